"""The CUDA attention kernels (templates/cuda/ops/attention.cu.j2) under the emulator, against PyTorch autograd.

attention (GPT-2's packed (B,T,3C) q|k|v) against F.scaled_dot_product_attention(is_causal=True), gqa_attention
against tests/test_ops_arch.py's torch_gqa (repeat_interleave over the groups, the causal and sliding-window mask
``ki > qi - window`` of transformers), both in float64 from the exact values the kernel is given: forward out and
lse, and the accumulated gradients (start + autograd), in fp32, bf16 and fp16 storage. Shapes: T = 1, odd T (7, 19),
T past one tile of 32 (37, 40, 70), head dims 1, 8, 17, 64 and the DMAX = 128 kernels (96, 128); GQA with
H = 4, K = 2 and multi-query (K = 1); window none, 1 and small ones that start inside a tile.

The backward gets the out the forward stored (rounded to the storage type), and uses it for D_t = d_out_t . out_t
as every flash backward does; autograd's D_t is that of the exact out. The reference adds the (exactly computed)
effect of that difference, -scale * P diag(dD) K for d_q and -scale * P^T diag(dD) Q for d_k (d_v has none), so
the check stays at the kernel's own error.

Tolerances, (rtol, atol_rel): |got - want| <= atol_rel * max|want| + rtol * |want| elementwise.
  * The kernel's fp32 error: sums of k terms in fp32 are off by about k * 2^-24 of their absolute-value sum. out
    and lse add a dot over D (<= 128), the online softmax's sum over <= 70 keys and a few roundings in each exp
    and rescaling: k <= 2^8, so 2^-16. A gradient adds the dot products d_out.v and D_t (over D) to a sum over
    the group's queries (<= 4 x 19 or 70) and the recomputed p: k <= 2^9, so 2^-15. Both as an atol relative to
    the largest |reference| (sums with cancellation) and as an rtol.
  * bf16 / fp16 storage: the inputs are exact 16-bit values, the reference computes from them in float64, and the
    kernel rounds each stored element once (out, and start + gradient for the accumulated gradients): the unit
    roundoff of the type (half an ulp: 2^-8 relative for bf16's 8 significant bits, 2^-11 for fp16's 11) is added
    to the rtol. lse is fp32 in every precision.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cuda_ops import error, libraries, storage_dtype
from helpers import I, P, assert_close
from test_ops_arch import torch_gqa

PRECISIONS = ("fp32", "bf16", "fp16")
HALF_ULP = {"fp32": 0.0, "bf16": 2.0 ** -8, "fp16": 2.0 ** -11}   # one rounding to the storage type, relative
FWD32, GRAD32 = 2.0 ** -16, 2.0 ** -15                            # the kernels' fp32 error (see above)
TOLERANCES = {(q, p): (HALF_ULP[p] * (q != "lse") + e, e)
              for p in PRECISIONS for q, e in (("out", FWD32), ("lse", FWD32), ("grad", GRAD32))}


@pytest.fixture(scope="module")
def libs():
    return libraries()   # every op, one library per precision, shared by the op test files (tests/cuda_ops.py)


def draw(rng, shape, precision):
    """Random values exactly representable in the storage type: (the kernel's array, float64 torch tensor)."""
    a = rng.standard_normal(shape).astype(np.float32).astype(storage_dtype(precision))
    return a, torch.from_numpy(a.astype(np.float64))


def check(name, quantity, precision, got, want):
    rtol, atol_rel = TOLERANCES[(quantity, precision)]
    want = np.asarray(want, np.float64)
    assert_close(f"{name} ({precision})", np.asarray(got).astype(np.float64), want,
                 rtol=rtol, atol=atol_rel * max(float(np.abs(want).max()), 1e-30))


def probabilities(q, k, H, K, D, window):
    """Softmax probabilities (B,H,T,T) in float64, with torch_gqa's mask."""
    B, T, _ = q.shape
    qh = q.reshape(B, T, H, D).transpose(1, 2)
    kh = k.reshape(B, T, K, D).transpose(1, 2).repeat_interleave(H // K, dim=1)
    qi, ki = torch.arange(T)[:, None], torch.arange(T)[None, :]
    visible = (ki <= qi) & (ki > qi - window) if window else ki <= qi
    return ((qh @ kh.transpose(-2, -1)) * D ** -0.5).masked_fill(~visible, float("-inf")).softmax(-1)


def stored_out_correction(q, k, dout, out_exact, out_stored, H, K, D, window):
    """What using the stored out in D_t adds to d_q and d_k: dD = d_out . (out_stored - out_exact) per query row,
    d_score changes by -scale p dD, so d_q by -scale diag(dD) P K and d_k by -scale P^T diag(dD) Q (over the group)."""
    B, T, _ = q.shape
    p = probabilities(q, k, H, K, D, window)
    g = dout.reshape(B, T, H, D).transpose(1, 2)
    dd = (g * (out_stored - out_exact).reshape(B, T, H, D).transpose(1, 2)).sum(-1, keepdim=True)   # (B,H,T,1)
    kh = k.reshape(B, T, K, D).transpose(1, 2).repeat_interleave(H // K, dim=1)
    qh = q.reshape(B, T, H, D).transpose(1, 2)
    cq = -(D ** -0.5) * dd * (p @ kh)                                     # (B,H,T,D)
    ck = -(D ** -0.5) * (p.transpose(-2, -1) @ (dd * qh))                 # (B,H,T,D) per query head
    ck = ck.reshape(B, K, H // K, T, D).sum(2)
    return cq.transpose(1, 2).reshape(B, T, H * D), ck.transpose(1, 2).reshape(B, T, K * D)


# ---- grouped-query attention -------------------------------------------------------------------------------

GQA_SHAPES = [  # B, T, H, K, D, window
    (1, 1, 1, 1, 1, 0),          # one position, head dim 1
    (2, 7, 4, 2, 17, 0),         # odd T, odd head dim, groups of 2
    (2, 7, 4, 2, 1, 1),          # window 1: each query sees itself only
    (1, 19, 4, 1, 8, 5),         # multi-query, a window shorter than T
    (2, 19, 4, 2, 64, 3),        # GPT-2's head dim, a small window
    (1, 70, 2, 1, 8, 0),         # three query tiles of 32, keys past two tiles, multi-query at B = 1
    (1, 70, 4, 2, 17, 33),       # a window that spans tiles and starts inside one
    (1, 37, 2, 1, 128, 0),       # DMAX = 128: key / query tiles of 16 sharing a buffer
    (1, 40, 4, 2, 96, 7),        # DMAX = 128 with its last column chunk unused
]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("B,T,H,K,D,window", GQA_SHAPES)
def test_gqa_attention(libs, precision, B, T, H, K, D, window):
    lib, dt = libs[precision], storage_dtype(precision)
    rng = np.random.default_rng(B * 1000 + T * 10 + D)
    (q, qt), (k, kt), (v, vt) = (draw(rng, (B, T, n * D), precision) for n in (H, K, K))
    (dout, gt) = draw(rng, (B, T, H * D), precision)
    for t in (qt, kt, vt):
        t.requires_grad_(True)
    ref, ref_lse = torch_gqa(qt, kt, vt, H, K, D, window)
    ref.backward(gt)
    args = (I(B), I(T), I(H), I(K), I(D), I(window))

    out = np.full((B, T, H * D), np.nan, dt)            # everything is written
    lse = np.full((B, H, T), 9.0, np.float32)
    lib.gqa_attention_forward(P(out), P(lse), P(q), P(k), P(v), *args)
    check("gqa out", "out", precision, out, ref.detach().numpy())
    check("gqa lse", "lse", precision, lse, ref_lse.detach().numpy())
    out2, lse2 = np.zeros_like(out), np.zeros_like(lse)
    lib.gqa_attention_forward(P(out2), P(lse2), P(q), P(k), P(v), *args)
    assert out2.tobytes() == out.tobytes() and lse2.tobytes() == lse.tobytes(), "forward: not deterministic"

    (sq, sqt), (sk, skt), (sv, svt) = (draw(rng, (B, T, n * D), precision) for n in (H, K, K))
    cq, ck = stored_out_correction(qt.detach(), kt.detach(), gt, ref.detach(),
                                   torch.from_numpy(out.astype(np.float64)), H, K, D, window)
    want = {"d_q": sqt + qt.grad + cq, "d_k": skt + kt.grad + ck, "d_v": svt + vt.grad}
    dq, dk, dv = sq.copy(), sk.copy(), sv.copy()
    lib.gqa_attention_backward(P(dq), P(dk), P(dv), P(dout), P(q), P(k), P(v), P(out), P(lse), *args)
    for name, got in (("d_q", dq), ("d_k", dk), ("d_v", dv)):
        check(name, "grad", precision, got, want[name].numpy())
    # bitwise repeatable, and any gradient may be NULL: the others are the same bits
    for only in ("d_q", "d_k", "d_v"):
        bufs = {"d_q": sq.copy(), "d_k": sk.copy(), "d_v": sv.copy()}
        ptrs = [P(bufs[n]) if n == only else None for n in ("d_q", "d_k", "d_v")]
        lib.gqa_attention_backward(*ptrs, P(dout), P(q), P(k), P(v), P(out), P(lse), *args)
        assert bufs[only].tobytes() == {"d_q": dq, "d_k": dk, "d_v": dv}[only].tobytes(), f"{only} alone differs"
    lib.gqa_attention_backward(None, None, None, P(dout), P(q), P(k), P(v), P(out), P(lse), *args)
    assert error(lib) is None


# ---- GPT-2's attention over the packed qkv -------------------------------------------------------------------

@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("B,T,C,NH", [(1, 1, 3, 3), (2, 7, 24, 3), (1, 19, 34, 2), (1, 40, 128, 2), (1, 70, 64, 1)])
def test_attention(libs, precision, B, T, C, NH):
    lib, dt = libs[precision], storage_dtype(precision)
    D = C // NH
    rng = np.random.default_rng(T * 100 + C)
    qkv, qkvt = draw(rng, (B, T, 3 * C), precision)
    dout, gt = draw(rng, (B, T, C), precision)
    qkvt.requires_grad_(True)
    qq, kk, vv = qkvt.split(C, dim=2)
    ref = F.scaled_dot_product_attention(*(t.reshape(B, T, NH, D).transpose(1, 2) for t in (qq, kk, vv)),
                                         is_causal=True).transpose(1, 2).reshape(B, T, C)
    ref.backward(gt)
    _, ref_lse = torch_gqa(qq.detach(), kk.detach(), vv.detach(), NH, NH, D, 0)
    args = (I(B), I(T), I(C), I(NH))

    out, lse = np.full((B, T, C), np.nan, dt), np.full((B, NH, T), 9.0, np.float32)
    lib.attention_forward(P(out), P(lse), P(qkv), *args)
    check("attention out", "out", precision, out, ref.detach().numpy())
    check("attention lse", "lse", precision, lse, ref_lse.numpy())

    start, startt = draw(rng, (B, T, 3 * C), precision)
    cq, ck = stored_out_correction(qq.detach(), kk.detach(), gt, ref.detach(),
                                   torch.from_numpy(out.astype(np.float64)), NH, NH, D, 0)
    want = startt + qkvt.grad + torch.cat([cq, ck, torch.zeros_like(cq)], 2)
    d = start.copy()
    lib.attention_backward(P(d), P(dout), P(qkv), P(out), P(lse), *args)
    check("d_qkv", "grad", precision, d, want.numpy())
    d2 = start.copy()
    lib.attention_backward(P(d2), P(dout), P(qkv), P(out), P(lse), *args)
    assert d2.tobytes() == d.tobytes(), "backward: not deterministic"
    lib.attention_backward(None, P(dout), P(qkv), P(out), P(lse), *args)   # no gradient wanted: nothing to do
    assert error(lib) is None


def test_head_dim_over_128_is_reported(libs):
    lib = libs["fp32"]
    T, D = 2, 129
    x = np.zeros((1, T, D), np.float32)
    out, lse = np.zeros_like(x), np.zeros((1, 1, T), np.float32)
    lib.gqa_attention_forward(P(out), P(lse), P(x), P(x), P(x), I(1), I(T), I(1), I(1), I(D), I(0))
    msg = error(lib)
    assert msg is not None and "head dim 129" in msg, msg
