"""Building: generate a model's sources, compile them into a Python extension, and cache the result.

The extension is two objects linked together: ``binding.o`` (pybind11, the same for every model;
compiled once per compiler, Python and pybind11 version) and ``model.o`` (the generated C). Editing a
model file therefore recompiles only the generated C and relinks. Each build lives in the cache under
a key that hashes everything that changes its output: the rendered sources (so the model file, the
config overrides, the templates and the generator), the compiler and its version, the flags and the
CPU that ``-march=native`` targets. An unchanged rebuild compiles nothing. Builders of the same key
take a file lock and re-check the cache after taking it, and every artefact is renamed into place
only when complete, so concurrent builds never see or leave half a file.

``CC`` and ``CXX`` are commands, split like a shell would (``CC="ccache gcc"``, ``CC="gcc -m64"``);
``GPT2GEN_CFLAGS`` adds flags to the generated code's compile (``-march=x86-64-v3`` tests the AVX2
paths on an AVX-512 machine) and is part of the key. A model that can never run on this machine (its
parameters and activations beyond the machine's total memory) is refused before anything is compiled or
allocated; training checks all its arenas against the memory available when it starts (see "memory"
below; ``GPT2GEN_MAX_MEMORY`` overrides the figures the system gives).

Finding a build without a compiler: the key needs the compiler's version, which only the compiler
can tell. So every build also records, under ``index/``, a *recall key* -- the same inputs without
the versions (the compiler commands as named, the sources, flags, CPU, Python, pybind11 and binding
sources) -- pointing at the build directory it made or used. When the compiler is present the full
key is used as always (a compiler upgrade rebuilds); only when it cannot be found does the recall key
look up what this machine last built with that same ``CC``/``CXX``, and the missing compiler is an
error only when nothing was built.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import lower as _lower
from . import render as _render
from . import spec as _spec
from . import targets as _targets
from .program import Program
from .targets import CompileJob
from .cache import atomic_path, cache_root, digest, file_lock, temp_path, write_if_changed
from .resources import csrc_dir, find_model

C_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-std=c11", "-fno-math-errno"]  # errno is never read
CXX_FLAGS = ["-O3", "-fPIC", "-std=c++17", "-fvisibility=hidden"]
LINK_FLAGS = ["-shared", "-fopenmp", "-Wl,-Bsymbolic"]
MODULE = "_gpt2gen_model"
CFLAGS_ENV = "GPT2GEN_CFLAGS"
MAX_MEMORY_ENV = "GPT2GEN_MAX_MEMORY"


class BuildError(RuntimeError):
    """A build that could not finish: what failed, where, and what to do about it."""


class MemoryLimitError(BuildError):
    """A model whose arenas do not fit in the memory available: refused before compiling or allocating."""


@dataclass
class Built:
    """A compiled model: its program, its sources and the extension file."""
    program: Program
    target: str
    key: str
    directory: Path
    extension: Path
    sources: dict[str, str]
    compiled: bool            # False when the cache already had it
    options: dict = field(default_factory=dict)   # the target's build options (cuda: emulate, archs)


# ---- commands and the toolchain ------------------------------------------------------------------------

def _command(env_var: str, default: str) -> list[str]:
    """``$env_var`` (or ``default``) as an argument list: a compiler may come with a wrapper or flags."""
    raw = os.environ.get(env_var, "").strip() or default
    try:
        argv = shlex.split(raw)
    except ValueError as e:
        raise BuildError(f"{env_var}={raw!r} cannot be split into words ({e}).\n"
                         f"hint: {env_var} is split like a shell command line: close the quote, or quote a path "
                         f"with spaces, e.g. {env_var}='\"/opt/my cc/gcc\" -m64'") from None
    return argv or [default]


def _subprocess(cmd: list[str], what: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:       # not executable, a directory, a script without an interpreter line ...
        raise BuildError(f"{what}: cannot run `{cmd[0]}`: {e.strerror or e}.\n"
                         f"hint: check that CC / CXX name an executable compiler") from None


def _run(cmd: list[str], what: str, source: Path | None = None, hint: str | None = None) -> subprocess.CompletedProcess:
    """Run a compiler; a failure is a BuildError with its diagnostics. Returns the process (its output)."""
    proc = _subprocess(cmd, what)
    if proc.returncode != 0:
        where = f" ({source})" if source else ""
        hint = hint or ("the generated file names the template each section comes from; fix that template or "
                        "the model file, then build again")
        raise BuildError(f"{what} failed{where}:\n$ {shlex.join(cmd)}\n{proc.stderr.strip()}\nhint: {hint}")
    return proc


def _compiler(env_var: str, default: str, kind: str) -> list[str]:
    argv = _command(env_var, default)
    if shutil.which(argv[0]) is None:
        named = f"`{argv[0]}`" + (f" (from {env_var}={shlex.join(argv)!r})" if len(argv) > 1 else "")
        raise BuildError(f"{kind} compiler {named} not found on PATH.\n"
                         f"hint: install one (Debian/Ubuntu: `apt-get install build-essential`) or set {env_var} "
                         f"to the compiler to use")
    return argv


@functools.lru_cache(maxsize=None)
def _version(cc: str) -> str:
    out = _subprocess([*shlex.split(cc), "--version"], "asking the compiler for its version")
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


def extra_cflags() -> list[str]:
    """``$GPT2GEN_CFLAGS``: flags added after the defaults to every compile of generated C (part of the key)."""
    return _command(CFLAGS_ENV, "") if os.environ.get(CFLAGS_ENV, "").strip() else []


def c_flags() -> list[str]:
    return C_FLAGS + extra_cflags()


def _compile_hint() -> str | None:
    extra = extra_cflags()
    if not extra:
        return None
    return (f"{CFLAGS_ENV} adds `{shlex.join(extra)}` to this compile: check those flags (unset {CFLAGS_ENV} to "
            f"build with the defaults); otherwise the generated file names the template each section comes from")


def toolchain() -> dict[str, str]:
    """The compilers this machine would use, with versions (part of every build key)."""
    cc = shlex.join(_compiler("CC", "gcc", "C"))
    cxx = shlex.join(_compiler("CXX", "g++", "C++"))
    return {"cc": cc, "cxx": cxx, "cc_version": _version(cc), "cxx_version": _version(cxx), "cpu": _cpu()}


def _pybind11():
    try:
        import pybind11
    except ImportError:
        raise BuildError("pybind11 is not installed.\nhint: `pip install pybind11`") from None
    return pybind11


def _recall_key(kind: str, *parts: str) -> str:
    """What keys a build except the compilers' versions (which need the compilers): see the module doc."""
    cxx = shlex.join(_command("CXX", "g++"))
    return digest(kind, shlex.join(_command("CC", "gcc")), _cpu(), binding_key({"cxx": cxx, "cxx_version": ""}),
                  *parts)


def _remember(recall: str, product: Path) -> None:
    """Record ``product`` for ``recall``; best effort: a read-only cache still serves what it holds."""
    root = cache_root()
    with contextlib.suppress(OSError):
        write_if_changed(root / "index" / recall, str(product.relative_to(root)) + "\n")


def _recall(recall: str) -> Path | None:
    """The product this machine built for ``recall``, if it is still in the cache."""
    root = cache_root()
    try:
        rel = (root / "index" / recall).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    product = root / rel
    if not rel or ".." in Path(rel).parts or Path(rel).is_absolute() or not product.is_file():
        return None
    return product


def _toolchain_or_cached(recall: str) -> tuple[dict[str, str] | None, Path | None]:
    """The toolchain, or -- only when a compiler is missing -- the product already built for ``recall``."""
    try:
        return toolchain(), None
    except BuildError:
        product = _recall(recall)
        if product is None:
            raise
        return None, product


def _build_once(product: Path, make: Callable[[Path], None]) -> bool:
    """Build ``product`` unless the cache has it; returns whether this call built it.

    ``make(tmp)`` writes the product to a temporary name, which is renamed into place when complete;
    builders of the same product take a file lock and re-check, so concurrent builds compile it once
    and nobody sees half a file. A failed build leaves no temporary behind, and one killed outright
    leaves temporaries the next build in the directory removes.
    """
    if product.exists():
        return False
    with file_lock(product.parent / ".lock"):
        if product.exists():
            return False
        with atomic_path(product) as tmp:
            make(tmp)
    return True


def _check_openmp(tc: dict[str, str]) -> None:
    """Compile an OpenMP probe once per compiler; through ``_build_once`` so that processes starting at once
    on an empty cache neither share the probe's files nor see a half-written marker."""
    marker = cache_root() / "toolchain" / f"openmp-{digest(tc['cc'], tc['cc_version'])}.ok"

    def make(tmp: Path) -> None:
        src, exe = temp_path(marker, ".c"), temp_path(marker, ".bin")
        try:
            src.write_text("#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
            proc = _subprocess([*shlex.split(tc["cc"]), "-fopenmp", str(src), "-o", str(exe)],
                               "checking OpenMP support")
            if proc.returncode != 0:
                raise BuildError(f"the C compiler `{tc['cc']}` cannot build OpenMP code:\n{proc.stderr.strip()}\n"
                                 f"hint: install OpenMP support (Debian/Ubuntu: `apt-get install build-essential "
                                 f"libgomp1`; for clang also `libomp-dev`), or set CC to a compiler that has it")
            tmp.write_text("ok\n")
        finally:
            src.unlink(missing_ok=True)
            exe.unlink(missing_ok=True)
    _build_once(marker, make)


def _python_includes() -> list[str]:
    inc = sysconfig.get_paths()["include"]
    if not (Path(inc) / "Python.h").exists():
        raise BuildError(f"Python headers not found (no Python.h in {inc}).\n"
                         f"hint: install them (Debian/Ubuntu: `apt-get install python3-dev`)")
    return [inc, _pybind11().get_include()]


def binding_key(tc: dict[str, str]) -> str:
    """What the compiled binding depends on: its sources, the C++ compiler and its version, Python, pybind11
    and the flags (the recall key uses it with the version left out)."""
    return digest((csrc_dir() / "binding.cpp").read_text(), (csrc_dir() / "gpt2gen_abi.h").read_text(), tc["cxx"],
                  tc["cxx_version"], sys.version, _pybind11().__version__, " ".join(CXX_FLAGS))


def binding_object(tc: dict[str, str]) -> Path:
    """The compiled binding, shared by every model (built once per toolchain and Python)."""
    src = csrc_dir() / "binding.cpp"
    obj = cache_root() / "binding" / binding_key(tc) / "binding.o"

    def make(tmp: Path) -> None:
        includes = [f"-I{i}" for i in _python_includes()]
        _run([*shlex.split(tc["cxx"]), *CXX_FLAGS, *includes, f"-I{csrc_dir()}", "-c", str(src), "-o", str(tmp)],
             "compiling the Python binding", src)
    _build_once(obj, make)
    return obj


# ---- memory ---------------------------------------------------------------------------------------------
#
# One policy, two uses. numpy's zeros are lazy: an arena costs memory only where it is written. Building a
# model writes none of them, running it (forward, generate) writes params and acts, and only training writes
# grads, m, v and dacts too. So
#   * building and creating a model (check_memory) refuse only what can never run here: params + acts beyond
#     the machine's total memory (MemTotal, or the cgroup limit), a steady figure, so the verdict does not
#     flip with what else happens to run;
#   * training, where it starts (check_available_memory, through runtime.check_training_memory), refuses all
#     six arenas beyond the memory available now (MemAvailable, or the cgroup's headroom), counting what the
#     arenas already hold as theirs.
# GPT2GEN_MAX_MEMORY, when set, replaces both figures: the most memory the model may use.

RUN_ARENAS = ("params", "acts")            # what forward and generate write; training writes all the arenas
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGTP]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if m is None:
        raise BuildError(f"{MAX_MEMORY_ENV}={text!r} is not a size.\n"
                         f"hint: give bytes, or a number with K, M, G or T (powers of 1024), e.g. "
                         f"{MAX_MEMORY_ENV}=16G; unset it to use the memory the system reports")
    return int(float(m[1]) * _UNITS[m[2].upper()])


def _override() -> tuple[int, str] | None:
    """``$GPT2GEN_MAX_MEMORY`` as (bytes, source), when set: it replaces every figure the system gives."""
    env = os.environ.get(MAX_MEMORY_ENV, "").strip()
    return (_parse_size(env), f"{MAX_MEMORY_ENV}={env}") if env else None


def _meminfo(field: str) -> int | None:
    """A field of /proc/meminfo (``MemTotal``, ``MemAvailable``) in bytes, if the system has it."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _sysconf_pages(name: str) -> int | None:
    try:
        return os.sysconf(name) * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):   # not known on this system
        return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_in_use(d: Path, v2: bool) -> int | None:
    """What a cgroup uses, less the file cache the kernel reclaims before it refuses memory (the working set,
    as container runtimes count it)."""
    usage = _read_int(d / ("memory.current" if v2 else "memory.usage_in_bytes"))
    if usage is None:
        return None
    inactive = 0
    try:
        stats = dict(line.split()[:2] for line in (d / "memory.stat").read_text().splitlines() if " " in line)
        inactive = int(stats.get("inactive_file" if v2 else "total_inactive_file", 0))
    except (OSError, ValueError):
        pass
    return max(usage - inactive, 0)


def _cgroup_limits() -> list[tuple[int, int | None]]:
    """(limit, in use) for this process's cgroup and each ancestor that sets a memory limit (v2 or v1)."""
    found: list[tuple[int, int | None]] = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        _, controllers, rel = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            base, name, v2 = Path("/sys/fs/cgroup"), "memory.max", True                       # v2
        elif "memory" in controllers.split(","):
            base, name, v2 = Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes", False    # v1
        else:
            continue
        d = base / rel.lstrip("/")
        while True:
            limit = _read_int(d / name)
            if limit is not None and limit < 2**60:                     # v1 writes ~2**63 for none, v2 "max"
                found.append((limit, _cgroup_in_use(d, v2)))
            if d == base or base not in d.parents:
                break
            d = d.parent
    return found


def _system_figure(meminfo_key: str, sysconf_name: str, fallback_source: str) -> tuple[int | None, str]:
    """A /proc/meminfo figure, or its sysconf fallback, with where it came from (None: neither)."""
    value = _meminfo(meminfo_key)
    if value is not None:
        return value, f"{meminfo_key} in /proc/meminfo"
    return _sysconf_pages(sysconf_name), fallback_source


def machine_memory() -> tuple[int | None, str]:
    """The most memory this process can ever have, and where that figure comes from (None: unknown)."""
    override = _override()
    if override is not None:
        return override
    total, source = _system_figure("MemTotal", "SC_PHYS_PAGES", "physical memory (sysconf)")
    found = [(total, source)] if total is not None else []
    found += [(limit, "this process's cgroup memory limit") for limit, _ in _cgroup_limits()]
    return min(found) if found else (None, "unknown")


def available_memory() -> tuple[int | None, str]:
    """The memory this process can have now, and where that figure comes from (None: unknown)."""
    override = _override()
    if override is not None:
        return override
    avail, source = _system_figure("MemAvailable", "SC_AVPHYS_PAGES", "free physical pages (sysconf)")
    found: list[tuple[int, str]] = [(avail, source)] if avail is not None else []
    for limit, used in _cgroup_limits():
        if used is None:
            found.append((limit, "this process's cgroup memory limit"))
        else:
            found.append((max(limit - used, 0), "this process's cgroup memory limit less what the cgroup uses"))
    return min(found) if found else (None, "unknown")


def _human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if n < 1024 or unit == "EiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else (f"{n:.1f} {unit}" if n < 1e6 else f"{n:.3g} {unit}")
        n /= 1024
    raise AssertionError("unreachable")


def arena_bytes(program: Program) -> dict[str, int]:
    """Bytes of each arena the runtime allocates to run and train the model (params, grads, master, m and v share
    one layout in elements); the decode program's KV cache comes at the first decode, and only then."""
    return {k: n for k, n in program.layout.arena_bytes().items() if k != "cache"}


def memory_error(program: Program, reason: str, arenas: tuple[str, ...] | None = None,
                 now: bool = False) -> MemoryLimitError:
    """The error for a model too large: the size of each arena ``arenas`` counts, their total, why (``reason``),
    what training adds when only the running arenas were counted, and a hint (``now``: the figure was the
    memory available at the moment, so freeing memory helps too)."""
    sizes = arena_bytes(program)
    arenas = tuple(sizes) if arenas is None else arenas
    total = sum(sizes[n] for n in arenas)
    rows = "\n".join(f"  {n:<7} {_human(sizes[n]):>14}" for n in arenas)
    rest = [n for n in sizes if n not in arenas]
    what = "its arenas" if not rest else f"its {' and '.join(arenas)} arenas (what running it writes)"
    also = (f"\n  training also needs {', '.join(f'{n} {_human(sizes[n])}' for n in rest)} "
            f"({_human(sum(sizes.values()))} in all)") if rest else ""
    cfg = ", ".join(f"{k}={v}" for k, v in program.config.items())
    free = "; or stop what else uses memory on this machine" if now else ""
    return MemoryLimitError(
        f"{program.spec.path}: the model needs {_human(total)} ({total:,} bytes) for {what}, {reason}:\n"
        f"{rows}\n  {'total':<7} {_human(total):>14}{also}\n  config: {cfg}\n"
        f"hint: make the model smaller -- fewer layers or channels (L, C), a smaller vocabulary or context -- or "
        f"lower the batch maxima (B, T), which size the activations; e.g. --set / build(..., L=4, C=256), or -b/-t "
        f"to the trainer{free}. If the figure for this machine is wrong, set {MAX_MEMORY_ENV} "
        f"(e.g. {MAX_MEMORY_ENV}=64G)")


def describe_available() -> str:
    available, source = available_memory()
    return f"{_human(available)} available ({source})" if available is not None else "memory available unknown"


_FITS: set[tuple] = set()    # (arena sizes, GPT2GEN_MAX_MEMORY) already found to fit this machine


def check_memory(program: Program) -> None:
    """Refuse, before compiling or allocating, a model that can never run on this machine: its params and acts
    beyond the machine's total memory (what training adds is checked where training starts).

    Once per model: from_hf checks before it builds, and the build it then runs finds the verdict here."""
    sizes = arena_bytes(program)
    key = (tuple(sizes.items()), os.environ.get(MAX_MEMORY_ENV, "").strip())
    if key in _FITS:
        return
    total, source = machine_memory()
    if total is not None and sum(sizes[n] for n in RUN_ARENAS) > total:
        raise memory_error(program, f"more than this machine's {_human(total)} ({source})", RUN_ARENAS)
    _FITS.add(key)


def check_available_memory(program: Program, held: int = 0) -> None:
    """Refuse a training run whose six arenas do not fit in the memory available now.

    ``held``: bytes the arenas already occupy (params written by the initialisation or a load, acts by a
    forward); MemAvailable no longer counts them, so only the rest must fit in it. Under GPT2GEN_MAX_MEMORY,
    the most memory the model may use, everything counts."""
    available, source = available_memory()
    if available is None:
        return
    total = sum(arena_bytes(program).values())
    held = 0 if _override() is not None else min(max(held, 0), total)
    if total - held <= available:
        return
    if held:
        reason = (f"and the {_human(total - held)} of it not yet in memory is more than the {_human(available)} "
                  f"available now ({source})")
    else:
        reason = f"more than the {_human(available)} available now ({source})"
    raise memory_error(program, reason, now=True)


# ---- models ---------------------------------------------------------------------------------------------

def generate(model: str | Path = "model.yaml", target: str = "cpu", label: str | None = None,
             precision: str = "fp32", fuse: str | None = "all", loss_scaling: bool | None = None,
             **overrides) -> tuple[Program, dict[str, str]]:
    """Load, lower and render a model; returns the program and {file name: source}. ``precision``: fp32 or
    bf16 (the target says which it has); ``fuse``: ``all``, ``none`` or fusion names ``a,b`` (gpt2gen/fusion.py)."""
    path = find_model(model)
    spec = _spec.load(path)
    config = spec.resolve(overrides)
    _target(target)
    try:
        program = _lower.lower(spec, config, target, precision, fuse, loss_scaling)
    except _targets.OptionError as e:          # a precision or fusion the target lacks (the lowering checks)
        raise BuildError(str(e)) from None
    return program, _render.render_program(program, target, label)


def compile_model(model: str | Path = "model.yaml", target: str = "cpu", out: str | Path | None = None,
                  verbose: bool = False, precision: str = "fp32", fuse: str | None = "all",
                  loss_scaling: bool | None = None, emulate: bool = False, archs: str | list[str] | None = None,
                  **overrides) -> Built:
    """Generate and compile a model (or find it in the cache). ``out`` also receives a copy of the sources.
    ``emulate`` and ``archs`` are the CUDA target's: run its kernels on the CPU (gpt2gen.cuda_emu), or compile
    with nvcc for these GPU architectures (``sm_80,sm_90`` by default)."""
    tgt = _target(target)
    try:
        options = tgt.build_options(emulate=emulate, archs=archs)
    except _targets.OptionError as e:
        raise BuildError(str(e)) from None
    program, sources = generate(model, target, precision=precision, fuse=fuse, loss_scaling=loss_scaling, **overrides)
    check_memory(program)
    if out is not None:
        _render.write_sources(sources, Path(out))
    ext_suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    source_parts = [f"{k}\n{v}" for k, v in sorted(sources.items())]
    cflags = c_flags()
    flags = " ".join(cflags + LINK_FLAGS)
    try:
        target_key = tgt.build_key(options)
    except _targets.OptionError as e:
        raise BuildError(str(e)) from None
    recall = _recall_key("model", target, *source_parts, flags, ext_suffix, target_key)
    tc, cached = _toolchain_or_cached(recall)
    if cached is not None:
        return Built(program, target, cached.parent.name.rsplit("-", 1)[-1], cached.parent, cached, sources, False,
                     options)
    key = digest(*source_parts, *[f"{k}={v}" for k, v in sorted(tc.items())], flags, ext_suffix, binding_key(tc),
                 target_key)
    directory = cache_root() / "models" / f"{program.spec.name}-{target}-{key}"
    module = f"gg_{key}"
    ext = directory / (module + ext_suffix)
    if ext.exists():
        _remember(recall, ext)
        return Built(program, target, key, directory, ext, sources, False, options)
    _check_openmp(tc)
    binding = binding_object(tc)

    def make(tmp: Path) -> None:
        for name, text in sources.items():
            write_if_changed(directory / name, text)
        try:
            tgt.compile(CompileJob(directory, sources, tmp, module, tc, cflags, LINK_FLAGS, binding, MODULE, _run,
                                   _compile_hint(), verbose, options))
        except _targets.OptionError as e:       # a missing nvcc or cuBLASLt: what to install, or which flag to use
            raise BuildError(str(e)) from None
    compiled = _build_once(ext, make)
    _remember(recall, ext)
    return Built(program, target, key, directory, ext, sources, compiled, options)


def _target(name: str) -> _targets.Target:
    try:
        return _targets.get(name)
    except ValueError as e:
        raise BuildError(f"{e}; `gpt2gen build --target cpu` builds for this machine's CPU") from None


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


def kernels_library(op_names: list[str], target: str = "cpu", precision: str = "fp32") -> Path:
    """Compile the kernels of ``op_names`` (plus helpers and the optimizer) into a shared library with
    exported symbols, cached by content; the op tests call them through ctypes. ``precision``: how their
    float tensors are stored (the source, and so the cache key, differs by precision)."""
    source = _target(target).kernels_source(op_names, precision)
    flags = c_flags()
    recall = _recall_key("kernels", source, " ".join(flags))
    tc, cached = _toolchain_or_cached(recall)
    if cached is not None:
        return cached
    key = digest(source, tc["cc"], tc["cc_version"], tc["cpu"], " ".join(flags))
    lib = cache_root() / "kernels" / key / "kernels.so"
    if not lib.exists():
        _check_openmp(tc)

        def make(tmp: Path) -> None:
            src = lib.with_name("kernels.c")
            write_if_changed(src, source)
            _run([*shlex.split(tc["cc"]), *flags, "-shared", str(src), "-o", str(tmp)], "compiling the op kernels",
                 src, _compile_hint())
        _build_once(lib, make)
    _remember(recall, lib)
    return lib
