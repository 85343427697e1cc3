"""Where the package finds its templates, model files and C sources, in a checkout or installed.

In a source checkout they sit at the repository root (``templates/``, ``models/``, ``model.yaml``); an
installed package carries copies under ``gpt2gen/_data/`` (see setup.py).
"""
from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
_CHECKOUT = PACKAGE.parent
_INSTALLED = PACKAGE / "_data"


def data_root() -> Path:
    if (_CHECKOUT / "templates").is_dir() and (_CHECKOUT / "pyproject.toml").is_file():
        return _CHECKOUT
    return _INSTALLED


def templates_dir() -> Path:
    return data_root() / "templates"


def csrc_dir() -> Path:
    return PACKAGE / "csrc"


def find_model(model: str | Path) -> Path:
    """A model file by path; a bare name like ``model.yaml`` or ``models/llama2.yaml`` falls back to the
    copy shipped with the package when it is not found relative to the working directory."""
    p = Path(model)
    if p.exists():
        return p
    if not p.is_absolute():
        shipped = data_root() / p
        if shipped.exists():
            return shipped
        shipped = data_root() / "models" / p.name
        if shipped.exists():
            return shipped
    return p


def model_label(path: Path) -> str:
    """How generated files name their model file: relative to the project root when inside it.

    The label goes into C comments, so anything but plain path characters becomes `?` (a file name
    with a newline must not be able to end a comment and start code)."""
    path = Path(path).resolve()
    label = path.name
    for root in (data_root().resolve(), Path.cwd().resolve()):
        try:
            label = str(path.relative_to(root))
            break
        except ValueError:
            continue
    return re.sub(r"[^A-Za-z0-9_.+\-/]", "?", label)
