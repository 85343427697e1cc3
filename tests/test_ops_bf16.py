"""Every op's kernels built for bf16 storage (``kernels_library(..., precision="bf16")``), against PyTorch.

bf16 storage, fp32 arithmetic: every parameter, activation and gradient is a bf16 (the top 16 bits of an
fp32), a kernel widens what it reads, computes in fp32 and rounds each element it stores to nearest even,
once; saved statistics (mean, rstd, lse), losses and AdamW's master weights and moments stay fp32.

Three checks per op:
  * against a float64 PyTorch reference computed from the same bf16 inputs and rounded to bf16 where the
    kernel stores (``check16``): within 1 bf16 ulp of the rounded reference, plus E, a bound on the kernel's
    fp32 error before its rounding (that error can flip a rounding). E is derived per op in the style of
    Higham's forward bounds: gamma(k) = k u / (1 - k u), u = 2^-24, times the expression evaluated with
    absolute values of every term, where k counts the roundings on the longest path (the length of a sum
    plus a few for the operations around it, and |z| more for an exp(z), whose argument's rounding costs
    |z| u of relative error). E stays under half a bf16 ulp for all but a few percent of the elements (those
    whose sum cancels), so the check is about as tight as the rounding itself: a second rounding in a sum
    (a bf16 partial sum) fails it;
  * bit for bit against the fp32 kernels run on the same (widened) values and rounded once, wherever the
    bf16 kernel does the same fp32 operations in the same order by construction (GEMM, elementwise ops,
    embeddings, attention's forward and d_v, softmax's backward, the norms' d_weight and d_bias, AdamW):
    that is the "one rounding per stored element" property itself. (A reduction that omp simd vectorises
    over 16-bit loads may be split into lanes differently than over fp32 ones: the norms' rows, softmax's
    forward, attention's d_q and d_k get only the bound above.) This assumes the default flags: -std=c11
    contracts no a*b+c;
  * a looser one against plain fp32 PyTorch on the unrounded inputs: the result of a bf16 model is within a
    few bf16 ulps of fp32's, rtol 2^-6 plus 2^-6 of the reference's largest magnitude (inputs rounded to
    bf16 move by up to 2^-9 relative, and the output's own rounding adds 2^-9).
Backward kernels accumulate: gradient buffers start from random bf16 values, so the reference is
round(start + gradient), summed in fp32 before the one rounding.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt2gen import ops as O
from gpt2gen.builder import kernels_library
from helpers import Fl, I, P, Z, assert_close

U = 2.0 ** -24          # fp32 unit roundoff
LOOSE = 2.0 ** -6       # the looser check against plain fp32: rtol, and atol relative to the largest |reference|


@pytest.fixture(scope="module")
def lib():
    return ctypes.CDLL(str(kernels_library(sorted(O.OPS), precision="bf16")))


@pytest.fixture(scope="module")
def lib32():
    return ctypes.CDLL(str(kernels_library(sorted(O.OPS))))


# ---- bf16 values ---------------------------------------------------------------------------------------

def to16(x) -> np.ndarray:
    """bf16 bits (uint16) of x, rounded to nearest even by PyTorch (float64 goes through fp32 first)."""
    t = torch.as_tensor(np.ascontiguousarray(np.asarray(x, dtype=np.float32)))
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).copy()


def wide(b: np.ndarray) -> np.ndarray:
    """The fp32 value of bf16 bits, exactly."""
    return (np.asarray(b, np.uint16).astype(np.uint32) << 16).view(np.float32)


class B16:
    """A random tensor: ``orig`` its fp32 draw, ``bits`` the bf16 the kernel gets, ``f`` / ``d`` their value
    in fp32 / float64 (exact), ``t`` that value as a float64 torch tensor."""

    def __init__(self, shape, rng, scale=1.0, shift=0.0):
        self.orig = (rng.standard_normal(shape) * scale + shift).astype(np.float32)
        self.bits = to16(self.orig)
        self.f = wide(self.bits)
        self.d = self.f.astype(np.float64)

    @property
    def t(self):
        return torch.from_numpy(self.d.copy())

    def ptr(self):
        return P(self.bits)


def zeros16(shape) -> np.ndarray:
    return np.zeros(shape, np.uint16)


def gamma(k) -> float:
    return k * U / (1 - k * U)


def round16(x) -> np.ndarray:
    """float64 x rounded to bf16 (8 significant bits, nearest even) directly, as a float64."""
    m, e = np.frexp(np.asarray(x, np.float64))
    return np.ldexp(np.round(m * 256) / 256, e)


def ulp16(x) -> np.ndarray:
    """The spacing of bf16 numbers at |x| (8 significant bits; bf16 has fp32's exponent range)."""
    a = np.maximum(np.abs(np.asarray(x, np.float64)), 2.0 ** -126)
    return np.exp2(np.floor(np.log2(a)) - 7)


def check16(name: str, got_bits, ref, err=0.0) -> None:
    """got (bf16 bits) == round(ref) within 1 ulp, or more exactly: |got - round(ref)| <= E + ulp(|ref| + E),
    where E (``err``, elementwise or scalar) bounds the kernel's fp32 error before it rounds. (If the kernel's
    fp32 value a is within E of the exact b, |rnd(a) - rnd(b)| <= E + ulp(a)/2 + ulp(b)/2.)"""
    got = wide(got_bits).astype(np.float64)
    ref = np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != reference {ref.shape}"
    want = round16(ref)
    err = np.broadcast_to(np.asarray(err, np.float64), ref.shape)
    bound = err + ulp16(np.abs(ref) + err)
    diff = np.abs(got - want)
    ok = diff <= bound
    if not ok.all():
        excess = np.where(np.isfinite(got), diff - bound, np.inf)
        i = np.unravel_index(int(np.argmax(excess)), got.shape)
        raise AssertionError(
            f"{name}: {int((~ok).sum())} of {got.size} bf16 elements further than 1 ulp + E from the rounded "
            f"reference; worst at {tuple(int(x) for x in i)}: got {got[i]!r}, rounded reference {want[i]!r} "
            f"(exact {ref[i]!r}), |diff| {diff[i]:.3g} > bound {bound[i]:.3g} (E {err[i]:.3g})")


def same16(name: str, got_bits, fp32_result) -> None:
    """Bit for bit: the bf16 kernel's output is the fp32 kernel's, rounded once."""
    want = to16(fp32_result)
    bad = got_bits != want
    if bad.any():
        i = np.unravel_index(int(np.argmax(bad)), bad.shape)
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.size} elements are not the fp32 kernel's result "
                             f"rounded once; first at {tuple(int(x) for x in i)}: got {wide(got_bits)[i]!r}, "
                             f"fp32 kernel {np.asarray(fp32_result)[i]!r} -> {wide(want)[i]!r}")


def loose(name: str, got_bits, ref32) -> None:
    """Against plain fp32 on the unrounded inputs: a few bf16 ulps (see the module docstring)."""
    ref32 = np.asarray(ref32, np.float64)
    assert_close(name + " (vs fp32)", wide(got_bits), ref32, rtol=LOOSE,
                 atol=LOOSE * max(float(np.abs(ref32).max()), 1e-30))


def grad32(fn, tensors, dout):
    """Plain fp32 autograd: the gradients of sum(fn(*tensors) * dout) (tensors as fp32 numpy arrays)."""
    ts = [torch.tensor(x, requires_grad=True) for x in tensors]
    out = fn(*ts)
    out.backward(torch.tensor(dout))
    return out.detach().numpy(), [t.grad.numpy() for t in ts]


# ---- the conversions themselves ------------------------------------------------------------------------

def test_rounding_is_torchs_round_to_nearest_even(lib):
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2 ** 32, 1 << 18, dtype=np.uint64).astype(np.uint32)
    special = np.array([0x00000000, 0x80000000, 0x7f800000, 0xff800000,       # +-0, +-inf
                        0x7f7fffff, 0xff7fffff, 0x7f7f8000, 0x7f7f7fff,       # the largest floats: round to inf or not
                        0x3f808000, 0x3f818000, 0x3f808001, 0x3f807fff,       # ties to even, either way; just past
                        0x00000001, 0x00008000, 0x00018000, 0x007fffff,       # subnormals
                        0x7fc00000, 0x7f800001, 0xff800001, 0x7f80ffff, 0x7fffffff], np.uint32)  # NaNs
    x = np.concatenate([bits, special]).view(np.float32)
    out = zeros16(x.size)
    lib.gg_to_bf16(P(out), P(x), Z(x.size))
    want = to16(x)
    nan = np.isnan(x)
    assert np.isnan(wide(out[nan])).all(), "a NaN stays a NaN (payloads in the dropped bits only included)"
    assert (out[nan] >> 15 == x.view(np.uint32)[nan] >> 31).all(), "a NaN keeps its sign (torch makes every NaN 0x7fc0)"
    bad = np.flatnonzero(out[~nan] != want[~nan])
    assert bad.size == 0, f"{bad.size} values rounded unlike torch, e.g. {x[~nan][bad[0]]!r} -> {out[~nan][bad[0]]:#06x}"
    back = np.zeros(x.size, np.float32)
    lib.gg_from_bf16(P(back), P(out), Z(x.size))
    assert (back.view(np.uint32) == out.astype(np.uint32) << 16).all(), "widening is exact"
    z = np.full(37, 0x3f80, np.uint16)
    lib.gg_zero16(P(z), Z(30))
    assert (z[:30] == 0).all() and (z[30:] == 0x3f80).all()


def test_nan_and_infinities_pass_through(lib):
    x = to16(np.array([np.nan, np.inf, 0.0, -100.0, 100.0], np.float32))
    out = zeros16(5)
    lib.gelu_forward(P(out), P(x), Z(5))
    o = wide(out)
    assert np.isnan(o[0]) and o[1] == np.inf and o[2] == 0 and o[3] == 0 and o[4] == 100
    logits = to16(np.array([[0.0, np.nan, 1.0]], np.float32))
    losses, lse = np.zeros(1, np.float32), np.zeros(1, np.float32)
    lib.softmax_crossentropy_forward(P(losses), P(lse), P(logits), P(np.zeros(1, np.int32)), I(1), I(3), I(3))
    assert np.isnan(losses[0])


# ---- embedding -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,T,C", [(1, 1, 1), (2, 3, 13), (2, 7, 33), (4, 64, 20)])
def test_embedding(lib, lib32, B, T, C):
    rng = np.random.default_rng(1)
    V, Pn = 11, T + 2
    idx = rng.integers(0, V, (B, T)).astype(np.int32)
    idx.flat[0] = idx.flat[-1]          # repeated tokens must accumulate in fp32, not race
    table, pos = B16((V, C), rng), B16((Pn, C), rng)
    out = zeros16((B, T, C))
    lib.embedding_forward(P(out), P(idx), table.ptr(), pos.ptr(), I(B), I(T), I(C))
    ref = table.d[idx] + pos.d[:T]
    check16("embedding out", out, ref, gamma(1) * (np.abs(table.d[idx]) + np.abs(pos.d[:T])))
    o32 = np.zeros((B, T, C), np.float32)
    lib32.embedding_forward(P(o32), P(idx), P(table.f), P(pos.f), I(B), I(T), I(C))
    same16("embedding out", out, o32)
    loose("embedding out", out, table.orig[idx] + pos.orig[:T])

    dout, st_t, st_p = B16((B, T, C), rng), B16((V, C), rng), B16((Pn, C), rng)
    dt, dp = st_t.bits.copy(), st_p.bits.copy()
    lib.embedding_backward(P(dt), P(dp), dout.ptr(), P(idx), I(B), I(T), I(C))
    gt, gt_abs = st_t.d.copy(), np.abs(st_t.d)
    np.add.at(gt, idx.ravel(), dout.d.reshape(-1, C))
    np.add.at(gt_abs, idx.ravel(), np.abs(dout.d).reshape(-1, C))
    n = int(np.bincount(idx.ravel()).max()) + 1          # the longest sum: a token's positions and the start
    check16("d_table", dt, gt, gamma(n) * gt_abs)
    gp, gp_abs = st_p.d.copy(), np.abs(st_p.d)
    gp[:T] += dout.d.sum(0)
    gp_abs[:T] += np.abs(dout.d).sum(0)
    check16("d_pos", dp, gp, gamma(B + 1) * gp_abs)
    dt32, dp32 = st_t.f.copy(), st_p.f.copy()
    lib32.embedding_backward(P(dt32), P(dp32), P(dout.f), P(idx), I(B), I(T), I(C))
    same16("d_table", dt, dt32)
    same16("d_pos", dp, dp32)
    t32 = st_t.orig.copy()
    np.add.at(t32, idx.ravel(), dout.orig.reshape(-1, C))
    loose("d_table", dt, t32)


# ---- layernorm -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("N,C", [(1, 1), (6, 13), (14, 33), (4, 300)])
def test_layernorm(lib, lib32, N, C):
    rng = np.random.default_rng(2)
    eps = 1e-5
    x, w, b = B16((N, C), rng, 2.0, 0.5), B16(C, rng), B16(C, rng)
    out, mean, rstd = zeros16((N, C)), np.zeros(N, np.float32), np.zeros(N, np.float32)
    lib.layernorm_forward(P(out), P(mean), P(rstd), x.ptr(), w.ptr(), b.ptr(), I(N), I(C), Fl(eps))
    m = x.d.mean(-1, keepdims=True)
    s = 1 / np.sqrt(((x.d - m) ** 2).mean(-1, keepdims=True) + eps)
    xhat = (x.d - m) * s
    ma = np.abs(x.d).mean(-1, keepdims=True)
    # fp32: |d mean| <= gamma(C+1) mean|x|, rstd within gamma(C+10) relative (a sum of C squares, a sqrt, a
    # divide); out = (x - mean) rstd w + b from those, evaluated with absolute values: (|x| + mean|x|) rstd |w| + |b|
    assert_close("layernorm mean", mean, m[:, 0], rtol=0, atol=float(gamma(C + 2) * ma.max()))
    assert_close("layernorm rstd", rstd, s[:, 0], rtol=gamma(C + 10), atol=0)
    check16("layernorm out", out, xhat * w.d + b.d, 2 * gamma(C + 10) * ((np.abs(x.d) + ma) * s * np.abs(w.d) + np.abs(b.d)))
    loose("layernorm out", out, F.layer_norm(torch.tensor(x.orig), (C,), torch.tensor(w.orig), torch.tensor(b.orig), eps))

    dout, sx, sw, sb = B16((N, C), rng), B16((N, C), rng), B16(C, rng), B16(C, rng)
    dx, dw, db = sx.bits.copy(), sw.bits.copy(), sb.bits.copy()
    lib.layernorm_backward(P(dx), P(dw), P(db), dout.ptr(), x.ptr(), w.ptr(), P(mean), P(rstd), I(N), I(C))
    gw = w.d * dout.d
    ref_dx = sx.d + s * (gw - gw.mean(-1, keepdims=True) - xhat * (gw * xhat).mean(-1, keepdims=True))
    # with absolute values: rstd (|w g| + mean|w g| + |xhat| mean|w g xhat|), |xhat| <= (|x| + mean|x|) rstd;
    # two reductions of C terms and the forward's fp32 mean and rstd: 2 gamma(C + 16)
    xa = (np.abs(x.d) + ma) * s
    nat = s * (np.abs(gw) + np.abs(gw).mean(-1, keepdims=True) + xa * (np.abs(gw) * xa).mean(-1, keepdims=True))
    check16("d_inp", dx, ref_dx, 2 * gamma(C + 16) * nat + 2 * U * np.abs(sx.d))
    check16("d_weight", dw, sw.d + (dout.d * xhat).sum(0),
            2 * gamma(N + C + 16) * (np.abs(sw.d) + (np.abs(dout.d) * xa).sum(0)))
    check16("d_bias", db, sb.d + dout.d.sum(0), gamma(N + 1) * (np.abs(sb.d) + np.abs(dout.d).sum(0)))
    dx32, dw32, db32 = sx.f.copy(), sw.f.copy(), sb.f.copy()
    lib32.layernorm_backward(P(dx32), P(dw32), P(db32), P(dout.f), P(x.f), P(w.f), P(mean), P(rstd), I(N), I(C))
    same16("d_weight", dw, dw32)
    same16("d_bias", db, db32)
    _, (g_x, g_w, g_b) = grad32(lambda a, c, d: F.layer_norm(a, (C,), c, d, eps), [x.orig, w.orig, b.orig], dout.orig)
    loose("d_bias", db, sb.orig + g_b)
    loose("d_weight", dw, sw.orig + g_w)
    if C > 1:   # (C = 1: the exact gradient is 0 and fp32 autograd returns its rounding, up to rstd = 316 times)
        loose("d_inp", dx, sx.orig + g_x)


# ---- matmul --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("N,C,OC,bias", [(1, 1, 1, True), (5, 13, 7, True), (9, 33, 5, False), (12, 64, 130, True),
                                         # past a reduction block (256: fp32 sums kept between blocks, the middle
                                         # blocks of 520 too) and a packed column block (384), partial register
                                         # blocks on every side
                                         (37, 300, 530, True), (61, 520, 45, False), (14, 257, 385, True),
                                         # d_weight reduces over N = 300 rows; rows past one chunk of kept sums
                                         (300, 40, 70, True), (2400, 300, 24, True)])
def test_matmul(lib, lib32, N, C, OC, bias):
    rng = np.random.default_rng(3)
    x, w = B16((N, C), rng), B16((OC, C), rng)
    b = B16(OC, rng) if bias else None
    out = zeros16((N, OC))
    lib.matmul_forward(P(out), x.ptr(), w.ptr(), b.ptr() if bias else None, I(N), I(C), I(OC))
    ref = x.d @ w.d.T + (b.d if bias else 0)
    # a sum of C products and the bias: gamma(C + 1) (|x| |w|^T + |b|)
    check16("matmul out", out, ref, gamma(C + 1) * (np.abs(x.d) @ np.abs(w.d).T + (np.abs(b.d) if bias else 0)))
    o32 = np.zeros((N, OC), np.float32)
    lib32.matmul_forward(P(o32), P(x.f), P(w.f), P(b.f) if bias else None, I(N), I(C), I(OC))
    same16("matmul out", out, o32)
    loose("matmul out", out, x.orig @ w.orig.T + (b.orig if bias else 0))

    dout, sx, sw = B16((N, OC), rng), B16((N, C), rng), B16((OC, C), rng)
    sb = B16(OC, rng) if bias else None
    dx, dw = sx.bits.copy(), sw.bits.copy()
    db = sb.bits.copy() if bias else None
    lib.matmul_backward(P(dx), P(dw), P(db), dout.ptr(), x.ptr(), w.ptr(), I(N), I(C), I(OC))
    ga = np.abs(dout.d)
    check16("d_inp", dx, sx.d + dout.d @ w.d, gamma(OC + 1) * (np.abs(sx.d) + ga @ np.abs(w.d)))
    check16("d_weight", dw, sw.d + dout.d.T @ x.d, gamma(N + 1) * (np.abs(sw.d) + ga.T @ np.abs(x.d)))
    if bias:
        check16("d_bias", db, sb.d + dout.d.sum(0), gamma(N + 1) * (np.abs(sb.d) + ga.sum(0)))
    dx32, dw32 = sx.f.copy(), sw.f.copy()
    db32 = sb.f.copy() if bias else None
    lib32.matmul_backward(P(dx32), P(dw32), P(db32), P(dout.f), P(x.f), P(w.f), I(N), I(C), I(OC))
    same16("d_inp", dx, dx32)
    same16("d_weight", dw, dw32)
    if bias:
        same16("d_bias", db, db32)
    loose("d_inp", dx, sx.orig + dout.orig @ w.orig)
    loose("d_weight", dw, sw.orig + dout.orig.T @ x.orig)
    # NULL gradients are skipped; the others are still right
    dw2 = sw.bits.copy()
    lib.matmul_backward(None, P(dw2), None, dout.ptr(), x.ptr(), w.ptr(), I(N), I(C), I(OC))
    assert (dw2 == dw).all()


# ---- attention -----------------------------------------------------------------------------------------

def attention_ref(q, k, v, H, K, D, window):
    """float64 from the bf16 values: out (B,T,H*D), lse (B,H,T), and what the error bounds need."""
    B, T, _ = q.shape
    g = H // K
    qh = q.reshape(B, T, H, D).transpose(1, 2)
    kh = k.reshape(B, T, K, D).transpose(1, 2).repeat_interleave(g, dim=1)
    vh = v.reshape(B, T, K, D).transpose(1, 2).repeat_interleave(g, dim=1)
    qi, ki = torch.arange(T)[:, None], torch.arange(T)[None, :]
    visible = ki <= qi
    if window:
        visible = visible & (ki > qi - window)
    scale = D ** -0.5
    s = ((qh @ kh.transpose(-2, -1)) * scale).masked_fill(~visible, float("-inf"))
    s_abs = ((qh.abs() @ kh.abs().transpose(-2, -1)) * scale).masked_fill(~visible, 0.0)
    p = s.softmax(-1)
    out = (p @ vh).transpose(1, 2).reshape(B, T, H * D)
    out_abs = (p @ vh.abs()).transpose(1, 2).reshape(B, T, H * D)
    lse = s.logsumexp(-1)
    # fp32: a score is off by gamma(D + 2) s_abs; p = exp(s - lse) then by twice that, plus the online softmax's
    # rescaling and sum over T keys (gamma(T + 16)) and exp's argument (|s| u, 4 for the four exps it passes)
    smax = float(s_abs.max())
    eps_p = 2 * gamma(D + 2) * smax + gamma(T + 16) + 4 * U * float(s.masked_fill(~visible, 0).abs().max())
    return {"out": out, "out_abs": out_abs, "lse": lse, "p": p, "qh": qh, "kh": kh, "vh": vh, "eps_p": eps_p,
            "scale": scale}


def attention_grads_ref(r, out16, dout, B, T, H, K, D):
    """The backward kernel's formula in float64: d_score = p (d_out.v - d_out.out) / sqrt(D), with d_out.out from
    the bf16 out the kernel is given (the forward's stored result), and the same with absolute values."""
    p, qh, kh, vh, scale = r["p"], r["qh"], r["kh"], r["vh"], r["scale"]
    gh = dout.reshape(B, T, H, D).transpose(1, 2)
    oh = out16.reshape(B, T, H, D).transpose(1, 2)
    ds = p * (gh @ vh.transpose(-2, -1) - (gh * oh).sum(-1, keepdim=True)) * scale
    ds_abs = p * (gh.abs() @ vh.abs().transpose(-2, -1) + (gh.abs() * oh.abs()).sum(-1, keepdim=True)) * scale
    g = H // K

    def heads(x, n):          # (B, H, T, D) -> (B, T, n*D), summed over each group when n = K
        if n == K:
            x = x.reshape(B, K, g, T, D).sum(2)
        return x.transpose(1, 2).reshape(B, T, n * D)
    return {"dq": heads(ds @ kh, H), "dk": heads(ds.transpose(-2, -1) @ qh, K), "dv": heads(p.transpose(-2, -1) @ gh, K),
            "dq_abs": heads(ds_abs @ kh.abs(), H), "dk_abs": heads(ds_abs.transpose(-2, -1) @ qh.abs(), K),
            "dv_abs": heads(p.transpose(-2, -1) @ gh.abs(), K)}


def run_attention_checks(r, out, lse, T, D, H, K, out32, lse32):
    check16("attention out", out, r["out"].numpy(), 2 * r["eps_p"] * r["out_abs"].numpy())
    lse_err = r["eps_p"] + 2 * U * np.abs(r["lse"].numpy())
    assert_close("attention log-sum-exp", lse, r["lse"].numpy(), rtol=0, atol=float(lse_err.max()))
    same16("attention out", out, out32)            # the fp32 kernel's, from the same values
    assert (lse.view(np.uint32) == lse32.view(np.uint32)).all(), "lse: the fp32 kernel's, bit for bit"


@pytest.mark.parametrize("B,T,C,NH", [(1, 1, 4, 1), (2, 7, 12, 3), (2, 9, 16, 4), (1, 150, 8, 2)])
def test_attention(lib, lib32, B, T, C, NH):
    rng = np.random.default_rng(4)
    D = C // NH
    qkv = B16((B, T, 3 * C), rng)
    out, lse = zeros16((B, T, C)), np.zeros((B, NH, T), np.float32)
    lib.attention_forward(P(out), P(lse), qkv.ptr(), I(B), I(T), I(C), I(NH))
    o32, l32 = np.zeros((B, T, C), np.float32), np.zeros((B, NH, T), np.float32)
    lib32.attention_forward(P(o32), P(l32), P(qkv.f), I(B), I(T), I(C), I(NH))
    q, k, v = qkv.t.split(C, dim=2)
    r = attention_ref(q, k, v, NH, NH, D, 0)
    run_attention_checks(r, out, lse, T, D, NH, NH, o32, l32)
    dout, start = B16((B, T, C), rng), B16((B, T, 3 * C), rng)
    d = start.bits.copy()
    lib.attention_backward(P(d), dout.ptr(), qkv.ptr(), P(out), P(lse), I(B), I(T), I(C), I(NH))
    gr = attention_grads_ref(r, torch.from_numpy(wide(out).astype(np.float64)), dout.t, B, T, NH, NH, D)
    ref = start.d + torch.cat([gr["dq"], gr["dk"], gr["dv"]], 2).numpy()
    nat = torch.cat([gr["dq_abs"], gr["dk_abs"], gr["dv_abs"]], 2).numpy()
    # p's error (eps_p) and the sums over D and T: twice gamma(T + D + 8) of the absolute-value evaluation
    check16("d_qkv", d, ref, 2 * (r["eps_p"] + gamma(T + D + 8)) * nat + 2 * U * np.abs(start.d))
    d32 = start.f.copy()    # d_v needs no reduction over 16-bit loads: the fp32 kernel's, from the same values
    lib32.attention_backward(P(d32), P(dout.f), P(qkv.f), P(wide(out)), P(lse), I(B), I(T), I(C), I(NH))
    same16("d_v", d[..., 2 * C:], d32[..., 2 * C:])

    def torch_attention(x):
        qq, kk, vv = x.split(C, dim=2)
        return F.scaled_dot_product_attention(*(t.reshape(B, T, NH, D).transpose(1, 2) for t in (qq, kk, vv)),
                                              is_causal=True).transpose(1, 2).reshape(B, T, C)
    o32, (g32,) = grad32(torch_attention, [qkv.orig], dout.orig)
    loose("attention out", out, o32)
    loose("d_qkv", d, start.orig + g32)


@pytest.mark.parametrize("B,T,H,K,D,window", [
    (2, 9, 6, 2, 5, 0),          # groups of 3, odd head dim
    (1, 8, 4, 1, 8, 0),          # multi-query
    (2, 13, 4, 2, 8, 4),         # sliding window shorter than T
    (1, 140, 4, 1, 8, 0),        # past two key tiles (64) of the online softmax
    (1, 140, 2, 2, 8, 70),       # a window that starts inside a tile
])
def test_gqa_attention(lib, lib32, B, T, H, K, D, window):
    rng = np.random.default_rng(14)
    q, k, v = B16((B, T, H * D), rng), B16((B, T, K * D), rng), B16((B, T, K * D), rng)
    out, lse = zeros16((B, T, H * D)), np.full((B, H, T), 9.0, np.float32)
    args = (I(B), I(T), I(H), I(K), I(D), I(window))
    lib.gqa_attention_forward(P(out), P(lse), q.ptr(), k.ptr(), v.ptr(), *args)
    o32, l32 = np.zeros((B, T, H * D), np.float32), np.zeros((B, H, T), np.float32)
    lib32.gqa_attention_forward(P(o32), P(l32), P(q.f), P(k.f), P(v.f), *args)
    r = attention_ref(q.t, k.t, v.t, H, K, D, window)
    run_attention_checks(r, out, lse, T, D, H, K, o32, l32)
    dout = B16((B, T, H * D), rng)
    sq, sk, sv = B16((B, T, H * D), rng), B16((B, T, K * D), rng), B16((B, T, K * D), rng)
    dq, dk, dv = sq.bits.copy(), sk.bits.copy(), sv.bits.copy()
    lib.gqa_attention_backward(P(dq), P(dk), P(dv), dout.ptr(), q.ptr(), k.ptr(), v.ptr(), P(out), P(lse), *args)
    gr = attention_grads_ref(r, torch.from_numpy(wide(out).astype(np.float64)), dout.t, B, T, H, K, D)
    g = H // K
    for name, buf, start, n in (("d_q", dq, sq, T + D), ("d_k", dk, sk, g * T + D), ("d_v", dv, sv, g * T)):
        key = name[2:]
        check16(name, buf, start.d + gr["d" + key].numpy(),
                2 * (r["eps_p"] + gamma(n + 8)) * gr["d" + key + "_abs"].numpy() + 2 * U * np.abs(start.d))
    dv32 = sv.f.copy()
    lib32.gqa_attention_backward(None, None, P(dv32), P(dout.f), P(q.f), P(k.f), P(v.f), P(wide(out)), P(lse), *args)
    same16("d_v", dv, dv32)
    dk2 = sk.bits.copy()          # any gradient may be NULL; the others are still right
    lib.gqa_attention_backward(None, P(dk2), None, dout.ptr(), q.ptr(), k.ptr(), v.ptr(), P(out), P(lse), *args)
    assert (dk2 == dk).all()

    def torch_gqa(qq, kk, vv):
        from test_ops_arch import torch_gqa as ref
        return ref(qq, kk, vv, H, K, D, window)[0]
    o32, (gq, gk, gv) = grad32(torch_gqa, [q.orig, k.orig, v.orig], dout.orig)
    loose("gqa out", out, o32)
    loose("d_q", dq, sq.orig + gq)
    loose("d_k", dk, sk.orig + gk)
    loose("d_v", dv, sv.orig + gv)


# ---- elementwise ops -----------------------------------------------------------------------------------

def exp_terms(z) -> np.ndarray:
    """Roundings worth of relative error in an fp32 function of an exp(z): a few, plus |z| (its argument)."""
    return 16 + 4 * np.abs(z)


@pytest.mark.parametrize("n", [1, 7, 1000])
def test_gelu(lib, lib32, n):
    rng = np.random.default_rng(5)
    x = B16(n, rng, 3.0)
    out = zeros16(n)
    lib.gelu_forward(P(out), x.ptr(), Z(n))
    xd = x.d
    u2 = 2 * np.sqrt(2 / np.pi) * (xd + 0.044715 * xd ** 3)       # gelu = x sigmoid(2u)
    sg = 1 / (1 + np.exp(-u2))
    check16("gelu out", out, xd * sg, exp_terms(u2) * U * np.abs(xd * sg))
    o32 = np.zeros(n, np.float32)
    lib32.gelu_forward(P(o32), P(x.f), Z(n))
    same16("gelu out", out, o32)
    loose("gelu out", out, F.gelu(torch.tensor(x.orig), approximate="tanh"))

    dout, start = B16(n, rng), B16(n, rng)
    d = start.bits.copy()
    lib.gelu_backward(P(d), dout.ptr(), x.ptr(), Z(n))
    du = np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * xd ** 2)
    term = 2 * xd * sg * (1 - sg) * du
    check16("d_inp", d, start.d + dout.d * (sg + term),
            exp_terms(u2) * U * np.abs(dout.d) * (sg + np.abs(term)) + 2 * U * np.abs(start.d))
    d32 = start.f.copy()
    lib32.gelu_backward(P(d32), P(dout.f), P(x.f), Z(n))
    same16("d_inp", d, d32)
    _, (g32,) = grad32(lambda a: F.gelu(a, approximate="tanh"), [x.orig], dout.orig)
    loose("d_inp", d, start.orig + g32)


@pytest.mark.parametrize("n", [13, 4096])
def test_residual(lib, lib32, n):
    rng = np.random.default_rng(6)
    a, b = B16(n, rng), B16(n, rng)
    out = zeros16(n)
    lib.residual_forward(P(out), a.ptr(), b.ptr(), Z(n))
    check16("residual out", out, a.d + b.d, U * np.abs(a.d + b.d))
    o32 = np.zeros(n, np.float32)
    lib32.residual_forward(P(o32), P(a.f), P(b.f), Z(n))
    same16("residual out", out, o32)
    loose("residual out", out, a.orig + b.orig)
    dout, sa, sb = B16(n, rng), B16(n, rng), B16(n, rng)
    da, db = sa.bits.copy(), sb.bits.copy()
    lib.residual_backward(P(da), P(db), dout.ptr(), Z(n))
    check16("d_a", da, sa.d + dout.d, U * np.abs(sa.d + dout.d))
    check16("d_b", db, sb.d + dout.d, U * np.abs(sb.d + dout.d))
    db2 = sb.bits.copy()
    lib.residual_backward(None, P(db2), dout.ptr(), Z(n))
    assert (db2 == db).all()
    loose("d_a", da, sa.orig + dout.orig)


@pytest.mark.parametrize("op", ["swiglu", "geglu"])
@pytest.mark.parametrize("n", [7, 1000])
def test_glu(lib, lib32, op, n):
    rng = np.random.default_rng(15)
    gate, up = B16(n, rng, 3.0), B16(n, rng)
    out = zeros16(n)
    getattr(lib, f"{op}_forward")(P(out), gate.ptr(), up.ptr(), Z(n))
    x = gate.d
    if op == "swiglu":
        z = x                                                    # silu(x) = x sigmoid(x)
        sg = 1 / (1 + np.exp(-x))
        act, dact, dact_abs = x * sg, sg * (1 + x * (1 - sg)), sg * (1 + np.abs(x) * (1 - sg))
    else:
        z = 2 * np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)     # gelu(x) = x sigmoid(2u)
        sg = 1 / (1 + np.exp(-z))
        term = 2 * x * sg * (1 - sg) * np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * x ** 2)
        act, dact, dact_abs = x * sg, sg + term, sg + np.abs(term)
    check16(f"{op} out", out, act * up.d, exp_terms(z) * U * np.abs(act * up.d))
    o32 = np.zeros(n, np.float32)
    getattr(lib32, f"{op}_forward")(P(o32), P(gate.f), P(up.f), Z(n))
    same16(f"{op} out", out, o32)
    fn = (lambda g, u: F.silu(g) * u) if op == "swiglu" else (lambda g, u: F.gelu(g, approximate="tanh") * u)
    loose(f"{op} out", out, fn(torch.tensor(gate.orig), torch.tensor(up.orig)))

    dout, sg_, su = B16(n, rng), B16(n, rng), B16(n, rng)
    dg, du = sg_.bits.copy(), su.bits.copy()
    getattr(lib, f"{op}_backward")(P(dg), P(du), dout.ptr(), gate.ptr(), up.ptr(), Z(n))
    check16("d_up", du, su.d + dout.d * act, exp_terms(z) * U * np.abs(dout.d * act) + 2 * U * np.abs(su.d))
    check16("d_gate", dg, sg_.d + dout.d * up.d * dact,
            2 * exp_terms(z) * U * np.abs(dout.d * up.d) * dact_abs + 2 * U * np.abs(sg_.d))
    dg32, du32 = sg_.f.copy(), su.f.copy()
    getattr(lib32, f"{op}_backward")(P(dg32), P(du32), P(dout.f), P(gate.f), P(up.f), Z(n))
    same16("d_gate", dg, dg32)
    same16("d_up", du, du32)
    _, (gg32, gu32) = grad32(fn, [gate.orig, up.orig], dout.orig)
    loose("d_gate", dg, sg_.orig + gg32)
    loose("d_up", du, su.orig + gu32)
    getattr(lib, f"{op}_backward")(None, None, dout.ptr(), gate.ptr(), up.ptr(), Z(n))


# ---- softmax + cross-entropy ---------------------------------------------------------------------------

@pytest.mark.parametrize("N,V,Vp", [(1, 1, 1), (6, 13, 13), (64, 50, 64), (3, 1000, 1024)])
def test_softmax_crossentropy(lib, lib32, N, V, Vp):
    rng = np.random.default_rng(7)
    logits = B16((N, Vp), rng, 4.0)
    targets = rng.integers(0, V, N).astype(np.int32)
    losses, lse = np.zeros(N, np.float32), np.zeros(N, np.float32)
    lib.softmax_crossentropy_forward(P(losses), P(lse), logits.ptr(), P(targets), I(N), I(V), I(Vp))
    x = logits.t[:, :V]
    ref_lse = x.logsumexp(-1).numpy()
    xt = logits.d[np.arange(N), targets]
    # fp32 (losses and lse are stored in fp32): a sum of V exps, each off by its argument's rounding
    # (|x - max| u) and a few ulps: gamma(V + 8) + u (|x - max| + 2 |lse|); the loss rounds once more
    spread = (logits.d[:, :V].max(-1) - logits.d[:, :V].min(-1))
    e_lse = gamma(V + 8) + U * (spread + 2 * np.abs(ref_lse))
    assert_close("log-sum-exp", lse, ref_lse, rtol=0, atol=float(e_lse.max()))
    assert_close("losses", losses, ref_lse - xt, rtol=0, atol=float((e_lse + 2 * U * (np.abs(ref_lse) + np.abs(xt))).max()))
    l32 = F.cross_entropy(torch.tensor(logits.orig[:, :V]), torch.from_numpy(targets).long(), reduction="none").numpy()
    assert_close("losses (vs fp32)", losses, l32, rtol=LOOSE, atol=LOOSE * float(np.abs(l32).max()))

    dloss = rng.random(N).astype(np.float32)                       # d_losses stay fp32
    start = B16((N, Vp), rng)
    d = start.bits.copy()
    lib.softmax_crossentropy_backward(P(d), P(dloss), logits.ptr(), P(lse), P(targets), I(N), I(V), I(Vp))
    assert (d[:, V:] == start.bits[:, V:]).all(), "the padding columns get no gradient"
    p = np.zeros((N, Vp))
    p[:, :V] = x.softmax(-1).numpy()
    onehot = np.zeros((N, Vp))
    onehot[np.arange(N), targets] = 1
    g = dloss.astype(np.float64)[:, None]
    # p = exp(x - lse) with the kernel's lse (off by e_lse) and exp's argument: relative e_lse + u |x - lse| + 4u;
    # then start + p g - g: two roundings
    e_p = e_lse[:, None] + U * (np.abs(logits.d - ref_lse[:, None]) + 4)
    err = g * p * e_p + 2 * U * (np.abs(start.d) + g * (p + onehot))
    check16("d_logits", d[:, :V], (start.d + (p - onehot) * g)[:, :V], err[:, :V])
    d32 = start.f.copy()       # the same lse: (start + p g) - g for the target, rounded once
    lib32.softmax_crossentropy_backward(P(d32), P(dloss), P(logits.f), P(lse), P(targets), I(N), I(V), I(Vp))
    same16("d_logits", d, d32)
    _, (g32,) = grad32(lambda a: F.cross_entropy(a[:, :V], torch.from_numpy(targets).long(), reduction="none"),
                       [logits.orig], dloss)
    loose("d_logits", d, start.orig + g32)


# ---- token embedding -----------------------------------------------------------------------------------

@pytest.mark.parametrize("B,T,C,scale,pad", [(1, 1, 1, 1.0, -1), (2, 5, 13, 1.0, -1), (3, 7, 33, float(np.sqrt(33)), 0),
                                             (2, 9, 16, 4.0, 3)])
def test_token_embedding(lib, lib32, B, T, C, scale, pad):
    rng = np.random.default_rng(11)
    V = 11
    idx = rng.integers(0, V, (B, T)).astype(np.int32)
    idx.flat[0] = idx.flat[-1]
    if pad >= 0:
        idx.flat[1 % idx.size] = pad    # the padding token is looked up but gets no gradient
    table = B16((V, C), rng)
    out = zeros16((B, T, C))
    lib.token_embedding_forward(P(out), P(idx), table.ptr(), I(B), I(T), I(C), Fl(scale))
    sc = float(np.float32(scale))
    check16("token_embedding out", out, table.d[idx] * sc, U * np.abs(table.d[idx] * sc))
    o32 = np.zeros((B, T, C), np.float32)
    lib32.token_embedding_forward(P(o32), P(idx), P(table.f), I(B), I(T), I(C), Fl(scale))
    same16("token_embedding out", out, o32)
    loose("token_embedding out", out, table.orig[idx] * np.float32(scale))

    dout, start = B16((B, T, C), rng), B16((V, C), rng)
    dt = start.bits.copy()
    lib.token_embedding_backward(P(dt), dout.ptr(), P(idx), I(B), I(T), I(C), Fl(scale), I(pad))
    keep = idx.ravel() != pad
    ref, nat = start.d.copy(), np.abs(start.d)
    np.add.at(ref, idx.ravel()[keep], dout.d.reshape(-1, C)[keep] * sc)
    np.add.at(nat, idx.ravel()[keep], np.abs(dout.d.reshape(-1, C)[keep]) * abs(sc))
    n = int(np.bincount(idx.ravel()).max()) + 1
    check16("d_table", dt, ref, gamma(2 * n) * nat)     # n products and n additions
    dt32 = start.f.copy()
    lib32.token_embedding_backward(P(dt32), P(dout.f), P(idx), I(B), I(T), I(C), Fl(scale), I(pad))
    same16("d_table", dt, dt32)
    if pad >= 0:
        assert (dt[pad] == start.bits[pad]).all(), "the padding row gets no gradient"
    lib.token_embedding_backward(None, dout.ptr(), P(idx), I(B), I(T), I(C), Fl(scale), I(pad))


# ---- rmsnorm -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("N,C", [(1, 1), (6, 13), (14, 33), (4, 300)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rmsnorm(lib, lib32, N, C, offset):
    rng = np.random.default_rng(12)
    eps = 1e-6
    x, w = B16((N, C), rng, 2.0, 0.3), B16(C, rng, 0.3 if offset else 1.0)
    out, rstd = zeros16((N, C)), np.zeros(N, np.float32)
    lib.rmsnorm_forward(P(out), P(rstd), x.ptr(), w.ptr(), I(N), I(C), Fl(eps), Fl(offset))
    s = 1 / np.sqrt((x.d ** 2).mean(-1, keepdims=True) + eps)
    wp = w.d + offset
    # rstd: a sum of C squares, a divide and a sqrt: gamma(C + 10) relative; out = x rstd w': 2 gamma(C + 10)
    assert_close("rmsnorm rstd", rstd, s[:, 0], rtol=gamma(C + 10), atol=0)
    check16("rmsnorm out", out, x.d * s * wp, 2 * gamma(C + 10) * np.abs(x.d) * s * (np.abs(w.d) + offset))
    h = torch.tensor(x.orig) * torch.rsqrt(torch.tensor(x.orig).pow(2).mean(-1, keepdim=True) + eps)
    loose("rmsnorm out", out, h * (torch.tensor(w.orig) + offset))

    dout, sx, sw = B16((N, C), rng), B16((N, C), rng), B16(C, rng)
    dx, dw = sx.bits.copy(), sw.bits.copy()
    lib.rmsnorm_backward(P(dx), P(dw), dout.ptr(), x.ptr(), w.ptr(), P(rstd), I(N), I(C), Fl(offset))
    g = dout.d
    dot = (g * wp * x.d).sum(-1, keepdims=True)
    ref_dx = sx.d + s * wp * g - x.d * dot * s ** 3 / C
    # with absolute values: rstd |w' g| + |x| rstd^3 / C sum |g w' x|, a C-term sum and the forward's rstd
    wa = np.abs(w.d) + offset
    nat = s * wa * np.abs(g) + np.abs(x.d) * s ** 3 / C * (np.abs(g) * wa * np.abs(x.d)).sum(-1, keepdims=True)
    check16("d_inp", dx, ref_dx, 2 * gamma(C + 16) * nat + 2 * U * np.abs(sx.d))
    check16("d_weight", dw, sw.d + (g * x.d * s).sum(0),
            2 * gamma(N + C + 16) * (np.abs(sw.d) + (np.abs(g * x.d) * s).sum(0)))
    dx32, dw32 = sx.f.copy(), sw.f.copy()
    lib32.rmsnorm_backward(P(dx32), P(dw32), P(dout.f), P(x.f), P(w.f), P(rstd), I(N), I(C), Fl(offset))
    same16("d_weight", dw, dw32)
    _, (g_x, g_w) = grad32(lambda a, c: a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + eps) * (c + offset),
                           [x.orig, w.orig], dout.orig)
    loose("d_weight", dw, sw.orig + g_w)
    if C > 1:
        loose("d_inp", dx, sx.orig + g_x)
    lib.rmsnorm_backward(None, None, dout.ptr(), x.ptr(), w.ptr(), P(rstd), I(N), I(C), Fl(offset))


# ---- rope ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,T,H,D,theta", [(1, 1, 1, 2, 10000.0), (2, 5, 3, 8, 10000.0), (1, 16, 2, 12, 500.0),
                                           (3, 7, 1, 6, 1e6)])
def test_rope(lib, lib32, B, T, H, D, theta):
    rng = np.random.default_rng(13)
    x = B16((B, T, H * D), rng)
    out = zeros16((B, T, H * D))
    lib.rope_forward(P(out), x.ptr(), I(B), I(T), I(H), I(D), Fl(theta))
    # cos and sin of the fp32 angle, as transformers (and the kernel) compute it; the rest in float64
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    ang = torch.arange(T).float()[:, None] * inv_freq[None, :]
    cos, sin = ang.cos().double(), ang.sin().double()

    def rot(t, sign):    # (B, T, H*D): x1 c - s x2 | x2 c + s x1 (sign -1: the transpose, for the backward)
        th = t.reshape(B, T, H, D)
        a, b = th[..., :D // 2], th[..., D // 2:]
        c, s = cos[None, :, None, :], sign * sin[None, :, None, :]
        return torch.cat([a * c - b * s, b * c + a * s], -1).reshape(B, T, H * D), \
            torch.cat([a.abs() * c.abs() + b.abs() * s.abs(), b.abs() * c.abs() + a.abs() * s.abs()], -1).reshape(B, T, H * D)
    ref, nat = rot(x.t, 1.0)
    # two products and a sum, and libm's cosf / sinf within an ulp or two of torch's: 8 u of the absolute value
    check16("rope out", out, ref.numpy(), 8 * U * nat.numpy())
    o32 = np.zeros((B, T, H * D), np.float32)
    lib32.rope_forward(P(o32), P(x.f), I(B), I(T), I(H), I(D), Fl(theta))
    same16("rope out", out, o32)
    from test_ops_arch import torch_rope
    loose("rope out", out, torch_rope(torch.tensor(x.orig), H, D, theta))

    dout, start = B16((B, T, H * D), rng), B16((B, T, H * D), rng)
    d = start.bits.copy()
    lib.rope_backward(P(d), dout.ptr(), I(B), I(T), I(H), I(D), Fl(theta))
    g, gnat = rot(dout.t, -1.0)
    check16("d_inp", d, start.d + g.numpy(), 8 * U * gnat.numpy() + 2 * U * np.abs(start.d))
    d32 = start.f.copy()
    lib32.rope_backward(P(d32), P(dout.f), I(B), I(T), I(H), I(D), Fl(theta))
    same16("d_inp", d, d32)
    lib.rope_backward(None, dout.ptr(), I(B), I(T), I(H), I(D), Fl(theta))


# ---- AdamW ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weight_decay,grad_scale", [(0.0, 1.0), (0.1, 0.5)])
def test_adamw(lib, lib32, weight_decay, grad_scale):
    """The update runs on the fp32 master weights, as fp32 AdamW does (torch's, to fp32 accuracy, and the
    fp32 kernel's, bit for bit), from the bf16 gradients; the bf16 weights are the master weights rounded."""
    rng = np.random.default_rng(8)
    n, lr, b1, b2, eps = 1037, 1e-2, 0.9, 0.95, 1e-8
    p0 = rng.standard_normal(n).astype(np.float32)
    tp = torch.tensor(p0.copy(), requires_grad=True)
    opt = torch.optim.AdamW([tp], lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay)
    t32 = torch.tensor(p0.copy(), requires_grad=True)          # plain fp32 training, on the unrounded gradients
    opt32 = torch.optim.AdamW([t32], lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay)
    master, m, v = p0.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)
    p = to16(master)
    k32, km, kv = p0.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)   # the fp32 kernel, on the same values
    for step in range(1, 6):
        g = B16(n, rng)
        tp.grad = torch.tensor(g.f * np.float32(grad_scale))
        opt.step()
        t32.grad = torch.tensor(g.orig * np.float32(grad_scale))
        opt32.step()
        bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
        hyper = (Z(n), Fl(lr), Fl(b1), Fl(b2), Fl(eps), Fl(weight_decay), Fl(grad_scale), Fl(bc1), Fl(bc2))
        lib.adamw_update(P(p), g.ptr(), P(master), P(m), P(v), *hyper)
        lib32.adamw_update(P(k32), P(g.f), P(km), P(kv), *hyper)
        assert_close(f"AdamW master step {step}", master, tp.detach().numpy(), rtol=1e-5, atol=1e-6)
        assert (master.view(np.uint32) == k32.view(np.uint32)).all(), "master: the fp32 kernel's, bit for bit"
        assert (m == km).all() and (v == kv).all()
        assert (p == to16(master)).all(), "the bf16 weights are the master weights rounded to nearest even"
        check16(f"AdamW weights step {step}", p, tp.detach().numpy().astype(np.float64), 1e-5 * np.abs(master) + 1e-6)
        # vs fp32 on unrounded gradients: a gradient's rounding (2^-9) moves an update by at most about that
        # relative to lr, and the weights' own rounding adds 2^-9 relative
        assert_close(f"AdamW weights step {step} (vs fp32)", wide(p), t32.detach().numpy(),
                     rtol=2.0 ** -8, atol=step * lr * 2.0 ** -6)
