"""The on-disk build cache: where compiled artefacts live and how concurrent builds share it; and
atomic file writes, which the cache, data files and checkpoints all use.

The cache root is ``$GPT2GEN_CACHE`` if set, else ``$XDG_CACHE_HOME/gpt2gen``, else ``~/.cache/gpt2gen``.
Every entry lives in a directory named by a build key (a hash of everything that changes the output);
``file_lock`` serialises builders of the same key so concurrent builds never corrupt an entry.

Temporaries are named ``.<target>.gpt2gen-<host>-<pid>-<n>.tmp`` (plus an extension for scratch files
a compiler needs, e.g. ``.tmp.c``), so a process killed with ``kill -9`` leaves files that say whose
they were: the next write into the same directory (:func:`atomic_path`) removes those of processes
on this host that no longer exist, and never one whose process is still running.
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

_TMP_RE = re.compile(r"^\.(?P<target>.+)\.gpt2gen-(?P<host>[A-Za-z0-9_-]*)-(?P<pid>\d+)-\d+\.tmp"
                     r"(?:\.[A-Za-z0-9_.-]+)?$")
# what earlier versions left: `.<target>.<pid>.tmp`, and `.<target>.<pid>.model.o`/`.init.o` from a build;
# they name no host, so they are removed only where gpt2gen alone writes such names (see remove_stale_temporaries)
_LEGACY_RE = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.(?:tmp|model\.o|init\.o)$")
_counter = itertools.count()


def _host() -> str:
    """This host's short name as it can appear in a file name (temporaries of other hosts on a shared
    file system are never judged by this host's process table)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0])[:24]


def temp_path(path: str | os.PathLike, suffix: str = "") -> Path:
    """A fresh temporary name next to ``path`` that records this host and process; ``suffix`` (e.g.
    ``".c"``) is for scratch files whose extension matters to a compiler. Unique within the process
    too, so two threads writing the same file never share a temporary."""
    path = Path(path)
    return path.with_name(f".{path.name}.gpt2gen-{_host()}-{os.getpid()}-{next(_counter)}.tmp{suffix}")


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


def remove_stale_temporaries(directory: str | os.PathLike, legacy_glob: str | None = None) -> list[Path]:
    """Remove the temporaries in ``directory`` whose process died (``kill -9``, a crash, a power cut);
    returns what was removed.

    Only names this module makes are considered, only those made on this host, and only when their
    process no longer exists: a running writer's temporary is never touched, and neither is one
    another host is writing on a shared file system. ``legacy_glob`` also removes the host-less names
    of older versions (``.<target>.<pid>.tmp``) whose target matches it; they are ambiguous enough to
    be removed only where gpt2gen alone makes them (the build cache, a checkpoint directory).
    """
    removed: list[Path] = []
    host = _host()
    try:
        entries = list(os.scandir(directory))
    except OSError:          # missing, not a directory, unreadable: nothing of ours to clean
        return removed
    for entry in entries:
        m = _TMP_RE.match(entry.name)
        if m is not None:
            if m["host"] != host:
                continue
        else:
            m = _LEGACY_RE.match(entry.name) if legacy_glob else None
            if m is None or not fnmatch.fnmatchcase(m["target"], legacy_glob):
                continue
        try:
            if not entry.is_file(follow_symlinks=False) or _alive(int(m["pid"])):
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
