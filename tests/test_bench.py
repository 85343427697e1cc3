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


# ------------------------------------------------------------------------------ bad input: one error line

def test_bench_options_out_of_range_are_refused(capsys, monkeypatch):
    """A zero step or round count is refused when parsed (it used to exit 1 with a bare SystemExit text), and
    by run_bench for a Namespace made by hand, as one `gpt2gen: error:` line with exit status 2."""
    import argparse

    from gpt2gen import cli
    monkeypatch.setattr(bench, "_Contender", lambda *a, **k: pytest.fail("a contender started"))
    for option in ("--steps", "--rounds", "--threads", "-b"):
        with pytest.raises(SystemExit) as e:
            cli.main(["bench", option, "0"])
        assert e.value.code == 2
        assert "must be a whole number >= 1, got 0" in capsys.readouterr().err
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args([])
    args.steps = 0
    assert cli.run_command(bench.cmd_bench, args) == 2
    err = capsys.readouterr().err
    assert err == "gpt2gen: error: --steps must be a whole number >= 1, got 0\n", err


def test_a_model_file_bench_has_no_torch_module_for(tmp_path, capsys, monkeypatch):
    """A model file of neither family (GPT-2 without its GELU) is a UsageError naming the file and the fix,
    from the API and from `gpt2gen bench` before any process starts; it used to be a plain ValueError."""
    from gpt2gen import cli
    from gpt2gen.checks import UsageError
    import re
    text = (gpt2gen.resources.data_root() / "model.yaml").read_text()
    text, dropped = re.subn(r"^ *- \{name: *mlp_gelu,.*\n", "", text, flags=re.M)   # the GELU node ...
    text, rewired = re.subn(r"in: *\[fch_gelu,", "in: [fch,", text)                  # ... and its one reader
    assert dropped == rewired == 1
    other = tmp_path / "nogelu.yaml"
    other.write_text(text)
    small = dict(V=97, L=1, C=32, NH=2, maxT=16, T=16)
    program, _ = gpt2gen.builder.generate(other, "cpu", **small)
    with pytest.raises(UsageError, match="gpt2gen bench has a PyTorch module for GPT-2 and Llama-family") as e:
        bench_torch.make_module(program.spec, program.config)
    assert str(other) in str(e.value) and "hint: benchmark one of those" in str(e.value)
    monkeypatch.setattr(bench, "_Contender", lambda *a, **k: pytest.fail("a contender started"))
    sets = [x for k, v in small.items() for x in ("--set", f"{k}={v}")]
    assert cli.main(["bench", "--model", str(other), *sets]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gpt2gen: error: {other}: gpt2gen bench has a PyTorch module") and "Traceback" not in err
    assert err.count("\n") == 2 and "\n  hint: benchmark one of those" in err   # one line and its hint


def test_a_contender_reports_a_user_error_in_its_own_words():
    """A contender whose setup fails with a user error tells the parent the message, not the exception's type;
    a bug keeps its type (the parent raises a UsageError for the first, a RuntimeError for the second)."""
    from gpt2gen.checks import UsageError
    assert bench._failure(UsageError("x.yaml: too big", hint="smaller")) == {
        "ready": False, "error": "x.yaml: too big\n  hint: smaller", "user_error": True}
    assert bench._failure(KeyError("wte")) == {"ready": False, "error": "KeyError: 'wte'", "user_error": False}
