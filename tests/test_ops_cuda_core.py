"""The CUDA target's core ops and helpers under the emulator (tests/cuda_ops.py), against PyTorch in float64,
with the float tensors stored in fp32, bf16 and fp16: matmul (templates/cuda/ops/matmul.cu.j2: one cuBLASLt
GEMM per product, the bias in the epilogue, d_bias a deterministic column sum), matmul_gelu (matmul_gelu.cu.j2:
OC % 8 == 0 takes cuBLASLt's GELU_AUX(_BIAS) epilogue, other widths the GEMM and gelu.cu.j2's kernel; the
backward overwrites d_out with d_pre), residual, gelu, and util.cu.j2's gg_zero / gg_zero16 / gg_fill /
gg_mean and gg_colsum_add (through matmul's d_bias).

The GEMM operands are in the emulator's device memory (cuda_ops.to_device: the cuBLASLt stand-in, as a GPU,
refuses host memory); the elementwise kernels take numpy memory. Every input is a random value of the storage
type, so the float64 reference computes from exactly what the kernel reads; where a kernel stores an
intermediate that what follows reads (matmul_gelu's pre on the GEMM + kernel path, its d_pre written over
d_out), the reference of what follows starts from the stored values. Backward kernels accumulate: every
gradient buffer starts from random values and the reference is start + gradient; each gradient may be NULL
(the others then get the same bits). Shapes are awkward: N, C, OC of 1, odd, OC a multiple of 8 (the fused
epilogue) and not, pointers aligned to one element only, and N past the column sum's chunk of 256 rows.

Tolerances: |got - want| <= rtol |want| + atol_rel * scale + FLOOR, where scale is the check's expression
evaluated in absolute values (sum |x_i w_i| + |b| for a dot product, ...: Higham's forward error bounds),
elementwise.
  * fp32, u = 2^-24: a sum of L terms in any order, each a rounded product, plus a start value (beta = 1)
    errs by gamma(L + 2) ~ (L + 2) u relative to the absolute-value sum; doubled for the bound. The GEMMs
    reduce over C or OC (<= 130 here: "matmul") or over N (<= 520: "matmul d_weight"); the column sum adds
    each chunk's <= 256 rows, the chunks in order, then the start: <= N + 2 roundings ("matmul d_bias").
  * gelu in fp32 (util.cu.j2 gg_gelu_tanh, x s with s = sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)):
    z = 2u carries ~7 roundings (the cube, the two float constants, a sum and products), which exp(-z)
    turns into 7 |z| u relative, and s, x s a few more: 4 + 7 |z| roundings relative to |gelu(x)|; with
    |x| <= 6 (asserted), |z| <= 25: GELU_K = 2 (4 + 7 * 25) = 358 as an rtol. Its gradient s + 2 x s (1 - s)
    du/dx has the same error in s, which 1 - s carries as an absolute error of s's: GELU_K u relative to
    s + 2 |x| s du/dx, times |d_out| ("gelu d_inp", with the start). matmul_gelu's out on the cuBLASLt path is
    gelu of the fp32 pre-activation, so pre's GEMM error passes through gelu' (|gelu'| <= 1.13): its scale
    is 1.13 times pre's.
  * residual: one fp32 rounding of a + b, then (16-bit) one to the storage type: rtol 2u (+ U16).
  * 16-bit storage: the kernel rounds each stored element once, to half an ulp: U16 = 2^-8 relative for
    bf16 (8 significant bits), 2^-11 for fp16 (11), at the bottom of a binade, of the fp32 value v' it
    computed (within E, the fp32 bound, of the exact v): |round(v') - v| <= U16 |v| + (1 + U16) E, so the rtol
    gains U16 and the atol_rel a factor 1 + U16. Below 2^-14 fp16 is subnormal, with spacing 2^-24: FLOOR
    adds half of it. An accumulated gradient's reference is start + gradient, the one rounding of round(start
    + grad) included.
  * gg_mean sums in double (its result is compared bit for bit with the same fixed order in numpy, and
    within u |mean| + n 2^-53 mean|x| of the float64 mean); gg_zero, gg_zero16 and gg_fill are exact.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cuda_ops import error, libraries, storage_dtype, to_device
from helpers import Fl, I, Z, assert_close

U = 2.0 ** -24
U16 = {"fp32": 0.0, "bf16": 2.0 ** -8, "fp16": 2.0 ** -11}
FLOOR = {"fp32": 0.0, "bf16": 0.0, "fp16": 2.0 ** -25}
PRECISIONS = ("fp32", "bf16", "fp16")
L_COLS, L_ROWS = 130, 520          # the longest reductions over C / OC, and over N, of the shapes below
X_MAX, Z_MAX = 6.0, 25.0           # the largest |gelu input|, and |z| = 2 sqrt(2/pi) (x + 0.044715 x^3) there
GELU_K = 2 * (4 + 7 * Z_MAX)

_FP32 = {  # (rtol, atol_rel) in fp32, derived above
    "matmul": (0.0, 2 * (L_COLS + 2) * U),
    "matmul d_weight": (0.0, 2 * (L_ROWS + 2) * U),
    "matmul d_bias": (0.0, 2 * (L_ROWS + 2) * U),
    "matmul_gelu out": (GELU_K * U, 1.13 * 2 * (L_COLS + 2) * U),
    "gelu": (GELU_K * U, 0.0),
    "gelu d_inp": (0.0, (GELU_K + 2) * U),
    "residual": (2 * U, 0.0),
}
TOLERANCES = {(op, p): (r + U16[p], a * (1 + U16[p])) for op, (r, a) in _FP32.items() for p in PRECISIONS}


@pytest.fixture(scope="module")
def libs():
    """Every op's kernels under the emulator, one library per precision, shared by the op test files."""
    return libraries()


def call(lib, fn: str, *args, restype=None):
    """lib.fn(*args) (scalars given as ctypes values, arrays as pointers, None as NULL), with no CUDA error."""
    f = lib[fn]
    f.restype = restype
    out = f(*args)
    msg = error(lib)
    assert msg is None, f"{fn}: {msg}"
    return out


def draw(rng, shape, prec: str, scale: float = 1.0) -> np.ndarray:
    """Random values of the storage type (rounded to it from fp32 draws)."""
    return (rng.standard_normal(shape) * scale).astype(np.float32).astype(storage_dtype(prec))


def f64(a) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


def t64(a, grad: bool = False) -> torch.Tensor:
    return torch.tensor(f64(a), requires_grad=grad)


def check(name: str, op: str, prec: str, got, want, scale=0.0) -> None:
    rtol, atol_rel = TOLERANCES[(op, prec)]
    want = np.asarray(want.detach() if isinstance(want, torch.Tensor) else want, np.float64)
    assert_close(f"{name} ({prec})", f64(got), want, rtol=rtol,
                 atol=atol_rel * np.asarray(scale, np.float64) + FLOOR[prec])


def same_bits(name: str, got, want) -> None:
    assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes(), f"{name}: other bits"


def gelu_grad_scale(x) -> np.ndarray:
    """s + 2 |x| s du/dx: gelu'(x) = s + 2 x s (1 - s) du/dx evaluated in absolute values (see the docstring)."""
    x = f64(x)
    s = 1 / (1 + np.exp(-2 * np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    return s + 2 * np.abs(x) * s * np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * x * x)


def colsum_in_order(start, x, rows_per_chunk: int = 256) -> np.ndarray:
    """util.cu.j2 gg_colsum_add in numpy: each chunk of rows summed in fp32 in row order, the chunks added in
    order in fp32, then added to the widened start and rounded once to the storage type."""
    x32 = np.asarray(x).astype(np.float32)
    total = np.zeros(x32.shape[1], np.float32)
    for r0 in range(0, x32.shape[0], rows_per_chunk):
        part = np.zeros(x32.shape[1], np.float32)
        for row in x32[r0:r0 + rows_per_chunk]:
            part = part + row
        total = total + part
    return (np.asarray(start).astype(np.float32) + total).astype(np.asarray(start).dtype)


# ---- matmul --------------------------------------------------------------------------------------------

MATMUL_SHAPES = [  # N, C, OC, bias, the gradients wanted, offset (elements past a 256-byte boundary)
    (1, 1, 1, True, "inp,weight,bias", 0),
    (1, 7, 8, False, "inp,weight", 0),           # OC a multiple of 8, no bias (the DEFAULT epilogue)
    (5, 13, 1, True, "weight,bias", 0),          # OC = 1
    (7, 33, 24, True, "inp,bias", 0),
    (3, 64, 17, False, "inp,weight,bias", 1),    # every pointer aligned to one element only
    (9, 31, 64, True, "inp,weight,bias", 1),
    (300, 5, 7, True, "inp,weight,bias", 0),     # the column sum in two chunks of rows (256 + 44)
    (520, 3, 130, True, "bias", 0),              # three chunks, two blocks of columns (128 + 2)
    (2, 96, 96, True, "", 0),                    # no gradient wanted: nothing is written
    (0, 4, 8, True, "inp,weight,bias", 0),       # no rows: the gradients keep their start
    (3, 0, 8, True, "inp,weight,bias", 0),       # C = 0: out is the bias
]


def matmul_case(lib, rng, prec, N, C, OC, bias, offset=0, bias_scale=1.0):
    assert C <= L_COLS and OC <= L_COLS and N <= L_ROWS
    x = to_device(lib, draw(rng, (N, C), prec), offset)
    w = to_device(lib, draw(rng, (OC, C), prec, max(C, 1) ** -0.5), offset)
    b = to_device(lib, draw(rng, OC, prec, bias_scale), offset) if bias else None
    return x, w, b


def check_matmul_backward(lib, rng, prec, op, run, x, w, grads, offset):
    """run(d_inp, d_weight, d_bias) runs op's backward into these (any may be None) from fresh inputs and
    returns the d_out its GEMMs read (as stored). Checks start + float64 autograd for each gradient wanted, the
    column sum's order bit for bit, and that each gradient alone (the others NULL) gets the same bits."""
    N, C = x.shape
    OC = w.shape[0]
    start = {"inp": draw(rng, (N, C), prec), "weight": draw(rng, (OC, C), prec), "bias": draw(rng, OC, prec)}
    wanted = [k for k in grads.split(",") if k]
    got = {k: to_device(lib, v, offset) if k in wanted else None for k, v in start.items()}
    dout = run(got["inp"], got["weight"], got["bias"])
    xt, wt, bt = t64(x, True), t64(w, True), t64(np.zeros(OC), True)
    g = f64(dout)
    F.linear(xt, wt, bt).backward(torch.from_numpy(g))
    ag = np.abs(g)
    want = {"inp": xt.grad.numpy(), "weight": wt.grad.numpy(), "bias": bt.grad.numpy()}
    scale = {"inp": ag @ np.abs(f64(w)), "weight": ag.T @ np.abs(f64(x)), "bias": ag.sum(0)}
    tol = {"inp": "matmul", "weight": "matmul d_weight", "bias": "matmul d_bias"}
    for k in wanted:
        check(f"{op} d_{k}", tol[k], prec, got[k], f64(start[k]) + want[k], np.abs(f64(start[k])) + scale[k])
    if "bias" in wanted:                               # gg_colsum_add's fixed order, bit for bit
        same_bits(f"{op} d_bias, the chunked column sum", got["bias"], colsum_in_order(start["bias"], dout))
    for k in wanted:                                   # each alone: the same bits
        alone = {n: to_device(lib, start[n], offset) if n == k else None for n in start}
        run(alone["inp"], alone["weight"], alone["bias"])
        same_bits(f"{op} d_{k} alone", alone[k], got[k])
    return dout


@pytest.mark.parametrize("prec", PRECISIONS)
@pytest.mark.parametrize("N,C,OC,bias,grads,offset", MATMUL_SHAPES)
def test_matmul(libs, prec, N, C, OC, bias, grads, offset):
    lib, rng = libs[prec], np.random.default_rng(N * 1000 + C * 10 + OC)
    x, w, b = matmul_case(lib, rng, prec, N, C, OC, bias, offset)
    out = to_device(lib, np.full((N, OC), np.nan, np.float32).astype(storage_dtype(prec)), offset)
    call(lib, "matmul_forward", out, x, w, b, I(N), I(C), I(OC))
    ref = F.linear(t64(x), t64(w), t64(b) if bias else None)
    check("matmul out", "matmul", prec, out, ref, np.abs(f64(x)) @ np.abs(f64(w)).T + (np.abs(f64(b)) if bias else 0))
    out2 = to_device(lib, np.zeros_like(out), offset)
    call(lib, "matmul_forward", out2, x, w, b, I(N), I(C), I(OC))
    same_bits("matmul out, run twice", out2, out)

    dout = to_device(lib, draw(rng, (N, OC), prec), offset)
    before = np.array(dout, copy=True)

    def run(d_inp, d_weight, d_bias):
        call(lib, "matmul_backward", d_inp, d_weight, d_bias, dout, x, w, I(N), I(C), I(OC))
        return dout

    check_matmul_backward(lib, rng, prec, "matmul", run, x, w, grads, offset)
    same_bits("matmul d_out is not written", dout, before)


# ---- matmul + gelu (fused) -----------------------------------------------------------------------------

@pytest.mark.parametrize("prec", PRECISIONS)
@pytest.mark.parametrize("N,C,OC,bias,grads", [
    (1, 1, 1, True, "inp,weight,bias"),          # the GEMM + gelu kernel
    (5, 13, 8, True, "inp,weight,bias"),         # OC % 8 == 0: cuBLASLt's GELU_AUX_BIAS epilogue
    (7, 33, 24, False, "inp,weight"),            # GELU_AUX (no bias)
    (3, 17, 13, False, "weight"),                # the GEMM (no bias) + gelu kernel
    (6, 64, 17, True, "inp,bias"),
    (300, 5, 16, True, "inp,weight,bias"),       # the epilogue, and the column sum in two chunks
    (4, 9, 40, True, ""),
])
def test_matmul_gelu(libs, prec, N, C, OC, bias, grads):
    lib, rng = libs[prec], np.random.default_rng(N * 1000 + C * 10 + OC + 1)
    fused = OC % 8 == 0
    x, w, b = matmul_case(lib, rng, prec, N, C, OC, bias, bias_scale=0.5)   # |pre| <= X_MAX
    dt = storage_dtype(prec)
    pre = to_device(lib, np.full((N, OC), np.nan, np.float32).astype(dt))
    out = to_device(lib, np.full((N, OC), np.nan, np.float32).astype(dt))
    call(lib, "matmul_gelu_forward", pre, out, x, w, b, I(N), I(C), I(OC))
    ref_pre = F.linear(t64(x), t64(w), t64(b) if bias else None).numpy()
    s_pre = np.abs(f64(x)) @ np.abs(f64(w)).T + (np.abs(f64(b)) if bias else 0)
    check("matmul_gelu pre", "matmul", prec, pre, ref_pre, s_pre)
    assert np.abs(f64(pre)).max() <= X_MAX
    # the epilogue applies gelu to the fp32 pre-activation (its GEMM error passes through gelu'); the kernel
    # path to the stored pre, which the reference then starts from
    gin = ref_pre if fused else f64(pre)
    check("matmul_gelu out", "matmul_gelu out", prec, out, F.gelu(torch.from_numpy(gin), approximate="tanh"),
          s_pre if fused else 0.0)
    # the unfused ops give the same pre (the epilogue's pre is the same fp32 sum, rounded once)
    pre2 = to_device(lib, np.zeros((N, OC), dt))
    call(lib, "matmul_forward", pre2, x, w, b, I(N), I(C), I(OC))
    same_bits("matmul_gelu pre == matmul out", pre, pre2)
    if not fused:
        out2 = np.zeros((N, OC), dt)
        call(lib, "gelu_forward", out2, pre, Z(N * OC))
        same_bits("matmul_gelu out == gelu(pre)", out, out2)

    d0 = draw(rng, (N, OC), prec)

    def run(d_inp, d_weight, d_bias):                  # d_out becomes d_pre in place
        dout = to_device(lib, d0)
        call(lib, "matmul_gelu_backward", d_inp, d_weight, d_bias, dout, pre, x, w, I(N), I(C), I(OC))
        return dout

    dpre = run(None, None, None)
    pt = t64(pre, True)
    F.gelu(pt, approximate="tanh").backward(t64(d0))
    check("matmul_gelu d_pre (over d_out)", "gelu d_inp", prec, dpre, pt.grad, np.abs(f64(d0)) * gelu_grad_scale(pre))
    again = check_matmul_backward(lib, rng, prec, "matmul_gelu", run, x, w, grads, 0)
    same_bits("matmul_gelu d_pre, with the gradients", again, dpre)


# ---- residual ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prec", PRECISIONS)
@pytest.mark.parametrize("n,grads", [(0, "a,b"), (1, "a,b"), (7, "a"), (1000, "b"), (1000, "a,b"), (33, "")])
def test_residual(libs, prec, n, grads):
    lib, rng = libs[prec], np.random.default_rng(n + 5)
    a, b = draw(rng, n, prec, 2.0), draw(rng, n, prec)
    out = np.full(n + 1, np.nan, np.float32).astype(storage_dtype(prec))   # one guard element past the end
    call(lib, "residual_forward", out, a, b, Z(n))
    check("residual out", "residual", prec, out[:n], f64(a) + f64(b))
    assert np.isnan(f64(out[n])), "residual_forward wrote past n"
    dout = draw(rng, n, prec)
    start = {"a": draw(rng, n, prec), "b": draw(rng, n, prec)}
    got = {k: v.copy() if k in grads else None for k, v in start.items()}
    call(lib, "residual_backward", got["a"], got["b"], dout, Z(n))
    for k in "ab":
        if got[k] is not None:
            check(f"residual d_{k}", "residual", prec, got[k], f64(start[k]) + f64(dout))


# ---- gelu ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prec", PRECISIONS)
@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_gelu(libs, prec, n):
    lib, rng = libs[prec], np.random.default_rng(n + 6)
    x = draw(rng, n, prec, 1.5)
    if n >= 7:
        x[:5] = np.array([0.0, -X_MAX, X_MAX, -3.0, 1e-3], np.float32).astype(x.dtype)
    assert n == 0 or np.abs(f64(x)).max() <= X_MAX
    out = np.full(n + 1, np.nan, np.float32).astype(storage_dtype(prec))
    call(lib, "gelu_forward", out, x, Z(n))
    xt = t64(x, True)
    ref = F.gelu(xt, approximate="tanh")
    check("gelu out", "gelu", prec, out[:n], ref)
    assert np.isnan(f64(out[n])), "gelu_forward wrote past n"
    dout = draw(rng, n, prec)
    ref.backward(t64(dout))
    start = draw(rng, n, prec)
    d = start.copy()
    call(lib, "gelu_backward", d, dout, x, Z(n))
    check("gelu d_inp", "gelu d_inp", prec, d, f64(start) + xt.grad.numpy(),
          np.abs(f64(start)) + np.abs(f64(dout)) * gelu_grad_scale(x))
    call(lib, "gelu_backward", None, dout, x, Z(n))          # NULL: nothing to do


# ---- util.cu.j2: zero, fill, mean ----------------------------------------------------------------------

@pytest.mark.parametrize("prec", PRECISIONS)
@pytest.mark.parametrize("n", [0, 1, 7, 1000, 4099])
def test_zero_and_fill(libs, prec, n):
    lib = libs[prec]
    guard = np.float32(-3.5)
    x = np.full(n + 2, guard, np.float32)
    call(lib, "gg_zero", x[1:], Z(n))
    assert (x[1:n + 1].view(np.uint32) == 0).all(), "gg_zero: not +0.0"
    assert x[0] == guard and x[n + 1] == guard, "gg_zero wrote outside [0, n)"
    call(lib, "gg_fill", x[1:], Z(n), Fl(0.1))
    assert (x[1:n + 1] == np.float32(0.1)).all() and x[0] == guard and x[n + 1] == guard
    for dt in (storage_dtype("bf16"), storage_dtype("fp16")):
        h = np.full(n + 4, -3.5, np.float32).astype(dt)
        assert h.ctypes.data % 4 == 0
        for at in (2, 3):                       # 4-byte aligned (words when n is even) and not (halves)
            h[:] = np.float32(-3.5)
            call(lib, "gg_zero16", h[at:], Z(n))
            assert (h[at:at + n].view(np.uint16) == 0).all(), f"gg_zero16 ({dt}, at {at}): not +0"
            assert (f64(h[:at]) == -3.5).all() and (f64(h[at + n:]) == -3.5).all(), "gg_zero16 wrote outside"


def mean_in_order(x) -> np.float32:
    """util.cu.j2 gg_mean in numpy: thread t of 1024 sums x[t], x[t + 1024], ... in double, then a tree in
    shared memory (w = 512, 256, ..., 1: part[t] += part[t + w]), then (float)(sum / n)."""
    x = np.asarray(x, np.float32).astype(np.float64)
    part = np.zeros(1024)
    for i0 in range(0, x.size, 1024):
        chunk = x[i0:i0 + 1024]
        part[:chunk.size] = part[:chunk.size] + chunk
    w = 512
    while w > 0:
        part[:w] = part[:w] + part[w:2 * w]
        w //= 2
    return np.float32(part[0] / x.size)


@pytest.mark.parametrize("prec", PRECISIONS)
@pytest.mark.parametrize("n", [1, 7, 1000, 1024, 5000])
def test_mean(libs, prec, n):
    lib, rng = libs[prec], np.random.default_rng(n)
    x = (rng.standard_normal(n) * 3 + 1).astype(np.float32)     # losses and the like stay fp32
    if n > 2048:      # one thread's terms cancel: a double sum keeps the 1, a float sum would lose it
        x[[5, 5 + 1024, 5 + 2048]] = [2.0 ** 30, 1.0, -2.0 ** 30]
    got = call(lib, "gg_mean", x, Z(n), restype=ctypes.c_float)
    assert np.float32(got).tobytes() == mean_in_order(x).tobytes(), f"gg_mean {got!r} != {mean_in_order(x)!r}"
    want = f64(x).mean()
    assert_close(f"gg_mean ({prec})", np.float64(got), want, rtol=U, atol=n * 2.0 ** -53 * np.abs(f64(x)).mean())
    assert call(lib, "gg_mean", x, Z(n), restype=ctypes.c_float) == got, "gg_mean: two runs differ"


def test_mean_of_nothing_is_nan(libs):
    """As the CPU's gg_mean: 0 / 0."""
    got = call(libs["fp32"], "gg_mean", np.zeros(1, np.float32), Z(0), restype=ctypes.c_float)
    assert np.isnan(got)
