"""The on-disk build cache: where compiled artefacts live and how concurrent builds share it.

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
from typing import Iterator


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


def write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` only if its contents differ; returns True if written.

    The write is atomic (temporary file + rename), so a reader never sees half a file.
    """
    path = Path(path)
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return True
