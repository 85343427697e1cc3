"""The CUDA target: kernels and glue in CUDA C++ over device arenas, GEMMs through cuBLASLt.

Its kernels live in ``templates/cuda/`` (one template per op, as for the CPU, plus helpers and AdamW).
Each op's host launcher has the name and the arguments of the CPU kernel (``KERNELS`` below is the CPU
table with the CUDA templates), so one lowered program renders for both: the statements become the same
calls, and what differs is what the calls do (launch kernels on the model's stream). Every pointer a
launcher gets is a device pointer; a launcher allocates nothing (scratch is grown once, at the first
step), synchronises nothing and uses no float atomics, so two runs give bitwise-equal results.

Two builds of one rendering: ``nvcc`` for a GPU (``--arch sm_80,sm_90``), and the emulator
(``gpt2gen.cuda_emu``: the same ``.cu`` compiled with the host C++ compiler against CUDA-compatible
headers and run on the CPU with GPU semantics), which is how the kernels are proven here.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..cache import cache_root, digest, write_if_changed
from ..resources import csrc_dir
from . import CompileJob, OptionError
from .cpu import KERNELS as CPU_KERNELS
from .cpu import CpuTarget

# The CPU's kernel table with CUDA templates: the same launchers, arguments and saved state.
KERNELS = {name: replace(k, template=k.template.replace(".c.j2", ".cu.j2"),
                         needs=tuple(n.replace(".c.j2", ".cu.j2") for n in k.needs))
           for name, k in CPU_KERNELS.items()}

DEFAULT_ARCHS = ("sm_80", "sm_90")


@dataclass(frozen=True)
class Storage:
    """How the kernels store the model's float tensors (``st`` in the templates). Arithmetic is fp32 in every
    precision: ``load(e)`` widens a stored element to float, ``store(e)`` rounds a float to the storage type
    (to nearest even), ``add(dst, e)`` is ``dst += e`` with one rounding. ``blas`` is cuBLASLt's data type."""
    name: str            # fp32 | bf16 | fp16
    ctype: str           # float | __nv_bfloat16 | __half
    blas: str            # CUDA_R_32F | CUDA_R_16BF | CUDA_R_16F

    def load(self, e: str) -> str:
        return {"fp32": e, "bf16": f"__bfloat162float({e})", "fp16": f"__half2float({e})"}[self.name]

    def store(self, e: str) -> str:
        return {"fp32": e, "bf16": f"__float2bfloat16({e})", "fp16": f"__float2half({e})"}[self.name]

    def add(self, dst: str, e: str) -> str:
        if self.name == "fp32":
            return f"{dst} += {e}"
        return f"{dst} = {self.store(self.load(dst) + ' + (' + e + ')')}"


STORAGE = {"fp32": Storage("fp32", "float", "CUDA_R_32F"),
           "bf16": Storage("bf16", "__nv_bfloat16", "CUDA_R_16BF"),
           "fp16": Storage("fp16", "__half", "CUDA_R_16F")}


def cublas_dirs() -> tuple[Path, Path] | None:
    """The include and library folders of the ``nvidia-cublas`` package (the ``cuda`` extra), or None."""
    import importlib.util
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for sub in ("cu13", "cublas"):
            inc, lib = Path(root) / sub / "include", Path(root) / sub / "lib"
            if (inc / "cublasLt.h").is_file():
                return inc, lib
    return None


class CudaTarget(CpuTarget):
    """The statements render as for the CPU (C++ is C here); the templates, storage types and compiling differ."""
    name = "cuda"
    folder = "cuda"
    precisions = ("fp32", "bf16", "fp16")
    fusions = ("matmul_gelu", "classifier", "residual_layernorm")
    kernels = KERNELS
    type_names = {"f32": "float", "bf16": "__nv_bfloat16", "f16": "__half", "i32": "int"}
    main_template = "model.cu.j2"
    source_name = "model.cu"
    storage = STORAGE
    helpers = ("util.cu.j2",)
    optimizer = "optim/adamw.cu.j2"
    zero = {"f32": "gg_zero", "bf16": "gg_zero16", "f16": "gg_zero16"}

    def kernels_source(self, op_names: list[str], precision: str = "fp32") -> str:
        head = ("// kernels of gpt2gen ops, for testing them one by one (generated; do not edit)\n"
                "#define GG_KERNEL extern \"C\"\n\n")
        return head + "\n".join(self.kernel_sections(op_names, precision))

    def kernels_file(self, op_names: list[str], precision: str = "fp32") -> Path:
        """The kernels of ``op_names`` (helpers and AdamW included) as a ``.cu`` file in the cache, its launchers
        exported: ``cuda_emu.load(path)`` runs them on the CPU (device pointers are host memory there, so the
        op tests pass numpy arrays), ``cuda_emu.nvcc_compile(path)`` proves them valid CUDA."""
        source = self.kernels_source(op_names, precision)
        src = cache_root() / "kernels-cuda" / digest(source) / "kernels.cu"
        write_if_changed(src, source)
        return src

    def allocator(self, extension: Path):
        """Arenas in device memory: the model's own ``gg_alloc`` (managed memory, zeroed), viewed from Python as
        numpy arrays (the host reads and writes them through page migration; under emulation they are host
        memory). Each array frees its allocation when the last view of it goes."""
        import ctypes
        import weakref

        import numpy as np

        from ..precision import DTYPES
        lib = ctypes.CDLL(str(extension))
        alloc, free, error = lib.gg_alloc, lib.gg_free, lib.gg_error
        alloc.restype, alloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        free.restype, free.argtypes = None, [ctypes.c_void_p]
        error.restype, error.argtypes = ctypes.c_char_p, []

        def device(nbytes: int, dtype: str):
            ptr = alloc(max(nbytes, 1))
            if not ptr:
                why = (error() or b"").decode()
                if "memory" in why and "insufficient driver" not in why and "no CUDA-capable" not in why:
                    raise MemoryError(f"cannot allocate {nbytes:,} bytes of device memory: {why}")
                raise RuntimeError(f"the CUDA model {extension.name} cannot allocate its arenas: {why or 'unknown error'}."
                                   f"\nhint: this needs a machine with an NVIDIA GPU and its driver; without one, build "
                                   f"with --emulate (gpt2gen.build(..., target='cuda', emulate=True)) to run the same "
                                   f"CUDA code on the CPU")
            buf = (ctypes.c_uint8 * max(nbytes, 1)).from_address(ptr)
            weakref.finalize(buf, free, ptr)
            return np.frombuffer(buf, dtype=np.uint8)[:nbytes].view(DTYPES[dtype].numpy)
        return device

    # ---- compiling --------------------------------------------------------------------------------------

    def model_object(self, job: CompileJob, src: Path, obj: Path) -> list[str]:
        """model.cu into ``obj``: by nvcc for the GPU architectures asked for, or by the host compiler against
        the emulator (which the object then carries). Returns the link flags (cuBLASLt, cudart)."""
        if job.options.get("emulate"):
            from .. import cuda_emu
            # -O1: an emulated model runs small configs, and compiles in about half the time of -O2
            cuda_emu.compile_object(src, obj, include_dirs=[csrc_dir()], extra_flags=["-O1"])
            return []
        return self._nvcc_object(job, src, obj)

    def build_options(self, emulate: bool = False, archs: str | list[str] | None = None) -> dict:
        if isinstance(archs, str):
            archs = [a.strip() for a in archs.split(",") if a.strip()]
        archs = list(archs or DEFAULT_ARCHS)
        for a in archs:
            if not (a.startswith("sm_") and a[3:].rstrip("a").isdigit() and int(a[3:].rstrip("a")) >= 70):
                raise OptionError(f"--arch {a}: not a GPU architecture this target builds; give compute "
                                  f"capabilities as sm_XY, e.g. --arch sm_80,sm_90 (A100, H100)")
        if emulate:
            return {"emulate": True}
        return {"archs": tuple(archs)}

    def build_key(self, options: dict) -> str:
        from .. import cuda_emu
        if options.get("emulate"):
            return "emulate " + cuda_emu.headers_digest()
        nvcc = cuda_emu.find_nvcc()
        dirs = cublas_dirs()
        return " ".join(["nvcc", cuda_emu.nvcc_version(nvcc) if nvcc else "-", str(dirs[0] if dirs else "-"),
                         ",".join(options.get("archs", ()))])

    def _nvcc_object(self, job: CompileJob, src: Path, obj: Path) -> list[str]:
        """Compile with nvcc; writes ptxas's per-kernel report (registers, shared memory, spills) beside the
        sources as ``ptxas.txt`` and prints it when verbose. Returns the link flags."""
        from ..cuda_emu import find_nvcc
        nvcc = find_nvcc()
        if nvcc is None:
            raise OptionError("nvcc is not on PATH (nor in $CUDA_HOME/bin): install the CUDA toolkit (12.x or 13.x), "
                              "or build with --emulate to run the CUDA kernels on the CPU")
        dirs = cublas_dirs()
        if dirs is None:
            raise OptionError("cuBLASLt is not installed: pip install 'gpt2gen[cuda]' (the nvidia-cublas package)")
        inc, lib = dirs
        archs = job.options.get("archs") or DEFAULT_ARCHS
        gencode = [f for a in archs for f in ("-gencode", f"arch=compute_{a[3:]},code=sm_{a[3:]}")]
        proc = job.run([nvcc, "-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-Xptxas", "-v", *gencode,
                        f"-I{csrc_dir()}", f"-I{inc}", "-c", str(src), "-o", str(obj)],
                       "compiling the generated model with nvcc", src, job.hint)
        report = ptxas_report(proc.stdout + proc.stderr)
        write_if_changed(job.directory / "ptxas.txt", format_ptxas(report))
        if job.verbose:
            print(format_ptxas(report), end="")
        cudart = cudart_dir(nvcc)
        if cudart is None:
            raise OptionError(f"the CUDA runtime library (libcudart_static.a) is not beside {nvcc}: set CUDA_HOME to "
                              f"the CUDA toolkit's directory")
        return [f"-L{cudart}", f"-L{lib}", f"-Wl,-rpath,{lib}", "-l:libcublasLt.so.13", "-l:libcublas.so.13",
                "-lcudart_static", "-ldl", "-lrt", "-lpthread"]


def cudart_dir(nvcc: str) -> Path | None:
    """The folder holding the CUDA runtime's static library for this nvcc (``$CUDA_HOME``, the toolkit nvcc
    belongs to, /usr/local/cuda), or None."""
    import os
    roots = [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    roots += [Path(nvcc).resolve().parent.parent, Path("/usr/local/cuda")]
    for root in roots:
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            if (root / sub / "libcudart_static.a").is_file():
                return root / sub
    return None


@dataclass(frozen=True)
class KernelResources:
    """What ptxas reports of one kernel for one architecture."""
    kernel: str
    arch: str
    registers: int
    shared_bytes: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int


def ptxas_report(text: str) -> list[KernelResources]:
    """Parse ``nvcc -Xptxas -v`` output into one entry per (kernel, architecture)."""
    import re
    out, kernel, arch, frame = [], None, "", (0, 0, 0)
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'", line)
        if m:
            kernel, arch = m.group(1), m.group(2)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and kernel:
            frame = tuple(int(x) for x in m.groups())
            continue
        m = re.search(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?", line)
        if m and kernel:
            out.append(KernelResources(_demangle(kernel), arch, int(m.group(1)), int(m.group(2) or 0),
                                       frame[1], frame[2], frame[0]))
            kernel, frame = None, (0, 0, 0)
    return out


def _demangle(name: str) -> str:
    import shutil
    import subprocess
    if name.startswith("_Z") and shutil.which("c++filt"):
        try:
            return subprocess.run(["c++filt", name], capture_output=True, text=True, timeout=10).stdout.strip() or name
        except (OSError, subprocess.SubprocessError):
            return name
    return name


def format_ptxas(report: list[KernelResources]) -> str:
    rows = [f"{'kernel':<60} {'arch':<6} {'regs':>5} {'smem':>7} {'stack':>6} {'spills (st/ld)':>15}"]
    for r in sorted(report, key=lambda r: (r.kernel, r.arch)):
        name = r.kernel.split("(")[0].removeprefix("void ").replace(", ", ",")   # one word: kernel<64,true>
        name = name if len(name) <= 60 else name[:57] + "..."
        rows.append(f"{name:<60} {r.arch:<6} {r.registers:>5} {r.shared_bytes:>7} {r.stack_bytes:>6} "
                    f"{r.spill_stores:>7}/{r.spill_loads:<7}")
    return "\n".join(rows) + "\n"


CUDA = CudaTarget()
