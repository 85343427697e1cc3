"""GPT-2's row ops on the CUDA target (embedding, layernorm, softmax + cross-entropy, the fused classifier,
the fused residual + layernorm) under the emulator (tests/cuda_ops.py), against PyTorch autograd in float64,
with their float tensors stored in fp32, bf16 and fp16.

Every input is a random value of the storage type, so the float64 reference computes from exactly what the
kernel reads. Where a kernel stores an intermediate (the classifier's logits, and their gradient written
over them; residual_layernorm's r), the reference of what follows starts from the stored values, so each
check sees the error of one computation. Backward kernels accumulate: every gradient buffer starts from
random values and the reference is start + gradient. Shapes are awkward (T = 1, C = 1, sizes that the
16-byte vectors do not divide, which the kernels take only where they do; misaligned buffers take the
scalar path). Each backward is also run where the CPU kernel allows NULL gradients, and the sums that
must not depend on scheduling (the embedding's sort, the norms' column sums) are run twice and compared
bit for bit. (That every kernel compiles with the real nvcc, spilling no register, is tests/test_cuda_build.py.)
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cuda_ops import error, libraries, storage_dtype, to_device
from helpers import Fl, I, Z, assert_close

# ---- tolerances -----------------------------------------------------------------------------------------
# |got - want| <= rtol |want| + atol_rel * scale, where scale is the check's expression evaluated with the
# absolute value of every term (a sum of |terms|, |x| + mean|x| for a centred x, ...: Higham's forward
# error bounds), computed elementwise in each test.
#   fp32: gamma(k) ~ k u, u = 2^-24, where k counts the roundings on the longest path: the length of the
#   longest sum plus a few for the operations around it (an exp(z) costs |z| u more, which the scales of
#   lse and softmax's gradient carry). The final rounding of a stored fp32 value is inside k u too; rtol u.
#   16-bit: the kernel rounds each stored element once, to half an ulp: 2^-8 relative for bf16 (8 significant
#   bits), 2^-11 for fp16 (11), at the bottom of a binade (the 2^-9 / 2^-12 often quoted hold only at its
#   top), plus the same fp32 error before that rounding. Below 2^-14 fp16 is subnormal, with an absolute
#   spacing of 2^-24: FLOOR adds its half (tiny probabilities times d_loss reach it).
# Saved statistics, losses and log-sum-exps are fp32 in every precision: they take the op's fp32 entry.
U = 2.0 ** -24
U16 = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11}
FLOOR = {"fp32": 0.0, "bf16": 0.0, "fp16": 2.0 ** -25}
K = {
    # embedding: d_table sums its start and a token's positions; the longest has <= 63 positions (asserted)
    "embedding": 64,
    # layernorm: d_weight sums N rows of (x - mean) rstd g, each with the error of mean and rstd (C + 10
    # roundings: C squares, a square root, a division): 2 (N + C + 16), with N + C <= 300 (asserted)
    "layernorm": 2 * (300 + 16),
    # softmax + cross-entropy: lse sums V exps and a log, V + 8, V <= 1100 (asserted)
    "softmax_crossentropy": 1100 + 8,
    # the classifier: the GEMMs' sums (C + 2 with the bias, N + 1, OC + 1) and softmax's V + 8, all <= 138
    "classifier": 130 + 8,
    # residual + layernorm: layernorm's k
    "residual_layernorm": 2 * (300 + 16),
}
TOLERANCES = {(op, "fp32"): (U, k * U) for op, k in K.items()}
TOLERANCES.update({(op, p): (U16[p], k * U) for op, k in K.items() for p in U16})
# residual + layernorm, 16-bit: r's gradient is stored (as the unfused ops store it) before it is added to
# each summand's, a second rounding: half an ulp of |total| <= the scale
TOLERANCES.update({("residual_layernorm", p): (U16[p], K["residual_layernorm"] * U + U16[p]) for p in U16})

PRECISIONS = ("fp32", "bf16", "fp16")


@pytest.fixture(scope="module")
def libs():
    """Every op's kernels under the emulator, one library per precision, shared by the op test files."""
    return libraries()


@pytest.fixture
def device():
    """device(lib, a): a copy of a in the emulator's device memory (a numpy view of it; cuBLASLt refuses host
    memory for the classifier's GEMM operands, as a GPU would fault on it), freed with its last view."""
    return to_device


def call(lib, fn: str, *args) -> None:
    """lib.fn(*args): ints as int, floats as float, arrays as device pointers, None as NULL; no CUDA error."""
    lib[fn](*[I(a) if isinstance(a, int) else Fl(a) if isinstance(a, float) else a for a in args])
    msg = error(lib)
    assert msg is None, f"{fn}: {msg}"


def place(a: np.ndarray, offset: int = 0) -> np.ndarray:
    """A copy of a whose data starts 64-byte aligned (offset elements past it: offset 1 takes the scalar path)."""
    a = np.ascontiguousarray(a)
    raw = np.zeros(a.nbytes + 64 + offset * a.itemsize, np.uint8)
    start = -raw.ctypes.data % 64 + offset * a.itemsize
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def draw(rng, shape, prec: str, scale: float = 1.0, shift: float = 0.0, offset: int = 0) -> np.ndarray:
    """Random values of the storage type (rounded to it from fp32 draws), placed."""
    x = (rng.standard_normal(shape) * scale + shift).astype(np.float32).astype(storage_dtype(prec))
    return place(x, offset)


def f64(a) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


def t64(a, grad: bool = False) -> torch.Tensor:
    return torch.tensor(f64(a), requires_grad=grad)


def check(name: str, op: str, prec: str, got, want, scale, stored: bool = True) -> None:
    """got within TOLERANCES[(op, prec)] of want (the fp32 entry for an output that is fp32 in every precision)."""
    key = (op, prec if stored else "fp32")
    rtol, atol_rel = TOLERANCES[key]
    want = np.asarray(want.detach() if isinstance(want, torch.Tensor) else want, np.float64)
    atol = atol_rel * np.asarray(scale, np.float64) + FLOOR[key[1]]
    assert_close(f"{op} {name} ({prec})", f64(got), want, rtol=rtol, atol=atol)


def same_bits(name: str, got: np.ndarray, want: np.ndarray) -> None:
    g, w = np.ascontiguousarray(got).view(np.uint8), np.ascontiguousarray(want).view(np.uint8)
    assert np.array_equal(g, w), f"{name}: not bit for bit equal"


# ---- embedding -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("prec", PRECISIONS)
@pytest.mark.parametrize("B,T,C,V,grads", [
    (1, 1, 1, 5, "table,pos"), (1, 1, 7, 5, "table"), (2, 3, 13, 11, "pos"), (3, 5, 8, 11, "table,pos"),
    (2, 7, 33, 11, "table,pos"), (2, 4, 64, 7, "table,pos"),
    (2, 1100, 3, 300, "table,pos"),       # 2200 keys: the sort runs past one shared-memory tile (2048)
])
def test_embedding(libs, prec, B, T, C, V, grads):
    lib, rng = libs[prec], np.random.default_rng(1)
    idx = rng.integers(0, V, (B, T)).astype(np.int32)
    idx.flat[0] = idx.flat[-1]            # repeated tokens must accumulate, not race
    counts = np.bincount(idx.ravel())
    assert counts.max() <= K["embedding"] - 1
    table, pos = draw(rng, (V, C), prec), draw(rng, (T + 2, C), prec)
    out = place(np.zeros((B, T, C), storage_dtype(prec)))
    call(lib, "embedding_forward", out, idx, table, pos, B, T, C)
    tt, pt = t64(table, True), t64(pos, True)
    ref = tt[torch.from_numpy(idx).long()] + pt[:T]
    check("out", "embedding", prec, out, ref, np.abs(f64(table))[idx] + np.abs(f64(pos))[:T])

    dout = draw(rng, (B, T, C), prec)
    ref.backward(t64(dout))
    st_t, st_p = draw(rng, (V, C), prec), draw(rng, (T + 2, C), prec)
    dt = place(st_t) if "table" in grads else None
    dp = place(st_p) if "pos" in grads else None
    call(lib, "embedding_backward", dt, dp, dout, idx, B, T, C)
    if dt is not None:
        scale = np.abs(f64(st_t))
        np.add.at(scale, idx.ravel(), np.abs(f64(dout)).reshape(-1, C))
        check("d_table", "embedding", prec, dt, f64(st_t) + tt.grad.numpy(), scale)
    if dp is not None:
        scale = np.abs(f64(st_p))
        scale[:T] += np.abs(f64(dout)).sum(0)
        check("d_pos", "embedding", prec, dp, f64(st_p) + pt.grad.numpy(), scale)
    if B * T > 2048:                      # the sort and its sums are the same on every run
        again = place(st_t)
        call(lib, "embedding_backward", again, None, dout, idx, B, T, C)
        same_bits("d_table, run twice", again, dt)


# ---- layernorm -----------------------------------------------------------------------------------------

def layernorm_ref(x, w, b, dout, eps):
    """float64 autograd, and the absolute-value scales of each result (see TOLERANCES)."""
    xt, wt, bt = t64(x, True), t64(w, True), t64(b, True)
    ref = F.layer_norm(xt, (x.shape[-1],), wt, bt, eps)
    ref.backward(t64(dout))
    xd, wd, g = f64(x), f64(w), f64(dout)
    m = xd.mean(-1, keepdims=True)
    s = 1 / np.sqrt(((xd - m) ** 2).mean(-1, keepdims=True) + eps)
    ma = np.abs(xd).mean(-1, keepdims=True)
    xa = (np.abs(xd) + ma) * s                   # |xhat| evaluated in absolute values
    gw = np.abs(wd * g)
    return {"out": ref, "mean": m[:, 0], "rstd": s[:, 0], "d_inp": xt.grad.numpy(), "d_weight": wt.grad.numpy(),
            "d_bias": bt.grad.numpy(), "s_mean": ma[:, 0], "s_out": xa * np.abs(wd) + np.abs(f64(b)),
            "s_inp": s * (gw + gw.mean(-1, keepdims=True) + xa * (gw * xa).mean(-1, keepdims=True)),
            "s_weight": (np.abs(g) * xa).sum(0), "s_bias": np.abs(g).sum(0)}


def check_layernorm_forward(op, prec, out, mean, rstd, r):
    check("out", op, prec, out, r["out"], r["s_out"])
    check("mean", op, prec, mean, r["mean"], r["s_mean"], stored=False)
    check("rstd", op, prec, rstd, r["rstd"], r["rstd"], stored=False)


@pytest.mark.parametrize("prec", PRECISIONS)
@pytest.mark.parametrize("N,C,grads,offset", [
    (1, 1, "inp,weight,bias", 0), (1, 7, "inp,weight,bias", 0), (6, 13, "weight,bias", 0),
    (15, 8, "inp,weight,bias", 0), (14, 33, "inp,bias", 0), (3, 64, "inp,weight,bias", 0),
    (3, 64, "inp,weight,bias", 1),        # misaligned: the scalar path for a width the vectors divide
    (4, 264, "inp,weight", 0),            # more than one 16-byte vector per lane
    (130, 5, "inp,weight,bias", 0),       # more than one chunk (64 rows) of the column sums
])
def test_layernorm(libs, prec, N, C, grads, offset):
    lib, rng, eps = libs[prec], np.random.default_rng(2), 1e-5
    assert N + C <= 300
    x = draw(rng, (N, C), prec, 2.0, 0.5, offset)
    w, b = draw(rng, C, prec, offset=offset), draw(rng, C, prec, offset=offset)
    out = place(np.zeros((N, C), storage_dtype(prec)), offset)
    mean, rstd = np.zeros(N, np.float32), np.zeros(N, np.float32)
    call(lib, "layernorm_forward", out, mean, rstd, x, w, b, N, C, eps)
    dout = draw(rng, (N, C), prec, offset=offset)
    r = layernorm_ref(x, w, b, dout, eps)
    check_layernorm_forward("layernorm", prec, out, mean, rstd, r)

    start = {"inp": draw(rng, (N, C), prec, offset=offset), "weight": draw(rng, C, prec), "bias": draw(rng, C, prec)}
    got = {k: place(v, offset) if k in grads else None for k, v in start.items()}
    call(lib, "layernorm_backward", got["inp"], got["weight"], got["bias"], dout, x, w, mean, rstd, N, C)
    for k in grads.split(","):
        check(f"d_{k}", "layernorm", prec, got[k], f64(start[k]) + r[f"d_{k}"], np.abs(f64(start[k])) + r[f"s_{k}"])
    if N > 64:                            # the chunked column sums are the same on every run
        again = place(start["weight"])
        call(lib, "layernorm_backward", None, again, None, dout, x, w, mean, rstd, N, C)
        same_bits("d_weight, run twice", again, got["weight"])


# ---- softmax + cross-entropy ---------------------------------------------------------------------------

def softmax_ref(logits, targets, V, dloss, start=None):
    """float64 autograd over the first V columns, and the scales: lse's (an exp(z) costs |z| rounding),
    the loss's, and the gradient's (its p = exp(x - lse) carries lse's error and its own argument's)."""
    N, Vp = logits.shape
    lt = t64(logits, True)
    loss = F.cross_entropy(lt[:, :V], torch.from_numpy(targets).long(), reduction="none")
    loss.backward(t64(dloss))
    x = f64(logits)[:, :V]
    lse = torch.logsumexp(torch.from_numpy(x), -1).numpy()
    s_lse = 1 + (x.max(-1) - x.min(-1)) + 2 * np.abs(lse)
    p = np.zeros((N, Vp))
    p[:, :V] = np.exp(x - lse[:, None])
    onehot = np.zeros((N, Vp))
    onehot[np.arange(N), targets] = 1
    g = f64(dloss)[:, None]
    z = np.abs(f64(logits) - lse[:, None])
    s_d = g * (p + onehot) + g * p * (s_lse[:, None] + z + 4)
    if start is not None:
        s_d = s_d + np.abs(f64(start))
    return {"loss": loss, "lse": lse, "s_lse": s_lse, "s_loss": s_lse + 2 * np.abs(x[np.arange(N), targets]),
            "d": lt.grad.numpy(), "s_d": s_d}


@pytest.mark.parametrize("prec", PRECISIONS)
@pytest.mark.parametrize("N,V,Vp", [(1, 1, 1), (1, 5, 8), (6, 13, 13), (7, 50, 64), (3, 1000, 1024),
                                    (2, 1100, 1101)])   # a row longer than the block (1024), scalar
def test_softmax_crossentropy(libs, prec, N, V, Vp):
    lib, rng = libs[prec], np.random.default_rng(7)
    assert V <= 1100
    logits = draw(rng, (N, Vp), prec, 4.0)
    targets = rng.integers(0, V, N).astype(np.int32)
    losses, lse = np.zeros(N, np.float32), np.zeros(N, np.float32)
    call(lib, "softmax_crossentropy_forward", losses, lse, logits, targets, N, V, Vp)
    dloss = rng.random(N).astype(np.float32)          # d_losses stay fp32
    start = draw(rng, (N, Vp), prec)
    r = softmax_ref(logits, targets, V, dloss, start)
    check("lse", "softmax_crossentropy", prec, lse, r["lse"], r["s_lse"], stored=False)
    check("losses", "softmax_crossentropy", prec, losses, r["loss"], r["s_loss"], stored=False)

    d = place(start)
    call(lib, "softmax_crossentropy_backward", d, dloss, logits, lse, targets, N, V, Vp)
    same_bits("the padding columns get no gradient", d[:, V:], start[:, V:])
    check("d_logits", "softmax_crossentropy", prec, d, f64(start) + r["d"], r["s_d"])
    call(lib, "softmax_crossentropy_backward", None, dloss, logits, lse, targets, N, V, Vp)   # NULL: nothing


@pytest.mark.parametrize("prec", PRECISIONS)
def test_softmax_crossentropy_passes_nan_on(libs, prec):
    """A NaN logit makes the loss NaN (the trainer stops a diverging run on it), as on the CPU."""
    logits = place(np.array([[0.0, np.nan, 1.0]], np.float32).astype(storage_dtype(prec)))
    losses, lse = np.zeros(1, np.float32), np.zeros(1, np.float32)
    call(libs[prec], "softmax_crossentropy_forward", losses, lse, logits, np.zeros(1, np.int32), 1, 3, 3)
    assert np.isnan(losses[0]) and np.isnan(lse[0])


# ---- the classifier (matmul + softmax + cross-entropy, fused) ------------------------------------------

@pytest.mark.parametrize("prec", PRECISIONS)
@pytest.mark.parametrize("N,C,OC,V,bias", [(1, 1, 1, 1, True), (5, 13, 8, 5, False), (7, 16, 64, 50, True),
                                           (9, 33, 130, 127, True)])
def test_classifier(libs, device, prec, N, C, OC, V, bias):
    lib, rng = libs[prec], np.random.default_rng(9)
    assert max(C + 2, N + 1, OC + 1, V + 8) <= K["classifier"]
    x, w = device(lib, draw(rng, (N, C), prec)), device(lib, draw(rng, (OC, C), prec, 0.5))
    b = device(lib, draw(rng, OC, prec)) if bias else None
    targets = rng.integers(0, V, N).astype(np.int32)
    logits = device(lib, np.zeros((N, OC), storage_dtype(prec)))
    losses, lse = np.full(N, -7.0, np.float32), np.full(N, -7.0, np.float32)
    call(lib, "classifier_forward", logits, losses, lse, x, w, None, b, N, C, OC, V)   # no targets: logits only
    assert (losses == -7).all() and (lse == -7).all()
    call(lib, "classifier_forward", logits, losses, lse, x, w, targets, b, N, C, OC, V)
    xt, wt = t64(x, True), t64(w, True)
    bt = t64(b, True) if bias else None
    check("logits", "classifier", prec, logits, F.linear(xt, wt, bt),
          np.abs(f64(x)) @ np.abs(f64(w)).T + (np.abs(f64(b)) if bias else 0))
    dloss = rng.random(N).astype(np.float32)
    r = softmax_ref(logits, targets, V, dloss)        # from the stored logits
    check("lse", "classifier", prec, lse, r["lse"], r["s_lse"], stored=False)
    check("losses", "classifier", prec, losses, r["loss"], r["s_loss"], stored=False)

    st_x, st_w, st_b = draw(rng, (N, C), prec), draw(rng, (OC, C), prec), draw(rng, OC, prec)
    dx, dw = device(lib, st_x), device(lib, st_w)
    db = device(lib, st_b) if bias else None
    call(lib, "classifier_backward", dx, dw, db, logits, dloss, x, w, lse, targets, N, C, OC, V)
    check("d_logits (over the logits)", "classifier", prec, logits, r["d"], r["s_d"])
    assert (f64(logits)[:, V:] == 0).all(), "the padding columns' gradient is 0"
    dlog = np.abs(f64(logits))                        # the GEMMs start from the stored gradient
    F.linear(xt, wt, bt).backward(t64(logits))
    check("d_inp", "classifier", prec, dx, f64(st_x) + xt.grad.numpy(), np.abs(f64(st_x)) + dlog @ np.abs(f64(w)))
    check("d_weight", "classifier", prec, dw, f64(st_w) + wt.grad.numpy(), np.abs(f64(st_w)) + dlog.T @ np.abs(f64(x)))
    if bias:
        check("d_bias", "classifier", prec, db, f64(st_b) + bt.grad.numpy(), np.abs(f64(st_b)) + dlog.sum(0))


# ---- residual + layernorm (fused) ----------------------------------------------------------------------

@pytest.mark.parametrize("prec", PRECISIONS)
@pytest.mark.parametrize("N,C,grads", [(1, 1, "a,b,weight,bias"), (6, 13, "a,weight,bias"), (15, 8, "b,weight"),
                                       (14, 33, "a,b,bias"), (3, 64, "a,b,weight,bias"), (4, 264, "a,b")])
def test_residual_layernorm(libs, prec, N, C, grads):
    lib, rng, eps, op = libs[prec], np.random.default_rng(3), 1e-5, "residual_layernorm"
    assert N + C <= 300
    a, b = draw(rng, (N, C), prec, 2.0, 0.5), draw(rng, (N, C), prec)
    w, bias = draw(rng, C, prec), draw(rng, C, prec)
    r, out = place(np.zeros((N, C), storage_dtype(prec))), place(np.zeros((N, C), storage_dtype(prec)))
    mean, rstd = np.zeros(N, np.float32), np.zeros(N, np.float32)
    call(lib, "residual_layernorm_forward", r, out, mean, rstd, a, b, w, bias, N, C, eps)
    check("r", op, prec, r, f64(a) + f64(b), np.abs(f64(a)) + np.abs(f64(b)))
    d_r, dout = draw(rng, (N, C), prec), draw(rng, (N, C), prec)
    ref = layernorm_ref(r, w, bias, dout, eps)       # the norm of the stored r
    check_layernorm_forward(op, prec, out, mean, rstd, ref)
    # the unfused ops give the same bits: residual_forward, then layernorm_forward of the stored sum
    r2, out2 = place(np.zeros_like(r)), place(np.zeros_like(out))
    mean2, rstd2 = np.zeros_like(mean), np.zeros_like(rstd)
    call(lib, "residual_forward", r2, a, b, Z(N * C))
    call(lib, "layernorm_forward", out2, mean2, rstd2, r2, w, bias, N, C, eps)
    for name, got, want in [("r", r, r2), ("out", out, out2), ("mean", mean, mean2), ("rstd", rstd, rstd2)]:
        same_bits(f"fused {name} == unfused", got, want)

    start = {"a": draw(rng, (N, C), prec), "b": draw(rng, (N, C), prec), "weight": draw(rng, C, prec),
             "bias": draw(rng, C, prec)}
    got = {k: place(v) if k in grads else None for k, v in start.items()}
    call(lib, "residual_layernorm_backward", got["a"], got["b"], got["weight"], got["bias"], d_r, dout, r, w,
         mean, rstd, N, C)
    total, s_total = f64(d_r) + ref["d_inp"], np.abs(f64(d_r)) + ref["s_inp"]
    wants = {"a": total, "b": total, "weight": ref["d_weight"], "bias": ref["d_bias"]}
    scales = {"a": s_total, "b": s_total, "weight": ref["s_weight"], "bias": ref["s_bias"]}
    for k in grads.split(","):
        check(f"d_{k}", op, prec, got[k], f64(start[k]) + wants[k], np.abs(f64(start[k])) + scales[k])
    # unfused: layernorm_backward into a copy of d_r, which residual_backward then adds to both summands
    d_r2 = place(d_r)
    unfused = {k: place(v) for k, v in start.items()}
    call(lib, "layernorm_backward", d_r2, unfused["weight"], unfused["bias"], dout, r, w, mean, rstd, N, C)
    call(lib, "residual_backward", unfused["a"], unfused["b"], d_r2, Z(N * C))
    for k in grads.split(","):
        same_bits(f"fused d_{k} == unfused", got[k], unfused[k])
