"""Data-parallel training (gpt2gen.distributed): 2 processes over loopback gloo on this machine.

What is compared, and to what tolerance (derived, not tuned):

* 2 ranks x B against 1 process x 2B and 1 process x B with gradient accumulation 2: the same windows in
  every step (ShardedLoader), so the runs differ only in the order in which fp32 sums are taken (the
  batch rows inside the C backward, then the ranks in the all-reduce) and, with ZeRO-1, in the AdamW
  step being torch's elementwise ops instead of the generated C kernel (the same formula and float32
  constants: a few ulps per element).
  - losses: a mean over B*T tokens of fp32 terms; reordering moves it by ~n * 2^-24 relative, so
    rtol = 1e-5 (n = 128 terms).
  - m and v: weighted means of the gradients (of their squares); a reordered fp32 sum of n terms is off
    by at most ~n * 2^-24 * sum|terms| <= 1e-4 * max|g| for these sizes, the AdamWErrorBound default,
    so atol = 1e-4 * max|m| and 2e-4 * max|v| (v is quadratic). A missed 1/world scale would be 2x.
  - parameters: an Adam step is lr_t * m/(sqrt(v) + eps), whose size is at most ~lr_t. Where the
    gradient is far above its rounding error, reordering changes the step by a relative ~1e-6; where it
    is at rounding level Adam turns the noise into a step of any size up to lr_t. Such elements are
    rare; the bound allows every step of every element to differ by 1% of lr_t: atol = 0.01 * sum_t lr_t
    (a wrong window or scale moves weights by O(lr_t) per step, 100x that).
* a resumed 2-rank run against the uninterrupted one: bit for bit (same collectives, same order).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpt2gen import checkpoint as ck
from gpt2gen import data as D
from gpt2gen import distributed as dd
from gpt2gen import train as TR
from gpt2gen.checks import UsageError
from helpers import assert_close, scaled_atol

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(L=2, C=32, NH=2, maxT=16, V=2048)   # the tokens below are < 2000
STEPS, LR, WARMUP = 6, 3e-3, 2
DEAD_TIMEOUT_S = 8      # --dist-timeout of the failure tests; a rank must exit within this (+ start-up slack)
RUN_TIMEOUT_S = 180


def _common(train, val):
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    return [*sets, "-t", "16", "--steps", str(STEPS), "--lr", str(LR), "--warmup-steps", str(WARMUP),
            "--val-every", "3", "--val-steps", "2", "--sample-tokens", "0", "--no-progress",
            "--train-data", str(train), "--val-data", str(val)]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in dd.LAUNCH_ENV:
        env.pop(k, None)
    return env


def torchrun(args, cwd, nproc=2, timeout=RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=N -m gpt2gen.train ARGS`` (a free port is picked by torchrun)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "gpt2gen.train", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(args, cwd, world=2) -> list[subprocess.Popen]:
    """The ranks started by hand (as torchrun would, but with no agent to kill the others when one dies)."""
    port = _free_port()
    procs = []
    for r in range(world):
        env = dict(_env(), RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "gpt2gen.train", *map(str, args)], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def run_ranks(args, cwd, world=2, timeout=RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    """:func:`launch_ranks` and wait; rank 0's output, the worst exit status."""
    procs = launch_ranks(args, cwd, world)
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    rc = max((p.returncode for p in procs), key=abs)
    return subprocess.CompletedProcess(procs[0].args, rc, outs[0][0], "\n".join(o[1] for o in outs))


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _log(path: Path) -> tuple[list[float], list[float], list[dict]]:
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    return ([r["loss"] for r in recs if r["type"] == "train"], [r["loss"] for r in recs if r["type"] == "val"],
            [r for r in recs if r["type"] == "distributed"])


def _state(directory: Path, step: int = STEPS) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    return load_file(str(directory / f"state_{step:06d}.safetensors"))


def _schedule_sum() -> float:
    return sum(TR.lr_at(s, lr=LR, warmup=WARMUP, steps=STEPS, final_frac=0.1) for s in range(1, STEPS + 1))


def _compare(name: str, got: dict, want: dict) -> None:
    assert_close(f"{name}: parameters", got["params"], want["params"], rtol=0, atol=0.01 * _schedule_sum())
    assert_close(f"{name}: AdamW m", got["m"], want["m"], rtol=0, atol=scaled_atol(want["m"], 1e-4))
    assert_close(f"{name}: AdamW v", got["v"], want["v"], rtol=0, atol=scaled_atol(want["v"], 2e-4))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process references (in this process), a 2-rank run without and one with ZeRO-1, and the
    ZeRO-1 one resumed from its checkpoint at step 3."""
    tmp = tmp_path_factory.mktemp("dp")
    rng = np.random.default_rng(1)
    words = rng.integers(0, 2000, 64)
    seq = words[np.tile(np.arange(64), 40)]
    train, val = D.write_tokens(tmp / "rt.bin", seq[600:]), D.write_tokens(tmp / "rv.bin", seq[:600])
    common = _common(train, val)
    for name, extra in (("1x2B", ["-b", "4"]), ("1xBx2", ["-b", "2", "--total-batch-size", "64"])):
        args = TR.build_parser().parse_args([*common, *extra, "--log", str(tmp / f"{name}.jsonl"),
                                             "--checkpoint-dir", str(tmp / name)])
        TR.train(args, quiet=True)
    # the plain run through torchrun, as users launch it; the others by hand (no agent: a second faster)
    for name, launch, extra in (("2xB", torchrun, []), ("2xB-zero", run_ranks, ["--zero", "1", "--checkpoint-every",
                                                                               "3", "--keep-checkpoints", "0"])):
        _ok(launch([*common, "-b", "2", *extra, "--log-file", tmp / f"{name}.jsonl", "--checkpoint-dir",
                    tmp / name], cwd=tmp))
    (tmp / "resumed").mkdir()
    shutil.copy(tmp / "2xB-zero" / "state_000003.safetensors", tmp / "resumed")
    _ok(run_ranks(["--resume", tmp / "resumed", "--checkpoint-dir", tmp / "resumed", "--zero", "1", "--no-progress",
                   "--log-file", tmp / "resumed.jsonl"], cwd=tmp))
    return {"tmp": tmp, "common": common}


# ------------------------------------------------------------------------------ the same training

def test_two_ranks_train_like_one_process_at_twice_the_batch(runs):
    tmp = runs["tmp"]
    big_loss, big_val, _ = _log(tmp / "1x2B.jsonl")
    acc_loss, _, _ = _log(tmp / "1xBx2.jsonl")
    big, acc = _state(tmp / "1x2B"), _state(tmp / "1xBx2")
    for name in ("2xB", "2xB-zero"):
        loss, val, info = _log(tmp / f"{name}.jsonl")
        assert len(loss) == STEPS and len(val) == 3
        assert_close(f"{name}: train losses vs 1 process x 2B", loss, big_loss, rtol=1e-5, atol=0)
        assert_close(f"{name}: validation losses vs 1 process x 2B", val, big_val, rtol=1e-5, atol=0)
        assert_close(f"{name}: train losses vs 1 process x B x 2 accumulated", loss, acc_loss, rtol=1e-5, atol=0)
        got = _state(tmp / name)
        _compare(f"{name} vs 1 process x 2B", got, big)
        _compare(f"{name} vs 1 process x B x 2 accumulated", got, acc)
        meta = ck.read_state_metadata(tmp / name / f"state_{STEPS:06d}.safetensors")
        assert meta["extra"]["world_size"] == 2 and meta["data"]["train"]["world_size"] == 2
        assert info and info[0]["world_size"] == 2 and info[0]["backend"] == "gloo"


def test_zero1_halves_the_optimizer_memory_of_each_rank(runs):
    info = _log(runs["tmp"] / "2xB-zero.jsonl")[2][0]
    n = _state(runs["tmp"] / "2xB-zero")["m"].size
    assert info["zero"] == 1 and len(info["ranks"]) == 2
    for r in info["ranks"]:
        assert r["optimizer_bytes"] <= 2 * 4 * (n // 2 + dd.ALIGN)          # m and v of half the arena
        assert r["unused_full_mv_resident_bytes"] <= 4 * 4096             # the full m, v: given back
    plain = _log(runs["tmp"] / "2xB.jsonl")[2][0]
    assert all(r["optimizer_bytes"] == 2 * 4 * n for r in plain["ranks"])


def test_resuming_a_two_rank_run_reproduces_it_exactly(runs):
    tmp = runs["tmp"]
    whole_loss, whole_val, _ = _log(tmp / "2xB-zero.jsonl")
    loss, val, _ = _log(tmp / "resumed.jsonl")
    assert loss == whole_loss[3:] and val == whole_val[-1:]
    got, want = _state(tmp / "resumed"), _state(tmp / "2xB-zero")
    for k in ("params", "m", "v"):
        assert np.array_equal(got[k], want[k]), k
    assert not np.array_equal(_state(tmp / "2xB-zero", 3)["params"], want["params"])


def test_resume_with_another_world_size_is_refused(runs, capsys):
    state = runs["tmp"] / "2xB" / f"state_{STEPS:06d}.safetensors"
    assert TR.main(["--resume", str(state), "--no-progress", "--steps", str(STEPS + 2)]) == 2
    err = capsys.readouterr().err
    assert "saved by a run over 2 process(es), this run has 1" in err, err
    assert "torchrun --nproc_per_node=2 -m gpt2gen.train --resume" in err, err


# ------------------------------------------------------------------------------ failures

def _wait_for_state(directory: Path, procs, limit_s=120.0) -> Path:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        states = sorted(directory.glob("state_*.safetensors"))
        if states:
            return states[-1]
        if any(p.poll() is not None for p in procs):
            outs = [p.communicate() for p in procs]
            pytest.fail(f"a rank exited before the first checkpoint: {[p.returncode for p in procs]} {outs}")
        time.sleep(0.05)
    pytest.fail("no checkpoint appeared")


def _failure_run(runs, name):
    tmp = runs["tmp"]
    args = [*runs["common"], "-b", "2", "--steps", "100000", "--checkpoint-every", "2", "--keep-checkpoints", "2",
            "--val-every", "0", "--val-steps", "1", "--dist-timeout", DEAD_TIMEOUT_S, "--log-file",
            tmp / f"{name}.jsonl", "--checkpoint-dir", tmp / name]
    procs = launch_ranks(args, cwd=tmp)
    _wait_for_state(tmp / name, procs)
    time.sleep(0.2)                               # well into the following steps
    return procs


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_dead_or_hung_rank_ends_the_run_within_the_timeout(runs, how):
    tmp, name = runs["tmp"], f"fail-{how}"
    procs = _failure_run(runs, name)
    try:
        os.kill(procs[1].pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            _, err = procs[0].communicate(timeout=DEAD_TIMEOUT_S + 20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still running {DEAD_TIMEOUT_S + 20} s after rank 1 was {how}")
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[0].returncode == 2, err
    assert waited < DEAD_TIMEOUT_S + 5, f"rank 0 took {waited:.1f} s to give up"
    assert "gpt2gen: error: rank 0 of 2:" in err and "failed" in err, err
    assert f"the newest training state in {tmp / name} is intact" in err, err
    assert "hint: resume from the newest state with the same number of processes (2)" in err, err
    assert "Traceback" not in err, err
    # the newest checkpoint is complete and loads (no half-written temporary is left); resuming a 2-rank
    # state is what test_resuming_a_two_rank_run_reproduces_it_exactly does
    assert not list((tmp / name).glob(".*tmp*")) and not list((tmp / name).glob("*.tmp"))
    newest, meta = TR._find_state(tmp / name, lambda msg: pytest.fail(msg))
    assert meta["step"] >= 2 and meta["extra"]["world_size"] == 2
    import gpt2gen
    ck.load_state(newest, gpt2gen.build(B=2, T=16, seed=None, **TINY))


# ------------------------------------------------------------------------------ pieces

def test_sharded_loader_splits_each_global_batch_and_never_repeats_a_window(tmp_path):
    tokens = D.write_tokens(tmp_path / "t.bin", np.arange(16 * 50 + 1) % 1000)
    for shuffle in (False, True):
        one = D.DataLoader(tokens, 6, 16, shuffle=shuffle, seed=3)
        ranks = [dd.ShardedLoader(tokens, 2, 16, rank=r, world=3, shuffle=shuffle, seed=3) for r in range(3)]
        assert len(ranks[0]) == len(one)
        for _ in range(len(one) + 2):           # past an epoch's end too
            x, y = one.next_batch()
            parts = [ld.next_batch() for ld in ranks]
            assert np.array_equal(np.concatenate([p[0] for p in parts]), x)
            assert np.array_equal(np.concatenate([p[1] for p in parts]), y)
        seen = set()
        for ld in ranks:                        # one epoch: every window at most once over all ranks
            ld.reset()
            for _ in range(len(ld)):
                for row in ld.next_batch()[0]:
                    key = int(row[0])
                    assert key not in seen
                    seen.add(key)
        state = ranks[1].state_dict()
        assert state["world_size"] == 3 and state["B"] == 6
        with pytest.raises(D.DataError, match="over 3 process"):
            dd.ShardedLoader(tokens, 3, 16, rank=0, world=2).load_state_dict(state)


def test_shards_and_buckets_cover_the_arena():
    for n, world, cap in ((1000, 2, 64), (1008, 3, 100), (16, 4, 16), (123456, 5, 7000)):
        b = dd.shard_bounds(n, world)
        assert b[0] == 0 and b[-1] == n and b == sorted(b)
        assert all(x % dd.ALIGN == 0 for x in b[:-1])
        bk = dd.buckets(n, cap, b)
        assert bk[0][0] == 0 and bk[-1][1] == n
        assert all(hi0 == lo1 for (_, hi0), (lo1, _) in zip(bk, bk[1:]))
        assert all(hi - lo <= max(dd.ALIGN, cap // dd.ALIGN * dd.ALIGN) for lo, hi in bk)
        assert not any(lo < c < hi for lo, hi in bk for c in b)


def test_launch_environment_errors():
    assert dd.launch_from_env({}) is None
    assert dd.launch_from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    full = dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    assert dd.launch_from_env(full) == dd.Launch(1, 2, 1)
    with pytest.raises(UsageError, match=r"incomplete: RANK=1, WORLD_SIZE=2 are set but LOCAL_RANK, MASTER_ADDR, "
                                         r"MASTER_PORT are not") as e:
        dd.launch_from_env({"RANK": "1", "WORLD_SIZE": "2"})
    assert "torchrun --nproc_per_node=N -m gpt2gen.train" in e.value.hint
    with pytest.raises(UsageError, match="0 <= RANK < WORLD_SIZE"):
        dd.launch_from_env({**full, "RANK": "2"})
    with pytest.raises(UsageError, match="WORLD_SIZE='two'"):
        dd.launch_from_env({**full, "WORLD_SIZE": "two"})


def test_nccl_is_refused_for_host_arenas():
    args = TR.build_parser().parse_args(["--dist-backend", "nccl"])
    with pytest.raises(UsageError, match="NCCL reduces GPU memory only"):
        dd.DataParallel(dd.Launch(0, 2, 0), args)


def test_total_batch_size_counts_every_rank():
    args = TR.build_parser().parse_args(["-b", "2", "-t", "16", "--total-batch-size", "128"])
    assert TR._check_args(args, world=2) == 2 and TR._check_args(args, world=1) == 4
    args = TR.build_parser().parse_args(["-b", "2", "-t", "16", "--total-batch-size", "96"])
    with pytest.raises(UsageError, match=r"not a multiple of processes\*B\*T = 4\*2\*16 = 128"):
        TR._check_args(args, world=4)


@pytest.mark.parametrize("fused", [True, False])
def test_sharded_adamw_is_the_generated_update(fused):
    """The ZeRO-1 update of two shards equals the generated AdamW kernel (per-tensor decay, padding kept),
    through torch's fused kernel and through plain elementwise ops."""
    import gpt2gen
    if fused and not hasattr(torch, "_fused_adamw_"):
        pytest.skip("this PyTorch has no fused AdamW")
    model = gpt2gen.build(B=2, T=16, **TINY)
    a = model.arenas
    rng = np.random.default_rng(0)
    for k in ("grads", "m", "v"):
        a[k][...] = 0
        for s in model.layout.params.slots:
            a[k][s.offset:s.offset + s.numel] = rng.standard_normal(s.numel) * (0.01 if k != "v" else 1e-4)
    a["v"][...] = np.abs(a["v"])
    start = {k: a[k].copy() for k in ("params", "grads", "m", "v")}
    hp = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=3, grad_scale=0.7)
    model.update(**hp)
    want = {k: a[k].copy() for k in ("params", "m", "v")}
    p, g = start["params"].copy(), start["grads"].copy()
    n = p.size
    bounds = dd.shard_bounds(n, 2)
    pt, gt = torch.from_numpy(p), torch.from_numpy(g)
    for r in range(2):
        opt = dd.ZeroAdamW(model.layout.params.slots, bounds[r], bounds[r + 1], fused=fused)
        opt.m.copy_(torch.from_numpy(start["m"][bounds[r]:bounds[r + 1]]))
        opt.v.copy_(torch.from_numpy(start["v"][bounds[r]:bounds[r + 1]]))
        for lo, hi in dd.buckets(n, 5000, bounds):
            if bounds[r] <= lo < bounds[r + 1]:
                opt.step(pt, gt, lo, hi, **hp)
        # m = b1*m + (1-b1)*g: a few ulps of the larger term (the C compiler may fuse it into an FMA, which
        # rounds once); likewise v
        sl = slice(bounds[r], bounds[r + 1])
        gs = np.abs(start["grads"][sl].astype(np.float64) * hp["grad_scale"])
        for k, mine, terms in (("m", opt.m, np.abs(start["m"][sl]) + gs), ("v", opt.v, start["v"][sl] + gs * gs)):
            assert_close(f"shard {r} {k}", mine.numpy(), want[k][sl], rtol=0, atol=4 * 2.0**-24 * terms)
    # one step from the same state: the same float32 formula, so a few ulps of the weight, plus a few ulps
    # of the step where division by sqrt(v) + eps rounds differently
    assert_close("params after one sharded AdamW step", p, want["params"], rtol=4 * 2.0**-24, atol=1e-3 * 3e-3)
    assert any(not s.decay for s in model.layout.params.slots) and any(s.decay for s in model.layout.params.slots)


def test_release_pages_gives_the_memory_back():
    from gpt2gen.runtime import _resident_bytes
    a = np.zeros(1 << 22, np.float32)
    a[...] = 1.0
    assert _resident_bytes(a) > a.nbytes // 2
    dd.release_pages(a)
    assert _resident_bytes(a) <= 2 * 4096 and not a.any()


def test_layout_reports_the_memory_per_rank(capsys):
    from gpt2gen import cli
    assert cli.main(["layout", "--set", "L=2", "--set", "C=32", "--set", "NH=2", "--zero", "1", "--world", "2"]) == 0
    out = capsys.readouterr().out
    assert "data-parallel training over 2 rank(s), ZeRO stage 1" in out, out
    assert "2.00x less than without ZeRO" in out, out
    assert cli.main(["layout", "--set", "L=2", "--set", "C=32", "--set", "NH=2", "--world", "2"]) == 0
    assert "with --zero 1 over 2 ranks" in capsys.readouterr().out


def test_sharded_adamw_with_master_weights_updates_them_and_rounds_the_parameters():
    """Mixed precision: the update runs on the shard's fp32 master weights; the 16-bit parameters are their
    rounding. With gradients that bf16 holds exactly, the master weights follow the fp32 update bit for bit."""
    from types import SimpleNamespace
    slots = [SimpleNamespace(offset=0, numel=1000, decay=True), SimpleNamespace(offset=1008, numel=500, decay=False)]
    rng = np.random.default_rng(2)
    n = 1520
    w0 = torch.from_numpy(rng.standard_normal(n).astype(np.float32) * 0.02)
    g16 = torch.from_numpy(rng.standard_normal(n).astype(np.float32) * 1e-2).to(torch.bfloat16)
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=1, grad_scale=0.5)
    plain = dd.ZeroAdamW(slots, 0, n, fused=False)   # the master path is elementwise: compare like with like
    p32 = w0.clone()
    plain.step(p32, g16.float(), 0, n, **hp)
    mixed = dd.ZeroAdamW(slots, 0, n, master=True)
    mixed.state["master"].copy_(w0)
    p16 = w0.to(torch.bfloat16)
    mixed.step(p16, g16, 0, n, **hp)
    assert torch.equal(mixed.state["master"], p32) and torch.equal(mixed.m, plain.m)
    assert torch.equal(p16, p32.to(torch.bfloat16))
    assert mixed.nbytes == 3 * 4 * n and plain.nbytes == 2 * 4 * n
