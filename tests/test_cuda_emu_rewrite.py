"""The source rewrite behind the emulator: launches and __shared__ declarations."""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from gpt2gen import cuda_emu
from gpt2gen.cuda_emu.rewrite import RewriteError, mask_source, rewrite_source

KERNELS = Path(__file__).parent / "cuda_emu"


def test_launch_rewrite_keeps_lines_and_ignores_shifts_comments_strings():
    src = ('int a = b << 2 >> 1; // k<<<1,2>>>(x)\n'
           'const char* s = "k<<<1,2>>>(x)";\n'
           'ns::kern<float, (3 > 2)><<<grid,\n  block, 0, stream>>>(p, q);\n'
           'std::cout << x;\n'
           '(fp)<<<1, 1>>>();\n')
    out = rewrite_source(src, "t.cu")
    assert out.launches == 2
    assert out.text.count("\n") == src.count("\n")
    assert 'ns::kern<float, (3 > 2)>, "ns::kern<float, (3 > 2)>", ::gpt2gen_emu::LaunchCfg(grid,' in out.text
    assert "::gpt2gen_emu::launch(ns::kern" in out.text and "stream))(p, q);" in out.text
    assert '"k<<<1,2>>>(x)"' in out.text and "// k<<<1,2>>>(x)" in out.text
    assert "::gpt2gen_emu::launch((fp)" in out.text


def test_shared_rewrite_shapes():
    src = ("__global__ void k() {\n"
           "  __shared__ __align__(16) float a[4][N + 1], b[8];\n"
           "  extern __shared__ unsigned char raw[];\n"
           "  __shared__ volatile int v;\n"
           "  float4* p = reinterpret_cast<float4*>(b);\n"
           "}\n")
    out = rewrite_source(src, "t.cu").text
    assert out.count("\n") == src.count("\n")
    assert "auto& a = ::gpt2gen_emu::shared_static<::gpt2gen_emu::sarr_t<float, (4), (N + 1)>, (16), 1>(\"a\", 2);" in out
    assert "auto& b = ::gpt2gen_emu::shared_static<::gpt2gen_emu::sarr_t<float, (8)>, (16), 2>(\"b\", 2);" in out
    assert "unsigned char* const raw = ::gpt2gen_emu::dyn_shared<unsigned char>(0);" in out
    assert "auto& v = ::gpt2gen_emu::shared_static<volatile int, 0, 3>(\"v\", 4);" in out
    assert "reinterpret_cast<float4*>(::gpt2gen_emu::sdata(b))" in out


def test_shared_initializer_is_rejected():
    with pytest.raises(RewriteError, match="t.cu:2: __shared__ variables cannot have an initializer"):
        rewrite_source("void k() {\n __shared__ int x = 3;\n}\n", "t.cu")


def test_unterminated_launch_is_rejected():
    with pytest.raises(RewriteError, match="t.cu:1: kernel launch <<< without a matching >>>"):
        rewrite_source("k<<<1, 2(x);\n", "t.cu")


def test_mask_blanks_comments_and_strings_only():
    code, stmt = mask_source('#include "a.h"\nint x = 1; /* c */ char c = \'"\'; // d\n')
    assert '"a.h"' in code and "/* c */" not in code and "'\"'" not in code and "// d" not in code
    assert stmt.startswith(" " * len('#include "a.h"')) and "int x = 1;" in stmt


def test_syntax_corner_cases_compile_and_run():
    lib = cuda_emu.load(KERNELS / "syntax.cu")
    lib.run_syntax.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    out = np.zeros(32, np.float32)
    rev = np.zeros(32, np.float32)
    assert lib.run_syntax(out, rev) == 0
    t = np.arange(32)
    np.testing.assert_array_equal(out, 0.5 + (t >> 1 << 1) + 8 + 32)
    np.testing.assert_array_equal(rev, 31 - t)


def test_local_includes_are_rewritten(tmp_path):
    (tmp_path / "helper.cuh").write_text(
        "__device__ float block_sum(float v) {\n"
        "  __shared__ float s[64];\n"
        "  s[threadIdx.x] = v;\n"
        "  __syncthreads();\n"
        "  float r = 0;\n"
        "  for (int i = 0; i < 64; ++i) r += s[i];\n"
        "  return r;\n"
        "}\n"
        "__global__ void k(float* out) { out[threadIdx.x] = block_sum((float)threadIdx.x); }\n")
    (tmp_path / "main.cu").write_text(
        '#include "helper.cuh"\n'
        'extern "C" int run(float* h) {\n'
        "  float* d; cudaMalloc(&d, 64 * 4);\n"
        "  k<<<1, 64>>>(d);\n"
        "  cudaMemcpy(h, d, 64 * 4, cudaMemcpyDeviceToHost); cudaFree(d);\n"
        "  return cudaGetLastError();\n"
        "}\n")
    lib = cuda_emu.load(tmp_path / "main.cu")
    out = np.zeros(64, np.float32)
    lib.run.argtypes = [ctypes.c_void_p]
    assert lib.run(out) == 0
    np.testing.assert_array_equal(out, np.full(64, 63 * 64 / 2, np.float32))


def test_compile_errors_point_at_the_original_file(tmp_path):
    src = tmp_path / "broken.cu"
    src.write_text("__global__ void k(float* x) {\n  __shared__ float s[4];\n  x[0] = s[0] + nope;\n}\n")
    with pytest.raises(cuda_emu.CompileError, match=r"broken\.cu:3:.*nope"):
        cuda_emu.load(src)
