"""Kernels written to break each emulator check: every mistake must be reported (naming the kernel,
the block and the thread) instead of hanging or passing silently."""
from __future__ import annotations

import ctypes
import time
from pathlib import Path

import numpy as np
import pytest

from gpt2gen import cuda_emu

KERNELS = Path(__file__).parent / "cuda_emu"
WHO = r"kernel '{k}' block \({b}\) thread \({t}\): "

CASES = {
    # barrier divergence
    "check_divergent_barrier": WHO.format(k="divergent_barrier", b="0,0,0", t="32,0,0")
    + r"barrier divergence: threads of the block wait at different barriers: thread \(0,0,0\) at "
      r"__syncthreads \(.*checks\.cu:9\), thread \(32,0,0\) at __syncthreads \(.*checks\.cu:11\)",
    "check_exit_before_barrier": WHO.format(k="exit_before_barrier", b="0,0,0", t="0,0,0")
    + r"barrier divergence: 40 thread\(s\) wait at __syncthreads at .*checks\.cu:19, but thread \(40,0,0\) has exited",
    # shuffle / vote masks naming lanes that do not take part
    "check_shuffle_partial": WHO.format(k="shuffle_partial", b="0,0,0", t="0,0,0")
    + r"__shfl_down_sync at .*checks\.cu:24: mask 0xffffffff names lane 16 .*which does not take part",
    "check_vote_partial_warp": WHO.format(k="vote_partial_warp", b="0,0,0", t="32,0,0")
    + r"__ballot_sync .*mask 0xffffffff names lane 16 of warp 1, which does not exist \(the block has 48 threads\)",
    "check_vote_after_exit": WHO.format(k="vote_after_exit", b="0,0,0", t="6,0,0")
    + r"__all_sync .*names lane 5 \(thread \(5,0,0\)\), which has already exited",
    "check_shuffle_reads_outside_mask": WHO.format(k="shuffle_reads_outside_mask", b="0,0,0", t="0,0,0")
    + r"__shfl_sync .*lane 0 reads lane 20, which is not named in mask 0x0000ffff",
    "check_shuffle_vs_barrier": WHO.format(k="shuffle_vs_barrier", b="0,0,0", t="0,0,0")
    + r"__shfl_xor_sync .*names lane 16 .*it is waiting at __syncthreads at .*checks\.cu:43",
    # out-of-bounds shared memory
    "check_shared_oob_static": WHO.format(k="shared_oob_static", b="0,0,0", t="64,0,0")
    + r"out-of-bounds shared-memory access: index 64 into a dimension of extent 64 of __shared__ array 'buf'",
    "check_shared_oob_2d": WHO.format(k="shared_oob_2d", b="0,0,0", t="7,0,0")
    + r"out-of-bounds shared-memory access: index 8 into a dimension of extent 8 of __shared__ array 'tile'",
    "check_shared_oob_dynamic": r"kernel 'shared_oob_dynamic' block \(0,0,0\)( thread \(\d+,0,0\))?: "
    r"out-of-bounds shared-memory write: the red zone after the 256 bytes of dynamic",
    "check_static_smem_limit": WHO.format(k="static_smem_too_big", b="0,0,0", t="0,0,0")
    + r"static __shared__ memory exceeds the 48 KB per-block limit: 'big'",
    # launches beyond a real GPU's limits
    "check_too_many_threads": r"launch of kernel 'ok_kernel' .*block \(2048,1,1\): 2048 threads per block exceed the device limit of 1024",
    "check_block_z": r"launch of kernel 'ok_kernel' .*block \(1,1,65\): block dimensions exceed",
    "check_grid_y": r"launch of kernel 'ok_kernel' with grid \(1,70000,1\).*: grid dimensions exceed",
    "check_dynamic_smem_default_limit": r"launch of kernel 'shared_oob_dynamic' .*65536 bytes of dynamic shared memory "
    r"exceed the kernel's limit of 49152 bytes",
    "check_dynamic_smem_optin_limit": r"cudaFuncSetAttribute\(cudaFuncAttributeMaxDynamicSharedMemorySize, 307200\): "
    r"exceeds the device's 227 KB",
    # device-side failures
    "check_device_assert": WHO.format(k="device_assert", b="0,0,0", t="17,0,0")
    + r"device-side assertion `x\[threadIdx.x\] >= 0.0f` failed at .*checks\.cu:68",
    "check_trap": WHO.format(k="trap_kernel", b="2,0,0", t="3,0,0") + r"__trap\(\) was called",
    "check_spin_forever": WHO.format(k="spin_forever", b="0,0,0", t="0,0,0") + r"livelock",
}


@pytest.fixture(scope="module")
def lib():
    lib = cuda_emu.load(KERNELS / "checks.cu")
    lib.run_ok.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.check_memcpy_host_as_device.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return lib


def _ok(lib):
    x = np.zeros(32, np.float32)
    assert lib.run_ok(x, 32) == 0
    np.testing.assert_array_equal(x, 2 * np.arange(32, dtype=np.float32))


@pytest.mark.parametrize("name", sorted(CASES))
def test_check_is_reported(lib, name):
    t0 = time.perf_counter()
    with pytest.raises(cuda_emu.EmulationError, match=CASES[name]):
        getattr(lib, name)()
    assert time.perf_counter() - t0 < 20  # reported, never hung
    _ok(lib)  # the error was cleared: the library keeps working


def test_memcpy_with_host_pointer_as_device(lib):
    a = np.zeros(4, np.float32)
    with pytest.raises(cuda_emu.EmulationError, match=r"host: cudaMemcpy\(cudaMemcpyHostToDevice, 16 bytes\): "
                                                      r"destination 0x[0-9a-f]+ is not inside a device allocation"):
        lib.check_memcpy_host_as_device(a, a, 4)
    _ok(lib)


def test_cuda_error_codes_are_returned_too(lib):
    # The host code sees the CUDA error code (cudaErrorInvalidConfiguration = 9) as on a GPU ...
    f = lib._FuncPtr(("check_too_many_threads", lib))
    assert f() == 9
    # ... and the Python wrapper reports it (the message was recorded).
    with pytest.raises(cuda_emu.EmulationError, match="threads per block"):
        lib.check()


@pytest.mark.parametrize("variant, needle", [
    ("USE_LEGACY_SHFL", r"unsupported intrinsic __shfl\b"),
    ("USE_INLINE_PTX", r"inline_PTX_asm_is_not_supported"),
    ("USE_WMMA", r"unsupported header <mma\.h>"),
    ("USE_GRID_SYNC", r"unsupported intrinsic grid_group::sync"),
])
def test_unsupported_constructs_fail_to_compile(variant, needle):
    with pytest.raises(cuda_emu.CompileError, match=needle):
        cuda_emu.load(KERNELS / "unsupported.cu", defines={variant: 1})


def test_unsupported_file_baseline_compiles():
    assert cuda_emu.build(KERNELS / "unsupported.cu").is_file()
