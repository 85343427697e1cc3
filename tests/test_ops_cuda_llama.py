"""The CUDA kernels of Llama, Mistral and Gemma's ops and of AdamW, run under the emulator (tests/cuda_ops.py),
against PyTorch autograd in float64, in every storage precision (fp32, bf16, fp16).

Ops: token_embedding, rmsnorm (weight_offset 0 and Gemma's 1), rope, swiglu, geglu (templates/cuda/ops/), and
adamw_update (templates/cuda/optim/adamw.cu.j2). Shapes are tests/test_ops_arch.py's plus ones that reach the
CUDA kernels' own boundaries (several warps, tiles and chunks, several radix passes). Inputs are random values
of the storage type (exactly representable), and the reference is computed from them in float64. Every backward
accumulates, so gradient buffers start from random storage-type values and the reference is start + gradient;
each backward is also called with NULL gradients. Two runs of a reduction give the same bits.

Tolerances. A check is |got - want| <= rtol |want| + atol_rel * scale (+ FLOOR), want the exact (float64) value,
scale the largest magnitude of the computation (stated at each check: the reference's largest |value|, or the
same expression summed in absolute values where terms can cancel). u = 2^-24 is fp32's unit roundoff; an fp32
computation with k roundings on its longest path errs by at most about k u relative to that scale (Higham's
gamma_k), and each fp32 bound below is twice the count for the shapes tested:
  * token_embedding: one product, 1 rounding (rtol 2u). d_table: start + k products summed in order (k + 2
    roundings on the longest path), relative to |start| + sum |g scale|; the longest run of one token here is
    about 400 positions (k <= 510): atol_rel 1024u.
  * rmsnorm and its saved rstd: the sum of squares is ceil(C/32) sequential adds per lane plus a 5-level
    shuffle tree (all terms positive, so relative), then /C, + eps, sqrt, 1/x: <= 13 roundings for C <= 96,
    2 more for out: rtol 32u. d_inp: two terms that may cancel, with s^3 (3x the error of s) times a sum of
    C products: <= ~64 roundings relative to |start| + s |w' g| + |x| s^3 sum|g w' x| / C: atol_rel 128u.
    d_weight: start + a sum over N <= 300 rows of x s g (each term good to ~16u), in chunks of 256 rows then
    the chunks in order (<= 256 + 3 adds on the longest path): atol_rel 1024u relative to |start| + sum |x s g|.
  * rope: the reference takes transformers' fp32 angles (inv_freq = 1 / theta^(2i/D) and t * inv_freq, in
    fp32); the kernel's inv_freq is the correctly rounded one (double pow), so it may differ from torch's
    powf by an ulp, which moves the angle by up to 2 * 2^-23 t <= 2^-18 rad for T <= 16 (64u); cos and sin
    are rounded once (u each), then 2 products and a sum: atol_rel 128u relative to |x_i| + |x_{i+D/2}|
    (for d_inp: + |start|).
  * swiglu / geglu: sigmoid(z) = 1 / (1 + expf(-z)) with expf good to 2 ulps (the exact argument of silu,
    or GELU's cubic with 4 roundings, whose error expf multiplies by |z| <= ~20 where the result is not
    negligible), a few products: rtol 64u for outputs and atol_rel 64u of the largest |value| (for the
    derivatives, which vanish and cancel inside: |start| + the largest |gradient|).
  * AdamW: m, v and the step are fp32 expressions of a few roundings each, the weight is rounded once per
    step: rtol 16u (2u per step for 5 steps) and atol_rel 128u of lr * steps.
16-bit storage: the kernel computes the same fp32 value v' (within E, the bound above, of the exact v) and
rounds it once to nearest, so |round(v') - v| <= U16 |v'| + E with U16 the unit roundoff of the type: half
its spacing relative to the value, at most 2^-8 for bf16 (8 significant bits) and 2^-11 for fp16 (11; these
are twice the "2^-9 / 2^-12" sometimes quoted, which is half an ulp at the top of a binade only): rtol is
(U16 + the fp32 rtol) (1 + U16), atol_rel the fp32 one times (1 + U16), and FLOOR is half the smallest
subnormal spacing (fp16: 2^-25, which values below 2^-14 have instead of a relative rounding). Saved statistics (rstd) and AdamW's
master weights stay fp32 (no U16). The 16-bit AdamW parameter must be one of the two neighbours of the master
weight; the rounding is stochastic (see test_adamw_stochastic_rounding_is_unbiased for its statistical bound).
"""
from __future__ import annotations

import ctypes

import cuda_ops
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import Fl, I, Z, assert_close

U = 2.0 ** -24
U16 = {"fp32": 0.0, "bf16": 2.0 ** -8, "fp16": 2.0 ** -11}
FLOOR = {"fp32": 0.0, "bf16": 2.0 ** -134, "fp16": 2.0 ** -25}
PRECISIONS = ("fp32", "bf16", "fp16")

# fp32 (rtol, atol_rel), derived above; `stored` says whether the result is stored in the storage type
_FP32 = {  # op: (rtol, atol_rel, stored)
    "token_embedding": (2 * U, 0.0, True),
    "token_embedding d_table": (0.0, 1024 * U, True),
    "rmsnorm": (32 * U, 0.0, True),
    "rmsnorm rstd": (32 * U, 0.0, False),
    "rmsnorm d_inp": (0.0, 128 * U, True),
    "rmsnorm d_weight": (0.0, 1024 * U, True),
    "rope": (0.0, 128 * U, True),
    "rope d_inp": (0.0, 128 * U, True),
    "swiglu": (64 * U, 64 * U, True),
    "swiglu d_gate": (64 * U, 64 * U, True),
    "swiglu d_up": (64 * U, 64 * U, True),
    "geglu": (64 * U, 64 * U, True),
    "geglu d_gate": (64 * U, 64 * U, True),
    "geglu d_up": (64 * U, 64 * U, True),
    "adamw": (16 * U, 128 * U, False),
}
TOLERANCES = {(op, p): (((r + U16[p]) * (1 + U16[p]), a * (1 + U16[p])) if stored else (r, a))
              for op, (r, a, stored) in _FP32.items() for p in PRECISIONS}

def lib(precision):
    return cuda_ops.ops(precision)   # every op, shared by the op test files (tests/cuda_ops.py)


def no_error(k, precision):
    assert cuda_ops.error(k) is None, cuda_ops.error(k)


def rand(shape, rng, precision, scale=1.0, shift=0.0):
    """Random values of the storage type (so the float64 reference sees exactly what the kernel sees)."""
    x = (rng.standard_normal(shape) * scale + shift).astype(np.float32)
    return x.astype(cuda_ops.storage_dtype(precision))


def wide(a) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


def empty(shape, precision):
    return np.full(shape, np.nan, np.float32).astype(cuda_ops.storage_dtype(precision))


def check(name, op, precision, got, want, scale=None):
    """The TOLERANCES row of (op, precision); scale: the computation's magnitude (default max |want|)."""
    rtol, atol_rel = TOLERANCES[(op, precision)]
    want = np.asarray(want, np.float64)
    if scale is None:
        scale = float(np.abs(want).max()) if want.size else 0.0
    assert_close(f"{name} [{precision}]", wide(got), want, rtol=rtol, atol=atol_rel * float(scale) + FLOOR[precision])


# ---- token embedding -------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("B,T,C,scale,pad,V", [
    (1, 1, 1, 1.0, -1, 11), (2, 5, 13, 1.0, -1, 11), (3, 7, 33, float(np.sqrt(33)), 0, 11), (2, 9, 16, 4.0, 3, 11),
    (3, 7, 5, 2.0, 5, 3000),           # ids past 255: two radix passes
    (2, 600, 3, 1.0, 7, 70000),        # three passes, and B*T past one 1024-position tile
])
def test_token_embedding(precision, B, T, C, scale, pad, V):
    k = lib(precision)
    rng = np.random.default_rng(11)
    idx = rng.integers(0, V, (B, T)).astype(np.int32)
    idx.flat[0] = idx.flat[-1]          # repeated tokens must accumulate, not race
    if V > 100:
        idx.flat[2::3] = idx.flat[0]    # a long run of one token
        idx.flat[5::7] = V - 1
    if pad >= 0:
        idx.flat[1 % idx.size] = pad    # the padding token is looked up but gets no gradient
    table = rand((V, C), rng, precision)
    t = torch.tensor(wide(table), requires_grad=True)
    s32 = float(np.float32(scale))
    ref = F.embedding(torch.from_numpy(idx).long(), t, padding_idx=pad if pad >= 0 else None) * s32
    dout = rand((B, T, C), rng, precision)
    ref.backward(torch.from_numpy(wide(dout)))
    out = empty((B, T, C), precision)
    k.token_embedding_forward(out, idx, table, I(B), I(T), I(C), Fl(scale))
    check("token_embedding out", "token_embedding", precision, out, ref.detach().numpy())
    dt = rand((V, C), rng, precision)
    dt0 = dt.copy()
    k.token_embedding_backward(dt, dout, idx, I(B), I(T), I(C), Fl(scale), I(pad))
    natural = np.abs(wide(dt0))
    keep = idx.reshape(-1) != pad
    np.add.at(natural, idx.reshape(-1)[keep], np.abs(wide(dout)).reshape(-1, C)[keep] * abs(s32))
    check("d_table", "token_embedding d_table", precision, dt, wide(dt0) + t.grad.numpy(), natural.max())
    # bit for bit: each row is start + the products g * scale (fp32) added in position order in fp32, then
    # rounded once to the storage type (the emulator contracts no a * b + c into an FMA; nvcc may)
    seq = wide(dt0).astype(np.float32)
    np.add.at(seq, idx.reshape(-1)[keep], dout.astype(np.float32).reshape(-1, C)[keep] * np.float32(scale))
    assert seq.astype(dt.dtype).tobytes() == dt.tobytes(), "d_table is not the position-ordered fp32 sum"
    if pad >= 0:
        assert (dt[pad] == dt0[pad]).all() or pad not in idx, "the padding row got a gradient"
    again = dt0.copy()
    k.token_embedding_backward(again, dout, idx, I(B), I(T), I(C), Fl(scale), I(pad))
    assert again.tobytes() == dt.tobytes(), "two runs differ"
    k.token_embedding_backward(None, dout, idx, I(B), I(T), I(C), Fl(scale), I(pad))
    no_error(k, precision)


# ---- rmsnorm -------------------------------------------------------------------------------------------

def torch_rmsnorm(x, w, eps, offset):
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return h * (w + offset) if offset else h * w


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("N,C", [(1, 1), (1, 7), (6, 13), (15, 8), (14, 33), (4, 64), (3, 96), (300, 3)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rmsnorm(precision, N, C, offset):
    k = lib(precision)
    rng = np.random.default_rng(12)
    eps = 1e-6
    x, w = rand((N, C), rng, precision, 2.0, 0.3), rand(C, rng, precision, 0.3 if offset else 1.0)
    xt, wt = torch.tensor(wide(x), requires_grad=True), torch.tensor(wide(w), requires_grad=True)
    e32 = float(np.float32(eps))
    ref = torch_rmsnorm(xt, wt, e32, offset)
    dout = rand((N, C), rng, precision)
    ref.backward(torch.from_numpy(wide(dout)))
    out, rstd = empty((N, C), precision), np.full(N, np.nan, np.float32)
    k.rmsnorm_forward(out, rstd, x, w, I(N), I(C), Fl(eps), Fl(offset))
    check("rmsnorm out", "rmsnorm", precision, out, ref.detach().numpy())
    s = 1.0 / np.sqrt((wide(x) ** 2).mean(-1) + e32)
    check("rmsnorm rstd", "rmsnorm rstd", precision, rstd, s)
    dx, dw = rand((N, C), rng, precision), rand(C, rng, precision)
    dx0, dw0 = dx.copy(), dw.copy()
    k.rmsnorm_backward(dx, dw, dout, x, w, rstd, I(N), I(C), Fl(offset))
    ax, ag, aw = np.abs(wide(x)), np.abs(wide(dout)), np.abs(wide(w) + offset)
    nat_x = np.abs(wide(dx0)) + s[:, None] * aw * ag + ax * (s ** 3 * (ag * aw * ax).sum(-1) / C)[:, None]
    check("d_inp", "rmsnorm d_inp", precision, dx, wide(dx0) + xt.grad.numpy(), nat_x.max())
    nat_w = np.abs(wide(dw0)) + (ax * s[:, None] * ag).sum(0)
    check("d_weight", "rmsnorm d_weight", precision, dw, wide(dw0) + wt.grad.numpy(), nat_w.max())
    again = dw0.copy()
    k.rmsnorm_backward(None, again, dout, x, w, rstd, I(N), I(C), Fl(offset))   # d_weight alone
    assert again.tobytes() == dw.tobytes(), "d_weight: two runs differ"
    dx2 = dx0.copy()
    k.rmsnorm_backward(dx2, None, dout, x, w, rstd, I(N), I(C), Fl(offset))     # d_inp alone
    assert dx2.tobytes() == dx.tobytes(), "d_inp alone differs"
    k.rmsnorm_backward(None, None, dout, x, w, rstd, I(N), I(C), Fl(offset))
    no_error(k, precision)


# ---- rope ----------------------------------------------------------------------------------------------

def torch_rope(x, H, D, theta):
    """transformers' rotate-half RoPE on (B, T, H*D) in float64, on the angles LlamaRotaryEmbedding computes
    in fp32 (inv_freq and t * inv_freq); cos and sin of those angles in float64."""
    B, T, _ = x.shape
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    freqs = (torch.arange(T).float()[:, None] * inv_freq[None, :]).double()
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    xh = x.reshape(B, T, H, D).transpose(1, 2)
    x1, x2 = xh[..., :D // 2], xh[..., D // 2:]
    rot = torch.cat((-x2, x1), dim=-1)
    return (xh * cos + rot * sin).transpose(1, 2).reshape(B, T, H * D)


def pair_magnitude(a, H, D):
    """|a_i| + |a_{i+D/2}| at both elements of each rotated pair."""
    h = np.abs(wide(a)).reshape(*a.shape[:-1], H, 2, D // 2)
    return np.broadcast_to(h.sum(-2, keepdims=True), h.shape).reshape(a.shape)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("B,T,H,D,theta", [(1, 1, 1, 2, 10000.0), (2, 5, 3, 8, 10000.0), (1, 16, 2, 12, 500.0),
                                           (3, 7, 1, 6, 1e6), (2, 9, 5, 4, 10.0),
                                           (1, 3, 1, 2100, 10000.0)])   # past one 1024-pair angle table
def test_rope(precision, B, T, H, D, theta):
    k = lib(precision)
    rng = np.random.default_rng(13)
    x = rand((B, T, H * D), rng, precision)
    xt = torch.tensor(wide(x), requires_grad=True)
    ref = torch_rope(xt, H, D, theta)
    dout = rand((B, T, H * D), rng, precision)
    ref.backward(torch.from_numpy(wide(dout)))
    out = empty((B, T, H * D), precision)
    k.rope_forward(out, x, I(B), I(T), I(H), I(D), Fl(theta))
    check("rope out", "rope", precision, out, ref.detach().numpy(), pair_magnitude(x, H, D).max())
    d = rand((B, T, H * D), rng, precision)
    d0 = d.copy()
    k.rope_backward(d, dout, I(B), I(T), I(H), I(D), Fl(theta))
    nat = np.abs(wide(d0)) + pair_magnitude(dout, H, D)
    check("rope d_inp", "rope d_inp", precision, d, wide(d0) + xt.grad.numpy(), nat.max())
    k.rope_backward(None, dout, I(B), I(T), I(H), I(D), Fl(theta))
    no_error(k, precision)


# ---- gated units -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("op", ["swiglu", "geglu"])
@pytest.mark.parametrize("n", [1, 7, 1000])
def test_glu(precision, op, n):
    k = lib(precision)
    rng = np.random.default_rng(15)
    gate, up = rand(n, rng, precision, 3.0), rand(n, rng, precision)
    gt, ut = torch.tensor(wide(gate), requires_grad=True), torch.tensor(wide(up), requires_grad=True)
    act = F.silu(gt) if op == "swiglu" else F.gelu(gt, approximate="tanh")
    ref = act * ut
    dout = rand(n, rng, precision)
    ref.backward(torch.from_numpy(wide(dout)))
    out = empty(n, precision)
    getattr(k, f"{op}_forward")(out, gate, up, Z(n))
    check(f"{op} out", op, precision, out, ref.detach().numpy())
    dg, du = rand(n, rng, precision), rand(n, rng, precision)
    dg0, du0 = dg.copy(), du.copy()
    getattr(k, f"{op}_backward")(dg, du, dout, gate, up, Z(n))
    for name, buf, start, grad in (("d_gate", dg, dg0, gt.grad), ("d_up", du, du0, ut.grad)):
        g = grad.numpy()
        check(name, f"{op} {name}", precision, buf, wide(start) + g, np.abs(wide(start)).max() + np.abs(g).max())
    dg2 = dg0.copy()
    getattr(k, f"{op}_backward")(dg2, None, dout, gate, up, Z(n))                  # d_gate alone
    assert dg2.tobytes() == dg.tobytes()
    getattr(k, f"{op}_backward")(None, None, dout, gate, up, Z(n))
    no_error(k, precision)


# ---- AdamW ---------------------------------------------------------------------------------------------

LR, BETA1, BETA2, EPS = 1e-2, 0.9, 0.95, 1e-8


def adamw_call(k, precision, p, g, master, m, v, lr, b1, b2, eps, wd, gs, step, seed):
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    rest = (Z(p.size), Fl(lr), Fl(b1), Fl(b2), Fl(eps), Fl(wd), Fl(gs), Fl(bc1), Fl(bc2), ctypes.c_uint(seed))
    if precision == "fp32":
        k.adamw_update(p, g, m, v, *rest)
    else:
        k.adamw_update(p, g, master, m, v, *rest)


def neighbours(x: np.ndarray, precision: str):
    """The 16-bit values just below and just above each fp32 x (x itself twice where it is one)."""
    dt = cuda_ops.storage_dtype(precision)
    r = np.asarray(x, np.float32).astype(dt)     # to nearest: one of the two
    rd, xd = wide(r), wide(x)
    lo = np.where(rd > xd, wide(np.nextafter(r, dt.type(-np.inf))), rd)
    hi = np.where(rd < xd, wide(np.nextafter(r, dt.type(np.inf))), rd)
    return lo, hi


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("weight_decay,grad_scale", [(0.0, 1.0), (0.1, 0.5)])
def test_adamw(precision, weight_decay, grad_scale):
    """Five steps against torch.optim.AdamW in float64; 16-bit: the fp32 master weights take the step, and
    the 16-bit parameter is the master rounded down or up, the same bits for the same seed."""
    k = lib(precision)
    rng = np.random.default_rng(8)
    n, steps = 1000, 5
    lr, b1, b2, eps = LR, BETA1, BETA2, EPS
    w0 = rng.standard_normal(n).astype(np.float32)
    tp = torch.tensor(wide(w0), requires_grad=True)
    opt = torch.optim.AdamW([tp], lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay)
    dt = cuda_ops.storage_dtype(precision)
    p, master = w0.astype(dt), w0.copy()
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for step in range(1, steps + 1):
        g = rand(n, rng, precision)
        tp.grad = torch.from_numpy(wide(g) * float(np.float32(grad_scale)))
        opt.step()
        state = (p.copy(), master.copy(), m.copy(), v.copy())
        adamw_call(k, precision, p, g, master, m, v, lr, b1, b2, eps, weight_decay, grad_scale, step, seed=step)
        weights = p if precision == "fp32" else master
        rtol, atol_rel = TOLERANCES[("adamw", precision)]
        assert_close(f"AdamW weights step {step} [{precision}]", wide(weights), tp.detach().numpy(),
                     rtol=rtol, atol=atol_rel * lr * step)
        if precision != "fp32":
            lo, hi = neighbours(master, precision)
            pd = wide(p)
            bad = ~((pd == lo) | (pd == hi))
            assert not bad.any(), (f"step {step}: {int(bad.sum())} parameters are not a neighbour of their master "
                                   f"weight, e.g. p={pd[bad][0]!r} master={master[bad][0]!r}")
            # the same state and seed give the same bits
            p2, master2, m2, v2 = state
            adamw_call(k, precision, p2, g, master2, m2, v2, lr, b1, b2, eps, weight_decay, grad_scale, step,
                       seed=step)
            assert p2.tobytes() == p.tobytes() and master2.tobytes() == master.tobytes(), "same seed, other bits"
    no_error(k, precision)
    k.adamw_update(*([None] * (4 if precision == "fp32" else 5)), Z(0), *[Fl(0.0)] * 8, ctypes.c_uint(0))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_adamw_stochastic_rounding_is_unbiased(precision):
    """With lr = 0 the master weights stay where they are, and each 16-bit parameter is the master rounded up
    (to the next 16-bit value above) with probability q = (master - down) / (up - down). Masters are placed at
    chosen fractions q of random gaps, many magnitudes. For each q and sign, the number rounded up among its
    n = 8192 elements must be within 6 standard deviations (sqrt(n q (1 - q))) of n q: a rounding biased
    away from zero could cancel between the signs, hence a group per sign, and n is large enough that never
    rounding up at q = 2^-6 (n q = 128 +- 67) fails. The random bits are a fixed hash, so the test is
    deterministic; a generator of unbiased, independent bits would fail a group with probability below 2e-9.
    Another seed must give different, equally unbiased, bits."""
    k = lib(precision)
    rng = np.random.default_rng(21)
    dt = cuda_ops.storage_dtype(precision)
    qs = [2.0 ** -6, 0.25, 0.5, 0.8125]     # fractions of the gap exactly representable in both formats
    per = 16384                               # per q: 8192 positive masters, then 8192 negative
    base = (np.abs(rng.standard_normal(per * len(qs))) * 2.0 ** rng.integers(-6, 6, per * len(qs)))
    base = (base * np.tile(np.repeat([1.0, -1.0], per // 2), len(qs))).astype(np.float32)  # each group: + then -
    lo = base.astype(dt)                                     # a 16-bit value (never 0) ...
    assert (wide(lo) != 0).all()
    hi = np.nextafter(lo, dt.type(np.inf))                   # ... and the next one above it
    q = np.repeat(qs, per)
    lod, hid = wide(lo), wide(hi)
    master = (lod + q * (hid - lod)).astype(np.float32)
    assert (wide(master) - lod == q * (hid - lod)).all(), "the masters sit exactly at the fractions"
    n = master.size
    results = []
    for seed in (12345, 777):
        p = np.zeros(n, dt)
        mm = master.copy()
        g = np.zeros(n, dt)
        m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
        adamw_call(k, precision, p, g, mm, m, v, 0.0, 0.9, 0.95, 1e-8, 0.0, 1.0, 1, seed)
        assert mm.tobytes() == master.tobytes(), "lr = 0 moved the master weights"
        pd = wide(p)
        assert ((pd == lod) | (pd == hid)).all(), "a parameter is not a neighbour of its master"
        up = pd == hid
        half = per // 2
        for j, qj in enumerate(qs):
            for sign, at in (("+", j * per), ("-", j * per + half)):   # a bias may differ with the sign
                count = int(up[at:at + half].sum())
                sigma = np.sqrt(half * qj * (1 - qj))
                assert abs(count - half * qj) <= 6 * sigma, (f"seed {seed}, q = {qj}, sign {sign}: {count} of {half} "
                                                             f"rounded up, expected {half * qj:.0f} +- {6 * sigma:.0f}")
        results.append(p)
    assert results[0].tobytes() != results[1].tobytes(), "the seed does not change the rounding"
    no_error(k, precision)
