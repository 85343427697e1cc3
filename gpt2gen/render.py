"""Rendering: a lowered program turned into a target's source files, and those written to disk.

The work is the target's (``gpt2gen.targets``: its kernel table, its templates under
``templates/<folder>/``); this module is the one entry point that picks the target by name.
"""
from __future__ import annotations

from pathlib import Path

from . import targets
from .cache import write_if_changed
from .program import Program


def render_program(program: Program, target: str = "cpu", label: str | None = None) -> dict[str, str]:
    """Render ``program`` for ``target``; returns {file name: source text}."""
    return targets.get(target).render(program, label)


def write_sources(files: dict[str, str], out_dir: Path) -> list[Path]:
    """Write rendered files into ``out_dir`` (only those whose contents changed); returns those written."""
    written = []
    for name, text in files.items():
        if write_if_changed(Path(out_dir) / name, text):
            written.append(Path(out_dir) / name)
    return written
