"""Every CUDA kernel of the target is valid CUDA for the real compiler: the kernels of all ops
(``sorted(gpt2gen.targets.cuda.KERNELS)``, with the helpers and AdamW: ``CUDA.kernels_file``), in each storage
precision, compiled by nvcc for sm_80 and sm_90 (A100, H100), with a register spill in any kernel an error
(ptxas ``-warn-spills -Werror``: "Registers are spilled to local memory in function ..., N bytes spill
stores"). One test for the whole target (the op test files run the same kernels under the emulator). Skipped
without nvcc or the cuBLASLt headers (the nvidia-cublas package: pip install 'gpt2gen[cuda]').
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from gpt2gen import cuda_emu
from gpt2gen.resources import csrc_dir
from gpt2gen.targets.cuda import CUDA, KERNELS, cublas_dirs

PRECISIONS = ("fp32", "bf16", "fp16")
ARCHS = ("sm_80", "sm_90")


@pytest.fixture(scope="module")
def nvcc_objects():
    """Each precision's rendering of every kernel compiled by nvcc (the three at once: nvcc is slow and mostly
    single-threaded; the objects are cached by content). A CompileError is kept as that precision's result."""
    dirs = cublas_dirs()
    if cuda_emu.find_nvcc() is None or dirs is None:
        pytest.skip("nvcc or the cuBLAS headers (pip install 'gpt2gen[cuda]') are missing")
    flags = ["-I", str(csrc_dir()), "-I", str(dirs[0]), "-Xptxas", "-warn-spills", "-Xptxas", "-Werror"]

    def compile_one(precision):
        try:
            return cuda_emu.nvcc_compile(CUDA.kernels_file(sorted(KERNELS), precision), archs=ARCHS,
                                         extra_flags=flags)
        except cuda_emu.CompileError as e:
            return e

    with ThreadPoolExecutor(max_workers=len(PRECISIONS)) as ex:
        return dict(zip(PRECISIONS, ex.map(compile_one, PRECISIONS)))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_kernel_compiles_with_nvcc_without_spills(nvcc_objects, precision):
    res = nvcc_objects[precision]
    if isinstance(res, Exception):
        pytest.fail(f"{precision}: {res}", pytrace=False)
    assert res.is_file() and res.stat().st_size > 0
