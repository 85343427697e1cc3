"""The KV-cache decode kernels (rope_forward_at, attention_decode, gqa_attention_decode), fp32 and bf16 storage.

They are driven as a decoder drives them, at B = 1: a prefill chunk of several tokens at t0 = 0, single-token
steps, more chunks (one longer than the cache ring where there is a window), each call given only its chunk's
rows and the caches the previous calls left. After every call:
  * out's rows against the *forward kernel* run over all t0+T positions so far (its rows t0..t0+T-1). Both
    compute every score bitwise alike (the same products summed in the same order over the head dimension: the
    decode kernel packs key tiles as the forward does, and -std=c11 contracts no a*b+c); they differ only in
    where the online softmax's key tiles start (so in the maxima each exp is taken against, and the order in
    which the weights and the weighted values are summed). That costs at most eps_sm = gamma(N + 16) + 4 u
    max|s| of relative error in each weight and in their sum (N keys, a few roundings for the rescaling and
    the division, exp's argument's rounding |s - m| u with |s - m| <= 2 max|s|, over the two exps it passes
    through), so |decode - forward| <= 2 eps_sm sum_j p_j |v_j| (both kernels' errors). For the sizes here
    that is 3e-6 .. 2.2e-5 of sum_j p_j |v_j|: the fp32 check is rtol ~1e-5 of the natural magnitude. bf16: the
    two kernels round fp32 values that differ by at most that much, so they agree within one bf16 ulp (of the
    larger) plus that fp32 difference. A missing, extra or stale key moves an output by p_j |v_j|, far more;
  * out against a float64 reference from the same (stored) inputs, with test_ops_bf16's bound on an fp32
    attention's error, 2 eps_p sum_j p_j |v_j| (eps_p adds the scores' gamma(D + 2) rounding); bf16 within
    1 ulp + that of the rounded reference (check16);
  * bf16: out is bit for bit the fp32 kernel's on the same (widened) values, rounded once;
  * the caches: the rows of the positions they hold (the last S, or all) equal the chunk's k / v input rows bit
    for bit, and rows never written still hold the NaN they started with (a kernel that read them would put a
    NaN in out, which every check rejects).
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from gpt2gen.builder import kernels_library
from helpers import Fl, I, P
from test_ops_bf16 import U, check16, gamma, to16, ulp16, wide

PRECISIONS = ("fp32", "bf16")
NAN16 = np.uint16(0x7FC0)


@pytest.fixture(scope="module")
def libs():
    return {p: ctypes.CDLL(str(kernels_library(["attention", "gqa_attention", "rope"], precision=p)))
            for p in PRECISIONS}


# ---- stored tensors ---------------------------------------------------------------------------------------

def draw(prec, shape, rng) -> np.ndarray:
    """A random tensor as the kernels of ``prec`` store it (float32, or bf16 bits as uint16)."""
    x = rng.standard_normal(shape).astype(np.float32)
    return x if prec == "fp32" else to16(x)


def value(prec, buf) -> np.ndarray:
    """The exact value of a stored tensor, as float64."""
    return (buf if prec == "fp32" else wide(buf)).astype(np.float64)


def nans(prec, shape) -> np.ndarray:
    return np.full(shape, np.nan, np.float32) if prec == "fp32" else np.full(shape, NAN16, np.uint16)


def bits(buf) -> np.ndarray:
    return buf.view(np.uint32 if buf.dtype == np.float32 else np.uint16)


def check_bound(name, got, want, bound) -> None:
    """|got - want| <= bound elementwise (and got finite); on failure, the worst element."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    bound = np.broadcast_to(bound, got.shape)
    diff = np.abs(got - want)
    ok = diff <= bound
    if not ok.all():
        with np.errstate(invalid="ignore"):
            excess = np.where(np.isfinite(got), diff - bound, np.inf)
        i = np.unravel_index(int(np.argmax(excess)), got.shape)
        raise AssertionError(f"{name}: {int((~ok).sum())} of {got.size} elements out of bounds; worst at "
                             f"{tuple(int(x) for x in i)}: got {got[i]!r}, want {want[i]!r}, |diff| {diff[i]:.3g} "
                             f"> bound {bound[i]:.3g}")


# ---- rope_forward_at ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("prec", PRECISIONS)
@pytest.mark.parametrize("B,T,H,D,theta,t0", [(1, 1, 2, 8, 10000.0, 0), (1, 1, 2, 8, 10000.0, 37),
                                              (2, 5, 3, 6, 500.0, 11), (1, 3, 1, 2, 1e6, 4099),
                                              (1, 7, 4, 16, 10000.0, 1)])
def test_rope_forward_at(libs, prec, B, T, H, D, theta, t0):
    """rows [t0, t0+T) of rope_forward over t0+T rows, bit for bit, from rope_forward_at given those rows."""
    lib, rng = libs[prec], np.random.default_rng(21)
    x = draw(prec, (B, t0 + T, H * D), rng)
    full = nans(prec, x.shape)
    lib.rope_forward(P(full), P(x), I(B), I(t0 + T), I(H), I(D), Fl(theta))
    at = nans(prec, (B, T, H * D))
    lib.rope_forward_at(P(at), P(x[:, t0:].copy()), I(B), I(T), I(H), I(D), Fl(theta), I(t0))
    same = bits(at) == bits(full[:, t0:])
    assert same.all(), (f"rope_forward_at: {int((~same).sum())} of {same.size} elements differ from rope_forward's "
                        f"rows; first at {tuple(int(i) for i in np.argwhere(~same)[0])}")
    at0 = nans(prec, x.shape)
    lib.rope_forward_at(P(at0), P(x), I(B), I(t0 + T), I(H), I(D), Fl(theta), I(0))
    assert (bits(at0) == bits(full)).all(), "rope_forward_at(..., 0) is rope_forward"


# ---- attention_decode / gqa_attention_decode -------------------------------------------------------------------

def reference(q, k, v, H, K, D, window):
    """float64 attention over N positions from (N,H,D) q and (N,K,D) k, v: out (N,H,D), sum_j p_j |v_j|, max |s|."""
    N = q.shape[0]
    kh, vh = (np.repeat(x, H // K, axis=1).transpose(1, 0, 2) for x in (k, v))    # (H,N,D)
    s = np.einsum("thd,hnd->htn", q, kh) / np.sqrt(D)                             # (H,N queries,N keys)
    s_abs = np.einsum("thd,hnd->htn", np.abs(q), np.abs(kh)) / np.sqrt(D)
    qi, ki = np.arange(N)[:, None], np.arange(N)[None, :]
    seen = (ki <= qi) & ((ki > qi - window) if window > 0 else True)
    s = np.where(seen, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("htn,hnd->thd", p, vh)
    out_abs = np.einsum("htn,hnd->thd", p, np.abs(vh))
    return out, out_abs, float(np.where(seen, np.abs(s), 0).max()), float(np.where(seen, s_abs, 0).max())


class Decoder:
    """One precision's kernels over one sequence: its inputs (all N positions), caches, and the calls."""

    def __init__(self, lib, prec, inputs, H, K, D, window, S, packed):
        self.lib, self.prec, self.H, self.K, self.D, self.window, self.S, self.packed = \
            lib, prec, H, K, D, window, S, packed
        self.inputs = inputs                       # packed: (qkv,); else (q, k, v)
        self.kc, self.vc = nans(prec, (K, S, D)), nans(prec, (K, S, D))

    def k_v_rows(self):
        """The stored k and v rows of every position, (N, K, D) each."""
        if self.packed:
            C = self.H * self.D
            qkv = self.inputs[0]
            return (qkv[:, C:2 * C].reshape(-1, self.K, self.D), qkv[:, 2 * C:].reshape(-1, self.K, self.D))
        return self.inputs[1].reshape(-1, self.K, self.D), self.inputs[2].reshape(-1, self.K, self.D)

    def decode(self, t0, T):
        out = nans(self.prec, (T, self.H * self.D))
        rows = [x[t0:t0 + T].copy() for x in self.inputs]      # only the chunk's rows
        if self.packed:
            self.lib.attention_decode(P(out), P(rows[0]), P(self.kc), P(self.vc), I(T), I(self.H * self.D),
                                      I(self.H), I(t0), I(self.S))
        else:
            self.lib.gqa_attention_decode(P(out), *(P(r) for r in rows), P(self.kc), P(self.vc), I(T), I(self.H),
                                          I(self.K), I(self.D), I(self.window), I(t0), I(self.S))
        return out

    def forward(self, N):
        out, lse = nans(self.prec, (N, self.H * self.D)), np.zeros((self.H, N), np.float32)
        rows = [x[:N].copy() for x in self.inputs]
        if self.packed:
            self.lib.attention_forward(P(out), P(lse), P(rows[0]), I(1), I(N), I(self.H * self.D), I(self.H))
        else:
            self.lib.gqa_attention_forward(P(out), P(lse), *(P(r) for r in rows), I(1), I(N), I(self.H), I(self.K),
                                           I(self.D), I(self.window))
        return out


def drive(libs, prec, H, K, D, window, S, chunks, packed, seed=31):
    rng = np.random.default_rng(seed)
    N = sum(chunks)
    shapes = [(N, 3 * H * D)] if packed else [(N, H * D), (N, K * D), (N, K * D)]
    inputs = [draw(prec, s, rng) for s in shapes]
    dec = Decoder(libs[prec], prec, inputs, H, K, D, window, S, packed)
    # the fp32 kernels on the same (widened) values: the bf16 kernel's out must be theirs, rounded once
    dec32 = Decoder(libs["fp32"], "fp32", [value(prec, x).astype(np.float32) for x in inputs], H, K, D, window, S,
                    packed) if prec == "bf16" else None
    vals = [value(prec, x) for x in inputs]
    if packed:
        C = H * D
        q, k, v = (vals[0][:, i * C:(i + 1) * C] for i in range(3))
    else:
        q, k, v = vals
    ref, ref_abs, smax, sabs = reference(q.reshape(N, H, D), k.reshape(N, K, D), v.reshape(N, K, D), H, K, D, window)
    ref, ref_abs = ref.reshape(N, H * D), ref_abs.reshape(N, H * D)
    eps_sm = gamma(N + 16) + 4 * U * smax               # the softmax's error in each weight (module docstring)
    eps_p = eps_sm + 2 * gamma(D + 2) * sabs             # plus the scores' (test_ops_bf16.attention_ref)
    k_rows, v_rows = dec.k_v_rows()
    worst = {"vs forward": 0.0, "vs float64": 0.0}
    t0 = 0
    for T in chunks:
        t1 = t0 + T
        what = f"{prec} chunk t0={t0} T={T}"
        out = dec.decode(t0, T)
        fwd = dec.forward(t1)[t0:]
        got, want, nat = value(prec, out), value(prec, fwd), ref_abs[t0:t1]
        if prec == "fp32":
            check_bound(f"out vs forward ({what})", got, want, 2 * eps_sm * nat)
            check_bound(f"out vs float64 ({what})", got, ref[t0:t1], 2 * eps_p * nat)
        else:
            check_bound(f"out vs forward ({what})", got, want,
                        ulp16(np.maximum(np.abs(got), np.abs(want))) + 2 * eps_sm * nat)
            check16(f"out vs float64 ({what})", out, ref[t0:t1], 2 * eps_p * nat)
            out32 = dec32.decode(t0, T)
            same = to16(out32) == out
            assert same.all(), (f"out ({what}): {int((~same).sum())} elements are not the fp32 kernel's rounded "
                                f"once; first at {tuple(int(i) for i in np.argwhere(~same)[0])}")
        worst["vs forward"] = max(worst["vs forward"], float((np.abs(got - want) / nat).max()))
        worst["vs float64"] = max(worst["vs float64"], float((np.abs(got - ref[t0:t1]) / nat).max()))
        # the caches hold positions max(0, t1 - S) .. t1-1 at rows p % S; rows never written are still NaN
        for name, cache, rows in (("k_cache", dec.kc, k_rows), ("v_cache", dec.vc, v_rows)):
            held = range(max(0, t1 - S), t1)
            for p in held:
                assert (bits(cache[:, p % S]) == bits(rows[p])).all(), f"{name} row {p % S} != position {p} ({what})"
            unwritten = [r for r in range(S) if r >= t1]
            assert (bits(cache[:, unwritten]) == bits(nans(prec, (1,)))[0]).all(), f"{name}: unwritten rows ({what})"
        t0 = t1
    return worst


# (C, NH, S, chunks): S >= the sequence (no window)
GPT2_CASES = [
    (12, 3, 16, [5, 1, 1, 1, 4, 1]),          # head dim 4
    (10, 2, 14, [1, 1, 3, 1, 6]),             # odd head dim 5, T=1 from the start
    (7, 7, 11, [4, 1, 1, 1, 1, 2]),           # head dim 1
    (16, 2, 80, [70, 1, 1, 5]),               # past one key tile (64) in the prefill and the steps after
]

# (H, K, D, window, S, chunks); with a window S >= window: a ring
GQA_CASES = [
    (4, 4, 8, 0, 13, [5, 1, 1, 1, 4, 1]),     # multi-head
    (4, 2, 6, 0, 12, [3, 1, 1, 1, 5, 1]),     # grouped (2 query heads per kv head)
    (4, 1, 5, 0, 11, [4, 1, 1, 3, 1, 1]),     # multi-query, odd head dim
    (4, 2, 8, 4, 4, [7, 1, 1, 1, 3, 1, 6]),   # window 4 = S: prefill longer than the ring, wraps
    (2, 1, 3, 5, 8, [3, 1, 1, 10, 1, 2]),     # S > window, a chunk longer than S
    (3, 3, 7, 3, 3, [1, 1, 1, 1, 1, 1, 1]),   # T = 1 steps only, around a ring of 3
    (2, 2, 4, 70, 70, [100, 1, 1, 65, 1]),    # tiles split at the ring's end and at t0, past 64 keys
    (2, 1, 9, 0, 75, [70, 1, 1, 3]),          # no window, past one key tile
    (2, 1, 4, 3, 3, [3, 2, 2, 3]),            # ring of S = window: a chunk's first query reads rows its own
]                                             # positions then replace (the cache is written after every read)


@pytest.mark.parametrize("prec", PRECISIONS)
@pytest.mark.parametrize("C,NH,S,chunks", GPT2_CASES)
def test_attention_decode(libs, prec, C, NH, S, chunks):
    drive(libs, prec, NH, NH, C // NH, 0, S, chunks, packed=True)


@pytest.mark.parametrize("prec", PRECISIONS)
@pytest.mark.parametrize("H,K,D,window,S,chunks", GQA_CASES)
def test_gqa_attention_decode(libs, prec, H, K, D, window, S, chunks):
    drive(libs, prec, H, K, D, window, S, chunks, packed=False)

