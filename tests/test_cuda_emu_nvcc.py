"""Every test kernel must also be valid CUDA: compiled by the real nvcc for sm_80 and sm_90."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gpt2gen import cuda_emu

KERNELS = Path(__file__).parent / "cuda_emu"
# unsupported.cu is compiled in its valid baseline form only (its variants are meant to fail).
FILES = sorted(p.name for p in KERNELS.glob("*.cu"))


@pytest.fixture(scope="module")
def nvcc_results():
    if cuda_emu.find_nvcc() is None:
        pytest.skip("nvcc is not on PATH: cannot prove the test kernels compile as CUDA")

    def compile_one(name):
        try:
            return name, cuda_emu.nvcc_compile(KERNELS / name, archs=("sm_80", "sm_90"))
        except cuda_emu.CompileError as e:
            return name, e

    with ThreadPoolExecutor(max_workers=2) as ex:  # nvcc is slow; the results are cached by content
        return dict(ex.map(compile_one, FILES))


@pytest.mark.parametrize("name", FILES)
def test_kernel_compiles_with_nvcc_for_sm80_and_sm90(nvcc_results, name):
    res = nvcc_results[name]
    if isinstance(res, Exception):
        pytest.fail(str(res))
    assert res.is_file() and res.stat().st_size > 0


def test_nvcc_rejects_invalid_cuda(tmp_path):
    if cuda_emu.find_nvcc() is None:
        pytest.skip("nvcc is not on PATH")
    bad = tmp_path / "bad.cu"
    bad.write_text("__global__ void k(float* x) { x[0] = undefined_symbol; }\n")
    with pytest.raises(cuda_emu.CompileError, match="undefined_symbol"):
        cuda_emu.nvcc_compile(bad)
