"""The ``gpt2gen`` command line: build, layout, generate, and the training commands.

    gpt2gen build --target cpu [--precision fp32|bf16] [--model FILE] [--set NAME=VALUE ...] [--out DIR]
    gpt2gen build --target cuda [--arch sm_80,sm_90 | --emulate] [--precision fp32|bf16|fp16] ...
    gpt2gen layout [--precision P] [--model FILE] [--set NAME=VALUE ...] [--world N --zero 1]
    gpt2gen generate [--check]          # refresh (or check) generated/ for the shipped models
    gpt2gen prepro | train | plot ...   # data, training and curves (see docs/training.md)
    gpt2gen sample | eval | export ...  # use a checkpoint: generate text, loss and perplexity, HF / llm.c files

Every entry point (these subcommands, ``python -m gpt2gen.train``, ``.data``, ``.plot`` and ``.bench``) runs its
handler through :func:`run_command`, which turns user errors into one ``gpt2gen: error: ...`` message
and exit status 2 (130 for Ctrl-C); a traceback means a bug in gpt2gen.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

from . import __version__, targets
from .builder import BuildError, compile_model, generate
from . import checks
from .checks import Output, UsageError, check_outputs, describe_error, read_text
from .fusion import FUSIONS
from .precision import POLICIES
from .resources import data_root, find_model
from .spec import SpecError


# --------------------------------------------------------------------------------------------
# user errors: one message and exit status 2 at every entry point

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


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


def run_command(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a command handler: its return value (None = 0), or 2 with one message for a user error, or
    130 for Ctrl-C. The one wrapper of every entry point, so no handler catches errors itself."""
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("gpt2gen: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except user_errors() as err:
        print(f"gpt2gen: error: {describe_error(err)}", file=sys.stderr)
        return EXIT_USER_ERROR


# --------------------------------------------------------------------------------------------
# --set on the command line

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
# the commands

def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="model.yaml", help="model file (default: %(default)s)")
    p.add_argument("--set", action="append", metavar="NAME=VALUE", dest="overrides", type=parse_override,
                   help="override a config value or a batch maximum, e.g. --set L=2 --set B=8 (repeatable)")


def _target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="cpu", choices=targets.names(),
                   help="code generation target (default: %(default)s)")
    p.add_argument("--precision", default="fp32", choices=list(POLICIES),
                   help="storage of parameters, activations and gradients: fp32, or bf16/fp16 with fp32 master "
                        "weights, moments and statistics (default: %(default)s; a target says which it has)")
    p.add_argument("--fuse", default="all", metavar="all|none|A,B",
                   help="fusions of node pairs into one kernel: all (default), none, or names from "
                        f"{', '.join(FUSIONS)}")


def cmd_build(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if args.out:
        check_outputs([Output("--out", Path(args.out), "dir", "the generated sources")])
    built = compile_model(args.model, args.target, out=args.out, precision=args.precision, fuse=args.fuse,
                          emulate=args.emulate, archs=args.arch, **parse_overrides(args.overrides))
    dt = time.perf_counter() - t0
    n = sum(s.numel for s in built.program.layout.params.slots)
    state = "compiled" if built.compiled else "up to date (cached)"
    how = ", emulated" if args.emulate else (f", {','.join(built.options['archs'])}" if "archs" in built.options else "")
    print(f"{built.program.spec.name} ({args.target}{how}, {args.precision}): {state} in {dt:.2f} s, {n:,} parameters")
    print(f"  sources:   {built.directory}")
    print(f"  extension: {built.extension}")
    report = built.directory / "ptxas.txt"
    if "archs" in built.options and report.is_file():    # nvcc: registers, shared memory, spills per kernel
        print(f"  ptxas:     {report}")
        print("".join("    " + line + "\n" for line in report.read_text().splitlines()), end="")
    if args.out:
        print(f"  copy of the sources in {args.out}")
    return 0


def cmd_layout(args: argparse.Namespace) -> int:
    program, _ = generate(args.model, args.target, precision=args.precision, fuse=args.fuse,
                          **parse_overrides(args.overrides))
    cfg = ", ".join(f"{k}={v}" for k, v in program.config.items())
    print(f"{program.spec.name} from {find_model(args.model)}: {cfg}\n")
    print(program.layout.table())
    if args.world > 1 or args.zero:
        from .distributed import memory_report
        print("\n" + memory_report(program.layout, args.world, args.zero))
    return 0


def shipped_models() -> list[Path]:
    root = data_root()
    return [root / "model.yaml"] + sorted((root / "models").glob("*.yaml"))


def generated_sources(target: str | None = None) -> dict[Path, str]:
    """{path under generated/: text} for every shipped model at its default config, for ``target`` (None: every
    target)."""
    out: dict[Path, str] = {}
    root = data_root()
    for name in [target] if target else targets.names():
        for model in shipped_models():
            program, sources = generate(model, name, label=str(model.relative_to(root)))
            for file, text in sources.items():
                out[Path("generated") / program.spec.name / name / file] = text
    return out


def cmd_generate(args: argparse.Namespace) -> int:
    root = data_root()
    stale = []
    for rel, text in generated_sources(args.target).items():
        path = root / rel
        if not path.exists() or read_text(path) != text:
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
    _target_args(p)
    p.add_argument("--out", help="also write the generated sources into this directory")
    p.add_argument("--arch", metavar="sm_XY,...",
                   help="cuda: the GPU architectures nvcc compiles for (default: sm_80,sm_90)")
    p.add_argument("--emulate", action="store_true",
                   help="cuda: compile the same .cu against gpt2gen's CUDA emulator and run it on the CPU (slow; "
                        "how the CUDA kernels are proven without a GPU)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("layout", help="print the memory layout of a model's arenas",
                       description="Print every tensor's name, shape, offset and size in the flat arenas, and "
                                   "the totals, at the build-time maxima of B and T.")
    _model_args(p)
    _target_args(p)
    p.add_argument("--world", type=checks.Bounded(int, 1), default=1, metavar="N",
                   help="also report the memory per rank of data-parallel training over N processes")
    p.add_argument("--zero", type=int, choices=[0, 1], default=0,
                   help="with --world: 1 = ZeRO stage 1, the optimizer state (AdamW's moments, master "
                        "weights) sharded over the ranks")
    p.set_defaults(func=cmd_layout)

    p = sub.add_parser("generate", help="refresh generated/ for the shipped models",
                       description="Render the shipped model files into generated/<model>/<target>/.")
    p.add_argument("--target", default=None, choices=targets.names(), help="only this target (default: all)")
    p.add_argument("--check", action="store_true", help="only report files that are out of date (exit 1 if any)")
    p.set_defaults(func=cmd_generate)

    for module in ("data", "train", "plot", "bench", "sample", "evaluate", "export"):
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
