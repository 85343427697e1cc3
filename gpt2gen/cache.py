"""The on-disk build cache: where compiled artefacts live and how concurrent builds share it; and
atomic file writes, which the cache, data files and checkpoints all use.

The cache root is ``$GPT2GEN_CACHE`` if set, else ``$XDG_CACHE_HOME/gpt2gen``, else ``~/.cache/gpt2gen``.
Every entry lives in a directory named by a build key (a hash of everything that changes the output);
``file_lock`` serialises builders of the same key so concurrent builds never corrupt an entry.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator


def cache_root() -> Path:
    """The cache directory (created on demand)."""
    env = os.environ.get("GPT2GEN_CACHE")
    if env:
        root = Path(env)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = Path(base) / "gpt2gen"
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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed over ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was, so a reader never
    sees half a file and an interrupted write never destroys the previous one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
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
