"""``gpt2gen plot``: the loss, learning rate, gradient norm and throughput as panels sharing the step axis, from
one log or several."""
from __future__ import annotations

import json

import pytest

from gpt2gen import cli
from gpt2gen import plot as P

pytest.importorskip("matplotlib")


def write_log(path, steps=20, scale=1.0, with_series=True):
    with open(path, "w") as fh:
        fh.write(json.dumps({"type": "config", "run": path.stem}) + "\n")
        for s in range(1, steps + 1):
            rec = {"type": "train", "step": s, "loss": scale * 5.0 / s}
            if with_series:
                rec |= {"lr": 1e-3 * min(1, s / 5), "norm": 2.0 / s + 0.1, "ms": 100.0 + s, "tok_s": 5000.0 - s}
            fh.write(json.dumps(rec) + "\n")
            if s % 5 == 0:
                fh.write(json.dumps({"type": "val", "step": s, "loss": scale * 5.5 / s}) + "\n")
    return path


def _height(png):
    import matplotlib.image
    return matplotlib.image.imread(png).shape[0]


def test_read_log_keeps_every_series(tmp_path):
    data = P.read_log(write_log(tmp_path / "a.jsonl"))
    assert len(data["train"]) == 20 and len(data["val"]) == 4
    assert data["lr"][0] == (1, 2e-4) and data["norm"][-1][0] == 20 and len(data["tok_s"]) == 20
    old = P.read_log(write_log(tmp_path / "old.jsonl", with_series=False))   # logs that record loss only
    assert old["lr"] == [] and len(old["train"]) == 20


def test_plot_draws_one_panel_per_metric_for_several_runs(tmp_path, capsys):
    a, b = write_log(tmp_path / "a.jsonl"), write_log(tmp_path / "b.jsonl", scale=0.8)
    assert cli.main(["plot", str(a), str(b), "-o", str(tmp_path / "all.png"), "--smooth", "0.5"]) == 0
    assert "wrote" in capsys.readouterr().out
    P.plot_logs([a], tmp_path / "loss.png", metrics="loss")
    P.plot_logs([a, b], tmp_path / "two.png", metrics="loss,lr")
    heights = [_height(tmp_path / n) for n in ("loss.png", "two.png", "all.png")]
    assert heights[0] < heights[1] < heights[2]      # 1, 2 and 4 panels
    old = write_log(tmp_path / "old.jsonl", with_series=False)
    P.plot_logs([old], tmp_path / "old.png")          # default: only what the log records (loss)
    assert _height(tmp_path / "old.png") == heights[0]


def test_plot_metric_errors(tmp_path, capsys):
    a = write_log(tmp_path / "a.jsonl")
    old = write_log(tmp_path / "old.jsonl", with_series=False)
    assert cli.main(["plot", str(a), "--metrics", "loss,speed", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "--metrics 'loss,speed': unknown metric 'speed'" in err and "choose from loss, lr, norm, tok_s, ms" in err
    assert cli.main(["plot", str(old), "--metrics", "lr", "-o", str(tmp_path / "x.png")]) == 2
    assert "no learning rate records in" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"type": "train", "step": 1, "loss": 1.0, "lr": "fast"}) + "\n")
    assert cli.main(["plot", str(bad), "-o", str(tmp_path / "x.png")]) == 2
    assert f"{bad}:1: a train record's lr must be a number" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
