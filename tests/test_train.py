"""The trainer: schedule, sampling, end-to-end runs, logs, plots and exact resumes."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

import gpt2gen
from gpt2gen import checkpoint as ck
from gpt2gen import data as D
from gpt2gen import train as TR


# ------------------------------------------------------------------------------ helpers

class Bigram:
    """A numpy bigram language model with the runtime Model's interface (for trainer logic tests)."""

    def __init__(self, V=256, B=4, T=16, **_):
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


def test_first_ctrl_c_finishes_the_step(tmp_path, tokens, fake_build, monkeypatch):
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
    assert rc == 1 and "gpt2gen: error: --export-llmc" in err and "'wte'" in err
    assert not log.exists() or '"train"' not in log.read_text()
    assert not (tmp_path / "out.bin").exists()


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
    assert TR.main([*base, "--resume", str(tmp_path / "ck")]) == 1
    assert "none of the 3 training states" in capsys.readouterr().err


def test_cmd_train_reports_os_and_data_errors(tmp_path, tokens, fake_build, capsys, monkeypatch):
    import errno
    train, val = tokens
    base = ["--val-data", str(val), "--no-progress", "--steps", "2", "-b", "4", "-t", "16",
            "--sample-tokens", "0", "--log", str(tmp_path / "l.jsonl")]

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ck, "save_state", full_disk)
    assert TR.main(["--train-data", str(train), *base, "--checkpoint-dir", str(tmp_path / "ck")]) == 1
    err = capsys.readouterr().err
    assert "gpt2gen: error: [Errno 28] No space left on device" in err and "Traceback" not in err
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\0" * 2000)
    assert TR.main(["--train-data", str(bad), *base]) == 1
    err = capsys.readouterr().err
    assert "gpt2gen: error:" in err and "bad magic" in err and "Traceback" not in err


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
    assert TR.main([*base, "--resume", str(states[-1])]) == 1
    assert "truncated or corrupt" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="multiple of B\\*T"):
        TR.main([*base, "--total-batch-size", "100"])


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
