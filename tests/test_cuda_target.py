"""`gpt2gen build --target cuda`: the real nvcc build, its ptxas report, the errors a user can meet, the trainer
on the emulated target, and (on a machine with a GPU) the device build against the emulated one.

The numerics of the CUDA kernels are proven under the emulator (tests/test_ops_cuda_*.py, tests/test_cuda_model.py);
here the same rendering is compiled by nvcc for sm_80 and sm_90 and linked against cuBLASLt into the extension a
GPU machine loads. Without a GPU (no driver) loading it works and allocating its arenas fails with a hint to
--emulate; with one, the device test compares the two builds' steps.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import gpt2gen
from gpt2gen import cuda_emu
from gpt2gen.builder import BuildError, compile_model
from gpt2gen.cli import main
from gpt2gen.targets import cuda as cuda_target
from helpers import assert_close, scaled_atol

CFG = dict(V=97, L=2, C=32, NH=2, maxT=16, B=2, T=16)   # tests/test_cuda_model.py's
HOT = ("attention", "att_", "layernorm", "softmax", "matmul", "adamw", "embedding", "residual", "gelu")

needs_nvcc = pytest.mark.skipif(cuda_emu.find_nvcc() is None or cuda_target.cublas_dirs() is None,
                                reason="needs nvcc and the nvidia-cublas package")


@pytest.fixture(scope="module")
def nvcc_build():
    return compile_model("model.yaml", "cuda", precision="bf16", **CFG)


@needs_nvcc
def test_nvcc_builds_sm80_and_sm90_and_reports_every_kernel(nvcc_build):
    """ptxas's report is kept beside the sources: registers, shared memory and spills per kernel and arch; no hot
    kernel spills (cuBLASLt's own GEMM kernels are not in it)."""
    assert nvcc_build.options["archs"] == ("sm_80", "sm_90")
    report = (nvcc_build.directory / "ptxas.txt").read_text().splitlines()
    rows = [r.split() for r in report[1:]]
    assert {r[-5] for r in rows} == {"sm_80", "sm_90"}
    names = " ".join(r[0] for r in rows)
    for kernel in ("gg_att", "layernorm", "adamw_kernel", "embedding", "softmax"):
        assert kernel in names, kernel
    spilled = [r for r in rows if r[-1] != "0/0" and any(h in " ".join(r) for h in HOT)]
    assert not spilled, f"hot kernels spill registers: {spilled}"


def _gpu_build():
    try:
        return gpt2gen.build("model.yaml", target="cuda", precision="bf16", **CFG)
    except RuntimeError as e:
        if "cannot allocate its arenas" in str(e):
            return str(e)
        raise


@needs_nvcc
def test_device_build_without_a_gpu_says_to_emulate_or_matches_the_emulator_with_one(nvcc_build):
    gpu = _gpu_build()
    if isinstance(gpu, str):      # no GPU here (cudaGetDeviceCount fails): the error says what to do
        assert "--emulate" in gpu and "NVIDIA GPU" in gpu
        pytest.skip("no usable CUDA device: " + gpu.splitlines()[0])
    emu = gpt2gen.build("model.yaml", target="cuda", emulate=True, precision="bf16", **CFG)
    rng = np.random.default_rng(0)
    idx, targets = (rng.integers(0, CFG["V"], (CFG["B"], CFG["T"])).astype(np.int32) for _ in range(2))
    for step in range(1, 4):
        losses = []
        for m in (gpu, emu):
            losses.append(m.forward(idx, targets))
            m.zero_grad()
            m.backward()
            m.update(1e-3, step=step)
        # the GPU's fast-math intrinsics and cuBLASLt's kernels sum in other orders than the emulator
        assert_close(f"loss at step {step} (GPU vs emulator)", losses[0], losses[1], rtol=2.0 ** -7)
    for name in gpu.params:
        w = emu.weights[name]
        assert_close(f"master {name}", gpu.weights[name], w, rtol=0, atol=scaled_atol(w, 2.0 ** -6))


# ---- errors -------------------------------------------------------------------------------------------------

def test_a_missing_nvcc_or_cublas_says_what_to_install(monkeypatch):
    monkeypatch.setattr(cuda_emu, "find_nvcc", lambda: None)
    with pytest.raises(BuildError, match=r"nvcc is not on PATH.*install the CUDA toolkit.*--emulate"):
        compile_model("model.yaml", "cuda", **CFG | {"C": 24})
    monkeypatch.undo()
    monkeypatch.setattr(cuda_target, "cublas_dirs", lambda: None)
    if cuda_emu.find_nvcc() is not None:
        with pytest.raises(BuildError, match=r"cuBLASLt is not installed: pip install 'gpt2gen\[cuda\]'"):
            compile_model("model.yaml", "cuda", **CFG | {"C": 24})


@pytest.mark.parametrize("kw,message", [
    (dict(target="cuda", archs="sm_5x"), r"--arch sm_5x: not a GPU architecture.*--arch sm_80,sm_90"),
    (dict(target="cpu", emulate=True), r"target `cpu` takes no --emulate or --arch"),
    (dict(target="cpu", precision="fp16"), r"target `cpu` has no precision `fp16`; it has fp32, bf16"),
])
def test_bad_build_options_are_refused_with_what_to_do(kw, message):
    with pytest.raises(BuildError, match=message):
        compile_model("model.yaml", **CFG, **kw)


# ---- the command line and the trainer on the emulated target ------------------------------------------------

def test_build_command_emulated(capsys):
    assert main(["build", "--target", "cuda", "--emulate", "--precision", "fp16", "--set", "V=97", "--set", "L=2",
                 "--set", "C=32", "--set", "NH=2", "--set", "maxT=16", "--set", "B=2", "--set", "T=16"]) == 0
    out = capsys.readouterr().out
    assert "gpt2 (cuda, emulated, fp16):" in out and "ptxas:" not in out     # no nvcc, no ptxas report


def test_trainer_runs_the_emulated_cuda_target_in_fp16(tmp_path):
    """python -m gpt2gen.train --target cuda --emulate --precision fp16: loss-scaled steps, the scale logged, the
    norm that of the unscaled gradients."""
    from gpt2gen import data as D
    from gpt2gen.train import main as train_main
    seq = np.tile(np.arange(40, 72), 100)
    train, val = D.write_tokens(tmp_path / "train.bin", seq[500:]), D.write_tokens(tmp_path / "val.bin", seq[:500])
    log = tmp_path / "log.jsonl"
    rc = train_main(["--target", "cuda", "--emulate", "--precision", "fp16", "--train-data", str(train),
                     "--val-data", str(val), "--set", "L=2", "--set", "C=32", "--set", "NH=2", "--set", "V=97",
                     "--set", "maxT=16",      # tests/test_cuda_model.py's fp16 build: the cache has it
                     "-b", "2", "-t", "16", "--steps", "3", "--val-every", "0", "--sample-tokens", "0",
                     "--no-progress", "--log", str(log), "--checkpoint-dir", str(tmp_path / "ck")])
    assert rc == 0
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    train_recs = [r for r in recs if r.get("type") == "train"]
    assert len(train_recs) == 3 and all(np.isfinite(r["loss"]) and r["loss_scale"] > 0 for r in train_recs)
    assert 0 < train_recs[0]["norm"] < 1e3     # the norm of the unscaled gradients
