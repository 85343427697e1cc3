"""The cuBLASLt stand-in of gpt2gen.cuda_emu (include/cublasLt.h) against float64 numpy references.

Every matmul goes through the real API (descriptors, layouts, preference, heuristic, cublasLtMatmul) in
tests/cuda_emu/cublaslt.cu. Tolerances are derived, per element, from the arithmetic the emulator promises:
products of the (exactly converted) inputs accumulated in fp32 over k terms, scaled and biased in fp32, so
|error| <= (k + 4) * 2^-24 * (|alpha| |op(A)| |op(B)| + |beta C| + |bias|) before the epilogue, and one
rounding to the output type (at most half an ulp: 2^-24, 2^-11, 2^-8 relative for fp32, fp16, bf16).

With GPT2GEN_CUBLASLT=real (on a machine with an NVIDIA GPU, nvcc and the nvidia-cublas wheel) the same
file is built with nvcc against the real cuBLASLt and the tests that describe the library, not the emulator,
run against it: the way to check that the emulator's semantics are the library's.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import shlex
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from gpt2gen import cuda_emu

SRC = Path(__file__).parent / "cuda_emu" / "cublaslt.cu"

# The real enum values (library_types.h, cublas_api.h, cublasLt.h).
R32F, R16F, R16BF = 0, 2, 14
COMPUTE_32F, COMPUTE_32F_FAST_TF32 = 68, 77
SUCCESS, NOT_INITIALIZED, INVALID_VALUE, EXECUTION_FAILED, NOT_SUPPORTED = 0, 1, 7, 13, 15
EPI = {"DEFAULT": 1, "RELU": 2, "RELU_AUX": 130, "BIAS": 4, "RELU_BIAS": 6, "GELU": 32, "GELU_AUX": 160,
       "GELU_BIAS": 36, "GELU_AUX_BIAS": 164, "DGELU": 192, "DGELU_BGRAD": 208, "BGRADA": 256, "BGRADB": 512}
ORDER_ROW = 1
U32 = 2.0 ** -24
UNIT = {R32F: 2.0 ** -24, R16F: 2.0 ** -11, R16BF: 2.0 ** -8}   # unit roundoff: half an ulp, relative
SIZE = {R32F: 4, R16F: 2, R16BF: 2}
NAME = {R32F: "fp32", R16F: "fp16", R16BF: "bf16"}

I32, I64 = ctypes.c_int32, ctypes.c_int64
REAL = os.environ.get("GPT2GEN_CUBLASLT") == "real"
emu_only = pytest.mark.skipif(REAL, reason="the emulator's own behaviour (messages, its heuristic, its subset)")
# the real library's GELU may use the GPU's fast tanh (about 2^-11 relative): slack for the activations
ACT_TOL = 2.0 ** -10 if REAL else 0.0


class LtCase(ctypes.Structure):   # LtCase of cublaslt.cu, field for field
    _fields_ = (
        [(f, I32) for f in ["ab_type", "cd_type", "compute", "transa", "transb", "epilogue", "bias_type", "aux_type"]]
        + [(f, I64) for f in ["m", "n", "k", "lda", "ldb", "ldc", "ldd", "aux_ld"]]
        + [("batch", I32), ("in_place", I32)]
        + [(f, I64) for f in ["stride_a", "stride_b", "stride_c", "stride_d"]]
        + [("alpha", ctypes.c_float), ("beta", ctypes.c_float)]
        + [(f, I64) for f in ["bytes_a", "bytes_b", "bytes_c", "bytes_d", "bytes_bias", "bytes_aux"]]
        + [(f, I32) for f in ["offset_a", "offset_d", "offset_bias", "order_a", "use_algo", "null_handle", "host_a"]]
        + [("max_workspace", I64), ("workspace", I64), ("set_align", I32), ("kb", I64), ("mc", I64)]
        + [("heuristic_status", I32), ("returned", I32), ("heuristic_workspace", I64), ("matmul_status", I32)]
    )


class _ArrayArgs:
    """A plain ctypes library whose functions take numpy arrays for pointers (as EmuLibrary's do)."""

    def __init__(self, dll: ctypes.CDLL):
        self._dll = dll

    def __getattr__(self, name):
        f = getattr(self._dll, name)
        return lambda *a: f(*[ctypes.c_void_p(x.ctypes.data) if isinstance(x, np.ndarray) else x for x in a])


def _real_library():
    """cublaslt.cu built by nvcc and linked with the real cuBLASLt, or a skip."""
    nvcc, dirs = cuda_emu.find_nvcc(), _cublas_dirs()
    if nvcc is None or dirs is None:
        pytest.skip("GPT2GEN_CUBLASLT=real needs nvcc and the nvidia-cublas wheel")
    inc, libdir = dirs
    from gpt2gen.cache import cache_root, digest

    out = cache_root() / "cublaslt_real" / digest(SRC.read_bytes(), str(inc)) / "lib.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [nvcc, "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-arch=native", "-I", str(inc), str(SRC),
               "-L", str(libdir), "-Xlinker", "-rpath", "-Xlinker", str(libdir), "-l:libcublasLt.so.13", "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            pytest.fail(f"{shlex.join(cmd)}\n{proc.stdout}{proc.stderr}")
    dll = ctypes.CDLL(str(out))
    if dll.lt_device_count() < 1:
        pytest.skip("GPT2GEN_CUBLASLT=real needs a CUDA device")
    return dll


@pytest.fixture(scope="module")
def lib():
    raw = _real_library() if REAL else cuda_emu.load(SRC)
    P = ctypes.c_void_p
    raw.lt_run.argtypes = [ctypes.POINTER(LtCase), P, P, P, P, P, P]
    raw.lt_api_checks.argtypes = [P]
    return _ArrayArgs(raw) if REAL else raw


# ---------------------------------------------------------------------------------------------- numbers
def quantize(x: np.ndarray, t: int) -> np.ndarray:
    """float64 -> the storage of type t (round to nearest even; bf16 as its bit pattern in uint16)."""
    if t == R32F:
        return x.astype(np.float32)
    if t == R16F:
        return x.astype(np.float16)
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def value(s: np.ndarray, t: int) -> np.ndarray:
    """The storage of type t -> float64 (exact)."""
    if t == R16BF:
        return (s.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return s.astype(np.float64)


def gelu(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def dgelu(x):
    s = np.sqrt(2.0 / np.pi)
    t = np.tanh(s * (x + 0.044715 * x ** 3))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * s * (1.0 + 3 * 0.044715 * x * x)


def pack(mats: np.ndarray, ld: int, stride: int, t: int, fill=np.nan) -> np.ndarray:
    """(batch, rows, cols) float64 -> column-major storage with leading dimension ld and batch stride;
    the gaps hold `fill` (NaN: a read of a gap poisons the result, a write to one is seen)."""
    batch, rows, cols = mats.shape
    buf = np.full((batch - 1) * stride + (cols - 1) * ld + rows if rows and cols else 1, fill)
    for b in range(batch):
        for j in range(cols):
            buf[b * stride + j * ld: b * stride + j * ld + rows] = mats[b, :, j]
    return quantize(buf, t)


def unpack(flat: np.ndarray, rows: int, cols: int, ld: int, stride: int = 0, batch: int = 1) -> np.ndarray:
    out = np.empty((batch, rows, cols))
    for b in range(batch):
        for j in range(cols):
            out[b, :, j] = flat[b * stride + j * ld: b * stride + j * ld + rows]
    return out


def gaps(flat: np.ndarray, rows: int, cols: int, ld: int, stride: int = 0, batch: int = 1) -> np.ndarray:
    mask = np.ones(flat.size, bool)
    for b in range(batch):
        for j in range(cols):
            mask[b * stride + j * ld: b * stride + j * ld + rows] = False
    return flat[mask]


# ---------------------------------------------------------------------------------------------- one matmul
def gemm(lib, *, ab=R32F, cd=None, ta=0, tb=0, m=24, n=20, k=36, pad=(0, 0, 0, 0), batch=1, alpha=1.0,
         beta=0.0, in_place=False, epilogue="DEFAULT", bias_type=-1, aux_type=-1, aux_ld=None, bias=None,
         aux=None, compute=COMPUTE_32F, seed=0, max_workspace=1 << 22, workspace=-1, **knobs):
    """Run one cublasLtMatmul; returns (case, results): D (batch, m, n) and, as the epilogue has them, the
    aux matrix and the bias (gradient) vector, the inputs' exact values and D's gaps."""
    rng = np.random.default_rng(seed)
    cd = ab if cd is None else cd
    ep = EPI[epilogue]
    ar, ac = (k, m) if ta else (m, k)
    br, bc = (n, k) if tb else (k, n)
    lda, ldb, ldc, ldd = ar + pad[0], br + pad[1], m + pad[2], m + pad[3]
    sa, sb, sc, sd = [(ld * cols + 5) if batch > 1 else 0 for ld, cols in ((lda, ac), (ldb, bc), (ldc, n), (ldd, n))]
    A = pack(rng.standard_normal((batch, ar, ac)), lda, sa, ab)
    B = pack(rng.standard_normal((batch, br, bc)), ldb, sb, ab)
    Cm = rng.standard_normal((batch, m, n)) if beta else np.full((batch, m, n), np.nan)   # beta 0: C is never read
    if in_place:
        C = None
        D = pack(Cm, ldd, sd, cd)
        ldc, sc = ldd, sd
    else:
        C = pack(Cm, ldc, sc, cd)
        D = pack(np.full((batch, m, n), np.nan), ldd, sd, cd)
    res = {"A": unpack(value(A, ab), ar, ac, lda, sa, batch), "B": unpack(value(B, ab), br, bc, ldb, sb, batch),
           "C": unpack(value(D if in_place else C, cd), m, n, ldc, sc, batch)}
    bias_t = cd if bias_type < 0 else bias_type
    aux_t = cd if aux_type < 0 else aux_type
    blen = n if epilogue == "BGRADB" else m
    if bias is None and ep in (4, 6, 36, 164):
        bias = quantize(rng.standard_normal(blen), bias_t)
        res["bias_in"] = value(bias, bias_t)
    elif bias is None and ep in (208, 256, 512):
        bias = quantize(np.full(blen, np.nan), bias_t)
    aux_ld = (m + 7) // 8 * 8 + 8 if aux_ld is None else aux_ld
    if aux is None and ep in (160, 164):
        aux = pack(np.full((1, m, n), np.nan), aux_ld, 0, aux_t)
    elif aux is None and ep in (192, 208):
        aux = pack(rng.standard_normal((1, m, n)) * 1.5, aux_ld, 0, aux_t)
        res["aux_in"] = unpack(value(aux, aux_t), m, n, aux_ld)[0]
    c = LtCase(ab_type=ab, cd_type=cd, compute=compute, transa=ta, transb=tb, epilogue=ep, bias_type=bias_type,
               aux_type=aux_type, m=m, n=n, k=k, lda=lda, ldb=ldb, ldc=ldc, ldd=ldd, aux_ld=aux_ld, batch=batch,
               in_place=int(in_place), stride_a=sa, stride_b=sb, stride_c=sc, stride_d=sd, alpha=alpha, beta=beta,
               bytes_a=A.nbytes, bytes_b=B.nbytes, bytes_c=0 if C is None else C.nbytes, bytes_d=D.nbytes,
               bytes_bias=0 if bias is None else bias.nbytes, bytes_aux=0 if aux is None else aux.nbytes,
               order_a=0, use_algo=1, max_workspace=max_workspace, workspace=workspace)
    for key, v in knobs.items():
        setattr(c, key, v)
    lib.lt_run(ctypes.byref(c), A, B, C, D, bias, aux)
    dv = value(D, cd)
    res["D"] = unpack(dv, m, n, ldd, sd, batch)
    res["D_gaps"] = gaps(dv, m, n, ldd, sd, batch)
    if bias is not None:
        res["bias"] = value(bias, bias_t)
    if aux is not None:
        res["aux"] = unpack(value(aux, aux_t), m, n, aux_ld)[0]
    res.update(ab=ab, cd=cd, bias_t=bias_t, aux_t=aux_t)
    return c, res


def reference(c: LtCase, r: dict, epilogue: str):
    """Expected outputs and per-element error bounds (see the module docstring)."""
    A = np.swapaxes(r["A"], 1, 2) if c.transa else r["A"]
    B = np.swapaxes(r["B"], 1, 2) if c.transb else r["B"]
    k, alpha, beta = c.k, float(c.alpha), float(c.beta)
    x = alpha * (A @ B) + (beta * r["C"] if beta else 0.0)
    mag = abs(alpha) * (np.abs(A) @ np.abs(B)) + (abs(beta) * np.abs(r["C"]) if beta else 0.0)
    if "bias_in" in r:
        x = x + r["bias_in"][None, :, None]
        mag = mag + np.abs(r["bias_in"])[None, :, None]
    err = (k + 4) * U32 * mag + 1e-300
    out = {"pre": x, "pre_err": err}
    if "GELU" in epilogue and not epilogue.startswith("D"):
        d, derr = gelu(x), 1.2 * err + (4 * U32 + ACT_TOL) * (np.abs(x) + 1)
    elif "RELU" in epilogue:
        d, derr = np.maximum(x, 0.0), err
    elif epilogue.startswith("DGELU"):
        g = dgelu(r["aux_in"])[None]
        d = x * g
        derr = err * np.abs(g) + np.abs(x) * (64 * U32 + ACT_TOL) * (1 + np.abs(r["aux_in"]) ** 3)[None]
    else:
        d, derr = x, err
    out["D"], out["D_err"] = d, derr + UNIT[r["cd"]] * np.abs(d) + (2.0 ** -24 if r["cd"] == R16F else 0.0)
    bu = UNIT[r["bias_t"]]
    if epilogue == "DGELU_BGRAD":
        bg = d[0].sum(axis=1)
        out["bgrad"], out["bgrad_err"] = bg, derr[0].sum(axis=1) + 4 * U32 * np.abs(d[0]).sum(axis=1) + bu * np.abs(bg)
    elif epilogue in ("BGRADA", "BGRADB"):
        bg = A[0].sum(axis=1) if epilogue == "BGRADA" else B[0].sum(axis=0)
        mg = np.abs(A[0]).sum(axis=1) if epilogue == "BGRADA" else np.abs(B[0]).sum(axis=0)
        out["bgrad"], out["bgrad_err"] = bg, (k + 4) * U32 * mg + bu * np.abs(bg)
    return out


def assert_within(got, want, err, what):
    bad = ~(np.abs(got - want) <= err)
    if bad.any():
        i = np.flatnonzero(bad)[0]
        pytest.fail(f"{what}: {bad.sum()} of {bad.size} elements off, e.g. #{i}: got {got.flat[i]!r}, "
                    f"want {want.flat[i]!r} +- {err.flat[i]:.3g}")


def check(c, r, epilogue="DEFAULT"):
    assert (c.heuristic_status, c.returned, c.matmul_status) == (SUCCESS, 1, SUCCESS)
    ref = reference(c, r, epilogue)
    assert_within(r["D"], ref["D"], ref["D_err"], "D")
    assert np.isnan(r["D_gaps"]).all(), "cublasLtMatmul wrote between the columns of D"
    return ref


# ---------------------------------------------------------------------------------------------- the API
def test_handle_descriptor_and_attribute_calls(lib):
    out = np.zeros(64, np.int64)
    count = lib.lt_api_checks(out)
    assert count == 36
    S, I, NI = SUCCESS, INVALID_VALUE, NOT_INITIALIZED
    assert list(out[:2]) == [S, I] and out[2] > 0
    assert list(out[3:7]) == [S, S, COMPUTE_32F, 4]
    assert list(out[7:10]) == [I, I, I]            # wrong sizes (int64 for int32, int32 for int64), NULL buf
    assert list(out[10:13]) == [S, ctypes.sizeof(ctypes.c_void_p), I]   # size query; size 0 without sizeWritten
    assert out[13] == EPI["DEFAULT"]
    assert list(out[14:19]) == [S, I, S, 7, 1]     # ROWS is uint64_t; BATCH_COUNT defaults to 1
    assert list(out[19:22]) == [S, I, S]           # MAX_WORKSPACE_BYTES is uint64_t
    assert list(out[22:24]) == [NI, I]             # no handle; requestedAlgoCount 0
    assert list(out[24:27]) == [S, 1, S] and 0 <= out[27] <= 1 << 20
    assert list(out[28:33]) == [S, S, S, S, 0]     # descriptors on the stack (Init); default: no workspace
    assert list(out[33:36]) == [1, S, NI]


# ---------------------------------------------------------------------------------------------- arithmetic
@pytest.mark.parametrize("ab", [R32F, R16BF], ids=NAME.get)
@pytest.mark.parametrize("ta,tb", [(0, 0), (1, 0), (0, 1), (1, 1)], ids=["NN", "TN", "NT", "TT"])
def test_transposes_with_padded_leading_dimensions(lib, ab, ta, tb):
    c, r = gemm(lib, ab=ab, ta=ta, tb=tb, m=37, n=29, k=45, pad=(3, 5, 2, 7), alpha=0.75, beta=-0.5, seed=ta + 2 * tb)
    check(c, r)


@pytest.mark.parametrize("ab", [R32F, R16BF, R16F], ids=NAME.get)
def test_in_place_accumulation_beta_one(lib, ab):
    c, r = gemm(lib, ab=ab, tb=1, m=33, n=17, k=64, pad=(0, 0, 0, 5), beta=1.0, in_place=True, seed=3)
    check(c, r)


@pytest.mark.parametrize("in_place", [False, True], ids=["out-of-place", "in-place"])
def test_beta_zero_never_reads_c(lib, in_place):
    # with beta = 0, C (and so D, in place) holds NaN: none of it may reach the result
    c, r = gemm(lib, m=16, n=8, k=8, beta=0.0, in_place=in_place, alpha=2.0, seed=4)
    assert np.isnan(r["C"]).all()
    check(c, r)


def test_out_of_place_c_may_broadcast_with_ld_zero(lib):
    c, r = gemm(lib, m=12, n=6, k=5, beta=1.0, pad=(0, 0, -12, 0), seed=5)   # ldc = 0: every column is C's first
    assert (c.heuristic_status, c.matmul_status) == (SUCCESS, SUCCESS)
    col = r["C"][0, :, :1]
    want = r["A"][0] @ r["B"][0] + col
    assert_within(r["D"][0], want, (c.k + 4) * U32 * (np.abs(r["A"][0]) @ np.abs(r["B"][0]) + np.abs(col)), "D")


@pytest.mark.parametrize("ab", [R32F, R16F], ids=NAME.get)
def test_strided_batches(lib, ab):
    c, r = gemm(lib, ab=ab, ta=1, m=19, n=23, k=31, pad=(1, 2, 3, 4), batch=3, alpha=1.5, beta=0.25, seed=6)
    check(c, r)


@pytest.mark.parametrize("ab,cd", [(R16BF, R16BF), (R16BF, R32F), (R16F, R16F), (R16F, R32F)],
                         ids=["bf16-bf16", "bf16-fp32", "fp16-fp16", "fp16-fp32"])
def test_16bit_inputs_round_once_to_nearest_even(lib, ab, cd):
    c, r = gemm(lib, ab=ab, cd=cd, m=64, n=48, k=96, beta=0.5, seed=7)
    ref = check(c, r)
    if cd != R32F:   # the fp32 accumulation error is far below half an ulp: nearly all are the exact RNE
        exact = value(quantize(ref["D"], cd), cd)
        assert np.mean(r["D"] == exact) > 0.99


@emu_only
def test_fast_tf32_compute_type_is_fp32(lib):
    c, r = gemm(lib, compute=COMPUTE_32F_FAST_TF32, m=20, n=20, k=40, seed=8)
    check(c, r)


# ---------------------------------------------------------------------------------------------- epilogues
EPILOGUES = ["DEFAULT", "RELU", "BIAS", "RELU_BIAS", "GELU", "GELU_BIAS", "GELU_AUX", "GELU_AUX_BIAS", "DGELU",
             "DGELU_BGRAD", "BGRADA", "BGRADB"]


@pytest.mark.parametrize("ab", [R32F, R16BF], ids=NAME.get)
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_epilogue(lib, epilogue, ab):
    c, r = gemm(lib, ab=ab, ta=1, m=40, n=24, k=33, pad=(0, 3, 0, 2), beta=0.5, epilogue=epilogue, seed=9)
    ref = check(c, r, epilogue)
    if "AUX" in epilogue:   # GELU_AUX*: the pre-activation (matmul + beta C + bias), in D's type
        assert_within(r["aux"], ref["pre"][0], ref["pre_err"][0] + UNIT[r["aux_t"]] * np.abs(ref["pre"][0]), "aux")
    if epilogue.startswith("DGELU"):
        np.testing.assert_array_equal(r["aux"], r["aux_in"])   # an input: left alone
    if "bgrad" in ref:
        assert r["bias"].shape == ((c.n,) if epilogue == "BGRADB" else (c.m,))
        assert_within(r["bias"], ref["bgrad"], ref["bgrad_err"], "bias gradient")


@pytest.mark.parametrize("epilogue", ["GELU_AUX_BIAS", "DGELU_BGRAD", "BGRADB"])
def test_epilogue_on_several_threads(lib, epilogue):
    # large enough to be split over the worker threads (13 tasks of 16 columns); the bias gradient of
    # DGELU_BGRAD is summed per task, then over the tasks in order: the same on any number of threads
    c, r = gemm(lib, ab=R16BF, tb=1, m=128, n=200, k=160, epilogue=epilogue, seed=14)
    ref = check(c, r, epilogue)
    if "bgrad" in ref:
        assert_within(r["bias"], ref["bgrad"], ref["bgrad_err"], "bias gradient")


def test_fp32_bias_and_aux_with_bf16_output(lib):
    c, r = gemm(lib, ab=R16BF, m=32, n=16, k=24, epilogue="GELU_AUX_BIAS", bias_type=R32F, aux_type=R32F, seed=10)
    ref = check(c, r, "GELU_AUX_BIAS")
    assert_within(r["aux"], ref["pre"][0], ref["pre_err"][0] + U32 * np.abs(ref["pre"][0]), "aux")


# ---------------------------------------------------------------------------------------------- checks
def expect(c, heuristic, matmul, capfd, reason):
    assert (c.heuristic_status, c.matmul_status) == (heuristic, matmul)
    err = capfd.readouterr().err
    if not REAL:
        assert "[cuda_emu] cublasLt" in err and reason in err, err


@pytest.mark.parametrize("knobs,reason", [
    ({"kb": 35}, "inconsistent shapes"),
    ({"mc": 20}, "C is 20x20 but D is 24x20"),
    ({"lda": 23}, "leading dimension must be >= the rows"),
    ({"ldd": 10}, "leading dimension must be >= the rows"),
], ids=["k-mismatch", "C-shape", "lda", "ldd"])
def test_inconsistent_shapes_are_invalid(lib, capfd, knobs, reason):
    c, _ = gemm(lib, use_algo=0, **knobs)
    expect(c, INVALID_VALUE, INVALID_VALUE, capfd, reason)


@emu_only
@pytest.mark.parametrize("kw,reason", [
    ({"order_a": ORDER_ROW}, "only CUBLASLT_ORDER_COL"),
    ({"ab": R16F, "cd": R16BF}, "not a supported combination"),
    ({"ab": R32F, "cd": R16BF}, "not a supported combination"),
    ({"ab": R16BF, "compute": COMPUTE_32F_FAST_TF32}, "need CUDA_R_32F matrices"),
    ({"batch": 2, "epilogue": "BIAS"}, "only for unbatched matmuls"),
    ({"epilogue": "RELU_AUX"}, "is not emulated"),
    ({"ab": R16BF, "bias_type": R16F, "epilogue": "BIAS"}, "BIAS_DATA_TYPE"),
], ids=["row-order", "fp16-bf16", "fp32-bf16", "tf32-bf16", "batched-epilogue", "relu-aux", "bias-type"])
def test_unsupported_configurations(lib, capfd, kw, reason):
    c, _ = gemm(lib, use_algo=0, **kw)
    expect(c, NOT_SUPPORTED, NOT_SUPPORTED, capfd, reason)


def test_aux_leading_dimension_must_be_a_multiple_of_8(lib, capfd):
    c, _ = gemm(lib, m=24, epilogue="GELU_AUX", aux_ld=28, use_algo=0)
    expect(c, INVALID_VALUE, INVALID_VALUE, capfd, "divisible by 8")
    c, _ = gemm(lib, m=24, epilogue="GELU_AUX", aux_ld=16, use_algo=0)
    expect(c, INVALID_VALUE, INVALID_VALUE, capfd, "divisible by 8")


@emu_only
def test_bias_epilogue_needs_a_bias_pointer(lib, capfd):
    c, _ = gemm(lib, epilogue="BIAS", bias=np.zeros(0, np.float32))   # no bias buffer: the pointer stays NULL
    expect(c, SUCCESS, INVALID_VALUE, capfd, "needs CUBLASLT_MATMUL_DESC_BIAS_POINTER")


@emu_only
def test_workspace_smaller_than_the_heuristic_asked_for(lib, capfd):
    c, r = gemm(lib, m=32, n=32, k=8, max_workspace=1 << 20)
    assert 0 < c.heuristic_workspace <= 1 << 20
    check(c, r)
    c, _ = gemm(lib, m=32, n=32, k=8, max_workspace=1 << 20, workspace=c.heuristic_workspace - 256)
    expect(c, SUCCESS, INVALID_VALUE, capfd, "workspaceSizeInBytes")
    c, _ = gemm(lib, m=32, n=32, k=8, max_workspace=1024)    # too little for any: the heuristic asks for none
    assert c.heuristic_workspace == 0 and c.matmul_status == SUCCESS


@emu_only
def test_default_preference_assumes_16_byte_alignment(lib, capfd):
    # default preference: 256-byte alignment assumed, kernels need 16: a 2-byte aligned A is refused
    c, _ = gemm(lib, ab=R16BF, offset_a=2)
    expect(c, SUCCESS, NOT_SUPPORTED, capfd, "2-byte aligned")
    c, _ = gemm(lib, ab=R16BF, offset_a=2, use_algo=0)
    expect(c, SUCCESS, NOT_SUPPORTED, capfd, "algo is NULL")


def test_alignment_stated_in_the_preference(lib):
    # runs when the preference states the pointers' real alignment (as generated glue does)
    c, r = gemm(lib, ab=R16BF, offset_a=2, offset_d=6, set_align=1, beta=0.5, seed=11)
    check(c, r)
    # the bias: the heuristic sees its pointer, so a misaligned bias set before the heuristic is fine
    c, r = gemm(lib, ab=R16BF, epilogue="BIAS", offset_bias=2, seed=12)
    check(c, r, "BIAS")


def test_null_handle_is_not_initialized(lib, capfd):
    c, _ = gemm(lib, null_handle=1)
    expect(c, SUCCESS, NOT_INITIALIZED, capfd, "lightHandle")


@emu_only
def test_host_memory_is_a_device_fault(lib, capfd):
    with pytest.raises(cuda_emu.EmulationError, match="A .* is not inside a device allocation"):
        gemm(lib, host_a=1)
    assert "cublasLtMatmul" in capfd.readouterr().err
    c, r = gemm(lib)    # the sticky error was cleared with the exception: the next call works
    check(c, r)


# ---------------------------------------------------------------------------------------------- speed
def test_a_large_matmul_is_fast(lib):
    m, n, k = 1024, 1024, 256
    rng = np.random.default_rng(13)
    A = rng.standard_normal(m * k).astype(np.float32)
    B = rng.standard_normal(k * n).astype(np.float32)
    D = np.zeros(m * n, np.float32)
    c = LtCase(ab_type=R32F, cd_type=R32F, compute=COMPUTE_32F, epilogue=EPI["DEFAULT"], bias_type=-1, aux_type=-1,
               m=m, n=n, k=k, lda=m, ldb=k, ldc=m, ldd=m, batch=1, in_place=1, alpha=1.0, beta=0.0,
               bytes_a=A.nbytes, bytes_b=B.nbytes, bytes_d=D.nbytes, use_algo=1, max_workspace=32 << 20, workspace=-1)
    t0 = time.perf_counter()
    lib.lt_run(ctypes.byref(c), A, B, None, D, None, None)
    elapsed = time.perf_counter() - t0
    assert c.matmul_status == SUCCESS
    want = A.reshape(k, m).T.astype(np.float64) @ B.reshape(n, k).T.astype(np.float64)
    np.testing.assert_allclose(D.reshape(n, m).T, want, rtol=0, atol=(k + 4) * U32 * 4 * k)
    assert elapsed < 1.0, f"1024x1024x256 took {elapsed:.2f} s"


# ---------------------------------------------------------------------------------------------- nvcc
def _cublas_dirs() -> tuple[Path, Path] | None:
    """The include and library folders of the nvidia-cublas wheel, or None."""
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for sub in ("cu13", "cublas"):
            inc = Path(root) / sub / "include"
            if (inc / "cublasLt.h").is_file():
                return inc, Path(root) / sub / "lib"
    return None


def test_same_source_compiles_with_nvcc_and_the_real_cublaslt_header():
    if cuda_emu.find_nvcc() is None:
        pytest.skip("nvcc is not on PATH")
    dirs = _cublas_dirs()
    if dirs is None:
        pytest.skip("the nvidia-cublas headers are not installed")
    obj = cuda_emu.nvcc_compile(SRC, archs=("sm_90",), include_dirs=[dirs[0]])
    assert obj.is_file() and obj.stat().st_size > 0
