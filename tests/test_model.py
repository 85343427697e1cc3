"""The whole generated GPT-2 against a PyTorch reference with the same weights.

Checked: logits, loss, every parameter gradient, and the losses and weights over 10 AdamW steps.
Tolerances (fp32): logits and loss rtol 1e-4; gradients atol 1e-4 x the largest |gradient| of that
tensor (sums over B*T positions in another order); the training curve rtol 1e-4 and the weights within
the error that gradient tolerance propagates to through AdamW (helpers.AdamWErrorBound), against a
float64 run so that the bound does not depend on which kernels PyTorch picks on this CPU.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import gpt2gen
from helpers import AdamWErrorBound, assert_close, scaled_atol
from reference import adamw, gpt2_forward, params_to_torch

CONFIGS = {
    "tiny": dict(V=97, L=2, C=36, NH=3, maxT=16, B=3, T=7),
    "one-head": dict(V=61, L=1, C=20, NH=1, maxT=8, B=1, T=8),
    "odd": dict(V=300, L=3, C=50, NH=5, maxT=32, B=2, T=13),
}


def batch(model, B, T, seed=0):
    rng = np.random.default_rng(seed)
    V = model.config["V"]
    return rng.integers(0, V, (B, T)).astype(np.int32), rng.integers(0, V, (B, T)).astype(np.int32)


def compare_step(model, idx, targets, grad_rel=1e-4):
    p = params_to_torch(model.params)
    logits, loss = gpt2_forward(p, idx, model.config, targets)
    loss.backward()
    got = model.forward(idx, targets)
    V = model.config["V"]
    assert_close("logits", model.logits, logits[..., :V].detach().numpy(), rtol=1e-4,
                 atol=scaled_atol(logits.detach().numpy(), 1e-5))
    assert_close("loss", got, loss.item(), rtol=1e-5)
    model.zero_grad()
    model.backward()
    for name, t in p.items():
        want = t.grad.numpy()
        assert_close(f"grad {name}", model.grads[name], want, rtol=1e-3, atol=scaled_atol(want, grad_rel))


@pytest.mark.parametrize("fuse", ["all", "none"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_pytorch(name, fuse):
    """Fused (residual + layernorm, matmul + gelu, the classifier) and unfused builds alike."""
    cfg = CONFIGS[name]
    model = gpt2gen.build("model.yaml", fuse=fuse, **cfg)
    assert bool(model.program.fused) == (fuse == "all")
    idx, targets = batch(model, cfg["B"], cfg["T"])
    compare_step(model, idx, targets)


def test_smaller_batch_needs_no_rebuild():
    """B and T are run-time values: a smaller batch runs in the same build and still matches."""
    model = gpt2gen.build("model.yaml", **CONFIGS["tiny"])
    for B, T in [(1, 1), (2, 5), (3, 7), (1, 6)]:
        idx, targets = batch(model, B, T, seed=B * 10 + T)
        compare_step(model, idx, targets)


@pytest.mark.parametrize("fuse", ["all", "none"])
def test_training_steps_match_pytorch_adamw(fuse):
    """10 AdamW steps against PyTorch's AdamW run in float64 (the exact trajectory, to fp32's eyes).

    Losses: rtol 1e-4. Gradients at every step: within 1e-4 x the tensor's largest |gradient| of the exact
    ones. Weights: within the bound that this gradient error propagates to through AdamW, element by
    element (helpers.AdamWErrorBound says how it is derived); a fixed tolerance cannot work here, since an
    element whose gradient is at rounding level takes a step of about lr set by the rounding noise alone,
    which differs with the summation order of whichever CPU kernels run.
    """
    cfg = CONFIGS["odd"]
    model = gpt2gen.build("model.yaml", fuse=fuse, **cfg)
    idx, targets = batch(model, cfg["B"], cfg["T"], seed=3)
    p = {k: t.detach().double().requires_grad_() for k, t in params_to_torch(model.params).items()}
    decay = {t.name: t.decay for t in model.spec.of_kind("param")}
    lr, betas, eps, wd = 3e-3, (0.9, 0.95), 1e-8, 0.1
    opt = adamw(p, decay, lr, betas, eps, wd)
    bound = AdamWErrorBound(lr, betas, eps, gamma=1e-4)
    ours, theirs = [], []
    for step in range(1, 11):
        ours.append(model.forward(idx, targets))
        model.zero_grad()
        model.backward()
        opt.zero_grad()
        _, loss = gpt2_forward(p, idx, model.config, targets)
        loss.backward()
        theirs.append(loss.item())
        for name, t in p.items():
            bound.check_grad(name, model.grads[name], t.grad.numpy())
        model.update(lr, betas[0], betas[1], eps, wd, step)
        opt.step()
        bound.add_step({name: opt.state[t]["exp_avg_sq"].numpy() for name, t in p.items()})
    print("losses (gpt2gen):        ", np.round(ours, 5))
    print("losses (pytorch float64):", np.round(theirs, 5))
    assert ours[-1] < ours[0] - 0.5, "training on one batch should drive the loss down"
    assert_close("loss curve", ours, theirs, rtol=1e-4)
    for name, t in p.items():
        bound.check_weight(name, model.params[name], t.detach().numpy())


def test_gpt2_124m_shape():
    """The real GPT-2 124M shapes (12 layers, 768 channels, 50257 tokens) at a small B, T."""
    model = gpt2gen.build("model.yaml", B=1, T=8)
    assert model.config["Vp"] == 50304 and model.config["C"] == 768 and model.config["L"] == 12
    assert model.num_parameters == 124_475_904      # as llm.c counts it, with the padded vocabulary
    idx, targets = batch(model, 1, 8, seed=5)
    compare_step(model, idx, targets, grad_rel=1e-4)


def test_forward_without_targets():
    model = gpt2gen.build("model.yaml", **CONFIGS["tiny"])
    idx, targets = batch(model, 2, 5)
    assert model.forward(idx) is None
    logits = model.logits.copy()
    assert model.forward(idx, targets) is not None
    assert_close("logits with and without targets", logits, model.logits, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="targets"):
        model.forward(idx)
        model.backward()


def test_results_do_not_depend_on_the_thread_count(tmp_path):
    """Every kernel sums each output in a fixed order, whatever the thread count: 1 and 3 threads give the
    same bytes (loss, logits, every gradient), with T past one key tile of the attention and rows past one
    register block of the GEMM."""
    script = (
        "import sys, numpy as np, gpt2gen\n"
        "m = gpt2gen.build('model.yaml', V=97, L=2, C=36, NH=3, maxT=80, B=2, T=70)\n"
        "rng = np.random.default_rng(0)\n"
        "idx = rng.integers(0, 97, (2, 70)).astype(np.int32)\n"
        "loss = m.forward(idx, np.roll(idx, -1, axis=1)); logits = m.logits.copy(); m.zero_grad(); m.backward()\n"
        "np.save(sys.argv[1], np.concatenate([[loss], logits.ravel(), m.arenas['grads']]))\n")
    out = {}
    for n in (1, 3):
        env = dict(os.environ, OMP_NUM_THREADS=str(n))
        subprocess.run([sys.executable, "-c", script, str(tmp_path / f"{n}.npy")], check=True, env=env)
        out[n] = np.load(tmp_path / f"{n}.npy")
    assert out[1].tobytes() == out[3].tobytes(), f"max |diff| {np.abs(out[1] - out[3]).max():.3g}"
