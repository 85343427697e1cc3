"""The ops of Llama, Mistral and Gemma against PyTorch autograd, kernel by kernel (as tests/test_ops.py).

Kernels are the templates a generated model uses, called through ctypes. Every backward kernel
accumulates, so gradient buffers start from random values (the check is ``start + autograd``), and
each is also called with NULL gradient pointers. References follow transformers' own formulas: RMSNorm
``x * rsqrt(mean(x^2) + eps) * w`` (Gemma ``* (1 + w)``), rotate-half RoPE with ``inv_freq =
theta^(-2i/D)``, ``repeat_kv`` grouped-query attention with its sliding-window mask
(``kv_idx > q_idx - window``), SiLU/GELU-tanh gated units. Tolerances: fp32, rtol 1e-5 elementwise; sums
over a dimension get an absolute tolerance of 1e-5 x the reference's largest value.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt2gen import ops as O
from gpt2gen.builder import kernels_library
from helpers import Fl, I, P, Z, assert_close, check_grad, f32, start_grad

ARCH_OPS = ["token_embedding", "rmsnorm", "rope", "gqa_attention", "swiglu", "geglu"]


@pytest.fixture(scope="module")
def lib():
    return ctypes.CDLL(str(kernels_library(ARCH_OPS)))


def test_ops_are_registered_with_their_kernels():
    from gpt2gen.targets.cpu import KERNELS
    for name in ARCH_OPS:
        assert O.get(name) is not None and name in KERNELS, name


# ---- token embedding -------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,T,C,scale,pad", [(1, 1, 1, 1.0, -1), (2, 5, 13, 1.0, -1), (3, 7, 33, float(np.sqrt(33)), 0),
                                             (2, 9, 16, 4.0, 3)])
def test_token_embedding(lib, B, T, C, scale, pad):
    rng = np.random.default_rng(11)
    V = 11
    idx = rng.integers(0, V, (B, T)).astype(np.int32)
    idx.flat[0] = idx.flat[-1]          # repeated tokens must accumulate, not race
    if pad >= 0:
        idx.flat[1 % idx.size] = pad    # the padding token is looked up but gets no gradient
    table = torch.randn(V, C, requires_grad=True)
    ref = F.embedding(torch.from_numpy(idx).long(), table, padding_idx=pad if pad >= 0 else None) \
        * torch.tensor(scale, dtype=torch.float32)
    dout = torch.randn(B, T, C)
    ref.backward(dout)
    out = np.zeros((B, T, C), np.float32)
    lib.token_embedding_forward(P(out), P(idx), P(f32(table)), I(B), I(T), I(C), Fl(scale))
    assert_close("token_embedding out", out, ref.detach().numpy())
    dt = start_grad((V, C), rng)
    dt0 = dt.copy()
    lib.token_embedding_backward(P(dt), P(f32(dout)), P(idx), I(B), I(T), I(C), Fl(scale), I(pad))
    check_grad("d_table", dt, dt0, table.grad)
    lib.token_embedding_backward(None, P(f32(dout)), P(idx), I(B), I(T), I(C), Fl(scale), I(pad))


# ---- rmsnorm -------------------------------------------------------------------------------------------

def torch_rmsnorm(x, w, eps, offset):
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return h * (w + offset) if offset else h * w


@pytest.mark.parametrize("N,C", [(1, 1), (1, 7), (6, 13), (15, 8), (14, 33), (4, 64)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rmsnorm(lib, N, C, offset):
    rng = np.random.default_rng(12)
    eps = 1e-6
    x = (torch.randn(N, C) * 2 + 0.3).requires_grad_()
    w = (torch.randn(C) * (0.3 if offset else 1.0)).requires_grad_()
    ref = torch_rmsnorm(x, w, eps, offset)
    dout = torch.randn(N, C)
    ref.backward(dout)
    out, rstd = np.zeros((N, C), np.float32), np.zeros(N, np.float32)
    lib.rmsnorm_forward(P(out), P(rstd), P(f32(x)), P(f32(w)), I(N), I(C), Fl(eps), Fl(offset))
    assert_close("rmsnorm out", out, ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    want_rstd = torch.rsqrt(x.detach().pow(2).mean(-1) + eps).numpy()
    assert_close("rmsnorm rstd", rstd, want_rstd, rtol=1e-5)
    dx, dw = start_grad((N, C), rng), start_grad(C, rng)
    dx0, dw0 = dx.copy(), dw.copy()
    lib.rmsnorm_backward(P(dx), P(dw), P(f32(dout)), P(f32(x)), P(f32(w)), P(rstd), I(N), I(C), Fl(offset))
    # d_inp is a difference of two terms of the size of |w' g| * rstd: the tolerance is relative to that
    natural = float(np.abs(f32(dout) * (f32(w) + offset)).max() * rstd.max())
    want = dx0.astype(np.float64) + x.grad.numpy()
    assert_close("d_inp", dx, want, rtol=1e-5, atol=1e-5 * max(natural, float(np.abs(want).max())))
    check_grad("d_weight", dw, dw0, w.grad)
    lib.rmsnorm_backward(None, None, P(f32(dout)), P(f32(x)), P(f32(w)), P(rstd), I(N), I(C), Fl(offset))


# ---- rope ----------------------------------------------------------------------------------------------

def torch_rope(x, H, D, theta):
    """transformers' rotate-half RoPE on (B, T, H*D), cos/sin computed in fp32 as LlamaRotaryEmbedding does."""
    B, T, _ = x.shape
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    freqs = torch.arange(T).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    xh = x.reshape(B, T, H, D).transpose(1, 2)
    x1, x2 = xh[..., :D // 2], xh[..., D // 2:]
    rot = torch.cat((-x2, x1), dim=-1)
    return (xh * cos + rot * sin).transpose(1, 2).reshape(B, T, H * D)


@pytest.mark.parametrize("B,T,H,D,theta", [(1, 1, 1, 2, 10000.0), (2, 5, 3, 8, 10000.0), (1, 16, 2, 12, 500.0),
                                           (3, 7, 1, 6, 1e6), (2, 9, 5, 4, 10.0)])
def test_rope(lib, B, T, H, D, theta):
    rng = np.random.default_rng(13)
    x = torch.randn(B, T, H * D, requires_grad=True)
    ref = torch_rope(x, H, D, theta)
    dout = torch.randn(B, T, H * D)
    ref.backward(dout)
    out = np.zeros((B, T, H * D), np.float32)
    lib.rope_forward(P(out), P(f32(x)), I(B), I(T), I(H), I(D), Fl(theta))
    assert_close("rope out", out, ref.detach().numpy(), rtol=1e-5, atol=1e-5)
    d = start_grad((B, T, H * D), rng)
    d0 = d.copy()
    lib.rope_backward(P(d), P(f32(dout)), I(B), I(T), I(H), I(D), Fl(theta))
    assert_close("d_inp", d, d0 + x.grad.numpy(), rtol=1e-5, atol=1e-5)
    lib.rope_backward(None, P(f32(dout)), I(B), I(T), I(H), I(D), Fl(theta))


# ---- grouped-query attention -------------------------------------------------------------------------------

def torch_gqa(q, k, v, H, K, D, window):
    """transformers' eager attention: repeat_kv, scores * D^-0.5, causal (+ sliding-window) mask, softmax."""
    B, T, _ = q.shape
    qh = q.reshape(B, T, H, D).transpose(1, 2)
    kh = k.reshape(B, T, K, D).transpose(1, 2).repeat_interleave(H // K, dim=1)
    vh = v.reshape(B, T, K, D).transpose(1, 2).repeat_interleave(H // K, dim=1)
    qi, ki = torch.arange(T)[:, None], torch.arange(T)[None, :]
    visible = ki <= qi
    if window:
        visible = visible & (ki > qi - window)
    scores = ((qh @ kh.transpose(-2, -1)) * D ** -0.5).masked_fill(~visible, float("-inf"))
    return (scores.softmax(-1) @ vh).transpose(1, 2).reshape(B, T, H * D), scores.logsumexp(-1)


@pytest.mark.parametrize("B,T,H,K,D,window", [
    (1, 1, 1, 1, 4, 0),          # one position
    (2, 7, 4, 4, 8, 0),          # plain multi-head
    (2, 9, 6, 2, 5, 0),          # groups of 3, odd head dim
    (1, 8, 4, 1, 8, 0),          # multi-query
    (3, 5, 3, 3, 6, 0),          # odd head count
    (2, 13, 4, 2, 8, 4),         # sliding window shorter than T
    (1, 16, 5, 1, 4, 1),         # window 1: each query sees itself only
    (2, 6, 2, 1, 4, 6),          # window == T: same as causal
    (1, 140, 4, 1, 8, 0),        # past two key tiles (64) of the online softmax, multi-query at B = 1
    (1, 140, 2, 2, 8, 70),       # a window that starts inside a tile
])
def test_gqa_attention(lib, B, T, H, K, D, window):
    rng = np.random.default_rng(14)
    q = torch.randn(B, T, H * D, requires_grad=True)
    k = torch.randn(B, T, K * D, requires_grad=True)
    v = torch.randn(B, T, K * D, requires_grad=True)
    ref, ref_lse = torch_gqa(q, k, v, H, K, D, window)
    dout = torch.randn(B, T, H * D)
    ref.backward(dout)
    out, lse = np.zeros((B, T, H * D), np.float32), np.full((B, H, T), 9.0, np.float32)
    args = (I(B), I(T), I(H), I(K), I(D), I(window))
    lib.gqa_attention_forward(P(out), P(lse), P(f32(q)), P(f32(k)), P(f32(v)), *args)
    assert_close("attention out", out, ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert_close("attention log-sum-exp", lse, ref_lse.detach().numpy(), rtol=1e-5, atol=1e-6)
    dq, dk, dv = start_grad((B, T, H * D), rng), start_grad((B, T, K * D), rng), start_grad((B, T, K * D), rng)
    dq0, dk0, dv0 = dq.copy(), dk.copy(), dv.copy()
    lib.gqa_attention_backward(P(dq), P(dk), P(dv), P(f32(dout)), P(f32(q)), P(f32(k)), P(f32(v)), P(out), P(lse), *args)
    check_grad("d_q", dq, dq0, q.grad)
    check_grad("d_k", dk, dk0, k.grad)
    check_grad("d_v", dv, dv0, v.grad)
    # any gradient may be NULL; the others are still right
    dk2 = dk0.copy()
    lib.gqa_attention_backward(None, P(dk2), None, P(f32(dout)), P(f32(q)), P(f32(k)), P(f32(v)), P(out), P(lse), *args)
    check_grad("d_k alone", dk2, dk0, k.grad)


def test_gqa_attention_window_matches_transformers_mask(lib):
    """The window means what transformers' sliding_window_causal_mask_function means."""
    from transformers import masking_utils
    fn = masking_utils.sliding_window_causal_mask_function(3)
    T = 7
    tt = torch.tensor
    want = np.array([[bool(fn(tt(0), tt(0), tt(qi), tt(ki))) for ki in range(T)] for qi in range(T)])
    # equal scores and one-hot values: out[t] holds the weight query t gives each key, > 0 where it sees it
    q, k = np.ones((1, T, T), np.float32), np.ones((1, T, T), np.float32)
    v = np.eye(T, dtype=np.float32)[None]
    out, lse = np.zeros((1, T, T), np.float32), np.zeros((1, 1, T), np.float32)
    lib.gqa_attention_forward(P(out), P(lse), P(q), P(k), P(v), I(1), I(T), I(1), I(1), I(T), I(3))
    np.testing.assert_array_equal(out[0] > 0, want)


# ---- gated units -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["swiglu", "geglu"])
@pytest.mark.parametrize("n", [1, 7, 1000])
def test_glu(lib, op, n):
    rng = np.random.default_rng(15)
    gate = (torch.randn(n) * 3).requires_grad_()
    up = torch.randn(n, requires_grad=True)
    act = F.silu(gate) if op == "swiglu" else F.gelu(gate, approximate="tanh")
    ref = act * up
    dout = torch.randn(n)
    ref.backward(dout)
    out = np.zeros(n, np.float32)
    getattr(lib, f"{op}_forward")(P(out), P(f32(gate)), P(f32(up)), Z(n))
    assert_close(f"{op} out", out, ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    dg, du = start_grad(n, rng), start_grad(n, rng)
    dg0, du0 = dg.copy(), du.copy()
    getattr(lib, f"{op}_backward")(P(dg), P(du), P(f32(dout)), P(f32(gate)), P(f32(up)), Z(n))
    check_grad("d_gate", dg, dg0, gate.grad)
    check_grad("d_up", du, du0, up.grad)
    getattr(lib, f"{op}_backward")(None, None, P(f32(dout)), P(f32(gate)), P(f32(up)), Z(n))
