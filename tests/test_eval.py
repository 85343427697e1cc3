"""Evaluation: ``gpt2gen eval`` (every token of a file, loss, perplexity, tokens), the trainer's --eval-only, and
the trainer keeping its final weights (--save-final, on by default for the demo's data) for sample/eval."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

import gpt2gen
from gpt2gen import checkpoint as ck
from gpt2gen import cli
from gpt2gen import data as D
from gpt2gen import evaluate as EV
from gpt2gen import train as TR

CFG = dict(V=101, maxT=16, L=1, NH=2, C=16)


@pytest.fixture
def tokens(tmp_path):
    rng = np.random.default_rng(0)
    seq = np.tile(np.arange(40, 72), 40)
    noise = rng.random(seq.size) < 0.1
    seq[noise] = rng.integers(40, 72, noise.sum())
    return D.write_tokens(tmp_path / "train.bin", seq[300:]), D.write_tokens(tmp_path / "val.bin", seq[:203])


def reference_loss(m, toks: np.ndarray) -> tuple[float, int]:
    """Mean next-token loss from the logits alone (numpy log-softmax), one window of T at a time."""
    T = int(m.config["T"])
    total, n = 0.0, 0
    for s in range(0, len(toks) - 1, T):
        x = np.asarray(toks[s:s + T], np.int32)[None]
        y = np.asarray(toks[s + 1:s + T + 1], np.int64)
        x = x[:, :len(y)]
        m.forward(x)
        z = m.logits[0].astype(np.float64)
        lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
        total += float(np.sum(lse - z[np.arange(len(y)), y]))
        n += len(y)
    return total / n, n


def test_windows_cover_every_target_once():
    toks = np.arange(100)
    xs, ys = zip(*EV.windows(toks, 3, 8))
    assert sum(x.size for x in xs) == 99
    assert np.array_equal(np.concatenate([y.ravel() for y in ys]), np.arange(1, 100))
    assert np.array_equal(np.concatenate([x.ravel() for x in xs]), np.arange(0, 99))
    assert [x.shape for x in xs][-2:] == [(3, 8), (1, 3)] and xs[-3].shape == (3, 8)


def test_evaluate_tokens_matches_the_logits(tmp_path, tokens):
    m = gpt2gen.build("model.yaml", seed=2, B=3, T=8, **CFG)
    toks = D.read_tokens(tokens[1])
    r = EV.evaluate_tokens(m, toks, 3, 8)
    want, n = reference_loss(m, toks)
    assert r["tokens"] == n == len(toks) - 1
    assert r["loss"] == pytest.approx(want, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)
    assert EV.evaluate_tokens(m, toks, 3, 8, steps=2)["tokens"] == 2 * 3 * 8


def test_eval_command(tmp_path, tokens, capsys):
    m = gpt2gen.build("model.yaml", seed=2, B=3, T=8, **CFG)
    state = ck.save_state(tmp_path / "run" / "state_000001.safetensors", m, step=1,
                          extra={"hparams": {"val_data": str(tokens[1]), "model": "model.yaml"}})
    assert cli.main(["eval", "--checkpoint", str(state), "--data", str(tokens[1]), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    want, n = reference_loss(m, D.read_tokens(tokens[1]))
    assert r["tokens"] == n and r["tokens_in_file"] == 203 and (r["B"], r["T"]) == (3, 8)
    assert r["loss"] == pytest.approx(want, rel=1e-5) and r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    # the text form; --data defaults to the run's --val-data; -b/-t choose another batch shape
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "run"), "-b", "2", "-t", "4"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("loss ") and "perplexity" in out.out and "202 tokens evaluated (of 203" in out.out
    assert "the run's --val-data" in out.err
    # an llm.c file of the same weights gives the same numbers at the same shape
    ck.save_llmc(m, tmp_path / "m.bin")
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "m.bin"), "--data", str(tokens[1]), "-b", "3", "-t", "8",
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(r["loss"], rel=1e-6)


def test_eval_errors(tmp_path, tokens, capsys):
    m = gpt2gen.build("model.yaml", seed=2, B=3, T=8, **CFG)
    state = ck.save_state(tmp_path / "run" / "state_000001.safetensors", m, step=1)
    ck.save_llmc(m, tmp_path / "m.bin")

    def err(*argv):
        assert cli.main(["eval", *argv]) == 2
        text = capsys.readouterr().err
        assert text.startswith("gpt2gen: error: ") and "Traceback" not in text, text
        return text
    assert "--data FILE is required (this training state records no validation file)" in err("--checkpoint", str(state))
    assert "this looks like an llm.c model file, not a token file" in err("--checkpoint", str(state), "--data",
                                                                          str(tmp_path / "m.bin"))
    big = D.write_tokens(tmp_path / "big.bin", [1, 2, 500])
    assert "token 500 (first bad one at position 2) is out of range for a vocabulary of 101" in \
        err("--checkpoint", str(state), "--data", str(big))
    assert "a token file not found" in err("--checkpoint", str(state), "--data", str(tmp_path / "nope.bin"))
    assert "is an llm.c token file (data), not a checkpoint" in err("--checkpoint", str(tokens[1]), "--data",
                                                                    str(tokens[1]))
    assert "-t/--seq-len 64: longer than the model's maxT = 16" in err("--checkpoint", str(state), "--data",
                                                                      str(tokens[1]), "-t", "64")
    with pytest.raises(SystemExit):
        cli.main(["eval", "--checkpoint", str(state), "-b", "0"])
    assert "argument -b/--batch-size: must be a whole number >= 1, got 0" in capsys.readouterr().err


def _train_args(tmp_path, tokens, *extra):
    return ["--train-data", str(tokens[0]), "--val-data", str(tokens[1]), "--log", str(tmp_path / "log.jsonl"),
            "--no-progress", "--set", "V=101", "--set", "L=1", "--set", "C=16", "--set", "NH=2", "--set", "maxT=16",
            "-b", "2", "-t", "8", "--steps", "3", "--sample-tokens", "0", "--val-every", "0", "--val-steps", "4",
            *extra]


def test_trainer_eval_only_repeats_the_runs_validation(tmp_path, tokens, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = TR.train(TR.build_parser().parse_args(_train_args(tmp_path, tokens, "--checkpoint-dir", "ck")), quiet=True)
    final = res.val_losses[-1][1]
    assert TR.main(["--eval-only", "--resume", "ck", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"eval loss {final:.4f}" in out and "4 batches of 2 x 8" in out
    r = EV.trainer_eval_only(TR.build_parser().parse_args(["--eval-only", "--resume", "ck"]), say=lambda m: None)
    assert r["loss"] == pytest.approx(final, rel=1e-6) and r["tokens"] == 4 * 2 * 8
    assert not (tmp_path / "out").exists()          # nothing was written
    assert TR.main(["--eval-only", "--no-progress", "--val-data", str(tokens[1])]) == 2
    assert "--eval-only needs the weights to evaluate" in capsys.readouterr().err


def test_trainer_keeps_its_final_weights(tmp_path, tokens, capsys, monkeypatch):
    """The demo (default data) saves its final state under out/RUN and says how to sample from it; so does
    any run with --save-final; other runs keep their old behaviour unless asked."""
    monkeypatch.chdir(tmp_path)
    assert TR.main(_train_args(tmp_path, tokens, "--run-name", "plain")) == 0
    assert not (tmp_path / "out").exists()
    capsys.readouterr()
    monkeypatch.setattr(TR, "DEFAULT_TRAIN", tokens[0])      # as if this were the demo's tiny Shakespeare
    assert TR.main(_train_args(tmp_path, tokens, "--run-name", "demo")) == 0
    out = capsys.readouterr().out
    state = tmp_path / "out" / "demo" / "state_000003.safetensors"
    assert state.is_file() and f"final weights: {state.relative_to(tmp_path)}" in out
    assert f"gpt2gen sample --checkpoint {state.relative_to(tmp_path)}" in out
    assert cli.main(["sample", "--checkpoint", "out", "--tokens", "40,41", "-n", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["tokens"]) == 3
    assert TR.main(_train_args(tmp_path, tokens, "--run-name", "nodemo", "--no-save-final")) == 0
    assert not (tmp_path / "out" / "nodemo").exists()
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert TR.main(_train_args(tmp_path, tokens, "--run-name", "kept", "--save-final")) == 0
    assert (tmp_path / "out" / "kept" / "state_000003.safetensors").is_file()
