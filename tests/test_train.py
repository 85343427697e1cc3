"""The trainer: schedule, sampling, end-to-end runs, logs, plots and exact resumes."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import gpt2gen
from gpt2gen import checkpoint as ck
from gpt2gen import data as D
from gpt2gen import train as TR
from gpt2gen.checks import UsageError


# ------------------------------------------------------------------------------ helpers

class Bigram:
    """A numpy bigram language model with the runtime Model's interface (for trainer logic tests)."""

    def __init__(self, V=256, B=4, T=16, **_):
        self.loss_scaling, self.loss_scale = False, 1.0     # as gpt2gen.Model without loss scaling
        self.config = {"V": V, "Vp": V, "maxT": T, "L": 1, "NH": 1, "C": V, "B": B, "T": T}
        self.arenas = {k: np.zeros(V * V, np.float32) for k in ("params", "grads", "m", "v")}
        self.params = {"w": self.arenas["params"].reshape(V, V)}
        self.grads = {"w": self.arenas["grads"].reshape(V, V)}
        self.spec = None

    def init_weights(self, seed):
        rng = np.random.default_rng(seed)
        self.arenas["params"][:] = rng.normal(0, 0.02, self.arenas["params"].size)

    def forward(self, idx, targets=None):
        V = self.config["V"]
        self._idx = np.asarray(idx) % V
        self.logits = self.params["w"][self._idx]
        self._targets = targets
        if targets is None:
            return None
        z = self.logits - self.logits.max(-1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(-1, keepdims=True)
        self._probs = p
        t = np.asarray(targets)
        return float(-np.mean(np.log(np.take_along_axis(p, t[..., None], -1))))

    def zero_grad(self):
        self.arenas["grads"][:] = 0

    def backward(self):
        B, T = self._idx.shape
        g = self._probs.copy()
        np.put_along_axis(g, self._targets[..., None],
                          np.take_along_axis(g, self._targets[..., None], -1) - 1, -1)
        g /= B * T
        np.add.at(self.grads["w"], self._idx.ravel(), g.reshape(B * T, -1).astype(np.float32))

    def update(self, lr, beta1, beta2, eps, weight_decay, step, grad_scale=1.0):
        p, g, m, v = (self.arenas[k] for k in ("params", "grads", "m", "v"))
        g = g * np.float32(grad_scale)
        m[:] = beta1 * m + (1 - beta1) * g
        v[:] = beta2 * v + (1 - beta2) * g * g
        mh = m / (1 - beta1 ** step)
        vh = v / (1 - beta2 ** step)
        p -= (lr * (mh / (np.sqrt(vh) + eps) + weight_decay * p)).astype(np.float32)
        return True


@pytest.fixture
def fake_build(monkeypatch):
    built = []

    def build(model="model.yaml", target="cpu", **overrides):
        m = Bigram(**overrides)
        built.append(m)
        return m
    monkeypatch.setattr(gpt2gen, "build", build, raising=False)
    return built


@pytest.fixture
def tokens(tmp_path):
    """Synthetic, learnable token files (a noisy cycle of small ids) -- no tokenizer needed."""
    rng = np.random.default_rng(0)
    seq = np.tile(np.arange(40, 72), 200)
    noise = rng.random(seq.size) < 0.1
    seq[noise] = rng.integers(40, 72, noise.sum())
    train = D.write_tokens(tmp_path / "train.bin", seq[1000:])
    val = D.write_tokens(tmp_path / "val.bin", seq[:1000])
    return train, val


def _args(tmp_path, train, val, *extra):
    return TR.build_parser().parse_args([
        "--train-data", str(train), "--val-data", str(val), "--log", str(tmp_path / "log.jsonl"),
        "--no-progress", *extra])


# ------------------------------------------------------------------------------ unit pieces

def test_lr_schedule():
    kw = dict(lr=1.0, warmup=10, steps=110, final_frac=0.1)
    assert TR.lr_at(1, **kw) == pytest.approx(0.1)
    assert TR.lr_at(10, **kw) == pytest.approx(1.0)
    assert TR.lr_at(60, **kw) == pytest.approx(0.55)
    assert TR.lr_at(110, **kw) == pytest.approx(0.1)
    lrs = [TR.lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert TR.lr_at(5, lr=1.0, warmup=0, steps=5, final_frac=0.0) == pytest.approx(0.0)


def test_sample_token():
    rng = np.random.default_rng(0)
    logits = np.array([0.0, 5.0, 1.0, 4.9])
    assert TR.sample_token(logits, rng, temperature=0) == 1
    assert TR.sample_token(logits, rng, top_k=1) == 1
    draws = [TR.sample_token(logits, rng, top_k=2) for _ in range(300)]
    assert set(draws) == {1, 3}
    a = [TR.sample_token(logits, np.random.default_rng(5)) for _ in range(3)]
    assert len(set(a)) == 1  # seeded -> reproducible


def test_grad_norm():
    g = np.random.default_rng(0).standard_normal(10_001).astype(np.float32)
    assert TR.grad_norm(g, chunk=1000) == pytest.approx(float(np.linalg.norm(g.astype(np.float64))))


def test_cli_parsing():
    import argparse
    p = argparse.ArgumentParser()
    TR.add_subcommand(p.add_subparsers(dest="command"))
    a = p.parse_args(["train", "--set", "L=6", "--set", "C=384", "-b", "2", "--no-shuffle"])
    assert a.overrides == [("L", 6), ("C", 384)] and a.batch_size == 2 and not a.shuffle
    assert a.func is TR._cmd_train
    with pytest.raises(SystemExit):
        p.parse_args(["train", "--set", "L"])


# ------------------------------------------------------------------------------ with a fake model

def test_trainer_fake_end_to_end(tmp_path, tokens, fake_build):
    train, val = tokens
    args = _args(tmp_path, train, val, "--steps", "30", "--lr", "0.05", "-b", "4", "-t", "16",
                 "--warmup-steps", "3", "--val-every", "10", "--sample-tokens", "8",
                 "--sample-every", "15", "--total-batch-size", "128")
    res = TR.train(args, quiet=True)
    assert res.step == 30 and len(res.train_losses) == 30
    assert res.train_losses[-1][1] < res.train_losses[0][1] - 1.0
    assert [s for s, _ in res.val_losses] == [0, 10, 20, 30]
    assert res.val_losses[-1][1] < res.val_losses[0][1]
    assert [s for s, _ in res.samples] == [15, 30]
    recs = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    kinds = [r["type"] for r in recs]
    assert kinds[0] == "config" and kinds[-1] == "done" and kinds.count("train") == 30
    assert recs[0]["grad_accum"] == 2
    assert all({"loss", "lr", "norm", "ms", "tok_s"} <= set(r) for r in recs if r["type"] == "train")
    from gpt2gen import plot
    png = plot.plot_logs([tmp_path / "log.jsonl"], tmp_path / "loss.png", smoothing=0.5)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_is_exact_fake(tmp_path, tokens, fake_build):
    train, val = tokens
    common = ["--steps", "12", "--lr", "0.05", "-b", "4", "-t", "16", "--warmup-steps", "2",
              "--val-every", "0", "--sample-tokens", "4", "--total-batch-size", "128",
              "--grad-clip", "0.5"]
    full = TR.train(_args(tmp_path, train, val, *common, "--log", str(tmp_path / "a.jsonl")),
                    quiet=True)
    part = TR.train(_args(tmp_path, train, val, *common, "--stop-after", "5", "--checkpoint-dir",
                          str(tmp_path / "ck"), "--log", str(tmp_path / "b.jsonl")), quiet=True)
    assert part.step == 5 and part.checkpoints[-1].name == "state_000005.safetensors"
    rest = TR.train(_args(tmp_path, train, val, *common, "--resume", str(tmp_path / "ck"),
                          "--log", str(tmp_path / "b.jsonl")), quiet=True)
    assert part.train_losses + rest.train_losses == full.train_losses
    assert rest.samples == full.samples
    assert fake_build[-1].arenas["params"].tobytes() == fake_build[0].arenas["params"].tobytes()


def test_resume_rejects_other_batch(tmp_path, tokens, fake_build):
    train, val = tokens
    TR.train(_args(tmp_path, train, val, "--steps", "4", "--stop-after", "2", "--val-every", "0",
                   "--sample-tokens", "0", "-t", "16", "--checkpoint-dir", str(tmp_path / "ck")),
             quiet=True)
    with pytest.raises(ValueError, match="B is 8 in the state, 4 here"):
        TR.train(_args(tmp_path, train, val, "--steps", "4", "-b", "4", "-t", "16",
                       "--resume", str(tmp_path / "ck")), quiet=True)


INTERRUPT_COMMON = ["--steps", "10", "--lr", "0.05", "-b", "4", "-t", "16", "--warmup-steps", "2",
                    "--val-every", "4", "--val-steps", "2", "--sample-tokens", "4", "--sample-every", "3",
                    "--total-batch-size", "128"]   # 2 micro-batches per step


def _interrupted_then_resumed(tmp_path, train, val, monkeypatch, method, nth, action):
    """Run INTERRUPT_COMMON with Bigram.<method>'s nth call doing ``action`` (raise or signal), then resume."""
    calls = [0]
    orig = getattr(Bigram, method)

    def hooked(self, *a, **k):
        if method != "forward" or (len(a) < 2 or a[1] is None):   # forward: only sampling (no targets)
            calls[0] += 1
            if calls[0] == nth:
                action()
        return orig(self, *a, **k)
    monkeypatch.setattr(Bigram, method, hooked)
    with pytest.raises(KeyboardInterrupt):
        TR.train(_args(tmp_path, train, val, *INTERRUPT_COMMON, "--checkpoint-dir", str(tmp_path / "ck"),
                       "--log", str(tmp_path / "b.jsonl")), quiet=True)
    monkeypatch.setattr(Bigram, method, orig)
    states = sorted(p.name for p in (tmp_path / "ck").iterdir())
    rest = TR.train(_args(tmp_path, train, val, *INTERRUPT_COMMON, "--resume", str(tmp_path / "ck"),
                          "--log", str(tmp_path / "b.jsonl")), quiet=True)
    return states, rest


def _raise():
    raise KeyboardInterrupt


def _check_matches_full(full, rest, first_step):
    assert rest.train_losses == [(s, x) for s, x in full.train_losses if s >= first_step]
    assert rest.samples == [(s, t) for s, t in full.samples if s >= first_step - 1][-len(rest.samples):]
    assert rest.val_losses[-1] == full.val_losses[-1]
    assert rest.model.arenas["params"].tobytes() == full.model.arenas["params"].tobytes()


def test_interrupt_mid_step_resumes_exactly(tmp_path, tokens, fake_build, monkeypatch):
    """Ctrl-C landing inside a step (after the loader advanced) saves the last completed step."""
    train, val = tokens
    full = TR.train(_args(tmp_path, train, val, *INTERRUPT_COMMON, "--log", str(tmp_path / "a.jsonl")), quiet=True)
    # backward #9 = the first micro-batch of step 5, its batch already drawn
    states, rest = _interrupted_then_resumed(tmp_path, train, val, monkeypatch, "backward", 9, _raise)
    assert states == ["state_000004.safetensors"]
    assert rest.train_losses[0][0] == 5
    _check_matches_full(full, rest, 5)
    assert [s for s, _ in rest.samples] == [6, 9, 10]


def test_interrupt_while_sampling_resumes_exactly(tmp_path, tokens, fake_build, monkeypatch):
    """Ctrl-C during step 6's sample (the update applied, the RNG part used) resumes by redoing the sample."""
    train, val = tokens
    full = TR.train(_args(tmp_path, train, val, *INTERRUPT_COMMON, "--log", str(tmp_path / "a.jsonl")), quiet=True)
    # sampling forwards: 4 per sample; #7 is the 3rd token of step 6's sample
    states, rest = _interrupted_then_resumed(tmp_path, train, val, monkeypatch, "forward", 7, _raise)
    assert states == ["state_000006.safetensors"]
    assert ck.read_state_metadata(tmp_path / "ck" / states[0])["extra"]["post_step_pending"]
    assert [s for s, _ in rest.samples] == [6, 9, 10]   # step 6's sample is redone, from the saved RNG
    _check_matches_full(full, rest, 7)


@pytest.fixture
def default_sigint():
    """Python's own SIGINT handler, as in a terminal. A process started in the background by a shell without job
    control inherits SIGINT ignored (POSIX), Python then installs no handler, and the trainer rightly leaves such
    a process's SIGINT alone: these tests would not test the trainer's handler."""
    import signal
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def test_first_ctrl_c_finishes_the_step(tmp_path, tokens, fake_build, monkeypatch, default_sigint):
    """A real SIGINT only sets a flag: the step (with its sample) completes, then the state is saved."""
    import os
    import signal
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is handled by someone else here")
    train, val = tokens
    full = TR.train(_args(tmp_path, train, val, *INTERRUPT_COMMON, "--log", str(tmp_path / "a.jsonl")), quiet=True)
    states, rest = _interrupted_then_resumed(tmp_path, train, val, monkeypatch, "backward", 11,
                                             lambda: os.kill(os.getpid(), signal.SIGINT))
    assert states == ["state_000006.safetensors"]   # step 6 (backward #11, #12) completed, sample included
    assert "post_step_pending" not in ck.read_state_metadata(tmp_path / "ck" / states[0])["extra"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # restored
    _check_matches_full(full, rest, 7)
    assert [s for s, _ in rest.samples] == [9, 10]


def test_resume_keeps_the_saved_settings(tmp_path, tokens, fake_build, capsys):
    """Options not repeated on resume come from the state; explicit different ones win with a warning."""
    train, val = tokens
    common = ["--steps", "12", "--lr", "0.05", "-b", "4", "-t", "16", "--warmup-steps", "3",
              "--lr-final-frac", "0.3", "--weight-decay", "0.01", "--beta1", "0.8", "--beta2", "0.9",
              "--eps", "1e-6", "--grad-clip", "0.5", "--seed", "7", "--val-every", "5", "--val-steps", "2",
              "--sample-tokens", "3", "--sample-every", "4", "--temperature", "1.3", "--top-k", "5",
              "--total-batch-size", "128", "--no-shuffle"]
    full = TR.train(_args(tmp_path, train, val, *common, "--log", str(tmp_path / "a.jsonl")), quiet=True)
    TR.train(_args(tmp_path, train, val, *common, "--stop-after", "5", "--checkpoint-dir", str(tmp_path / "ck"),
                   "--log", str(tmp_path / "b.jsonl")), quiet=True)
    saved = ck.read_state_metadata(tmp_path / "ck" / "state_000005.safetensors")["extra"]["hparams"]
    assert saved["lr"] == 0.05 and saved["beta2"] == 0.9 and saved["train_data"] == str(train)
    assert set(saved) == set(TR.HPARAMS)
    capsys.readouterr()
    args = TR.build_parser().parse_args(["--resume", str(tmp_path / "ck"), "--no-progress",
                                         "--log", str(tmp_path / "b.jsonl")])
    rest = TR.train(args, quiet=True)
    assert rest.train_losses == full.train_losses[5:] and rest.samples == full.samples[1:]
    assert rest.model.arenas["params"].tobytes() == full.model.arenas["params"].tobytes()
    assert "warning" not in capsys.readouterr().err
    assert args.lr == 2e-3   # the caller's Namespace is left alone
    # explicit values win; each one that differs from the saved run is warned about
    TR.train(TR.build_parser().parse_args([
        "--resume", str(tmp_path / "ck" / "state_000005.safetensors"), "--lr", "2e-3", "--steps", "14",
        "--top-k", "5", "--log", str(tmp_path / "c.jsonl"), "--no-progress"]), quiet=True)
    err = capsys.readouterr().err
    assert "--lr is 0.002, the resumed run used 0.05" in err and "--steps is 14" in err
    assert "schedule changes" in err and "--top-k" not in err


def test_export_llmc_is_checked_before_training(tmp_path, tokens, fake_build, capsys):
    train, val = tokens
    log = tmp_path / "l.jsonl"
    rc = TR.main(["--train-data", str(train), "--val-data", str(val), "--no-progress", "--steps", "50",
                  "-b", "4", "-t", "16", "--sample-tokens", "0", "--log", str(log),
                  "--export-llmc", str(tmp_path / "out.bin")])
    err = capsys.readouterr().err
    assert rc == 2 and "gpt2gen: error: --export-llmc" in err and "'wte'" in err
    assert not log.exists() or '"train"' not in log.read_text()
    assert not (tmp_path / "out.bin").exists()


def test_a_failed_export_keeps_the_weights_and_deletes_no_state(tmp_path, tokens, fake_build, capsys, monkeypatch):
    """--export-llmc failing at the end (a full disk) saves the trained weights as a state and names that
    file. The fallback save used to go into a directory nobody had checked and prune it with the default
    --keep-checkpoints 2: a second run with the same --run-name deleted the first run's states and its own,
    and still said the weights were kept."""
    import errno

    from safetensors.numpy import load_file
    train, val = tokens
    monkeypatch.chdir(tmp_path)
    base = [*_base(tmp_path, train, val), "--run-name", "shk"]
    assert TR.main([*base, "--steps", "6", "--checkpoint-every", "2", "--keep-checkpoints", "0"]) == 0
    first = {p: p.read_bytes() for p in sorted((tmp_path / "out" / "shk").iterdir())}
    assert [p.name for p in first] == [f"state_00000{i}.safetensors" for i in (2, 4, 6)]

    def full_disk(model, path, dtype="fp32"):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(ck, "check_llmc_compatible", lambda model: None)
    monkeypatch.setattr(ck, "save_llmc", full_disk)
    capsys.readouterr()
    # another run into the same out/shk is refused before it trains, and the first run's states stay
    assert TR.main([*base, "--steps", "1", "--export-llmc", "x.bin"]) == 2
    assert "out/shk: holds 3 training state(s) of another run" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in sorted((tmp_path / "out" / "shk").iterdir())} == first
    # a new run whose export fails: its weights are in the state file the message names
    assert TR.main([*_base(tmp_path, train, val), "--run-name", "new", "--steps", "1", "--export-llmc", "x.bin"]) == 2
    err = capsys.readouterr().err
    kept = Path("out") / "new" / "state_000001.safetensors"
    assert (f"--export-llmc x.bin: could not write it: x.bin: No space left on device; the trained weights are "
            f"kept in {kept}") in err, err
    assert "hint: free some disk space" in err and f"then export them later with --resume {kept} --export-llmc PATH" in err
    assert ck.verify_state(kept)["step"] == 1
    assert load_file(str(kept))["params"].tobytes() == fake_build[-1].arenas["params"].tobytes()
    # resuming a run whose states are already saved names its newest state, and saves no other
    assert TR.main(["--resume", "out/shk", "--no-progress", "--export-llmc", "x.bin"]) == 2
    err = capsys.readouterr().err
    assert f"the trained weights are kept in {Path('out/shk/state_000006.safetensors')}" in err, err
    assert {p: p.read_bytes() for p in sorted((tmp_path / "out" / "shk").iterdir())} == first


def test_resume_falls_back_past_a_corrupt_newest_state(tmp_path, tokens, fake_build, capsys):
    train, val = tokens
    base = ["--train-data", str(train), "--val-data", str(val), "--no-progress", "--steps", "6", "-b", "4",
            "-t", "16", "--sample-tokens", "0", "--val-every", "0", "--log", str(tmp_path / "l.jsonl")]
    assert TR.main([*base, "--checkpoint-every", "2", "--keep-checkpoints", "0",
                    "--checkpoint-dir", str(tmp_path / "ck")]) == 0
    states = sorted((tmp_path / "ck").glob("state_*.safetensors"))
    for st in states[1:]:   # the two newest: intact headers and metadata, flipped tensor bytes
        raw = bytearray(st.read_bytes())
        raw[-3] ^= 0x55
        st.write_bytes(bytes(raw))
    capsys.readouterr()
    res = TR.train(TR.build_parser().parse_args([*base, "--resume", str(tmp_path / "ck")]), quiet=True)
    assert [s for s, _ in res.train_losses] == [3, 4, 5, 6]
    err = capsys.readouterr().err
    for st in states[1:]:
        assert f"skipping training state {st}" in err
    assert err.count("checksum mismatch") == 2
    for st in states:
        st.write_bytes(b"junk")
    assert TR.main([*base, "--resume", str(tmp_path / "ck")]) == 2
    assert "none of the 3 training states" in capsys.readouterr().err


def test_cmd_train_reports_os_and_data_errors(tmp_path, tokens, fake_build, capsys, monkeypatch):
    import errno
    train, val = tokens
    base = ["--val-data", str(val), "--no-progress", "--steps", "2", "-b", "4", "-t", "16",
            "--sample-tokens", "0", "--log", str(tmp_path / "l.jsonl")]

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ck, "save_state", full_disk)
    assert TR.main(["--train-data", str(train), *base, "--checkpoint-dir", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err
    assert "gpt2gen: error: [Errno 28] No space left on device" in err and "Traceback" not in err
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\0" * 2000)
    assert TR.main(["--train-data", str(bad), *base]) == 2
    err = capsys.readouterr().err
    assert "gpt2gen: error:" in err and "bad magic" in err and "Traceback" not in err


# ------------------------------------------------------------------------------ bad input, before training

def _base(tmp_path, train, val):
    return ["--train-data", str(train), "--val-data", str(val), "--no-progress", "--steps", "3", "-b", "4",
            "-t", "16", "--sample-tokens", "0", "--val-every", "0", "--log", str(tmp_path / "l.jsonl")]


def _dir(tmp_path):
    (tmp_path / "adir").mkdir()
    return tmp_path / "adir"


def _notes(tmp_path):
    (tmp_path / "notes.txt").write_text("my notes\n")
    return tmp_path / "notes.txt"


def _other_run(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "state_000100.safetensors").write_text("another run's state")
    return tmp_path / "ck"


OUTPUT_CASES = {   # name: (make the bad path, the options, what the message says)
    "export is a dir": (_dir, lambda p, t: ["--export-llmc", p], "--export-llmc {p}: is an existing directory"),
    "log is a dir": (_dir, lambda p, t: ["--log", p], "--log {p}: is an existing directory"),
    "checkpoint dir is a file": (_notes, lambda p, t: ["--checkpoint-dir", p],
                                 "--checkpoint-dir {p}: is an existing file, not a directory"),
    "parent is a file": (_notes, lambda p, t: ["--export-llmc", p / "m.bin"],
                         "{p} is a file, so no directory can be created under it"),
    "log is another file": (_notes, lambda p, t: ["--log", p], "--log {p}: exists and is not a JSONL training log"),
    "export is a foreign file": (_notes, lambda p, t: ["--export-llmc", p], "exists and is not an llm.c model file"),
    "export is the training data": (lambda tmp: None, lambda p, t: ["--export-llmc", t],
                                    "is also the --train-data input: writing it would destroy it"),
    "export is the log": (lambda tmp: tmp / "x", lambda p, t: ["--export-llmc", p, "--log", p],
                          "--log and --export-llmc are the same file"),
    "another run's states": (_other_run, lambda p, t: ["--checkpoint-dir", p],
                             "--checkpoint-dir {p}: holds 1 training state(s) of another run"),
}


@pytest.mark.parametrize("case", sorted(OUTPUT_CASES))
def test_every_output_path_is_checked_before_training(tmp_path, tokens, fake_build, capsys, case):
    """A path the run would write only at its end (or at a checkpoint) is refused before anything starts,
    and nothing that is there is touched."""
    train, val = tokens
    make, options, needle = OUTPUT_CASES[case]
    bad = make(tmp_path)
    before = {f: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()}
    assert TR.main([*_base(tmp_path, train, val), *map(str, options(bad, train))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2gen: error: ") and needle.format(p=bad) in err and "hint:" in err, err
    assert fake_build == []                                    # no model was built, no step taken
    assert {f: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()} == before


def test_preparing_tiny_shakespeare_names_what_the_trainer_user_can_change(tmp_path, fake_build, capsys,
                                                                           monkeypatch):
    """Without --train-data the trainer prepares tiny Shakespeare in ./data: a problem there is found before
    anything starts and names the trainer's options, not prepro's --data-dir (which the trainer lacks)."""
    from gpt2gen import data as data_module
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").write_text("my data notes\n")   # a file where the data directory would go
    monkeypatch.setattr(data_module, "_fetch_url", lambda *a: pytest.fail("downloaded despite a bad output"))
    assert TR.main(["--no-progress", "--steps", "1", "--log", str(tmp_path / "l.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gpt2gen: error: the default --train-data {Path('data/tinyshakespeare')}: "
                          f"{tmp_path / 'data'} is a file, so no directory can be created under it"), err
    assert "hint: without --train-data the trainer prepares tiny Shakespeare in data/tinyshakespeare" in err
    assert "pass --train-data and --val-data" in err and "--data-dir DIR" in err and "(--data-dir" not in err
    assert (tmp_path / "data").read_text() == "my data notes\n" and fake_build == []
    assert not (tmp_path / "l.jsonl").exists()


def test_an_output_directory_that_cannot_be_written(tmp_path, tokens, fake_build, capsys, monkeypatch):
    import os
    train, val = tokens
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p).endswith("no-write") else
                        real_access(p, mode, **k))
    (tmp_path / "no-write").mkdir()
    assert TR.main([*_base(tmp_path, train, val), "--export-llmc", str(tmp_path / "no-write" / "m.bin")]) == 2
    assert f"cannot write in {tmp_path / 'no-write'}" in capsys.readouterr().err and fake_build == []


def test_set_cannot_change_the_batch_shape(capsys):
    for sym, option in (("B", "-b 16"), ("T", "-t 16")):
        with pytest.raises(SystemExit) as e:
            TR.build_parser().parse_args(["--set", f"{sym}=16"])
        assert e.value.code == 2
        assert "the trainer's batch shape is set with" in (err := capsys.readouterr().err) and \
            f"use {option} instead" in err


@pytest.mark.parametrize("option,value,expected", [
    ("--lr", "nan", "must be a finite number >= 0, got nan"),
    ("--lr", "-0.001", "must be a finite number >= 0, got -0.001"),
    ("--weight-decay", "inf", "must be a finite number >= 0, got inf"),
    ("--beta1", "1", "must be a finite number in [0, 1), got 1.0"),
    ("--beta2", "-0.5", "must be a finite number in [0, 1), got -0.5"),
    ("--eps", "0", "must be a finite number > 0, got 0.0"),
    ("--grad-clip", "nan", "must be a finite number >= 0, got nan"),
    ("--lr-final-frac", "1.5", "must be a finite number in [0, 1], got 1.5"),
    ("--temperature", "-1", "must be a finite number >= 0, got -1.0"),
    ("--steps", "0", "must be a whole number >= 1, got 0"),
    ("--seed", "-1", "must be a whole number >= 0, got -1"),
    ("--top-k", "2.5", "must be a whole number >= 0, got '2.5'"),
])
def test_numeric_options_are_range_checked_when_parsed(capsys, option, value, expected):
    with pytest.raises(SystemExit) as e:
        TR.build_parser().parse_args([option, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert option in err and expected in err, err


def test_resumed_settings_are_range_checked_too(tmp_path, tokens, fake_build, capsys):
    """A state's saved settings are held to the command line's ranges (a NaN lr in a state is refused)."""
    train, val = tokens
    base = _base(tmp_path, train, val)
    assert TR.main([*base, "--steps", "4", "--stop-after", "2", "--checkpoint-dir", str(tmp_path / "ck")]) == 0
    path = tmp_path / "ck" / "state_000002.safetensors"
    meta = ck.read_state_metadata(path)
    hparams = {**meta["extra"]["hparams"], "lr": float("nan")}
    ck.save_state(path, fake_build[-1], step=2, data=meta["data"], rng=meta["rng"],
                  extra={**meta["extra"], "hparams": hparams})
    capsys.readouterr()
    assert TR.main(["--resume", str(tmp_path / "ck"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--lr must be a finite number >= 0, got nan (the value saved in the resumed run's state)" in err


def test_nonfinite_starting_weights_are_refused_where_they_are_loaded(tmp_path, tokens, fake_build, capsys,
                                                                      monkeypatch):
    """NaN/inf weights or AdamW moments in a resumed state are refused by the loader, naming the element, before
    the first step; the trainer does not scan them again, and a fresh random init is not scanned at all."""
    train, val = tokens
    base = _base(tmp_path, train, val)
    assert TR.main([*base, "--steps", "4", "--stop-after", "2", "--checkpoint-dir", str(tmp_path / "ck")]) == 0
    path = tmp_path / "ck" / "state_000002.safetensors"
    meta = ck.read_state_metadata(path)
    model = fake_build[-1]
    model.arenas["v"][7] = np.inf
    ck.save_state(path, model, step=2, data=meta["data"], rng=meta["rng"], extra=meta["extra"])
    capsys.readouterr()
    log = (tmp_path / "l.jsonl").read_text()
    assert TR.main(["--resume", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2gen: error: ") and str(path) in err and "v[7]" in err and "inf" in err, err
    assert (tmp_path / "l.jsonl").read_text() == log and len(fake_build) == 1   # refused before the model is built

    def scanned(*a, **k):
        raise AssertionError("a fresh random init was scanned for NaN")
    monkeypatch.setattr(ck, "check_finite", scanned)
    assert TR.main([*base, "--log", str(tmp_path / "fresh.jsonl")]) == 0


def test_a_diverged_loss_stops_before_the_update_and_keeps_the_last_good_state(tmp_path, tokens, fake_build,
                                                                              capsys, monkeypatch):
    from safetensors.numpy import load_file
    train, val = tokens
    calls = [0]
    forward = Bigram.forward

    def nan_at_step_3(self, idx, targets=None):
        loss = forward(self, idx, targets)
        if targets is not None:
            calls[0] += 1
            return float("nan") if calls[0] == 3 else loss
        return loss
    monkeypatch.setattr(Bigram, "forward", nan_at_step_3)
    assert TR.main([*_base(tmp_path, train, val), "--val-data", "", "--steps", "5",
                    "--checkpoint-dir", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err
    assert "training diverged: the loss became nan" in err and "at step 3" in err
    assert f"the state at step 2 is saved in {tmp_path / 'ck'}" in err and "hint: resume with a lower --lr" in err
    saved = load_file(str(tmp_path / "ck" / "state_000002.safetensors"))
    assert saved["params"].tobytes() == fake_build[-1].arenas["params"].tobytes()   # step 3 was never applied
    assert np.isfinite(saved["params"]).all()


def test_resuming_a_finished_run_says_so(tmp_path, tokens, fake_build, capsys):
    train, val = tokens
    base = _base(tmp_path, train, val)
    assert TR.main([*base, "--checkpoint-dir", str(tmp_path / "ck")]) == 0
    capsys.readouterr()
    assert TR.main(["--resume", str(tmp_path / "ck"), "--no-progress"]) == 0
    assert (f"the run at {tmp_path / 'ck'} already finished step 3 of 3: nothing to train; pass --steps M "
            f"(M > 3) to train further") in capsys.readouterr().out
    assert TR.main(["--resume", str(tmp_path / "ck"), "--no-progress", "--steps", "2"]) == 0
    assert "is already at step 3, past --steps 2" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["state_000003.safetensors"]


def test_resume_refuses_options_it_cannot_honour(tmp_path, tokens, fake_build, capsys):
    train, val = tokens
    base = _base(tmp_path, train, val)
    assert TR.main([*base, "--steps", "4", "--stop-after", "2", "--checkpoint-dir", str(tmp_path / "ck")]) == 0
    capsys.readouterr()
    assert TR.main(["--resume", str(tmp_path / "ck"), "--no-progress", "--set", "L=6"]) == 2
    assert "--set L=6: the resumed run's model has L=1, and a resumed run keeps its shape" in \
        capsys.readouterr().err
    assert TR.main(["--resume", str(tmp_path / "ck"), "--no-progress", "--init-from", str(train)]) == 2
    assert "exclude each other" in capsys.readouterr().err
    # a symbol the state predates (saved before the model file had GPT-2's norm_eps) is refused, not ignored
    assert TR.main(["--resume", str(tmp_path / "ck"), "--no-progress", "--set", "norm_eps=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "--set norm_eps=0.001: the resumed run's state records no norm_eps" in err and \
        "hint: drop --set norm_eps=..., or start a new run" in err, err
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["state_000002.safetensors"]   # nothing trained


def test_a_second_ctrl_c_as_the_update_returns_saves_that_step(tmp_path, tokens, fake_build, monkeypatch,
                                                               default_sigint):
    """Two Ctrl-Cs landing as step 5's update returns, before the trainer has recorded that it was applied:
    the second used to stop the run there, saving step 4's loader and RNG state with step 5's weights (a
    resume then diverged from an uninterrupted run). The trainer's own SIGINT handler is called directly,
    as Python calls it between bytecodes, so the interrupt lands exactly there."""
    import signal
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # the trainer installs its own
    train, val = tokens
    full = TR.train(_args(tmp_path, train, val, *INTERRUPT_COMMON, "--log", str(tmp_path / "a.jsonl")), quiet=True)
    update = Bigram.update

    def update_then_ctrl_c_twice(self, *a, **k):
        update(self, *a, **k)
        if a[5] == 5:   # the step number
            handler = signal.getsignal(signal.SIGINT)
            handler(signal.SIGINT, None)   # the first: finish the step, then stop
            handler(signal.SIGINT, None)   # the second: stop now
    monkeypatch.setattr(Bigram, "update", update_then_ctrl_c_twice)
    with pytest.raises(KeyboardInterrupt):
        TR.train(_args(tmp_path, train, val, *INTERRUPT_COMMON, "--checkpoint-dir", str(tmp_path / "ck"),
                       "--log", str(tmp_path / "b.jsonl")), quiet=True)
    monkeypatch.setattr(Bigram, "update", update)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    states = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert states == ["state_000005.safetensors"]   # step 5's update, with step 5's loader state
    assert ck.read_state_metadata(tmp_path / "ck" / states[0])["extra"]["post_step_pending"]
    rest = TR.train(_args(tmp_path, train, val, *INTERRUPT_COMMON, "--resume", str(tmp_path / "ck"),
                          "--log", str(tmp_path / "b.jsonl")), quiet=True)
    _check_matches_full(full, rest, 6)


# A child process: the fake model, a save that waits for the parent (so signals land during it), and the
# step number printed after each update.
_CTRL_C_CHILD = r"""
import signal, sys, time
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)   # as in a terminal, even if started with SIGINT ignored
sys.path[:0] = sys.argv[1].split("|")   # the gpt2gen under test, and tests/
import gpt2gen
from gpt2gen import checkpoint as ck, train as TR
from test_train import Bigram

gpt2gen.build = lambda model="model.yaml", target="cpu", **kw: Bigram(**kw)
go, real_save, real_update = Path(sys.argv[2]), ck.save_state, Bigram.update

def save_state(*a, **k):
    print("SAVING", flush=True)
    while not go.exists():
        time.sleep(0.01)
    return real_save(*a, **k)

def update(self, *a, **k):
    real_update(self, *a, **k)
    print("STEP", a[5], flush=True)

ck.save_state, Bigram.update = save_state, update
sys.exit(TR.main(sys.argv[3:]))
"""


def test_more_ctrl_c_during_the_interrupt_save_still_save(tmp_path, tokens):
    """Real SIGINTs to a real process: Ctrl-C, then two more while the state is being written. The save
    completes (it used to be abandoned, saving nothing), the user is told, and the run exits with 130."""
    import os
    import queue
    import signal
    import subprocess
    import sys
    import threading
    from pathlib import Path

    train, val = tokens
    go = tmp_path / "go"
    proc = subprocess.Popen(
        [sys.executable, "-c", _CTRL_C_CHILD, f"{Path(gpt2gen.__file__).parent.parent}|{Path(__file__).parent}",
         str(go), *_base(tmp_path, train, val),
         "--steps", "1000000", "--checkpoint-dir", str(tmp_path / "ck")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True)
    reader.start()
    seen: list[str] = []
    import time
    deadline = time.monotonic() + 300          # guards against a hang (a child training on), not timing assertions

    def wait_for(needle: str) -> str:
        while True:
            try:
                line = lines.get(timeout=max(1.0, min(120.0, deadline - time.monotonic())))
            except queue.Empty:
                line = None
            if line is None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"no {needle!r} from the trainer; it wrote:\n{''.join(seen[-20:])}")
            seen.append(line)
            if needle in line:
                return line

    try:
        wait_for("STEP 2")
        os.kill(proc.pid, signal.SIGINT)          # the first: finish the step, save, stop
        wait_for("SAVING")
        os.kill(proc.pid, signal.SIGINT)          # more, while the state is being written
        os.kill(proc.pid, signal.SIGINT)
        wait_for("Ctrl-C is ignored until that is done")
        go.touch()
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=60)
    out = "".join(seen) + "".join(lines.get() for _ in range(lines.qsize()))
    saved = sorted((tmp_path / "ck").glob("state_*.safetensors"))
    assert len(saved) == 1, out
    step = ck.verify_state(saved[0])["step"]            # complete and valid
    assert f"interrupted: the state at step {step} is saved in {tmp_path / 'ck'}" in out, out
    assert not list((tmp_path / "ck").glob(".*tmp*"))   # no half-written temporary left


# ------------------------------------------------------------------------------ with the real compiler

TINY = dict(L=2, C=32, NH=2, maxT=16)  # B=2, T=16: the shape the checkpoint tests build too


@pytest.fixture
def real_tokens(tmp_path):
    rng = np.random.default_rng(1)
    words = rng.integers(0, 2000, 64)  # a small "vocabulary" of real GPT-2 ids, in a learnable order
    seq = words[np.tile(np.arange(64), 40)]
    return (D.write_tokens(tmp_path / "rt.bin", seq[600:]), D.write_tokens(tmp_path / "rv.bin", seq[:600]))


def test_trainer_real_end_to_end_and_resume(tmp_path, real_tokens):
    train, val = real_tokens
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    common = [*sets, "--steps", "8", "-b", "2", "-t", "16", "--lr", "3e-3", "--warmup-steps", "2",
              "--val-every", "4", "--val-steps", "2", "--sample-tokens", "6", "--total-batch-size", "64"]
    full = TR.train(_args(tmp_path, train, val, *common, "--log", str(tmp_path / "a.jsonl"),
                          "--export-llmc", str(tmp_path / "final.bin")), quiet=True)
    losses = [x for _, x in full.train_losses]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert full.val_losses[-1][1] < full.val_losses[0][1]
    assert len(full.samples) == 1 and isinstance(full.samples[0][1], str)
    part = TR.train(_args(tmp_path, train, val, *common, "--stop-after", "3", "--checkpoint-dir",
                          str(tmp_path / "ck"), "--log", str(tmp_path / "b.jsonl")), quiet=True)
    rest = TR.train(_args(tmp_path, train, val, *common, "--resume", str(tmp_path / "ck"),
                          "--log", str(tmp_path / "b.jsonl")), quiet=True)
    assert part.train_losses + rest.train_losses == full.train_losses
    assert rest.val_losses[-1] == full.val_losses[-1] and rest.samples == full.samples
    assert rest.model.arenas["params"].tobytes() == full.model.arenas["params"].tobytes()
    # the resumed run saved its final state; resuming that trains nothing, and can still export the weights
    again = TR.train(_args(tmp_path, train, val, "--resume", str(tmp_path / "ck"), "--export-llmc",
                           str(tmp_path / "again.bin"), "--log", str(tmp_path / "b.jsonl")), quiet=True)
    assert again.step == 8 and again.train_losses == []
    assert (tmp_path / "again.bin").read_bytes() == (tmp_path / "final.bin").read_bytes()
    # the exported llm.c file reloads into a fresh model with identical weights and logits
    m2 = gpt2gen.from_llmc(tmp_path / "final.bin", B=2, T=16)
    assert m2.arenas["params"].tobytes() == full.model.arenas["params"].tobytes()
    x = np.asarray(D.read_tokens(val)[:32], np.int32).reshape(2, 16)
    full.model.forward(x)
    l1 = full.model.logits.copy()
    m2.forward(x)
    assert np.array_equal(m2.logits, l1)


def test_main_and_resume_errors(tmp_path, tokens, fake_build, capsys):
    train, val = tokens
    base = ["--train-data", str(train), "--val-data", str(val), "--no-progress", "--steps", "6",
            "-b", "4", "-t", "16", "--sample-tokens", "0", "--val-every", "0",
            "--log", str(tmp_path / "l.jsonl")]
    assert TR.main([*base, "--checkpoint-every", "2", "--keep-checkpoints", "0",
                    "--checkpoint-dir", str(tmp_path / "ck")]) == 0
    states = sorted((tmp_path / "ck").glob("state_*.safetensors"))
    assert [p.name for p in states] == [f"state_00000{i}.safetensors" for i in (2, 4, 6)]
    # a corrupt newest state is skipped (with a warning) when resuming from the directory ...
    states[-1].write_bytes(states[-1].read_bytes()[:200])
    res = TR.train(TR.build_parser().parse_args([*base, "--resume", str(tmp_path / "ck")]), quiet=True)
    assert [s for s, _ in res.train_losses] == [5, 6]
    assert "skipping training state" in capsys.readouterr().err
    # ... and named explicitly it is a clear error (the resumed run kept --checkpoint-every 2 and
    # rewrote state 6, so corrupt it again)
    assert ck.verify_state(states[-1])["step"] == 6
    states[-1].write_bytes(states[-1].read_bytes()[:200])
    assert TR.main([*base, "--resume", str(states[-1])]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    assert TR.main([*base, "--total-batch-size", "100"]) == 2
    assert "--total-batch-size 100 is not a multiple of B*T = 4*16 = 64" in capsys.readouterr().err


def test_init_from_llmc_on_the_command_line(tmp_path, real_tokens):
    train, val = real_tokens
    m = gpt2gen.build(model="model.yaml", **TINY, B=2, T=16)
    m.init_weights(42)
    ck.save_llmc(m, tmp_path / "init.bin")
    args = _args(tmp_path, train, val, "--init-from", str(tmp_path / "init.bin"), "--steps", "2",
                 "-b", "2", "-t", "16", "--val-every", "0", "--val-steps", "1", "--sample-tokens", "0",
                 "--lr", "0")  # lr 0: the weights stay those of the file
    res = TR.train(args, quiet=True)
    assert res.model.config["C"] == 32 and res.model.config["L"] == 2
    assert np.array_equal(res.model.arenas["params"], m.arenas["params"])  # (a zero may turn -0.0)
    x, y = D.DataLoader(val, 2, 16).next_batch()
    assert res.val_losses[-1][1] == pytest.approx(m.forward(x, y), rel=1e-6)


@pytest.mark.parametrize("arch", ["llama2", "mistral", "gemma"])
def test_trainer_runs_other_architectures(tmp_path, real_tokens, arch):
    """--model models/<arch>.yaml trains on GPT-2-tokenized data (the vocabulary grows to GPT-2's)."""
    train, val = real_tokens
    sets = [x for k, v in {**TINY, "NKV": 1}.items() for x in ("--set", f"{k}={v}")]
    res = TR.train(_args(tmp_path, train, val, "--model", f"models/{arch}.yaml", *sets, "--steps", "6", "-b", "2",
                         "-t", "16", "--lr", "3e-3", "--warmup-steps", "1", "--val-every", "6", "--val-steps", "1",
                         "--sample-tokens", "4"), quiet=True)
    losses = [x for _, x in res.train_losses]
    assert res.model.config["V"] == 50257 and res.model.spec.name == arch
    assert res.model.config["pad_id"] == -1       # the file's padding id is not a GPT-2 token
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert len(res.samples) == 1


def test_a_model_that_runs_but_cannot_train_here_is_refused_before_the_first_step(tmp_path, real_tokens, monkeypatch):
    """The build checks what running needs (params, acts); the trainer checks all six arenas before step 1."""
    train, val = real_tokens
    sizes = gpt2gen.builder.generate("model.yaml", "cpu", **TINY, B=2, T=16)[0].layout
    run = 4 * (sizes.params.size + sizes.acts.size)
    monkeypatch.setenv("GPT2GEN_MAX_MEMORY", str(run + 4 * sizes.params.size))   # runs; cannot hold grads, m, v
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    with pytest.raises(gpt2gen.builder.MemoryLimitError, match="arenas"):
        TR.train(_args(tmp_path, train, val, *sets, "--steps", "2", "-b", "2", "-t", "16",
                       "--log", str(tmp_path / "a.jsonl")), quiet=True)
    assert not (tmp_path / "a.jsonl").exists() or (tmp_path / "a.jsonl").read_text() == ""


def test_the_trainer_trains_and_resumes_in_bf16_and_unfused(tmp_path, real_tokens):
    """--precision bf16 trains (its state records the precision; resuming keeps it, exactly, and refuses
    another); --fuse none gives the same losses as the fused default, in fp32, bit for bit."""
    train, val = real_tokens
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    common = [*sets, "--steps", "6", "-b", "2", "-t", "16", "--lr", "3e-3", "--warmup-steps", "2",
              "--val-every", "0", "--sample-tokens", "0"]
    full = TR.train(_args(tmp_path, train, val, *common, "--precision", "bf16"), quiet=True)
    assert full.model.precision == "bf16" and full.train_losses[-1][1] < full.train_losses[0][1]
    part = TR.train(_args(tmp_path, train, val, *common, "--precision", "bf16", "--stop-after", "3",
                          "--checkpoint-dir", str(tmp_path / "ck")), quiet=True)
    rest = TR.train(_args(tmp_path, train, val, *common, "--resume", str(tmp_path / "ck")), quiet=True)
    assert rest.model.precision == "bf16" and part.train_losses + rest.train_losses == full.train_losses
    with pytest.raises(UsageError, match=r"--precision fp32: the run being resumed trains in bf16"):
        TR.train(_args(tmp_path, train, val, *common, "--precision", "fp32", "--resume", str(tmp_path / "ck")),
                 quiet=True)
    fused = TR.train(_args(tmp_path, train, val, *common), quiet=True)
    plain = TR.train(_args(tmp_path, train, val, *common, "--fuse", "none"), quiet=True)
    assert plain.model.program.fused == [] and fused.model.program.fused
    assert plain.train_losses == fused.train_losses
