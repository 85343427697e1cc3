"""The ``gpt2gen`` command line: build, layout, generate, and the training commands.

    gpt2gen build --target cpu [--model FILE] [--set NAME=VALUE ...] [--out DIR]
    gpt2gen layout [--model FILE] [--set NAME=VALUE ...]
    gpt2gen generate [--check]          # refresh (or check) generated/ for the shipped models
    gpt2gen prepro | train | plot ...   # data, training and curves (see docs/training.md)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import __version__
from .builder import BuildError, compile_model, generate
from .resources import data_root, find_model
from .spec import SpecError


def parse_overrides(items: list[str] | None) -> dict[str, int | float]:
    """``["L=2", "C=64"]`` -> {"L": 2, "C": 64}."""
    out: dict[str, int | float] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"gpt2gen: --set expects NAME=VALUE, got {item!r}")
        try:
            out[name.strip()] = int(value)
        except ValueError:
            try:
                out[name.strip()] = float(value)
            except ValueError:
                raise SystemExit(f"gpt2gen: --set {name}: {value!r} is not a number") from None
    return out


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="model.yaml", help="model file (default: %(default)s)")
    p.add_argument("--set", action="append", metavar="NAME=VALUE", dest="overrides",
                   help="override a config value or a batch maximum, e.g. --set L=2 --set B=8 (repeatable)")


def cmd_build(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
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
    try:
        return int(args.func(args) or 0)
    except (SpecError, BuildError) as err:
        print(f"gpt2gen: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
