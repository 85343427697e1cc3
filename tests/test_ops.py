"""Every op's forward and backward kernels against PyTorch autograd, on random data with awkward sizes.

The kernels are the exact templates a generated model uses, compiled into one library and called
through ctypes. Backward kernels accumulate, so every gradient buffer starts from random values and
the check is ``buffer == start + autograd's gradient``. Tolerances: fp32, rtol 1e-5 on elementwise
results; sums over a dimension get an absolute tolerance of 1e-5 x the reference's largest value.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt2gen import ops as O
from gpt2gen.builder import kernels_library
from helpers import Fl, I, P, Z, assert_close, check_grad, f32, scaled_atol, start_grad


@pytest.fixture(scope="module")
def lib():
    return ctypes.CDLL(str(kernels_library(sorted(O.OPS))))


SHAPES_BTC = [(1, 1, 1), (1, 1, 7), (2, 3, 13), (3, 5, 8), (2, 7, 33)]


@pytest.mark.parametrize("B,T,C", SHAPES_BTC)
def test_embedding(lib, B, T, C):
    rng = np.random.default_rng(1)
    V, Pn = 11, T + 2
    idx = rng.integers(0, V, (B, T)).astype(np.int32)
    idx.flat[0] = idx.flat[-1]          # repeated tokens must accumulate, not race
    table = torch.randn(V, C, requires_grad=True)
    pos = torch.randn(Pn, C, requires_grad=True)
    ref = table[torch.from_numpy(idx).long()] + pos[:T]
    dout = torch.randn(B, T, C)
    ref.backward(dout)
    out = np.zeros((B, T, C), np.float32)
    lib.embedding_forward(P(out), P(idx), P(f32(table)), P(f32(pos)), I(B), I(T), I(C))
    assert_close("embedding out", out, ref.detach().numpy())
    dt, dp = start_grad((V, C), rng), start_grad((Pn, C), rng)
    dt0, dp0 = dt.copy(), dp.copy()
    lib.embedding_backward(P(dt), P(dp), P(f32(dout)), P(idx), I(B), I(T), I(C))
    check_grad("d_table", dt, dt0, table.grad)
    check_grad("d_pos", dp, dp0, pos.grad)


@pytest.mark.parametrize("B,T,C", SHAPES_BTC)
def test_layernorm(lib, B, T, C):
    rng = np.random.default_rng(2)
    N = B * T
    x = (torch.randn(N, C) * 2 + 0.5).requires_grad_()
    w = torch.randn(C, requires_grad=True)
    b = torch.randn(C, requires_grad=True)
    ref = F.layer_norm(x, (C,), w, b, 1e-5)
    dout = torch.randn(N, C)
    ref.backward(dout)
    out, mean, rstd = np.zeros((N, C), np.float32), np.zeros(N, np.float32), np.zeros(N, np.float32)
    lib.layernorm_forward(P(out), P(mean), P(rstd), P(f32(x)), P(f32(w)), P(f32(b)), I(N), I(C), Fl(1e-5))
    assert_close("layernorm out", out, ref.detach().numpy(), rtol=1e-5, atol=1e-5)
    assert_close("layernorm mean", mean, x.detach().mean(-1).numpy(), atol=1e-6)
    var = x.detach().var(-1, unbiased=False)
    assert_close("layernorm rstd", rstd, (1 / torch.sqrt(var + 1e-5)).numpy(), rtol=1e-5)
    dx, dw, db = start_grad((N, C), rng), start_grad(C, rng), start_grad(C, rng)
    dx0, dw0, db0 = dx.copy(), dw.copy(), db.copy()
    lib.layernorm_backward(P(dx), P(dw), P(db), P(f32(dout)), P(f32(x)), P(f32(w)), P(mean), P(rstd), I(N), I(C))
    # d_inp is of the size of |w * d_out| * rstd (which reaches 1/sqrt(eps) = 316 when C = 1, where the exact
    # gradient is 0 and autograd returns its own rounding): the tolerance is relative to that size
    natural = float(np.abs(f32(dout) * f32(w)).max() * rstd.max())
    want = dx0.astype(np.float64) + x.grad.numpy()
    assert_close("d_inp", dx, want, rtol=1e-5, atol=1e-5 * max(natural, float(np.abs(want).max())))
    # d_weight sums d_out * (x - mean) * rstd: where x - mean cancels (C = 1: exactly 0) autograd returns the
    # rounding of its own centering, up to a few ulps of |x| times rstd per row, summed over the rows
    want = dw0.astype(np.float64) + w.grad.numpy()
    centering = float((np.abs(f32(dout)) * np.abs(f32(x)) * rstd[:, None]).sum(0).max()) * 8 * 2.0 ** -24
    assert_close("d_weight", dw, want, rtol=1e-5, atol=scaled_atol(want, 1e-5) + centering)
    check_grad("d_bias", db, db0, b.grad)


@pytest.mark.parametrize("N,C,OC,bias", [(1, 1, 1, True), (1, 7, 3, False), (5, 13, 7, True), (8, 16, 6, True),
                                         (9, 33, 5, False), (12, 64, 130, True),
                                         # past one reduction block (256) and one packed column block (384),
                                         # with partial register blocks on every side
                                         (37, 300, 530, True), (61, 520, 45, False), (14, 257, 385, True)])
def test_matmul(lib, N, C, OC, bias):
    rng = np.random.default_rng(3)
    x = torch.randn(N, C, requires_grad=True)
    w = torch.randn(OC, C, requires_grad=True)
    b = torch.randn(OC, requires_grad=True) if bias else None
    ref = F.linear(x, w, b)
    dout = torch.randn(N, OC)
    ref.backward(dout)
    out = np.zeros((N, OC), np.float32)
    bb = f32(b) if bias else None
    lib.matmul_forward(P(out), P(f32(x)), P(f32(w)), P(bb), I(N), I(C), I(OC))
    assert_close("matmul out", out, ref.detach().numpy(), rtol=1e-5, atol=scaled_atol(ref.detach().numpy(), 1e-6))
    dx, dw = start_grad((N, C), rng), start_grad((OC, C), rng)
    db = start_grad(OC, rng) if bias else None
    dx0, dw0, db0 = dx.copy(), dw.copy(), None if db is None else db.copy()
    lib.matmul_backward(P(dx), P(dw), P(db), P(f32(dout)), P(f32(x)), P(f32(w)), I(N), I(C), I(OC))
    check_grad("d_inp", dx, dx0, x.grad)
    check_grad("d_weight", dw, dw0, w.grad)
    if bias:
        check_grad("d_bias", db, db0, b.grad)


def torch_attention(qkv: torch.Tensor, NH: int):
    """Returns out (B,T,C) and the log-sum-exp of each query's scaled, masked scores (B,NH,T)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = qkv.split(C, dim=2)
    q, k, v = (t.reshape(B, T, NH, C // NH).transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-2, -1)) / np.sqrt(C // NH)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C), scores.logsumexp(-1)


@pytest.mark.parametrize("B,T,C,NH", [(1, 1, 4, 1), (1, 5, 6, 1), (2, 7, 12, 3), (3, 4, 10, 5), (2, 9, 16, 4),
                                      (1, 150, 8, 2)])      # past two key tiles (64) of the online softmax
def test_attention(lib, B, T, C, NH):
    rng = np.random.default_rng(4)
    qkv = torch.randn(B, T, 3 * C, requires_grad=True)
    ref, ref_lse = torch_attention(qkv, NH)
    dout = torch.randn(B, T, C)
    ref.backward(dout)
    out, lse = np.zeros((B, T, C), np.float32), np.zeros((B, NH, T), np.float32)
    lib.attention_forward(P(out), P(lse), P(f32(qkv)), I(B), I(T), I(C), I(NH))
    assert_close("attention out", out, ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert_close("attention log-sum-exp", lse, ref_lse.detach().numpy(), rtol=1e-5, atol=1e-6)
    d = start_grad((B, T, 3 * C), rng)
    d0 = d.copy()
    lib.attention_backward(P(d), P(f32(dout)), P(f32(qkv)), P(out), P(lse), I(B), I(T), I(C), I(NH))
    check_grad("d_qkv", d, d0, qkv.grad)


@pytest.mark.parametrize("n", [1, 7, 1000])
def test_gelu(lib, n):
    rng = np.random.default_rng(5)
    x = (torch.randn(n) * 3).requires_grad_()
    ref = F.gelu(x, approximate="tanh")
    dout = torch.randn(n)
    ref.backward(dout)
    out = np.zeros(n, np.float32)
    lib.gelu_forward(P(out), P(f32(x)), Z(n))
    assert_close("gelu out", out, ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    d = start_grad(n, rng)
    d0 = d.copy()
    lib.gelu_backward(P(d), P(f32(dout)), P(f32(x)), Z(n))
    check_grad("d_inp", d, d0, x.grad)


def test_gelu_keeps_its_relative_accuracy_in_the_tails(lib):
    """GELU tends to 0 for x << 0, where 0.5 x (1 + tanh(u)) cancels: the kernel computes x sigmoid(2u)
    instead, so every output, however small, is within rtol 2e-5 of the float64 value: computing u in
    fp32 (three roundings, 3 x 6e-8 relative) shifts exp(-2u) by about |2u| x 1.8e-7, and |2u| <= 70 for
    |x| <= 9. (tanh in fp32 leaves no correct digit at x = -9.)"""
    x = np.linspace(-9, 9, 20001).astype(np.float32)
    xd = x.astype(np.float64)
    u = np.sqrt(2 / np.pi) * (xd + 0.044715 * xd ** 3)
    want = xd / (1 + np.exp(-2 * u))
    out = np.zeros_like(x)
    lib.gelu_forward(P(out), P(x), Z(x.size))
    assert_close("gelu out, tails included", out, want, rtol=2e-5, atol=0)


def test_gelu_and_softmax_pass_nan_and_infinities_on(lib):
    """The vectorised exp keeps NaN a NaN (the trainer stops a diverging run on a NaN loss) and saturates."""
    x = np.array([np.nan, np.inf, 0.0, -100.0, 100.0], np.float32)
    out = np.zeros_like(x)
    lib.gelu_forward(P(out), P(x), Z(x.size))
    assert np.isnan(out[0]) and out[1] == np.inf and out[2] == 0 and out[3] == 0 and out[4] == 100
    logits = np.array([[0.0, np.nan, 1.0]], np.float32)
    losses, lse = np.zeros(1, np.float32), np.zeros(1, np.float32)
    lib.softmax_crossentropy_forward(P(losses), P(lse), P(logits), P(np.zeros(1, np.int32)), I(1), I(3), I(3))
    assert np.isnan(losses[0])


@pytest.mark.parametrize("n", [1, 13, 4096])
def test_residual(lib, n):
    rng = np.random.default_rng(6)
    a, b = torch.randn(n, requires_grad=True), torch.randn(n, requires_grad=True)
    ref = a + b
    dout = torch.randn(n)
    ref.backward(dout)
    out = np.zeros(n, np.float32)
    lib.residual_forward(P(out), P(f32(a)), P(f32(b)), Z(n))
    assert_close("residual out", out, ref.detach().numpy())
    da, db = start_grad(n, rng), start_grad(n, rng)
    da0, db0 = da.copy(), db.copy()
    lib.residual_backward(P(da), P(db), P(f32(dout)), Z(n))
    check_grad("d_a", da, da0, a.grad)
    check_grad("d_b", db, db0, b.grad)


@pytest.mark.parametrize("N,V,Vp", [(1, 1, 1), (1, 5, 8), (6, 13, 13), (7, 50, 64)])
def test_softmax_crossentropy(lib, N, V, Vp):
    rng = np.random.default_rng(7)
    logits = (torch.randn(N, Vp) * 4).requires_grad_()
    targets = rng.integers(0, V, N).astype(np.int32)
    ref = F.cross_entropy(logits[:, :V], torch.from_numpy(targets).long(), reduction="none")
    dloss = torch.rand(N)
    ref.backward(dloss)
    losses, lse = np.zeros(N, np.float32), np.zeros(N, np.float32)
    x = f32(logits)
    lib.softmax_crossentropy_forward(P(losses), P(lse), P(x), P(targets), I(N), I(V), I(Vp))
    assert_close("losses", losses, ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert_close("log-sum-exp", lse, logits.detach()[:, :V].logsumexp(-1).numpy(), rtol=1e-6, atol=1e-6)
    d = start_grad((N, Vp), rng)
    d0 = d.copy()
    lib.softmax_crossentropy_backward(P(d), P(f32(dloss)), P(x), P(lse), P(targets), I(N), I(V), I(Vp))
    assert (d[:, V:] == d0[:, V:]).all(), "the padding columns get no gradient"
    check_grad("d_logits", d, d0, logits.grad)


@pytest.mark.parametrize("weight_decay,grad_scale", [(0.0, 1.0), (0.1, 0.5)])
def test_adamw(lib, weight_decay, grad_scale):
    rng = np.random.default_rng(8)
    n, lr, b1, b2, eps = 37, 1e-2, 0.9, 0.95, 1e-8
    p0 = rng.standard_normal(n).astype(np.float32)
    tp = torch.tensor(p0, requires_grad=True)
    opt = torch.optim.AdamW([tp], lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay)
    p, m, v = p0.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)
    for step in range(1, 6):
        g = rng.standard_normal(n).astype(np.float32)
        tp.grad = torch.tensor(g * grad_scale)
        opt.step()
        bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
        lib.adamw_update(P(p), P(g), P(m), P(v), Z(n), Fl(lr), Fl(b1), Fl(b2), Fl(eps), Fl(weight_decay),
                         Fl(grad_scale), Fl(bc1), Fl(bc2))
        assert_close(f"AdamW step {step}", p, tp.detach().numpy(), rtol=1e-5, atol=1e-6)
