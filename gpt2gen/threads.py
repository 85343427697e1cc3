"""How many OpenMP threads the generated code runs on, chosen without rebuilding anything.

The generated C parallelises its loops with OpenMP; the compiled extension links the compiler's OpenMP
runtime (``libgomp.so.1`` for gcc, ``libomp.so`` for clang). The thread count is taken, first found:

1. ``--threads N`` on ``gpt2gen train``, ``sample``, ``eval`` and ``bench`` (:func:`set_threads`);
2. the environment variable ``GPT2GEN_THREADS`` (:data:`THREADS_ENV`);
3. ``OMP_NUM_THREADS``, which the OpenMP runtime itself reads -- but only once, when it is loaded: setting
   it from Python after a model has been built in that process changes nothing;
4. otherwise OpenMP's default, one thread per core this process may run on.

:func:`set_threads` works at any point: it sets ``OMP_NUM_THREADS`` for a runtime that is not loaded yet
(and for child processes), and calls ``omp_set_num_threads`` in every OpenMP runtime already loaded in the
process (found in ``/proc/self/maps``). ``omp_set_num_threads`` applies to parallel regions started by the
calling thread, which is the thread that calls ``Model.forward`` and friends: call it from that thread.
"""
from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

from .checks import Bounded, UsageError

THREADS_ENV = "GPT2GEN_THREADS"
THREADS = Bounded(int, 1)          # the argparse type of every --threads option
_OPENMP_LIB = re.compile(r"lib(gomp|omp|iomp5)[-.\w]*\.so")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def threads_from_env(environ=os.environ) -> int | None:
    """``GPT2GEN_THREADS`` as a thread count, None when unset or empty; a bad value is a UsageError."""
    raw = environ.get(THREADS_ENV, "").strip()
    if not raw:
        return None
    try:
        return THREADS(raw)
    except Exception:
        raise UsageError(f"the environment variable {THREADS_ENV}={raw!r} must be a whole number >= 1",
                         hint=f"set it to a thread count, e.g. {THREADS_ENV}={available_cores()}, or unset it") from None


def loaded_openmp_runtimes() -> list[str]:
    """Paths of the OpenMP runtimes loaded in this process (empty where /proc is not available)."""
    try:
        text = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    found = []
    for line in text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and _OPENMP_LIB.search(Path(parts[5]).name) and parts[5] not in found:
            found.append(parts[5])
    return found


def set_threads(n: int) -> list[str]:
    """Run the generated code's parallel loops on ``n`` threads from now on; returns the OpenMP runtimes
    that were already loaded and told so (the others read ``OMP_NUM_THREADS`` when they load)."""
    why = THREADS.problem(n)
    if why:
        raise UsageError(f"--threads {why}")
    os.environ["OMP_NUM_THREADS"] = str(n)
    told = []
    for path in loaded_openmp_runtimes():
        try:
            fn = ctypes.CDLL(path).omp_set_num_threads
        except (OSError, AttributeError):
            continue
        fn.argtypes = [ctypes.c_int]
        fn.restype = None
        fn(int(n))
        told.append(path)
    return told


def apply_threads(option: int | None) -> int | None:
    """The thread count of a command: ``--threads`` if given, else ``GPT2GEN_THREADS``; applied with
    :func:`set_threads` when either is set. Returns it (None: the OpenMP runtime's own choice)."""
    n = option if option is not None else threads_from_env()
    if n is not None:
        set_threads(n)
    return n


def current_threads() -> int:
    """The thread count a parallel region started now would use (``omp_get_max_threads`` of a loaded
    runtime; before any is loaded, what ``OMP_NUM_THREADS`` or the core count says)."""
    for path in loaded_openmp_runtimes():
        try:
            fn = ctypes.CDLL(path).omp_get_max_threads
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_int
        return int(fn())
    raw = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else available_cores()


def threads_text() -> str:
    """"2 threads" / "1 thread": what the generated code runs on now."""
    n = current_threads()
    return f"{n} thread{'s' if n != 1 else ''}"


def add_threads_argument(p) -> None:
    """The ``--threads N`` option, as every command spells it."""
    p.add_argument("--threads", type=THREADS, default=None, metavar="N",
                   help=f"OpenMP threads for the generated code (default: ${THREADS_ENV}, else "
                        f"$OMP_NUM_THREADS, else one per core)")
