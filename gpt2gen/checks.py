"""Checks on user-supplied paths and values, shared by the library and the command line.

The library (the trainer, the data preparation, the plotter) and the command line refuse the same bad
input with the same words: :class:`UsageError` for a value or file that cannot work, :class:`Bounded` for
a number's range, :func:`check_outputs` for the paths a command will write, and :func:`describe_error`
for how any user error is told. None of it knows about argparse subcommands or exit statuses, which
are :mod:`gpt2gen.cli`'s.
"""
from __future__ import annotations

import argparse
import errno
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


class UsageError(ValueError):
    """A user-supplied value or file that cannot work (an output path that is a directory, a NaN learning
    rate, ``--set B=`` for the trainer, a text file that is not UTF-8); the message names the option or
    file and the value, the hint the fix."""

    def __init__(self, message: str, hint: str | None = None):
        self.message, self.hint = message, hint
        super().__init__(message + (f"\n  hint: {hint}" if hint else ""))


# --------------------------------------------------------------------------------------------
# how a user error is told

OS_HINTS = {
    errno.ENOSPC: "free some disk space (a training state of GPT-2 124M is about 1.5 GB; "
                  "--keep-checkpoints limits how many are kept)",
    errno.EACCES: "choose a location you may write to, or fix its permissions",
    errno.EPERM: "choose a location you may write to, or fix its permissions",
    errno.EROFS: "the file system is read-only: choose another location",
    errno.EISDIR: "give a file path, not a directory",
    errno.ENOTDIR: "a component of the path is a file, not a directory",
}
TEXT_HINT = "the file must be UTF-8 text"


def _decode_problem(err: UnicodeDecodeError) -> str:
    bad = err.object[err.start:err.start + 1] if isinstance(err.object, (bytes, bytearray)) else b""
    byte = f"byte 0x{bad[0]:02x} at " if bad else ""
    return f"not UTF-8 text: {byte}byte offset {err.start} ({err.reason})"


def error_parts(err: BaseException, where: str | os.PathLike | None = None) -> tuple[str, str | None]:
    """(text, hint) of a user error: the text of gpt2gen's own errors, the file and reason of an
    operating-system error, and a hint where the fix is not obvious. ``where`` names the file when the
    exception cannot (a UnicodeDecodeError knows only its byte offset): callers that know it pass it."""
    if isinstance(err, UsageError):
        return err.message, err.hint
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.filename}: {err.strerror}" if err.filename is not None else str(err)
        if err.filename2 is not None:
            text += f" (and {err.filename2})"
        return text, OS_HINTS.get(err.errno or 0)
    if isinstance(err, UnicodeDecodeError):
        return (f"{where}: " if where is not None else "") + _decode_problem(err), TEXT_HINT
    if isinstance(err, MemoryError):
        return (f"out of memory: {str(err) or 'an allocation failed'}",
                "the model or batch is too large for this machine: use smaller sizes "
                "(--set C=..., --set L=..., -b, -t)")
    return str(err) or type(err).__name__, None


def describe_error(err: BaseException, where: str | os.PathLike | None = None) -> str:
    """The message a user error is reported with: :func:`error_parts`, the hint on its own line."""
    text, hint = error_parts(err, where)
    return text + (f"\n  hint: {hint}" if hint else "")


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file's contents; one that is not UTF-8 is a UsageError naming the file and the byte
    (a bare UnicodeDecodeError names neither the file nor what to do)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(*error_parts(e, path)) from None


# --------------------------------------------------------------------------------------------
# numbers

@dataclass(frozen=True)
class Bounded:
    """An argparse ``type`` for a finite number in a range; :meth:`problem` checks a value that came from
    elsewhere (a resumed run's state, a Namespace made by hand) against the same range, so both paths
    share one rule."""
    kind: type = float
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def expected(self) -> str:
        what = "a whole number" if self.kind is int else "a finite number"
        if self.lo is not None and self.hi is not None:
            return f"{what} in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{what} {'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{what} {'<' if self.hi_open else '<='} {self.hi:g}"
        return what

    def problem(self, value) -> str | None:
        """Why ``value`` is not acceptable, or None."""
        ok_type = isinstance(value, int) if self.kind is int else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or not math.isfinite(value):
            return f"must be {self.expected()}, got {value!r}"
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return f"must be {self.expected()}, got {value!r}"
        if self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)):
            return f"must be {self.expected()}, got {value!r}"
        return None

    def __call__(self, text: str) -> int | float:
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.expected()}, got {text!r}") from None
        why = self.problem(value)
        if why:
            raise argparse.ArgumentTypeError(why)
        return value


def check_bounds(values: object, bounds: dict[str, Bounded], note=lambda name: "") -> None:
    """Hold the attributes of ``values`` named in ``bounds`` to their ranges (a Namespace made by hand,
    or filled in from a state file, is not trusted more than a command line). ``note(name)`` adds where
    a value came from."""
    for name, bound in bounds.items():
        why = bound.problem(getattr(values, name))
        if why:
            raise UsageError(f"--{name.replace('_', '-')} {why}{note(name)}")


# --------------------------------------------------------------------------------------------
# output paths, checked before the work that would write them

@dataclass(frozen=True)
class Output:
    """A path a command will write: ``kind`` "file" (replaced atomically), "append" (appended to) or
    "dir" (files are written inside). ``what`` says what goes there; an existing non-empty file is
    replaced or appended to only if it starts with ``signature`` (it is of the kind written there);
    ``example`` is a file name the hint suggests inside a directory given by mistake. ``hint`` replaces
    the usual fix where the user did not choose the path with ``option`` (the trainer preparing tiny
    Shakespeare in its default place): it says what that user can change instead."""
    option: str
    path: Path
    kind: str
    what: str
    signature: bytes | None = None
    example: str | None = None
    hint: str | None = None


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p.parent != p:
        p = p.parent
    return p


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _output_problem(out: Output) -> tuple[str, str] | None:
    """(what is wrong, the usual fix) for one output, or None when it can be written."""
    p = Path(out.path)
    where = f"{out.option} {p}"
    if out.kind == "dir":
        if p.exists() and not p.is_dir():
            return (f"{where}: is an existing file, not a directory ({out.what} go there)",
                    "give a directory path; it is created if missing")
    else:
        if p.is_dir():
            return (f"{where}: is an existing directory, not a file ({out.what} is written there)",
                    "give a file path" + (f", e.g. {p / out.example}" if out.example else ""))
        if p.exists() and not p.is_file():
            return f"{where}: exists and is not a regular file", "give a file path"
        if p.is_file() and out.signature is not None:
            with open(p, "rb") as fh:
                head = fh.read(len(out.signature))
            if head and head != out.signature:
                verb = "appended to" if out.kind == "append" else "replaced"
                return (f"{where}: exists and is not {out.what}; it would be {verb}",
                        "remove it yourself if it may go, or choose another path")
        if out.kind == "append" and p.is_file():
            if not os.access(p, os.W_OK):
                return f"{where}: the file is not writable", OS_HINTS[errno.EACCES]
            return None
    base = _nearest_existing(p if out.kind == "dir" else p.parent)
    if not base.is_dir():
        return (f"{where}: {base} is a file, so no directory can be created under it",
                "choose a path whose parent directories are directories")
    if not os.access(base, os.W_OK | os.X_OK):
        return (f"{where}: cannot write in {base} (permission denied or a read-only file system)",
                OS_HINTS[errno.EACCES])
    return None


def check_outputs(outputs: Sequence[Output], inputs: Sequence[tuple[str, str | os.PathLike | None]] = ()) -> None:
    """Check, before any work, that every output can be written: not a directory where a file goes (or
    the reverse), a parent that exists or can be created, write permission, an existing file of the kind
    written there; and that no two outputs, and no output and an input, are the same file. Raises
    UsageError naming the option, the path and the fix; creates and changes nothing."""
    files = [o for o in outputs if o.kind != "dir"]
    for i, a in enumerate(files):
        pa = Path(a.path).absolute()
        for b in files[i + 1:]:
            if pa == Path(b.path).absolute() or _same_file(pa, Path(b.path)):
                raise UsageError(f"{a.option} and {b.option} are the same file {a.path}",
                                 hint=a.hint or "give each output its own path")
        for option, path in inputs:
            if path and (pa == Path(path).absolute() or _same_file(pa, Path(path))):
                raise UsageError(f"{a.option} {a.path} is also the {option} input: writing it would destroy it",
                                 hint=a.hint or "choose another output path")
    for out in outputs:
        problem = _output_problem(out)
        if problem:
            raise UsageError(problem[0], hint=out.hint or problem[1])
