"""The CUDA decode (KV cache) kernels under the emulator (tests/cuda_ops.py): rope_forward_at, attention_decode and
gqa_attention_decode (templates/cuda/ops/rope.cu.j2, attention.cu.j2; the contract: /work/notes/decode_contract.md),
in fp32, bf16 and fp16 storage.

  * rope_forward_at(..., t0) over T rows is bitwise rope_forward's rows [t0, t0+T) over t0 + T rows.
  * The attention decode kernels are driven as a decoder drives them: a prefill chunk at t0 = 0, single-token
    steps, more chunks, every chunk's q, k, v new random storage-type values, one pair of caches (NaN at the
    start, as unwritten memory) carried across the calls. After every call: the output rows equal the rows
    [t0, t0+T) of the forward kernel (attention_forward / gqa_attention_forward, same library) over all the
    positions so far, and a float64 reference; the caches hold exactly the k / v rows of the last S positions
    (position p at row p % S) bitwise, and every other row is still untouched. Cases: MHA, GQA (H = 4, K = 2),
    MQA, sliding windows with a ring of S = window rows that wraps (prefill chunks longer than S) and S > window,
    head dims 1 to 128 (odd ones, past 32 columns, 128), key ranges past one group of 32, T = 1 chunks only, head
    dim 256 (decode only: the forward takes <= 128) against float64. The whole sequence is run twice: the same bits.

Tolerances: the per-element bound B32 of one fp32 evaluation of the exact value v (Higham's gamma_k, u = 2^-24),
for a query with n visible keys in G <= ceil(n/32) + 1 groups (online-softmax rescales), head dim D:
  * the score s_j = scale q.k_j: D + 1 roundings relative to S_j = scale sum_d |q_d k_jd|;
  * e_j = exp(s_j - m): the subtraction (u |s_j - m| <= u (|s_j| + max|s|)), exp (2 ulps), <= G rescales of
    3 roundings each: a relative error rho_j of p_j, which moves out by sum_j p_j rho_j (v_j - out);
  * the weighted value sum over n keys and G rescales, relative to sum_j p_j |v_j|; l's n positive terms and
    1/l, the product: relative to |out|.
  B32 = 2 u [(n + G + 2) sum p|v| + (n + 2) |out| + sum_j p_j |v_j - out| ((D + 1) S_j + |s_j| + max|s| + 2 + 3G)]
  (twice the count, as tests/test_ops_cuda_llama.py does). For D = 128 and ~50 keys it is ~1e-5 relative to
  sum p|v|, the "rtol ~1e-5" of the contract; the errors measured are ~100x smaller.
  * fp32: |decode - forward| <= 2 B32 (two evaluations in different summation orders), |decode - ref| <= B32.
  * bf16 / fp16: both kernels round their fp32 value once: |decode - forward| <= ulp16(max(|a|, |b|)) + 2 B32
    (one storage ulp: a rounding the fp32 round-off flipped), |decode - ref| <= ulp16(|decode|) / 2 + B32;
    ulp16(x) is the storage type's spacing at x (2^(e-p) for |x| in [2^(e-1), 2^e), p = 8 / 11 significant
    bits; the subnormal spacing at least). Note that one ulp is up to 2^-7 / 2^-10 relative (at the bottom of
    a binade): a bare rtol of 2^-8 / 2^-11 is half an ulp, and can reject a flipped rounding.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from cuda_ops import error, libraries, storage_dtype
from helpers import Fl, I, P

PRECISIONS = ("fp32", "bf16", "fp16")
U = 2.0 ** -24
BITS = {"bf16": 8, "fp16": 11}                      # significant bits of the 16-bit storage types
MIN_SPACING = {"bf16": 2.0 ** -133, "fp16": 2.0 ** -24}


@pytest.fixture(scope="module")
def libs():
    return libraries()   # every op, one library per precision, shared by the op test files (tests/cuda_ops.py)


def draw(rng, shape, precision):
    return rng.standard_normal(shape).astype(np.float32).astype(storage_dtype(precision))


def nan_like(shape, precision):
    return np.full(shape, np.nan, np.float32).astype(storage_dtype(precision))


def bits(a) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def ulp16(x, precision):
    """The spacing of the storage type at |x| (elementwise)."""
    x = np.abs(np.asarray(x, np.float64))
    _, e = np.frexp(x)
    sp = np.ldexp(1.0, e - BITS[precision])
    return np.where(x == 0, MIN_SPACING[precision], np.maximum(sp, MIN_SPACING[precision]))


def within(name, got, want, bound):
    """|got - want| <= bound elementwise (got finite); on failure the worst element."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    err = np.abs(got - want)
    ratio = np.where(np.isfinite(got), err / np.maximum(bound, 1e-300), np.inf)
    worst = np.unravel_index(int(np.argmax(ratio)), got.shape)
    assert ratio[worst] <= 1.0, (
        f"{name}: {int(np.sum(~(ratio <= 1)))} of {got.size} elements out of bounds; worst at "
        f"{tuple(int(i) for i in worst)}: got {got[worst]!r}, want {want[worst]!r}, |diff| {err[worst]:.3g}, "
        f"bound {bound[worst]:.3g}")


def expect_bitwise(name, got, want):
    g, w = bits(got), bits(want)
    if not np.array_equal(g, w):
        bad = np.argwhere(g != w)
        i = tuple(int(x) for x in bad[0])
        raise AssertionError(f"{name}: {len(bad)} of {g.size} elements differ in bits; first at {i}: "
                             f"got {np.asarray(got)[i]!r}, want {np.asarray(want)[i]!r}")


# ---- rope_forward_at -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("B,t0,T,H,D,theta", [
    (1, 0, 1, 1, 2, 10000.0),       # t0 = 0: rope_forward itself
    (2, 7, 5, 3, 8, 10000.0),       # B > 1: every batch row's t restarts at t0
    (1, 1000, 3, 2, 12, 500.0),     # a far position
    (1, 5, 1, 2, 7, 1e6),           # odd D: the last value of each head is left alone
    (1, 3, 2, 1, 2100, 10000.0),    # past one 1024-pair angle table
])
def test_rope_forward_at(libs, precision, B, t0, T, H, D, theta):
    lib = libs[precision]
    rng = np.random.default_rng(t0 * 10 + D)
    x = draw(rng, (B, t0 + T, H * D), precision)
    full = nan_like(x.shape, precision)
    lib.rope_forward(P(full), P(x), I(B), I(t0 + T), I(H), I(D), Fl(theta))
    part_in = np.ascontiguousarray(x[:, t0:])
    part = nan_like(part_in.shape, precision)
    lib.rope_forward_at(P(part), P(part_in), I(B), I(T), I(H), I(D), Fl(theta), I(t0))
    assert error(lib) is None
    expect_bitwise(f"rope_forward_at t0={t0} ({precision})", part, full[:, t0:])


# ---- attention decode ----------------------------------------------------------------------------------------

def reference(q, k, v, H, K, D, window, t0, T):
    """float64 out of the queries at positions t0 .. t0+T-1 over every position so far (q, k, v: (N, .)), and
    B32 (the module docstring), both (T, H*D)."""
    N = k.shape[0]
    qh = q[t0:t0 + T].astype(np.float64).reshape(T, H, D).transpose(1, 0, 2)           # (H,T,D)
    kh, vh = (np.repeat(a.astype(np.float64).reshape(N, K, D).transpose(1, 0, 2), H // K, axis=0)
              for a in (k, v))                                                          # (H,N,D)
    scale = 1.0 / math.sqrt(D)
    pos, key = np.arange(t0, t0 + T)[:, None], np.arange(N)[None, :]
    seen = (key <= pos) & ((key > pos - window) if window > 0 else True)               # (T,N)
    s = np.einsum("htd,hnd->htn", qh, kh) * scale
    sabs = np.einsum("htd,hnd->htn", np.abs(qh), np.abs(kh)) * scale
    s = np.where(seen, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = p @ vh                                                                        # (H,T,D)
    n = seen.sum(-1)[None, :, None]                                                     # (1,T,1)
    G = np.ceil(n / 32) + 1
    s0 = np.where(seen, s, 0.0)
    smax = np.abs(s0).max(-1, keepdims=True)
    rho = (D + 1) * sabs + np.abs(s0) + smax + 2 + 3 * G                                # (H,T,N)
    dev = np.abs(vh[:, None, :, :] - out[:, :, None, :])                                # (H,T,N,D)
    b = (2 * U) * ((n + G + 2) * (p @ np.abs(vh)) + (n + 2) * np.abs(out)
                   + np.einsum("htn,htnd->htd", p * rho, dev))
    return tuple(a.transpose(1, 0, 2).reshape(T, H * D) for a in (out, b))


def compare_out(name, precision, got, fwd, ref, b32):
    """The decode rows against the forward kernel's rows (fwd, or None) and the float64 reference."""
    g = np.asarray(got, np.float64)
    if precision == "fp32":
        if fwd is not None:
            within(f"{name} vs forward", g, fwd, 2 * b32)
        within(f"{name} vs float64", g, ref, b32)
    else:
        if fwd is not None:
            f = np.asarray(fwd, np.float64)
            within(f"{name} vs forward", g, f, ulp16(np.maximum(np.abs(g), np.abs(f)), precision) + 2 * b32)
        within(f"{name} vs float64", g, ref, ulp16(g, precision) / 2 + b32)


def expected_cache(rows, S, K, D, precision):
    """The caches after every position of rows (N, K*D) was written in order: position p at row p % S."""
    c = nan_like((K, S, D), precision)
    for p in range(rows.shape[0]):
        c[:, p % S, :] = rows[p].reshape(K, D)
    return c


def run_gqa(lib, precision, H, K, D, window, S, chunks, seed, forward=True):
    """One decoder run: returns every call's output (bits), checks after every call."""
    rng = np.random.default_rng(seed)
    N = sum(chunks)
    qa, ka, va = (draw(rng, (N, n * D), precision) for n in (H, K, K))
    kc, vc = nan_like((K, S, D), precision), nan_like((K, S, D), precision)
    outs, t0 = [], 0
    tag = f"gqa_attention_decode H={H} K={K} D={D} window={window} S={S} ({precision})"
    for T in chunks:
        q, k, v = (np.ascontiguousarray(a[t0:t0 + T]) for a in (qa, ka, va))
        out = nan_like((T, H * D), precision)
        lib.gqa_attention_decode(P(out), P(q), P(k), P(v), P(kc), P(vc),
                                 I(T), I(H), I(K), I(D), I(window), I(t0), I(S))
        assert error(lib) is None
        fwd = None
        if forward:
            n = t0 + T
            fo, lse = nan_like((1, n, H * D), precision), np.zeros((1, H, n), np.float32)
            lib.gqa_attention_forward(P(fo), P(lse), P(qa[:n]), P(ka[:n]), P(va[:n]),
                                      I(1), I(n), I(H), I(K), I(D), I(window))
            fwd = fo[0, t0:]
        ref, b32 = reference(qa, ka, va, H, K, D, window, t0, T)
        compare_out(f"{tag} t0={t0} T={T}", precision, out, fwd, ref, b32)
        expect_bitwise(f"{tag} k_cache after t0={t0} T={T}", kc, expected_cache(ka[:t0 + T], S, K, D, precision))
        expect_bitwise(f"{tag} v_cache after t0={t0} T={T}", vc, expected_cache(va[:t0 + T], S, K, D, precision))
        outs.append(bits(out).copy())
        t0 += T
    return outs


GQA_CASES = [  # H, K, D, window, S, chunks
    (2, 2, 8, 0, 16, (5, 1, 1, 3, 1)),           # MHA, a cache longer than the sequence (rows never written)
    (4, 2, 17, 0, 12, (4, 1, 1, 1, 5)),          # GQA, odd head dim, the cache exactly full at the end
    (4, 1, 64, 0, 40, (33, 1, 1, 2)),            # MQA, keys past one group of 32
    (4, 2, 16, 5, 5, (7, 1, 1, 1, 6, 1, 2)),     # window 5 in a ring of 5: chunks longer than S, wraps
    (2, 1, 33, 3, 4, (2, 1, 5, 1, 1)),           # a ring longer than the window, head dim past 32
    (1, 1, 1, 0, 6, (3, 1, 2)),                  # head dim 1
    (2, 2, 127, 0, 10, (6, 1, 1)),               # odd head dim near the forward's limit
    (2, 2, 128, 40, 40, (45, 1, 1)),             # D = 128, a window over two key groups, ring of 40
    (2, 2, 8, 3, 3, (1,) * 8),                   # T = 1 steps only, through a ring of 3
]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("H,K,D,window,S,chunks", GQA_CASES)
def test_gqa_attention_decode(libs, precision, H, K, D, window, S, chunks):
    lib = libs[precision]
    seed = H * 1000 + D * 10 + window
    first = run_gqa(lib, precision, H, K, D, window, S, chunks, seed)
    again = run_gqa(lib, precision, H, K, D, window, S, chunks, seed, forward=False)
    assert all(np.array_equal(a, b) for a, b in zip(first, again)), "decode: not deterministic"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_gqa_attention_decode_head_dim_256(libs, precision):
    """Head dims past the forward kernel's 128 (up to 256): against float64 only."""
    run_gqa(libs[precision], precision, 2, 1, 256, 0, 8, (5, 1, 2), 256, forward=False)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("C,NH,S,chunks", [
    (24, 3, 10, (4, 1, 1, 2, 1)),
    (34, 2, 40, (33, 1, 1, 1)),      # head dim 17, keys past one group
    (128, 1, 9, (1, 1, 7)),          # head dim 128
    (3, 3, 4, (1, 1, 1, 1)),         # head dim 1, the cache exactly full
])
def test_attention_decode(libs, precision, C, NH, S, chunks):
    lib, D = libs[precision], C // NH
    rng = np.random.default_rng(C * 10 + S)
    N = sum(chunks)
    qkv = draw(rng, (N, 3 * C), precision)
    qa, ka, va = (np.ascontiguousarray(qkv[:, i * C:(i + 1) * C]) for i in range(3))
    kc, vc = nan_like((NH, S, D), precision), nan_like((NH, S, D), precision)
    tag = f"attention_decode C={C} NH={NH} S={S} ({precision})"
    t0 = 0
    for T in chunks:
        out = nan_like((T, C), precision)
        lib.attention_decode(P(out), P(np.ascontiguousarray(qkv[t0:t0 + T])), P(kc), P(vc),
                             I(T), I(C), I(NH), I(t0), I(S))
        assert error(lib) is None
        n = t0 + T
        fo, lse = nan_like((1, n, C), precision), np.zeros((1, NH, n), np.float32)
        lib.attention_forward(P(fo), P(lse), P(np.ascontiguousarray(qkv[:n])), I(1), I(n), I(C), I(NH))
        ref, b32 = reference(qa, ka, va, NH, NH, D, 0, t0, T)
        compare_out(f"{tag} t0={t0} T={T}", precision, out, fo[0, t0:], ref, b32)
        expect_bitwise(f"{tag} k_cache after t0={t0}", kc, expected_cache(ka[:n], S, NH, D, precision))
        expect_bitwise(f"{tag} v_cache after t0={t0}", vc, expected_cache(va[:n], S, NH, D, precision))
        t0 += T


def test_decode_reports_bad_arguments(libs):
    lib = libs["fp32"]
    x = np.zeros((4, 8 * 257), np.float32)
    c = np.zeros((8 * 4 * 257,), np.float32)
    lib.gqa_attention_decode(P(x), P(x), P(x), P(x), P(c), P(c), I(1), I(1), I(1), I(257), I(0), I(0), I(4))
    msg = error(lib)
    assert msg is not None and "head dim 257" in msg, msg
    # no window: the cache must hold every position; with one: at least the window
    lib.gqa_attention_decode(P(x), P(x), P(x), P(x), P(c), P(c), I(2), I(1), I(1), I(8), I(0), I(3), I(4))
    msg = error(lib)
    assert msg is not None and "cache of 4 rows" in msg, msg
    lib.gqa_attention_decode(P(x), P(x), P(x), P(x), P(c), P(c), I(1), I(1), I(1), I(8), I(5), I(9), I(4))
    msg = error(lib)
    assert msg is not None and "cache of 4 rows" in msg, msg
    lib.attention_decode(P(x), P(x), P(c), P(c), I(0), I(24), I(3), I(0), I(1))   # T = 0: nothing to do
    assert error(lib) is None

