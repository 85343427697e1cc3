"""Building: generate a model's sources, compile them into a Python extension, and cache the result.

The extension is two objects linked together: ``binding.o`` (pybind11, the same for every model;
compiled once per compiler, Python and pybind11 version) and ``model.o`` (the generated C). Editing a
model file therefore recompiles only the generated C and relinks. Each build lives in the cache under
a key that hashes everything that changes its output: the rendered sources (so the model file, the
config overrides, the templates and the generator), the compiler and its version, the flags and the
CPU that ``-march=native`` targets. An unchanged rebuild compiles nothing. Builders of the same key
take a file lock and re-check the cache after taking it, and every artefact is renamed into place
only when complete, so concurrent builds never see or leave half a file.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import lower as _lower
from . import render as _render
from . import spec as _spec
from .cache import atomic_path, cache_root, digest, file_lock, write_if_changed
from .resources import csrc_dir, find_model

C_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-std=c11", "-fno-math-errno"]  # errno is never read
CXX_FLAGS = ["-O3", "-fPIC", "-std=c++17", "-fvisibility=hidden"]
LINK_FLAGS = ["-shared", "-fopenmp", "-Wl,-Bsymbolic"]
MODULE = "_gpt2gen_model"


class BuildError(RuntimeError):
    """A build that could not finish: what failed, where, and what to do about it."""


@dataclass
class Built:
    """A compiled model: its program, its sources and the extension file."""
    program: _lower.Program
    target: str
    key: str
    directory: Path
    extension: Path
    sources: dict[str, str]
    compiled: bool            # False when the cache already had it


def _run(cmd: list[str], what: str, source: Path | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        where = f" ({source})" if source else ""
        raise BuildError(f"{what} failed{where}:\n$ {' '.join(cmd)}\n{proc.stderr.strip()}\n"
                         f"hint: the generated file names the template each section comes from; fix that "
                         f"template or the model file, then build again")


def _compiler(env_var: str, default: str, kind: str) -> str:
    cc = os.environ.get(env_var, default)
    if shutil.which(cc) is None:
        raise BuildError(f"{kind} compiler `{cc}` not found on PATH.\n"
                         f"hint: install one (Debian/Ubuntu: `apt-get install build-essential`) or set {env_var} "
                         f"to the compiler to use")
    return cc


@functools.lru_cache(maxsize=None)
def _version(cc: str) -> str:
    out = subprocess.run([cc, "--version"], capture_output=True, text=True)
    return out.stdout.splitlines()[0] if out.stdout else cc


@functools.lru_cache(maxsize=None)
def _cpu() -> str:
    """What -march=native targets: the CPU model and its instruction-set flags."""
    seen: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":")[0].strip()
            if key in ("model name", "flags") and key not in seen:
                seen[key] = line
    except OSError:
        pass
    return " | ".join(seen.values()) or platform.processor() or platform.machine()


def toolchain() -> dict[str, str]:
    """The compilers this machine would use, with versions (part of every build key)."""
    cc = _compiler("CC", "gcc", "C")
    cxx = _compiler("CXX", "g++", "C++")
    return {"cc": cc, "cxx": cxx, "cc_version": _version(cc), "cxx_version": _version(cxx), "cpu": _cpu()}


def _check_openmp(tc: dict[str, str]) -> None:
    marker = cache_root() / "toolchain" / f"openmp-{digest(tc['cc'], tc['cc_version'])}.ok"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    src = marker.with_suffix(".c")
    src.write_text("#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
    proc = subprocess.run([tc["cc"], "-fopenmp", str(src), "-o", str(marker.with_suffix(".bin"))],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"the C compiler `{tc['cc']}` cannot build OpenMP code:\n{proc.stderr.strip()}\n"
                         f"hint: install OpenMP support (Debian/Ubuntu: `apt-get install build-essential libgomp1`; "
                         f"for clang also `libomp-dev`), or set CC to a compiler that has it")
    marker.write_text("ok\n")


def _python_includes() -> list[str]:
    inc = sysconfig.get_paths()["include"]
    if not (Path(inc) / "Python.h").exists():
        raise BuildError(f"Python headers not found (no Python.h in {inc}).\n"
                         f"hint: install them (Debian/Ubuntu: `apt-get install python3-dev`)")
    try:
        import pybind11
    except ImportError:
        raise BuildError("pybind11 is not installed.\nhint: `pip install pybind11`") from None
    return [inc, pybind11.get_include()]


def _build_once(product: Path, make: Callable[[Path], None]) -> bool:
    """Build ``product`` unless the cache has it; returns whether this call built it.

    ``make(tmp)`` writes the product to a temporary name, which is renamed into place when complete;
    builders of the same product take a file lock and re-check, so concurrent builds compile it once
    and nobody sees half a file. A failed build leaves no temporary behind.
    """
    if product.exists():
        return False
    with file_lock(product.parent / ".lock"):
        if product.exists():
            return False
        with atomic_path(product) as tmp:
            make(tmp)
    return True


def binding_key(tc: dict[str, str]) -> str:
    import pybind11
    return digest((csrc_dir() / "binding.cpp").read_text(), (csrc_dir() / "gpt2gen_abi.h").read_text(), tc["cxx"],
                  tc["cxx_version"], sys.version, pybind11.__version__, " ".join(CXX_FLAGS))


def binding_object(tc: dict[str, str]) -> Path:
    """The compiled binding, shared by every model (built once per toolchain and Python)."""
    src = csrc_dir() / "binding.cpp"
    obj = cache_root() / "binding" / binding_key(tc) / "binding.o"

    def make(tmp: Path) -> None:
        includes = [f"-I{i}" for i in _python_includes()]
        _run([tc["cxx"], *CXX_FLAGS, *includes, f"-I{csrc_dir()}", "-c", str(src), "-o", str(tmp)],
             "compiling the Python binding", src)
    _build_once(obj, make)
    return obj


def generate(model: str | Path = "model.yaml", target: str = "cpu", label: str | None = None,
             **overrides) -> tuple[_lower.Program, dict[str, str]]:
    """Load, lower and render a model; returns the program and {file name: source}."""
    path = find_model(model)
    spec = _spec.load(path)
    config = spec.resolve(overrides)
    program = _lower.lower(spec, config)
    return program, _render.render_program(program, target, label)


def compile_model(model: str | Path = "model.yaml", target: str = "cpu", out: str | Path | None = None,
                  verbose: bool = False, **overrides) -> Built:
    """Generate and compile a model (or find it in the cache). ``out`` also receives a copy of the sources."""
    if target != "cpu":
        raise BuildError(f"target `{target}` is not available yet; use --target cpu")
    program, sources = generate(model, target, **overrides)
    if out is not None:
        _render.write_sources(sources, Path(out))
    tc = toolchain()
    ext_suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    key = digest(*[f"{k}\n{v}" for k, v in sorted(sources.items())], *[f"{k}={v}" for k, v in sorted(tc.items())],
                 " ".join(C_FLAGS + LINK_FLAGS), ext_suffix, binding_key(tc))
    directory = cache_root() / "models" / f"{program.spec.name}-{target}-{key}"
    module = f"gg_{key}"
    ext = directory / (module + ext_suffix)
    if ext.exists():
        return Built(program, target, key, directory, ext, sources, False)
    _check_openmp(tc)
    binding = binding_object(tc)

    def make(tmp: Path) -> None:
        t0 = time.perf_counter()
        for name, text in sources.items():
            write_if_changed(directory / name, text)
        src = directory / _render.renderer_for(target).source_name
        # Python finds a module by the name in its file, and a process may load many models: give each
        # build its own module name with a two-line init that forwards to the shared binding's.
        shim = directory / "module_init.c"
        write_if_changed(shim, f"// generated: names this build's Python module `{module}`\n"
                               f"extern void* PyInit_{MODULE}(void);\n"
                               f"__attribute__((visibility(\"default\"))) void* PyInit_{module}(void) "
                               f"{{ return PyInit_{MODULE}(); }}\n")
        objs = [tmp.with_suffix(".model.o"), tmp.with_suffix(".init.o")]
        try:
            _run([tc["cc"], *C_FLAGS, f"-I{csrc_dir()}", "-c", str(src), "-o", str(objs[0])],
                 "compiling the generated model", src)
            _run([tc["cc"], "-fPIC", "-c", str(shim), "-o", str(objs[1])], "compiling the module init")
            _run([tc["cxx"], *LINK_FLAGS, str(binding), *map(str, objs), "-o", str(tmp)], "linking the model extension")
        finally:
            for o in objs:
                o.unlink(missing_ok=True)
        if verbose:
            print(f"compiled {src} in {time.perf_counter() - t0:.2f} s")
    compiled = _build_once(ext, make)
    return Built(program, target, key, directory, ext, sources, compiled)


def load_extension(path: Path):
    """Import a compiled model extension from its file (several models can live in one process)."""
    name = Path(path).name.split(".")[0]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def build(model: str | Path = "model.yaml", target: str = "cpu", *, seed: int | None = 0,
          out: str | Path | None = None, verbose: bool = False, **overrides):
    """Generate, compile (cached) and load a model; parameters are initialised from ``seed`` (None: zeros)."""
    from .runtime import Model
    built = compile_model(model, target, out=out, verbose=verbose, **overrides)
    m = Model(built)
    if seed is not None:
        m.init_weights(seed)
    return m


def kernels_library(op_names: list[str], target: str = "cpu") -> Path:
    """Compile the kernels of ``op_names`` (plus helpers and the optimizer) into a shared library with
    exported symbols, cached by content; the op tests call them through ctypes."""
    if target != "cpu":
        raise BuildError(f"target `{target}` is not available yet")
    source = _render.kernels_source(op_names, target)
    tc = toolchain()
    key = digest(source, tc["cc"], tc["cc_version"], tc["cpu"], " ".join(C_FLAGS))
    lib = cache_root() / "kernels" / key / "kernels.so"
    if lib.exists():
        return lib
    _check_openmp(tc)

    def make(tmp: Path) -> None:
        src = lib.with_name("kernels.c")
        write_if_changed(src, source)
        _run([tc["cc"], *C_FLAGS, "-shared", str(src), "-o", str(tmp)], "compiling the op kernels", src)
    _build_once(lib, make)
    return lib
