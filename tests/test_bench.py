"""``gpt2gen bench``: its PyTorch modules compute what the model files compute, its FLOP count is the
textbook one, and the command runs end to end (tiny sizes: the numbers themselves are not tested, a
benchmark is never a timed assertion).

Tolerances (fp32): loss rtol 1e-5; gradients atol 1e-4 x the tensor's largest |gradient| (sums over B*T
positions in another order), as tests/test_model.py.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import gpt2gen
from gpt2gen import bench, bench_torch
from helpers import assert_close, scaled_atol

CASES = {
    "gpt2": ("model.yaml", dict(V=97, L=2, C=32, NH=4, maxT=16)),
    "llama2": ("models/llama2.yaml", dict(V=97, L=2, C=32, NH=4, NKV=2)),
    "mistral": ("models/mistral.yaml", dict(V=97, L=2, C=32, NH=4, NKV=1, window=5)),
    "gemma": ("models/gemma.yaml", dict(V=97, L=2, C=32, NH=4, NKV=1, HD=16)),
}


@pytest.mark.parametrize("arch", list(CASES))
def test_torch_module_matches_the_model_file(arch):
    path, cfg = CASES[arch]
    B, T = 2, 11
    model = gpt2gen.build(path, seed=3, B=B, T=T, **cfg)
    if arch != "gpt2":    # non-trivial norm weights: the init's ones (Gemma's zeros) hide offset mistakes
        for k in ("ln1w", "ln2w", "lnfw"):
            model.params[k][...] += np.random.default_rng(1).standard_normal(model.params[k].shape) * 0.2
    rng = np.random.default_rng(0)
    idx = rng.integers(0, cfg["V"], (B, T)).astype(np.int32)
    tg = rng.integers(0, cfg["V"], (B, T)).astype(np.int32)
    got = model.forward(idx, tg)
    model.zero_grad()
    model.backward()
    module = bench_torch.make_module(model.spec, model.config)
    module.load({k: v.copy() for k, v in model.params.items()})
    loss = module(torch.from_numpy(idx).long(), torch.from_numpy(tg).long())
    loss.backward()
    assert_close(f"{arch} loss", got, loss.item(), rtol=1e-5)
    named = dict(module.named_parameters())
    head = "wte" if arch == "gpt2" else "embed_tokens"
    want = named[f"{head}.weight"].grad.numpy()
    assert_close(f"{arch} grad wte", model.grads["wte"], want, rtol=1e-3, atol=scaled_atol(want, 1e-4))
    layer0 = "h.0.c_fc.weight" if arch == "gpt2" else "layers.0.gate_proj.weight"
    ours = model.grads["fcw" if arch == "gpt2" else "gatew"][0]
    want = named[layer0].grad.numpy()
    assert_close(f"{arch} grad of layer 0's first MLP matrix", ours, want, rtol=1e-3, atol=scaled_atol(want, 1e-4))


def test_step_flops_are_six_per_parameter_per_token_plus_attention():
    program, _ = gpt2gen.builder.generate("model.yaml", "cpu", B=4, T=64)
    work = bench.step_work(program, 4, 64)
    c = program.config
    C, L, V, FF = c["C"], c["L"], c["Vp"], c["FF"]
    matmul_params = L * (3 * C * C + C * C + 2 * C * FF) + V * C      # every GEMM weight, the tied head once
    assert work["gemm_flops"] == 6 * matmul_params * 4 * 64
    assert work["flops"] - work["gemm_flops"] == L * 12 * 4 * 64 * 64 * C
    assert abs(work["flops"] / 1e9 - 191.6) < 0.1      # "about 192 GFLOP per training step" for 124M at B=4, T=64


def test_bench_command_runs_end_to_end():
    cmd = [sys.executable, "-m", "gpt2gen.cli", "bench", "--set", "L=1", "--set", "C=32", "--set", "NH=2",
           "--set", "V=128", "-b", "2", "-t", "8", "--steps", "1", "--rounds", "2", "--warmup", "1",
           "--no-compile", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert set(r["contenders"]) == {"gpt2gen", "eager", "sgemm"}
    for row in r["contenders"].values():
        assert row["ms_per_step"] > 0 and row["peak_rss_gib"] > 0
    assert r["ratios"]["eager/gpt2gen"] > 0 and 0 < r["ratios"]["gpt2gen share of sgemm"]
    assert r["B"] == 2 and r["T"] == 8 and r["threads"] >= 1
