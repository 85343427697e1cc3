"""The CUDA target's op kernels, rendered for one precision and run under the emulator (gpt2gen.cuda_emu).

``ops(precision)`` is ONE loaded library per precision with every op of the target (``ALL_OPS``, the sorted
``gpt2gen.targets.cuda.KERNELS``), the helpers and AdamW: every test file shares the same three builds (cached
by content on disk, and per process here; the first call builds all three precisions at once, one compiler
per precision, so the two cores stay busy). Its launchers (the CPU kernels' names and arguments) take numpy
arrays for device pointers: under emulation device memory is host memory. A call that made the emulator
record an error (a fault in a kernel, a bad launch) raises ``cuda_emu.EmulationError``; a call the CUDA code
itself reports failing (a cuBLASLt status) is read with ``error(lib)``.

The cuBLASLt stand-in refuses host (numpy) memory for GEMM operands, as a GPU would fault on it: tests of a
launcher that calls gg_gemm (matmul, matmul_gelu, the classifier) put those operands in the emulator's device
memory with ``device_array(lib, shape, dtype)`` / ``to_device(lib, a)`` (numpy views over ``cudaMalloc``'d
memory, through the ``gg_test_alloc`` / ``gg_test_free`` pair that the test rendering appends to the kernels).
"""
from __future__ import annotations

import ctypes
import functools
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from gpt2gen import cuda_emu
from gpt2gen.cache import cache_root, digest, write_if_changed
from gpt2gen.resources import csrc_dir
from gpt2gen.targets.cuda import CUDA, KERNELS

NP = {"fp32": np.float32, "fp16": np.float16}
PRECISIONS = ("fp32", "bf16", "fp16")
ALL_OPS = tuple(sorted(KERNELS))

# Appended to the rendering for the emulator only (not part of the model, not compiled by nvcc): device memory
# for the tests, which numpy can view (the emulator's device memory is host memory).
DEVICE_MEMORY = """
// ---- test support (tests/cuda_ops.py): device memory that numpy views -----------------------------------
GG_KERNEL __attribute__((visibility("default"))) void* gg_test_alloc(size_t bytes) {
    void* p = NULL;
    return cudaMalloc(&p, bytes ? bytes : 1) == cudaSuccess ? p : NULL;
}
GG_KERNEL __attribute__((visibility("default"))) void gg_test_free(void* p) { cudaFree(p); }
"""


def source(precision: str) -> str:
    """The test rendering of every op in ``precision``: CUDA.kernels_source(ALL_OPS) + DEVICE_MEMORY."""
    return CUDA.kernels_source(list(ALL_OPS), precision) + DEVICE_MEMORY


def _build(precision: str) -> cuda_emu.EmuLibrary:
    text = source(precision)
    src = cache_root() / "kernels-cuda-test" / digest(text) / "kernels.cu"
    write_if_changed(src, text)
    return cuda_emu.load(src, include_dirs=[csrc_dir()])


@functools.cache
def libraries() -> dict[str, cuda_emu.EmuLibrary]:
    """The three libraries (fp32, bf16, fp16), built concurrently: three single-threaded compilers keep two
    cores busy to the end (two workers would leave the last build alone on one)."""
    with ThreadPoolExecutor(max_workers=len(PRECISIONS)) as ex:
        return dict(zip(PRECISIONS, ex.map(_build, PRECISIONS)))


def ops(*args) -> cuda_emu.EmuLibrary:
    """``ops(precision)``: the library of every op in ``precision``. The older form ``ops(names, precision)``
    is accepted (the names must be ops of the target; the library has them all)."""
    if args and not isinstance(args[0], str):
        names, args = tuple(args[0]), args[1:]
        unknown = sorted(set(names) - set(ALL_OPS))
        if unknown:
            raise KeyError(f"not CUDA ops: {', '.join(unknown)}")
    precision = args[0] if args else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")
    return libraries()[precision]


def storage_dtype(precision: str):
    """The numpy dtype of the model's float tensors in ``precision``."""
    if precision == "bf16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(NP[precision])


def error(lib) -> str | None:
    """The first error the CUDA code recorded since the last call of this (and clears it), or None."""
    fn = lib["gg_error"]
    fn.restype = ctypes.c_char_p
    msg = fn()
    return None if msg is None else msg.decode()


# ---- device memory -------------------------------------------------------------------------------------

def device_array(lib, shape, dtype, offset: int = 0) -> np.ndarray:
    """A C-contiguous numpy array of ``shape`` and ``dtype`` in the emulator's device memory of ``lib``
    (cudaMalloc'd: 256-byte aligned, filled with 0xFF bytes as the emulator fills it). ``offset`` elements
    past the allocation's start (1: a pointer aligned to the element only). The memory is freed when the
    last view of it goes."""
    dtype = np.dtype(dtype)
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize + offset * dtype.itemsize
    alloc, free = lib["gg_test_alloc"], lib["gg_test_free"]
    alloc.restype, alloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    free.restype, free.argtypes = None, [ctypes.c_void_p]
    ptr = alloc(max(nbytes, 1))
    if not ptr:
        raise MemoryError(f"cudaMalloc of {nbytes} bytes failed under emulation: {error(lib)}")
    buf = (ctypes.c_uint8 * max(nbytes, 1)).from_address(ptr)
    weakref.finalize(buf, free, ptr)
    raw = np.frombuffer(buf, dtype=np.uint8)
    return raw[offset * dtype.itemsize:nbytes].view(dtype).reshape(shape)


def to_device(lib, a, offset: int = 0) -> np.ndarray:
    """A copy of ``a`` in device memory (``device_array``), or None for None."""
    if a is None:
        return None
    a = np.ascontiguousarray(a)
    d = device_array(lib, a.shape, a.dtype, offset)
    d[...] = a
    return d
