"""The on-disk build cache: where compiled artefacts live and how concurrent builds share it; and
atomic file writes, which the cache, data files and checkpoints all use.

The cache root is ``$GPT2GEN_CACHE`` if set, else ``$XDG_CACHE_HOME/gpt2gen``, else ``~/.cache/gpt2gen``.
Every entry lives in a directory named by a build key (a hash of everything that changes the output);
``file_lock`` serialises builders of the same key so concurrent builds never corrupt an entry.

Temporaries are named ``.<target>.gpt2gen-<owner>-<pid>-<n>.tmp`` (plus an extension for scratch files
a compiler needs, e.g. ``.tmp.c``), so a process killed with ``kill -9`` leaves files that say whose
they were: the next write into the same directory (:func:`atomic_path`) removes those whose process no
longer exists. A process id means something only within one PID namespace of one boot, so ``<owner>``
hashes the hostname, the boot and the PID namespace, and only a temporary of this very owner is judged by
its pid; the names older versions made (``.<target>.<pid>.tmp``), which say less, are judged only in the
directories gpt2gen alone writes and only once they are ten minutes old.
"""
from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import itertools
import os
import re
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator


def _cache_dir() -> Path:
    env = os.environ.get("GPT2GEN_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gpt2gen"


def cache_root() -> Path:
    """The cache directory (created on demand)."""
    root = _cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    return root


def digest(*parts: bytes | str) -> str:
    """A stable hex digest of the given parts (order matters, boundaries are kept)."""
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:20]


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) for the duration."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ---- temporaries ---------------------------------------------------------------------------------------

_TMP_RE = re.compile(r"^\.(?P<target>.+)\.gpt2gen-(?P<owner>[A-Za-z0-9_-]*)-(?P<pid>\d+)-\d+\.tmp"
                     r"(?:\.[A-Za-z0-9_.-]+)?$")
# what earlier versions left: `.<target>.<pid>.tmp`, and `.<target>.<pid>.model.o`/`.init.o` from a build;
# they name no host, so they are removed only where gpt2gen alone writes such names (see remove_stale_temporaries)
_LEGACY_RE = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.(?:tmp|model\.o|init\.o)$")
LEGACY_MIN_AGE_S = 600       # a temporary judged by a weaker rule is left alone until it is this old
_counter = itertools.count()


def _read_text(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    """This process's PID namespace (the inode of /proc/self/ns/pid): process ids are numbered per
    namespace, so containers on one host, host networking or not, each have their own; "" where unknown."""
    try:
        st = os.stat("/proc/self/ns/pid")
    except OSError:
        return ""
    return f"{st.st_dev}:{st.st_ino}"


def _owner() -> str:
    """Whose temporaries this process's pid can judge: a short hash of the full hostname, this boot
    (/proc/sys/kernel/random/boot_id) and this PID namespace. Hostnames alone repeat (pods whose names
    share a prefix, hosts that differ after the first dot, containers sharing the host's name), and a pid
    from another namespace or boot names another process or none, so only this very owner's temporaries
    are judged by their pid."""
    return digest("gpt2gen temporary owner", socket.gethostname(), _read_text("/proc/sys/kernel/random/boot_id"),
                  _pid_namespace())[:16]


def temp_path(path: str | os.PathLike, suffix: str = "") -> Path:
    """A fresh temporary name next to ``path`` that records this process and its owner (:func:`_owner`);
    ``suffix`` (e.g. ``".c"``) is for scratch files whose extension matters to a compiler. Unique within
    the process too, so two threads writing the same file never share a temporary."""
    path = Path(path)
    return path.with_name(f".{path.name}.gpt2gen-{_owner()}-{os.getpid()}-{next(_counter)}.tmp{suffix}")


def _alive(pid: int) -> bool:
    """Whether a process with this id exists here (one we may not signal exists too)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return True          # not a process id: never treat such a file as orphaned
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:          # EPERM: it exists, it is someone else's
        return True
    return True


def _judged_pid(name: str, owner: str, legacy_glob: str | None) -> tuple[int, bool] | None:
    """(pid, weak) for a temporary this process may judge by its pid: ``weak`` when only its age makes
    the verdict safe (names of older versions); None for every other file, which is never touched."""
    m = _TMP_RE.match(name)
    if m is not None:
        return (int(m["pid"]), False) if m["owner"] == owner else None
    m = _LEGACY_RE.match(name) if legacy_glob else None
    if m is None or not fnmatch.fnmatchcase(m["target"], legacy_glob):
        return None
    return int(m["pid"]), True


def remove_stale_temporaries(directory: str | os.PathLike, legacy_glob: str | None = None) -> list[Path]:
    """Remove the temporaries in ``directory`` whose process died (``kill -9``, a crash, a power cut);
    returns what was removed.

    Only names this module makes are considered, and a temporary is judged by its pid only when this
    process's owner made it (:func:`_owner`: the same host, boot and PID namespace) and its process no
    longer exists: a running writer's temporary is never touched, and neither is one another host or
    container is writing on a shared file system. The names of older versions (``.<target>.<pid>.tmp``)
    say nothing of their writer's host, so they are considered only with ``legacy_glob``, where gpt2gen
    alone makes them (the build cache, a checkpoint directory), and removed only when their target
    matches it, their pid is not running here and they are LEGACY_MIN_AGE_S old.
    """
    removed: list[Path] = []
    owner, now = _owner(), time.time()
    try:
        entries = list(os.scandir(directory))
    except OSError:          # missing, not a directory, unreadable: nothing of ours to clean
        return removed
    for entry in entries:
        judged = _judged_pid(entry.name, owner, legacy_glob)
        if judged is None:
            continue
        pid, weak = judged
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            if weak and now - entry.stat(follow_symlinks=False).st_mtime < LEGACY_MIN_AGE_S:
                continue
            if _alive(pid):
                continue
            os.unlink(entry.path)
        except OSError:      # gone already (another process cleaned it), or not ours to remove
            continue
        removed.append(Path(entry.path))
    return removed


def _in_cache(directory: Path) -> bool:
    try:
        return directory.resolve().is_relative_to(_cache_dir().resolve())
    except OSError:
        return False


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed over ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was, so a reader never
    sees half a file and an interrupted write never destroys the previous one. What a killed process
    could not remove is removed by the next write into the directory (:func:`remove_stale_temporaries`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, legacy_glob="*" if _in_cache(path.parent) else None)
    tmp = temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # make the rename itself durable
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, write: Callable[[Any], None]) -> Path:
    """Atomically create ``path`` by calling ``write(filehandle)``."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            write(fh)
    return Path(path)


def write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` (atomically) only if its contents differ; returns True if written."""
    path = Path(path)
    if path.exists() and path.read_text() == text:
        return False
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return True
