"""The ``gpt2gen`` command line: build, layout, generate, and the training commands.

    gpt2gen build --target cpu [--model FILE] [--set NAME=VALUE ...] [--out DIR]
    gpt2gen layout [--model FILE] [--set NAME=VALUE ...]
    gpt2gen generate [--check]          # refresh (or check) generated/ for the shipped models
    gpt2gen prepro | train | plot ...   # data, training and curves (see docs/training.md)

Every entry point (these subcommands, ``python -m gpt2gen.train``, ``.data`` and ``.plot``) runs its
handler through :func:`run_command`, which turns user errors into one ``gpt2gen: error: ...`` message
and exit status 2 (130 for Ctrl-C); a traceback means a bug in gpt2gen.
"""
from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from . import __version__
from .builder import BuildError, compile_model, generate
from .resources import data_root, find_model
from .spec import SpecError


# --------------------------------------------------------------------------------------------
# user errors: one message and exit status 2 at every entry point

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """A command-line value that cannot work (an output path that is a directory, a NaN learning rate,
    ``--set B=`` for the trainer); the message names the option and the value, the hint the fix."""

    def __init__(self, message: str, hint: str | None = None):
        self.message, self.hint = message, hint
        super().__init__(message + (f"\n  hint: {hint}" if hint else ""))


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that report a problem with the user's input or machine, not a bug.

    Plain ValueError and RuntimeError are left out on purpose: gpt2gen raises typed errors for bad input,
    so an untyped one is a bug and keeps its traceback. MemoryError is an allocation the machine cannot
    serve (a model or batch too large), UnicodeError a file that is not UTF-8 text, FloatingPointError a
    run whose loss diverged.
    """
    from .checkpoint import CheckpointError
    from .data import DataError
    from .expr import ExprError
    from .tokenizer import TokenizerError
    return (UsageError, SpecError, ExprError, BuildError, CheckpointError, DataError, TokenizerError,
            OSError, UnicodeError, MemoryError, FloatingPointError)


_OS_HINTS = {
    errno.ENOSPC: "free some disk space (a training state of GPT-2 124M is about 1.5 GB; "
                  "--keep-checkpoints limits how many are kept)",
    errno.EACCES: "choose a location you may write to, or fix its permissions",
    errno.EPERM: "choose a location you may write to, or fix its permissions",
    errno.EROFS: "the file system is read-only: choose another location",
    errno.EISDIR: "give a file path, not a directory",
    errno.ENOTDIR: "a component of the path is a file, not a directory",
}


def describe(err: BaseException) -> str:
    """The message a user error is reported with: the text of gpt2gen's own errors, the file and reason
    of an operating-system error, and a hint where the fix is not obvious."""
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.filename}: {err.strerror}" if err.filename is not None else str(err)
        if err.filename2 is not None:
            text += f" (and {err.filename2})"
        hint = _OS_HINTS.get(err.errno or 0)
        return text + (f"\n  hint: {hint}" if hint else "")
    if isinstance(err, UnicodeDecodeError):
        return (f"cannot decode byte offset {err.start} as {err.encoding}: {err.reason}"
                "\n  hint: the file must be UTF-8 text")
    if isinstance(err, MemoryError):
        return (f"out of memory: {str(err) or 'an allocation failed'}"
                "\n  hint: the model or batch is too large for this machine: use smaller sizes "
                "(--set C=..., --set L=..., -b, -t)")
    return str(err) or type(err).__name__


def run_command(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a command handler: its return value (None = 0), or 2 with one message for a user error, or
    130 for Ctrl-C. The one wrapper of every entry point, so no handler catches errors itself."""
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("gpt2gen: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except user_errors() as err:
        print(f"gpt2gen: error: {describe(err)}", file=sys.stderr)
        return EXIT_USER_ERROR


# --------------------------------------------------------------------------------------------
# numbers on the command line

@dataclass(frozen=True)
class Bounded:
    """An argparse ``type`` for a finite number in a range; :meth:`problem` checks a value that came from
    elsewhere (a resumed run's state) against the same range, so both paths share one rule."""
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


def parse_override(text: str) -> tuple[str, int | float]:
    """``"L=2"`` -> ("L", 2): an argparse ``type`` for ``--set`` (a whole number stays an int)."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, int(value)
    except ValueError:
        pass
    try:
        num = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: {value!r} is not a number") from None
    if not math.isfinite(num):
        raise argparse.ArgumentTypeError(f"{name}: {value!r} is not a finite number")
    return name, num


def parse_overrides(items: Iterable[str | tuple[str, int | float]] | None) -> dict[str, int | float]:
    """``["L=2", "C=64"]`` (or already parsed pairs) -> {"L": 2, "C": 64}."""
    out: dict[str, int | float] = {}
    for item in items or []:
        if isinstance(item, str):
            try:
                item = parse_override(item)
            except argparse.ArgumentTypeError as e:
                raise UsageError(f"--set {e}") from None
        out[item[0]] = item[1]
    return out


# --------------------------------------------------------------------------------------------
# output paths, checked before the work that would write them

@dataclass(frozen=True)
class Output:
    """A path a command will write: ``kind`` "file" (replaced atomically), "append" (appended to) or
    "dir" (files are written inside). ``what`` says what goes there; an existing non-empty file is
    replaced or appended to only if it starts with ``signature`` (it is of the kind written there);
    ``example`` is a file name the hint suggests inside a directory given by mistake."""
    option: str
    path: Path
    kind: str
    what: str
    signature: bytes | None = None
    example: str | None = None


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


def _check_output(out: Output) -> None:
    p = Path(out.path)
    where = f"{out.option} {p}"
    if out.kind == "dir":
        if p.exists() and not p.is_dir():
            raise UsageError(f"{where}: is an existing file, not a directory ({out.what} go there)",
                             hint="give a directory path; it is created if missing")
    else:
        if p.is_dir():
            raise UsageError(f"{where}: is an existing directory, not a file ({out.what} is written there)",
                             hint="give a file path" + (f", e.g. {p / out.example}" if out.example else ""))
        if p.exists() and not p.is_file():
            raise UsageError(f"{where}: exists and is not a regular file", hint="give a file path")
        if p.is_file() and out.signature is not None:
            with open(p, "rb") as fh:
                head = fh.read(len(out.signature))
            if head and head != out.signature:
                verb = "appended to" if out.kind == "append" else "replaced"
                raise UsageError(f"{where}: exists and is not {out.what}; it would be {verb}",
                                 hint="remove it yourself if it may go, or choose another path")
        if out.kind == "append" and p.is_file():
            if not os.access(p, os.W_OK):
                raise UsageError(f"{where}: the file is not writable", hint=_OS_HINTS[errno.EACCES])
            return
    base = _nearest_existing(p if out.kind == "dir" else p.parent)
    if not base.is_dir():
        raise UsageError(f"{where}: {base} is a file, so no directory can be created under it",
                         hint="choose a path whose parent directories are directories")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"{where}: cannot write in {base} (permission denied or a read-only file system)",
                         hint=_OS_HINTS[errno.EACCES])


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
                                 hint="give each output its own path")
        for option, path in inputs:
            if path and (pa == Path(path).absolute() or _same_file(pa, Path(path))):
                raise UsageError(f"{a.option} {a.path} is also the {option} input: writing it would destroy it",
                                 hint="choose another output path")
    for out in outputs:
        _check_output(out)


# --------------------------------------------------------------------------------------------
# the commands

def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="model.yaml", help="model file (default: %(default)s)")
    p.add_argument("--set", action="append", metavar="NAME=VALUE", dest="overrides", type=parse_override,
                   help="override a config value or a batch maximum, e.g. --set L=2 --set B=8 (repeatable)")


def cmd_build(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if args.out:
        check_outputs([Output("--out", Path(args.out), "dir", "the generated sources")])
    built = compile_model(args.model, args.target, out=args.out, **parse_overrides(args.overrides))
    dt = time.perf_counter() - t0
    n = sum(s.numel for s in built.program.layout.params.slots)
    state = "compiled" if built.compiled else "up to date (cached)"
    print(f"{built.program.spec.name} ({args.target}): {state} in {dt:.2f} s, {n:,} parameters")
    print(f"  sources:   {built.directory}")
    print(f"  extension: {built.extension}")
    if args.out:
        print(f"  copy of the sources in {args.out}")
    return 0


def cmd_layout(args: argparse.Namespace) -> int:
    program, _ = generate(args.model, "cpu", **parse_overrides(args.overrides))
    cfg = ", ".join(f"{k}={v}" for k, v in program.config.items())
    print(f"{program.spec.name} from {find_model(args.model)}: {cfg}\n")
    print(program.layout.table())
    return 0


def shipped_models() -> list[Path]:
    root = data_root()
    return [root / "model.yaml"] + sorted((root / "models").glob("*.yaml"))


def generated_sources(target: str = "cpu") -> dict[Path, str]:
    """{path under generated/: text} for every shipped model at its default config."""
    out: dict[Path, str] = {}
    root = data_root()
    for model in shipped_models():
        program, sources = generate(model, target, label=str(model.relative_to(root)))
        for name, text in sources.items():
            out[Path("generated") / program.spec.name / target / name] = text
    return out


def cmd_generate(args: argparse.Namespace) -> int:
    root = data_root()
    stale = []
    for rel, text in generated_sources(args.target).items():
        path = root / rel
        if not path.exists() or path.read_text() != text:
            stale.append(rel)
            if not args.check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    verb = "out of date" if args.check else "written"
    for rel in stale:
        print(f"{verb}: {rel}")
    if not stale:
        print("generated/ is up to date")
    return 1 if args.check and stale else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2gen", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"gpt2gen {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("build", help="generate and compile a model (cached)",
                       description="Generate C from a model file and compile it into a Python extension. "
                                   "An unchanged model rebuilds nothing; an edited one recompiles only its "
                                   "generated C.")
    _model_args(p)
    p.add_argument("--target", default="cpu", choices=["cpu"], help="code generation target (default: %(default)s)")
    p.add_argument("--out", help="also write the generated sources into this directory")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("layout", help="print the memory layout of a model's arenas",
                       description="Print every tensor's name, shape, offset and size in the flat arenas, and "
                                   "the totals, at the build-time maxima of B and T.")
    _model_args(p)
    p.set_defaults(func=cmd_layout)

    p = sub.add_parser("generate", help="refresh generated/ for the shipped models",
                       description="Render the shipped model files into generated/<model>/<target>/.")
    p.add_argument("--target", default="cpu", choices=["cpu"], help="(default: %(default)s)")
    p.add_argument("--check", action="store_true", help="only report files that are out of date (exit 1 if any)")
    p.set_defaults(func=cmd_generate)

    for module in ("data", "train", "plot", "bench"):
        try:
            mod = __import__(f"gpt2gen.{module}", fromlist=["add_subcommand"])
        except ImportError:
            continue
        if hasattr(mod, "add_subcommand"):
            mod.add_subcommand(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
