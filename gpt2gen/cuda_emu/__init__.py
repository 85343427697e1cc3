"""Run CUDA on the CPU: compile an ordinary ``.cu`` file against an execution-model emulator.

``load(path)`` rewrites the file's ``<<<...>>>`` launches and ``__shared__`` declarations (see
:mod:`gpt2gen.cuda_emu.rewrite`), compiles it with the host C++ compiler against the headers in
``include/`` (``cuda_runtime.h``, ``cuda_bf16.h``, ``cuda_fp16.h``, ``cooperative_groups.h`` ...),
caches the shared object by content, and returns a :class:`ctypes.CDLL` whose ``extern "C"`` host
functions can be called with numpy arrays (or CPU torch tensors) for pointer arguments.

Every emulated thread of a block is a fiber; barriers and warp-synchronous functions switch fibers,
blocks run in parallel on a pool of OS threads. Mistakes a GPU would hide or hang on (barrier
divergence, shuffle masks naming absent lanes, out-of-bounds shared memory, launches beyond the
device limits, device-side asserts) raise :class:`EmulationError` naming kernel, block and thread.
See ``docs/cuda-emulator.md``.
"""
from __future__ import annotations

import ctypes
import functools
import os
import shlex
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Iterable, Mapping

from ..cache import atomic_path, cache_root, digest, file_lock
from .rewrite import REWRITE_VERSION, RewriteError, rewrite_source

__all__ = [
    "load", "build", "compile_object", "nvcc_compile", "find_nvcc", "include_dir", "EmulationError", "CompileError",
    "RewriteError", "EmuLibrary",
]

_PKG = Path(__file__).resolve().parent
_INCLUDE = _PKG / "include"
_PRELUDE = _INCLUDE / "gpt2gen_emu" / "prelude.hpp"
_LOCAL_INCLUDE_SUFFIXES = {".cu", ".cuh", ".h", ".hpp", ".hh", ".inl", ".inc"}


class EmulationError(RuntimeError):
    """A CUDA program misbehaved under emulation (the message names kernel, block and thread)."""


class CompileError(EmulationError):
    """The .cu file did not compile for emulation (or with nvcc); the message holds the diagnostics."""


def include_dir() -> Path:
    """Directory with the emulator's CUDA-compatible headers (pass it with -I)."""
    return _INCLUDE


@functools.lru_cache(maxsize=None)
def _headers_digest() -> str:
    parts = []
    for p in sorted(_INCLUDE.rglob("*")):
        if p.is_file():
            parts += [str(p.relative_to(_INCLUDE)), p.read_bytes()]
    return digest(*parts)


@functools.lru_cache(maxsize=None)
def _compiler_id(cxx: str) -> str:
    try:
        out = subprocess.run([*shlex.split(cxx), "--version"], capture_output=True, text=True, timeout=60)
        return (out.stdout.splitlines() or ["?"])[0]
    except (OSError, ValueError, subprocess.SubprocessError) as e:   # ValueError: CXX='g++ "' cannot be split
        raise CompileError(f"cuda_emu: cannot run the C++ compiler {cxx!r}: {e}") from None


_INCLUDE_RE = None


def _collect_sources(path: Path) -> list[Path]:
    """``path`` and the local (quoted, existing, relative) includes it pulls in, recursively."""
    import re

    global _INCLUDE_RE
    if _INCLUDE_RE is None:
        _INCLUDE_RE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"', re.M)
    seen: dict[Path, None] = {}
    stack = [path.resolve()]
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen[p] = None
        for m in _INCLUDE_RE.finditer(p.read_text()):
            q = (p.parent / m.group(1)).resolve()
            if q.is_file() and q.suffix in _LOCAL_INCLUDE_SUFFIXES:
                stack.append(q)
    return list(seen)


def _rewrite_tree(sources: list[Path], out_dir: Path) -> Path:
    """Write rewritten copies of all sources into out_dir; returns the main file's copy."""
    import re

    names = {p: out_dir / f"{i:03d}_{p.name}.cpp" if i == 0 else out_dir / f"{i:03d}_{p.name}"
             for i, p in enumerate(sources)}
    counter = [0]
    for p in sources:
        res = rewrite_source(p.read_text(), str(p), counter)

        def fix_include(m: "re.Match", base: Path = p) -> str:
            q = (base.parent / m.group(1)).resolve()
            if q in names:
                return m.group(0).replace(f'"{m.group(1)}"', f'"{names[q]}"')
            return m.group(0)

        text = re.sub(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"', fix_include, res.text, flags=re.M)
        quoted = str(p).replace("\\", "\\\\").replace('"', '\\"')
        names[p].write_text(f'#line 1 "{quoted}"\n{text}')
    return names[sources[0]]


_loaded: dict[str, "EmuLibrary"] = {}
_loaded_lock = threading.Lock()


def build(path: str | os.PathLike, *, defines: Mapping[str, object] | None = None,
          include_dirs: Iterable[str | os.PathLike] = (), extra_flags: Iterable[str] = (),
          debug: bool = False, checked_shared: bool = True, cxx: str | None = None, kind: str = "shared") -> Path:
    """Compile ``path`` for emulation (cached by content) and return the shared object's path (``kind="object"``:
    a relocatable object file instead, for linking into a program of one's own: see :func:`compile_object`).

    defines: extra ``-D`` macros; include_dirs: extra ``-I`` directories; debug: ``-O0 -g`` for gdb;
    checked_shared: bounds-checked static ``__shared__`` arrays (False: plain arrays, no OOB check);
    cxx: the C++ compiler (default ``$CXX`` or ``g++``).
    """
    src = Path(path).resolve()
    if not src.is_file():
        raise FileNotFoundError(src)
    cxx = cxx or os.environ.get("CXX") or "g++"
    if kind not in ("shared", "object"):
        raise ValueError(f"kind must be 'shared' or 'object', got {kind!r}")
    flags = ["-std=c++17", "-fPIC", "-shared" if kind == "shared" else "-c", "-pthread", "-fno-strict-aliasing", "-w"]
    flags += ["-O0", "-g"] if debug else ["-O2"]
    if not checked_shared:
        flags.append("-DGPT2GEN_EMU_UNCHECKED_SHARED")
    for k, v in (defines or {}).items():
        flags.append(f"-D{k}" if v is None else f"-D{k}={v}")
    for d in include_dirs:
        flags += ["-I", str(Path(d).resolve())]
    flags += list(extra_flags)
    sources = _collect_sources(src)
    key = digest("cuda_emu", REWRITE_VERSION, _headers_digest(), _compiler_id(cxx), cxx, *flags,
                 *[part for p in sources for part in (str(p), p.read_bytes())])
    root = cache_root() / "cuda_emu"
    out_dir = root / key
    so = out_dir / ("lib.so" if kind == "shared" else "lib.o")
    if so.is_file():
        return so
    with file_lock(root / f"{key}.lock"):
        if so.is_file():
            return so
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            main = _rewrite_tree(sources, out_dir)
        except RewriteError as e:
            raise CompileError(f"cuda_emu: cannot translate {src}: {e}") from None
        with atomic_path(so) as tmp:    # also removes what a build killed with kill -9 left
            cmd = [*shlex.split(cxx), *flags, "-I", str(_INCLUDE), "-I", str(src.parent), "-include", str(_PRELUDE),
                   "-x", "c++", str(main), "-o", str(tmp)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            (out_dir / "build.log").write_text(shlex.join(cmd) + "\n" + proc.stdout + proc.stderr)
            if proc.returncode != 0:
                raise CompileError(f"cuda_emu: {src} does not compile for emulation:\n"
                                   f"{_trim_diagnostics(proc.stderr)}")
    return so


def compile_object(path: str | os.PathLike, out: str | os.PathLike, **kwargs) -> Path:
    """Compile ``path`` for emulation into the object file ``out`` (cached by content; the options are
    :func:`build`'s). Linked into a shared library with ``-pthread``, its ``extern "C"`` functions run the
    file's host code against the emulator, which the object carries (hidden symbols, one emulator per library)."""
    obj = build(path, kind="object", **kwargs)
    shutil.copyfile(obj, out)
    return Path(out)


def headers_digest() -> str:
    """A digest of the emulator's headers: what an emulated build depends on besides its own sources."""
    return _headers_digest()


def nvcc_version(nvcc: str) -> str:
    """``nvcc --version``'s text (for cache keys)."""
    return _nvcc_id(nvcc)


def _trim_diagnostics(text: str, limit: int = 12000) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errs = [ln for ln in lines if "error" in ln]
    out = "\n".join(lines)
    if len(out) > limit:
        out = "\n".join(errs)[:limit] or out[:limit]
    return out


def load(path: str | os.PathLike, **kwargs) -> "EmuLibrary":
    """Compile ``path`` for emulation (see :func:`build` for the options) and load it.

    Returns an :class:`EmuLibrary` (a ``ctypes.CDLL``): its functions accept numpy arrays and CPU
    torch tensors for pointer arguments and raise :class:`EmulationError` when the emulator
    recorded an error during the call.
    """
    so = build(path, **kwargs)
    with _loaded_lock:
        lib = _loaded.get(str(so))
        if lib is None:
            lib = EmuLibrary(so, source=Path(path).resolve())
            _loaded[str(so)] = lib
    return lib


class EmuFunction:
    """A foreign function of an emulated library: converts arrays, checks for emulator errors."""

    def __init__(self, lib: "EmuLibrary", func, name: str):
        object.__setattr__(self, "_lib", lib)
        object.__setattr__(self, "_func", func)
        object.__setattr__(self, "__name__", name)

    def __getattr__(self, name):
        return getattr(self._func, name)

    def __setattr__(self, name, value):
        setattr(self._func, name, value)

    def _convert(self, i: int, a, argtypes):
        ptr = None
        if hasattr(a, "__array_interface__") and not isinstance(a, (bytes, bytearray)):
            flags = getattr(a, "flags", None)
            if flags is not None and not (flags["C_CONTIGUOUS"] or flags["F_CONTIGUOUS"]):
                raise ValueError(f"{self.__name__}: argument {i} is a non-contiguous array")
            ptr = a.__array_interface__["data"][0]
        elif hasattr(a, "data_ptr") and hasattr(a, "is_contiguous"):
            if not a.is_contiguous():
                raise ValueError(f"{self.__name__}: argument {i} is a non-contiguous tensor")
            if getattr(getattr(a, "device", None), "type", "cpu") != "cpu":
                raise ValueError(f"{self.__name__}: argument {i} is not a CPU tensor")
            ptr = a.data_ptr()
        if ptr is None:
            return a
        if argtypes and i < len(argtypes):
            t = argtypes[i]
            if isinstance(t, type) and issubclass(t, ctypes._Pointer):
                return ctypes.cast(ctypes.c_void_p(ptr), t)
        return ctypes.c_void_p(ptr)

    def __call__(self, *args):
        argtypes = self._func.argtypes
        conv = [self._convert(i, a, argtypes) for i, a in enumerate(args)]
        result = self._func(*conv)
        self._lib.check()
        return result


class EmuLibrary(ctypes.CDLL):
    """A loaded emulated .cu file."""

    def __init__(self, path: Path, source: Path | None = None):
        super().__init__(str(path), mode=os.RTLD_NOW | os.RTLD_LOCAL)
        self.source = source
        last = ctypes.CDLL.__getitem__(self, "gpt2gen_emu_last_error")
        last.restype = ctypes.c_char_p
        last.argtypes = []
        clear = ctypes.CDLL.__getitem__(self, "gpt2gen_emu_clear_error")
        clear.restype = None
        clear.argtypes = []
        self._last_error = last
        self._clear_error = clear

    def __getitem__(self, name):
        return EmuFunction(self, super().__getitem__(name), name if isinstance(name, str) else str(name))

    def last_error(self) -> str | None:
        msg = self._last_error()
        return None if msg is None else msg.decode(errors="replace")

    def clear_error(self) -> None:
        self._clear_error()

    def check(self) -> None:
        """Raise EmulationError if the emulator recorded an error (and clear it)."""
        msg = self.last_error()
        if msg is not None:
            self._clear_error()
            raise EmulationError(msg)


# ---------------------------------------------------------------------------------------- nvcc
def find_nvcc() -> str | None:
    """Path of nvcc (PATH, then $CUDA_HOME/bin), or None."""
    exe = shutil.which("nvcc")
    if exe:
        return exe
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return None


@functools.lru_cache(maxsize=None)
def _nvcc_id(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=120)
    return out.stdout.strip()


def _cublas_include_dir() -> Path | None:
    """The include folder of the ``nvidia-cublas`` wheel (the one with ``cublasLt.h``), or None."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        for sub in ("cu13", "cublas"):
            inc = Path(root) / sub / "include"
            if (inc / "cublasLt.h").is_file():
                return inc
    return None


def nvcc_compile(path: str | os.PathLike, archs: Iterable[str] = ("sm_80", "sm_90"), *,
                 defines: Mapping[str, object] | None = None, extra_flags: Iterable[str] = (),
                 nvcc: str | None = None, include_dirs: Iterable[str | os.PathLike] = ()) -> Path:
    """Compile ``path`` with the real nvcc to an object file for each architecture in ``archs``
    (one invocation, ``-gencode`` per arch), proving it is valid CUDA. Cached by content; returns
    the object file. Raises CompileError with nvcc's diagnostics, FileNotFoundError without nvcc.

    include_dirs: extra ``-I`` directories. The headers of the ``nvidia-cublas`` wheel (``cublasLt.h``),
    when it is installed, are searched last (``-idirafter``: only for headers found nowhere else, e.g.
    with a CUDA toolkit that lacks cuBLAS), so files using cuBLASLt compile as with a full toolkit."""
    nvcc = nvcc or find_nvcc()
    if not nvcc:
        raise FileNotFoundError("nvcc is not on PATH")
    src = Path(path).resolve()
    flags = ["-std=c++17", "-c"]
    for a in archs:
        num = a.split("_")[-1]
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    for k, v in (defines or {}).items():
        flags.append(f"-D{k}" if v is None else f"-D{k}={v}")
    for d in include_dirs:
        flags += ["-I", str(Path(d).resolve())]
    cublas_inc = _cublas_include_dir()
    if cublas_inc is not None:
        flags += ["-Xcompiler", "-idirafter", "-Xcompiler", str(cublas_inc)]
    flags += list(extra_flags)
    sources = _collect_sources(src)
    key = digest("nvcc", _nvcc_id(nvcc), *flags, *[part for p in sources for part in (str(p), p.read_bytes())])
    out_dir = cache_root() / "cuda_emu_nvcc" / key
    obj = out_dir / "out.o"
    if obj.is_file():
        return obj
    with file_lock(out_dir.parent / f"{key}.lock"):
        if obj.is_file():
            return obj
        with atomic_path(obj) as tmp:
            cmd = [nvcc, *flags, "-I", str(src.parent), str(src), "-o", str(tmp)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise CompileError(f"nvcc rejected {src}:\n{shlex.join(cmd)}\n"
                                   f"{_trim_diagnostics(proc.stdout + proc.stderr)}")
    return obj
