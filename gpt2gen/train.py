"""Train a model from its YAML file on tokenized text: ``python -m gpt2gen.train`` / ``gpt2gen train``.

With no arguments this is a demo: it prepares tiny Shakespeare if needed, trains a small GPT-2
(the ``demo`` preset) for a few minutes on the CPU, reports validation loss and prints a sample.
Every option is listed by ``--help``; docs/training.md explains them.

One optimiser step = ``grad_accum`` micro-batches of B x T tokens, where
``grad_accum = total_batch_size / (B * T)``; gradients are averaged over the micro-batches, clipped
to a global norm, and applied with AdamW at a learning rate that warms up linearly and then decays
along a cosine to ``lr * lr_final_frac``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import checkpoint as ckpt
from . import distributed
from .checks import Bounded, Output, UsageError, check_bounds, check_outputs, error_parts
from .cli import parse_override, run_command
from .data import DEFAULT_DATA_DIR, DataLoader, prepro_tinyshakespeare, read_header, tinyshakespeare_outputs
from .runtime import Model, check_training_memory

# Shape overrides of the presets (on top of the model file's config). "demo" fits a few minutes of
# 2-core CPU time; "model" keeps the model file's own sizes (GPT-2 124M for model.yaml).
PRESETS: dict[str, dict[str, int]] = {
    "demo": {"L": 4, "C": 128, "NH": 4, "maxT": 64},
    "model": {},
}
DEFAULT_TRAIN = DEFAULT_DATA_DIR / "tinyshakespeare" / "tiny_shakespeare_train.bin"
DEFAULT_VAL = DEFAULT_DATA_DIR / "tinyshakespeare" / "tiny_shakespeare_val.bin"


# --------------------------------------------------------------------------------------------
# pieces

def lr_at(step: int, *, lr: float, warmup: int, steps: int, final_frac: float) -> float:
    """Learning rate of optimiser step ``step`` (1-based): linear warmup, then cosine decay."""
    if warmup > 0 and step <= warmup:
        return lr * step / warmup
    lr_min = lr * final_frac
    if steps <= warmup:
        return lr
    progress = min(1.0, (step - warmup) / (steps - warmup))
    return lr_min + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - lr_min)


def grad_norm(grads: np.ndarray, chunk: int = 1 << 22) -> float:
    """Global L2 norm of a flat gradient arena, summed in float64 (deterministic)."""
    total = 0.0
    for i in range(0, grads.size, chunk):
        g = grads[i:i + chunk].astype(np.float64)
        total += float(np.dot(g, g))
    return math.sqrt(total)


def sample_token(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0,
                 top_k: int = 0) -> int:
    """Draw a token id from one row of logits (temperature 0 = greedy, top_k 0 = no cut)."""
    z = np.asarray(logits, dtype=np.float64)
    if temperature <= 0:
        return int(np.argmax(z))
    z = z / temperature
    if 0 < top_k < z.size:
        keep = np.argpartition(z, -top_k)[-top_k:]
        masked = np.full_like(z, -np.inf)
        masked[keep] = z[keep]
        z = masked
    p = np.exp(z - z.max())
    c = np.cumsum(p)
    return int(min(np.searchsorted(c, rng.random() * c[-1], side="right"), z.size - 1))


def generate(model, prompt: Sequence[int], n_tokens: int, rng: np.random.Generator, *,
             temperature: float = 1.0, top_k: int = 0, max_context: int | None = None) -> list[int]:
    """Sample ``n_tokens`` continuing ``prompt`` (a window of the last ``max_context`` tokens is fed)."""
    ctx_max = int(max_context or min(model.config["T"], model.config["maxT"]))
    tokens = [int(t) for t in prompt]
    out: list[int] = []
    for _ in range(n_tokens):
        window = tokens[-ctx_max:]
        idx = np.asarray(window, dtype=np.int32).reshape(1, -1)
        model.forward(idx)
        nxt = sample_token(model.logits[0, len(window) - 1], rng, temperature, top_k)
        tokens.append(nxt)
        out.append(nxt)
    return out


def evaluate(model, loader: DataLoader, steps: int) -> float:
    """Mean loss over the first ``steps`` batches of ``loader`` (sequential from its start)."""
    loader.reset()
    n = max(1, min(steps, len(loader)))
    total = 0.0
    for _ in range(n):
        x, y = loader.next_batch()
        total += float(model.forward(x, y))
    loader.reset()
    return total / n


class JsonlLog:
    """Appends one JSON object per line and flushes, so a crash loses at most one record."""

    def __init__(self, path: Path | None):
        self.path = path
        self._fh = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(path, "a", encoding="utf-8")

    def write(self, **record: Any) -> None:
        if self._fh is not None:
            record.setdefault("time", round(time.time(), 3))
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


@dataclass
class TrainResult:
    model: Any
    step: int
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    samples: list[tuple[int, str]] = field(default_factory=list)
    log_path: Path | None = None
    checkpoints: list[Path] = field(default_factory=list)
    wall_s: float = 0.0


# --------------------------------------------------------------------------------------------
# arguments

# The batch shape is the trainer's own option: the micro-batch B x T is also the build-time maximum.
BATCH_OPTIONS = {"B": "-b/--batch-size", "T": "-t/--seq-len"}

# Every numeric option's range, checked when parsed and again once a resumed run's saved settings are
# filled in (a state file is not trusted more than a command line). A NaN or negative learning rate
# would otherwise pass silently until the loss is NaN.
BOUNDS: dict[str, Bounded] = {
    "batch_size": Bounded(int, 1), "seq_len": Bounded(int, 1), "total_batch_size": Bounded(int, 0),
    "steps": Bounded(int, 1), "lr": Bounded(float, 0), "warmup_steps": Bounded(int, 0),
    "lr_final_frac": Bounded(float, 0, 1), "weight_decay": Bounded(float, 0),
    "beta1": Bounded(float, 0, 1, hi_open=True), "beta2": Bounded(float, 0, 1, hi_open=True),
    "eps": Bounded(float, 0, lo_open=True), "grad_clip": Bounded(float, 0), "seed": Bounded(int, 0),
    "val_every": Bounded(int, 0), "val_steps": Bounded(int, 1), "sample_every": Bounded(int, 0),
    "sample_tokens": Bounded(int, 0), "temperature": Bounded(float, 0), "top_k": Bounded(int, 0),
    "checkpoint_every": Bounded(int, 0), "keep_checkpoints": Bounded(int, 0), "stop_after": Bounded(int, 0),
}


def _kv(text: str) -> tuple[str, int | float]:
    """``--set KEY=VALUE`` for the trainer: any config symbol except the batch shape, which has options."""
    name, value = parse_override(text)
    if name in BATCH_OPTIONS:
        option = BATCH_OPTIONS[name]
        raise argparse.ArgumentTypeError(
            f"{name}={value}: the trainer's batch shape is set with {option} (it is also the build-time "
            f"maximum); use {option.split('/')[0]} {value} instead")
    return name, value


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="model.yaml", help="model file")
    g.add_argument("--target", default="cpu", choices=["cpu", "cuda"], help="code generation target (default: cpu)")
    g.add_argument("--emulate", action="store_true",
                   help="with --target cuda: run the CUDA build on the CPU under gpt2gen's emulator (slow)")
    g.add_argument("--arch", default=None, metavar="sm_XY,...",
                   help="with --target cuda: GPU architectures to compile for (default: sm_80,sm_90)")
    g.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                   help="storage of parameters, activations and gradients: fp32 (default), or bf16 / fp16 (cuda) "
                        "with fp32 master weights and moments (a resumed run keeps its own)")
    g.add_argument("--fuse", default="all", metavar="all|none|A,B",
                   help="fuse node pairs into one kernel (gpt2gen/fusion.py): all (default), none, or names")
    g.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                   help="shape overrides: demo = " + ", ".join(f"{k}={v}" for k, v in
                                                               PRESETS["demo"].items())
                   + "; model = the model file's own sizes")
    g.add_argument("--set", dest="overrides", metavar="KEY=VALUE", type=_kv, action="append",
                   default=[], help="override a config symbol (repeatable), e.g. --set L=6")
    g.add_argument("--init-from", metavar="PATH", default=None,
                   help="start from weights: an llm.c model file (.bin) or a HuggingFace "
                        "directory (its shape replaces the preset); default: random init")
    g = p.add_argument_group("data")
    g.add_argument("--train-data", default=str(DEFAULT_TRAIN),
                   help="training token file (prepared automatically if it is the default)")
    g.add_argument("--val-data", default=str(DEFAULT_VAL), help="validation token file ('' = none)")
    g.add_argument("-b", "--batch-size", type=int, default=8, help="micro-batch size B")
    g.add_argument("-t", "--seq-len", type=int, default=64, help="sequence length T")
    g.add_argument("--total-batch-size", type=int, default=0,
                   help="tokens per optimiser step; a multiple of B*T gives gradient "
                        "accumulation (0 = B*T)")
    g.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                   help="serve training windows in a shuffled order (per-epoch permutation)")
    g = p.add_argument_group("optimisation")
    g.add_argument("-n", "--steps", type=int, default=400, help="optimiser steps")
    g.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    g.add_argument("--warmup-steps", type=int, default=20, help="linear warmup steps")
    g.add_argument("--lr-final-frac", type=float, default=0.1,
                   help="cosine decay ends at this fraction of --lr")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    g.add_argument("--eps", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--grad-clip", type=float, default=1.0,
                   help="clip the global gradient norm to this (0 = off)")
    g.add_argument("--seed", type=int, default=1337, help="seed for init, data order and sampling")
    g = p.add_argument_group("evaluation and sampling")
    g.add_argument("--val-every", type=int, default=50, help="validate every N steps (0 = only at the end)")
    g.add_argument("--val-steps", type=int, default=10, help="validation batches per evaluation")
    g.add_argument("--sample-every", type=int, default=0,
                   help="print a sample every N steps (0 = only at the end)")
    g.add_argument("--sample-tokens", type=int, default=64, help="tokens per sample (0 = no samples)")
    g.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0 = greedy)")
    g.add_argument("--top-k", type=int, default=40, help="sample from the k likeliest tokens (0 = all)")
    g.add_argument("--prompt", default="", help="text that samples continue (default: <|endoftext|>)")
    g = p.add_argument_group("checkpoints and logs")
    g.add_argument("--run-name", default=None, help="name of this run (default: train-DATE-TIME)")
    g.add_argument("--checkpoint-every", type=int, default=0,
                   help="save the training state every N steps (0 = off; a final one is saved "
                        "whenever --checkpoint-dir is given or this is on)")
    g.add_argument("--checkpoint-dir", default=None, help="where states go (default: out/RUN)")
    g.add_argument("--keep-checkpoints", type=int, default=2,
                   help="how many recent training states to keep (0 = all)")
    g.add_argument("--resume", metavar="PATH", default=None,
                   help="resume from a training state file, or the newest valid one in a directory; "
                        "options not given again are taken from the saved run")
    g.add_argument("--stop-after", type=int, default=0, metavar="STEP",
                   help="stop (saving state) after this step as if interrupted; the schedule still "
                        "follows --steps (0 = run to the end)")
    g.add_argument("--export-llmc", metavar="PATH", default=None,
                   help="write the final weights as an llm.c model file")
    g.add_argument("--export-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="precision of --export-llmc")
    g.add_argument("--export-hf", metavar="DIR", default=None,
                   help="write the final weights as a HuggingFace directory (config.json + model.safetensors, "
                        "through the model file's huggingface mapping)")
    g.add_argument("--save-final", action=argparse.BooleanOptionalAction, default=None,
                   help="save the final weights as a training state in the checkpoint directory, for "
                        "`gpt2gen sample/eval/export --checkpoint` (default: on when training on the default "
                        "data, as the demo does, or whenever states are saved)")
    g.add_argument("--eval-only", action="store_true",
                   help="train nothing: evaluate the weights of --resume or --init-from on --val-data "
                        "(--val-steps batches of -b x -t) and print loss and perplexity")
    from .threads import add_threads_argument
    add_threads_argument(g)
    g.add_argument("--log", "--log-file", default=None,
                   help="JSONL log file (default: log/RUN.jsonl); under torchrun spell it --log-file, since "
                        "torchrun reads --log as an abbreviation of its own --log-dir")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (print a line per validation instead)")
    distributed.add_arguments(p)
    for action in p._actions:   # the plain int/float parsers above become range-checked ones
        if action.dest in BOUNDS:
            action.type = BOUNDS[action.dest]


# Training settings a state file records; a resumed run takes these from the state unless given
# explicitly on its command line (an explicit value that differs is used, with a warning).
HPARAMS = ("model", "target", "train_data", "val_data", "batch_size", "seq_len", "total_batch_size",
           "shuffle", "steps", "lr", "warmup_steps", "lr_final_frac", "weight_decay", "beta1", "beta2",
           "eps", "grad_clip", "seed", "val_every", "val_steps", "sample_every", "sample_tokens",
           "temperature", "top_k", "prompt", "checkpoint_every", "keep_checkpoints")
EXPLICIT = "_explicit"   # Namespace attribute: the dests given on the command line
_TRACKED: dict[type, type] = {}


def _tracked(base: type) -> type:
    """A subclass of the argparse action class ``base`` that records its dest in ``EXPLICIT`` when used."""
    if base not in _TRACKED:
        def __call__(self, parser, namespace, values, option_string=None):
            setattr(namespace, EXPLICIT, frozenset(getattr(namespace, EXPLICIT, frozenset())) | {self.dest})
            base.__call__(self, parser, namespace, values, option_string)
        _TRACKED[base] = type(f"Explicit{base.__name__}", (base,), {"__call__": __call__})
    return _TRACKED[base]


def _track_explicit(p: argparse.ArgumentParser) -> None:
    for action in p._actions:
        if action.option_strings and action.dest != "help":
            action.__class__ = _tracked(type(action))
    p.set_defaults(**{EXPLICIT: frozenset()})


def explicit_options(args: argparse.Namespace) -> set[str]:
    """The options given on the command line (for a Namespace made by hand: those that differ from the defaults)."""
    if hasattr(args, EXPLICIT):
        return set(getattr(args, EXPLICIT))
    defaults = vars(build_parser().parse_args([]))
    return {k for k, v in vars(args).items() if k in defaults and v != defaults[k]}


DESCRIPTION = ("Train a model from its YAML file on tokenized text. With no arguments: prepare tiny "
               "Shakespeare if needed and train a small GPT-2 for a few minutes (the demo).")


def build_parser(prog: str = "python -m gpt2gen.train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                formatter_class=HelpFormatter)
    add_arguments(p)
    _track_explicit(p)
    return p


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    """Add ``train`` to an argparse subparsers object (handler: ``args.func(args)``)."""
    p = subparsers.add_parser("train", help="train a model on tokenized text",
                              description=DESCRIPTION,
                              formatter_class=HelpFormatter)
    add_arguments(p)
    _track_explicit(p)
    p.set_defaults(func=_cmd_train)
    return p


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the uninformative ones (None, flags, empty lists)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or action.default == []:
            return action.help
        return super()._get_help_string(action)


def _cmd_train(args: argparse.Namespace) -> int:
    """The handler of ``gpt2gen train``; errors are reported by :func:`gpt2gen.cli.run_command`."""
    from .threads import apply_threads
    apply_threads(getattr(args, "threads", None))
    if getattr(args, "eval_only", False):
        from .evaluate import trainer_eval_only
        trainer_eval_only(args)
        return 0
    train(args)
    return 0


# --------------------------------------------------------------------------------------------
# the trainer

def _state_step(path: Path) -> int:
    try:
        return int(path.stem.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def _find_state(path: Path, warn) -> tuple[Path, dict]:
    """The state to resume from and its metadata: ``path`` itself, or the newest fully valid state in it.

    Candidates in a directory are tried newest first with full validation (metadata and checksum);
    each one skipped is reported through ``warn`` with the reason.
    """
    if path.is_file():
        return path, ckpt.verify_state(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume: {path} is neither a training state file nor a directory")
    cands = sorted(path.glob("state_*.safetensors"), key=lambda c: (_state_step(c), c.name), reverse=True)
    for cand in cands:
        try:
            return cand, ckpt.verify_state(cand)
        except (ckpt.CheckpointError, OSError) as e:
            warn(f"skipping training state {cand}: {e}; trying an older one")
    if cands:
        raise ckpt.CheckpointError(f"--resume: none of the {len(cands)} training states in {path} is usable")
    raise FileNotFoundError(f"--resume: no state_*.safetensors in {path}")


def _apply_saved_settings(args: argparse.Namespace, saved: dict, warn) -> set[str]:
    """Take the resumed run's settings for everything not given explicitly; warn where an explicit one differs.
    Returns the settings taken from the state."""
    explicit = explicit_options(args)
    taken: set[str] = set()
    for k in HPARAMS:
        if k not in saved:
            continue
        if k not in explicit:
            setattr(args, k, saved[k])
            taken.add(k)
        elif getattr(args, k) != saved[k]:
            note = ": the learning-rate schedule changes" if k in ("steps", "lr", "warmup_steps", "lr_final_frac") else ""
            warn(f"--{k.replace('_', '-')} is {getattr(args, k)!r}, the resumed run used {saved[k]!r}; "
                 f"using {getattr(args, k)!r}{note}")
    return taken


def _build_model(args, say, resume_meta):
    from . import build

    batch = {"B": args.batch_size, "T": args.seq_len}
    if resume_meta is not None:
        cfg = dict(resume_meta["config"])
        say(f"model: {args.model} with the resumed run's config "
            + " ".join(f"{k}={cfg[k]}" for k in ("L", "NH", "C", "maxT") if k in cfg))
        precision = (resume_meta.get("model") or {}).get("precision", "fp32")   # the run's own
        if args.precision not in (None, precision):
            raise UsageError(f"--precision {args.precision}: the run being resumed trains in {precision}",
                             hint=f"drop --precision, or give --precision {precision}")
        return build(model=args.model, target=args.target, seed=None, precision=precision, fuse=args.fuse,
                     **_target_options(args), **cfg)   # the state file has the weights
    overrides = dict(args.overrides)
    if args.init_from:
        src = Path(args.init_from)
        if src.is_dir():
            say(f"model: importing HuggingFace weights from {src}")
            return ckpt.from_hf(src, model=args.model, target=args.target, precision=args.precision or "fp32",
                                fuse=args.fuse, target_options=_target_options(args), **batch, **overrides)
        say(f"model: loading llm.c weights from {src}")
        return ckpt.from_llmc(src, target=args.target, model=args.model, precision=args.precision or "fp32",
                              fuse=args.fuse, target_options=_target_options(args), **batch, **overrides)
    cfg = {**PRESETS[args.preset], **overrides, **batch}
    if "V" not in overrides:
        # the token files hold GPT-2 token ids and samples are decoded with GPT-2's tokenizer: a model file
        # with another vocabulary (Llama's 32000, Gemma's 256000) trains here with the tokenizer's
        from .resources import find_model
        from .spec import load as load_spec
        from .tokenizer import N_VOCAB
        spec = load_spec(find_model(args.model))
        file_v = int(spec.resolve(cfg)["V"])
        if file_v != N_VOCAB:
            say(f"model: the data is GPT-2 tokenized, so V={N_VOCAB} instead of the model file's V={file_v} "
                f"(--set V=... to choose)")
            cfg["V"] = N_VOCAB
            # the file's padding token belongs to its own tokenizer; GPT-2 has none (Gemma's 0 is GPT-2's "!")
            hf = spec.huggingface
            for sym, key in (hf.config.items() if hf else ()):
                if "pad_token_id" in [k.strip() for k in key.split("|")] and sym not in overrides:
                    cfg[sym] = -1
                    say(f"model: {sym}=-1 (no padding token in GPT-2's vocabulary)")
    return build(model=args.model, target=args.target, seed=args.seed, precision=args.precision or "fp32",
                 fuse=args.fuse, **_target_options(args), **cfg)


def _target_options(args) -> dict:
    """The target's build options from the command line (--emulate, --arch: the cuda target's)."""
    out = {}
    if getattr(args, "emulate", False):
        out["emulate"] = True
    if getattr(args, "arch", None):
        out["archs"] = args.arch
    return out


def _check_args(args, from_state: set[str] = frozenset(), world: int = 1) -> int:
    """Validate the settings (those a resumed state supplied too, against the same ranges); returns the
    number of micro-batches per step (of each of ``world`` data-parallel processes: --total-batch-size
    counts the tokens of all of them)."""
    check_bounds(args, BOUNDS, lambda name: " (the value saved in the resumed run's state)" if name in from_state
                 else "")
    bt = args.batch_size * args.seq_len * world
    total = args.total_batch_size or bt
    if total % bt:
        what = f"B*T = {args.batch_size}*{args.seq_len}" if world == 1 else \
            f"processes*B*T = {world}*{args.batch_size}*{args.seq_len}"
        raise UsageError(f"--total-batch-size {total} is not a multiple of {what} "
                         f"= {bt}", hint=f"use a multiple of {bt}, e.g. {bt * max(1, round(total / bt))}")
    return total // bt


def _check_resume_options(args, resume_meta: dict) -> None:
    """Options a resumed run cannot honour are refused, not ignored: the state fixes the model's shape
    and holds the weights."""
    explicit = explicit_options(args)
    if args.init_from and "init_from" in explicit:
        raise UsageError(f"--init-from {args.init_from} and --resume {args.resume} exclude each other: the "
                         f"resumed state holds the weights", hint="drop --init-from to resume")
    cfg = resume_meta.get("config", {})
    for name, value in args.overrides:
        if name not in cfg:   # the state predates the symbol (GPT-2's norm_eps), or the file has none such
            raise UsageError(f"--set {name}={value}: the resumed run's state records no {name} (it was saved "
                             f"before the model file had that symbol, or the model has none), and a resumed "
                             f"run keeps the model it was saved with",
                             hint=f"drop --set {name}=..., or start a new run")
        if cfg[name] != value:
            raise UsageError(f"--set {name}={value}: the resumed run's model has {name}={cfg[name]}, and a "
                             f"resumed run keeps its shape", hint=f"drop --set {name}=..., or start a new run")


# The trainer prepares tiny Shakespeare in the default place, chosen by no option of its own: a problem
# there names what the trainer's user can change instead of prepro's --data-dir.
PREPARE_HINT = (f"without --train-data the trainer prepares tiny Shakespeare in {DEFAULT_DATA_DIR}/tinyshakespeare "
                f"under the current directory: run it from another directory, pass --train-data and --val-data "
                f"token files, or prepare them elsewhere with `gpt2gen prepro tinyshakespeare --data-dir DIR`")


def _prepares_tinyshakespeare(args) -> bool:
    """Whether this run prepares tiny Shakespeare before training (its default training file is missing)."""
    train_path = Path(args.train_data)
    return train_path == DEFAULT_TRAIN and not train_path.exists()


def _check_run_outputs(args, log_path: Path, ckpt_dir: Path | None, resume_path: Path | None) -> None:
    """Every path this run writes is checked before any data is prepared or model built (a bad
    --export-llmc found after the last step used to lose the run)."""
    outputs = [Output("--log", log_path, "append", "a JSONL training log", b"{", "train.jsonl")]
    if ckpt_dir is not None:
        outputs.append(Output("--checkpoint-dir", ckpt_dir, "dir", "training states"))
    if getattr(args, "export_hf", None):
        from .export import check_export_dir
        check_export_dir(Path(args.export_hf), "--export-hf")
    if args.export_llmc:
        outputs.append(Output("--export-llmc", Path(args.export_llmc), "file", "an llm.c model file",
                              np.array([ckpt.LLMC_MAGIC], dtype="<i4").tobytes(), "model.bin"))
    inputs = [("--train-data", args.train_data), ("--val-data", args.val_data),
              ("--init-from", args.init_from), ("--resume", resume_path)]
    if _prepares_tinyshakespeare(args):   # the token files it writes are outputs first, then the inputs
        prepared = tinyshakespeare_outputs(DEFAULT_DATA_DIR, "the default --train-data", PREPARE_HINT)
        outputs += prepared
        inputs = [(o, p) for o, p in inputs if not any(p and Path(p) == out.path for out in prepared)]
    check_outputs(outputs, inputs)
    if ckpt_dir is not None:
        _check_checkpoint_dir(args, ckpt_dir, resume_path)


def _check_checkpoint_dir(args, ckpt_dir: Path, resume_path: Path | None) -> None:
    """A new run refuses a directory holding another run's states: its saves would interleave with them,
    and --keep-checkpoints, which keeps the newest by step, would delete this run's own."""
    if resume_path is not None and ("checkpoint_dir" not in explicit_options(args)
                                    or resume_path.absolute().parent == ckpt_dir.absolute()
                                    or resume_path.absolute() == ckpt_dir.absolute()):
        return
    states = sorted(ckpt_dir.glob("state_*.safetensors"), key=_state_step) if ckpt_dir.is_dir() else []
    if states:
        raise UsageError(f"--checkpoint-dir {ckpt_dir}: holds {len(states)} training state(s) of another run "
                         f"(newest {states[-1].name}); this run's states would mix with them",
                         hint=f"continue that run with --resume {ckpt_dir}, or give this one another "
                              f"--checkpoint-dir (or --run-name)")


class _CtrlC:
    """What Ctrl-C (SIGINT) does during a run.

    The first one only sets ``requested``, checked between steps: the current step completes (with its
    validation, sample and checkpoint), the state is saved and the run stops. A second one stops at
    once (KeyboardInterrupt), and the last consistent state is saved. Inside a protected section
    (:meth:`protected`: writing a file, or applying an update together with the record that it was
    applied) a second Ctrl-C takes effect only when the section is done: an interrupted atomic write
    keeps nothing, and an update without its record would be saved with the previous step's loader
    and RNG state. Once the run is stopping, further Ctrl-Cs are ignored with a notice, so the save
    that was promised is not lost.
    """

    def __init__(self, notice: str, write):
        self.notice, self._write = notice, write
        self.requested = False
        self.stopping = False
        self._doing: str | None = None
        self._held = 0          # Ctrl-Cs held back in the current protected section
        self._stop_after = False   # one of them was a second Ctrl-C: stop when the section is done
        self._old = None

    def install(self) -> None:
        """Take over SIGINT (only from the main thread, and only from Python's default handler)."""
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._old = signal.signal(signal.SIGINT, self._handle)

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None

    def stop_now(self) -> KeyboardInterrupt:
        """The KeyboardInterrupt that stops the run; from here on Ctrl-C no longer interrupts the saving."""
        self.stopping = True
        return KeyboardInterrupt()

    @contextlib.contextmanager
    def protected(self, doing: str):
        """Ctrl-C cannot interrupt ``doing`` (e.g. "writing the training state PATH"); a second one
        pressed meanwhile stops the run once it is done (unless the run is stopping already)."""
        outer = self._doing
        if outer is None:
            self._held, self._stop_after = 0, False
        self._doing = doing
        try:
            yield
        finally:
            self._doing = outer
        if outer is None and self._stop_after and not self.stopping:
            raise self.stop_now()

    def writing(self, what: str):
        """:meth:`protected` for writing the file ``what``."""
        return self.protected(f"writing {what}")

    def _handle(self, signum, frame) -> None:
        if self.stopping or (self._doing is not None and self.requested):
            self.requested = True
            self._stop_after = self._stop_after or self._doing is not None
            self._held += 1
            if self._held == 1:
                what = self._doing or "saving and stopping"
                self._write(f"interrupt: {what}; Ctrl-C is ignored until that is done, then the run stops "
                            f"(kill -9 would stop at once, keeping the files already saved intact)")
            return
        if self.requested:
            raise self.stop_now()
        self.requested = True
        self._write(self.notice)


def _describe_finished(resume: str, start: int, steps: int) -> str:
    done = (f"already finished step {start} of {steps}" if start == steps
            else f"is already at step {start}, past --steps {steps}")
    return f"the run at {resume} {done}: nothing to train; pass --steps M (M > {start}) to train further"


def train(args: argparse.Namespace, *, quiet: bool = False) -> TrainResult:
    """Run training as described by ``args`` (from :func:`build_parser`); under torchrun, as one rank of a
    data-parallel run (gpt2gen.distributed)."""
    dp = distributed.setup(args)
    try:
        return _train(args, dp, quiet=quiet)
    finally:
        dp.close()


def _train(args: argparse.Namespace, dp, *, quiet: bool = False) -> TrainResult:
    from tqdm import tqdm

    from .tokenizer import get_tokenizer

    t_start = time.time()
    quiet = quiet or not dp.is_main   # only rank 0 of a data-parallel run reports
    say = (lambda *a, **k: None) if quiet else (lambda *a, **k: tqdm.write(" ".join(map(str, a))))

    def warn(msg: str) -> None:
        if dp.is_main:
            tqdm.write(f"warning: {msg}", file=sys.stderr)

    args = argparse.Namespace(**vars(args))   # resumed settings are filled in below: leave the caller's alone
    resume_path, resume_meta = _find_state(Path(args.resume), warn) if args.resume else (None, None)
    prev = (resume_meta or {}).get("extra", {})
    from_state: set[str] = set()
    if resume_meta is not None:
        from_state = _apply_saved_settings(args, prev.get("hparams", {}), warn)
        _check_resume_options(args, resume_meta)
        dp.check_resume(resume_path, prev)
    grad_accum = _check_args(args, from_state, dp.world)
    run_name = dp.from_main(args.run_name or prev.get("run_name") or time.strftime("train-%Y%m%d-%H%M%S"))
    log_path = Path(args.log) if args.log else (Path(prev["log"]) if prev.get("log")
                                                else Path("log") / f"{run_name}.jsonl")
    ckpt_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else (
        Path(prev["checkpoint_dir"]) if prev.get("checkpoint_dir") else Path("out") / run_name)
    # a resumed run keeps saving states (it came from one), so a Ctrl-C in it saves too
    save_states = args.checkpoint_every > 0 or args.checkpoint_dir is not None or resume_path is not None
    save_final = getattr(args, "save_final", None)
    if save_final is None:   # the demo keeps its weights, for `gpt2gen sample --checkpoint out`
        save_final = Path(args.train_data) == DEFAULT_TRAIN
    save_states = save_states or bool(save_final)
    export_any = bool(args.export_llmc or getattr(args, "export_hf", None))
    # --export-llmc may fall back to saving a state in ckpt_dir (a full disk at the end), so it is checked then too
    _check_run_outputs(args, log_path, ckpt_dir if save_states or args.stop_after or export_any else None,
                       resume_path)
    from .cache import remove_stale_temporaries   # a state half-written by a killed run: GBs for 124M
    for stale in remove_stale_temporaries(ckpt_dir, legacy_glob="state_*.safetensors"):
        say(f"removed {stale}, a temporary left by a run that was killed")

    # data
    train_path = Path(args.train_data)
    if _prepares_tinyshakespeare(args) and dp.local_rank == 0:   # once per machine; the others wait
        say("training data not found; preparing tiny Shakespeare ...")
        prepro_tinyshakespeare(DEFAULT_DATA_DIR, quiet=quiet)
    dp.barrier("waiting for the training data to be prepared")
    for data_file in (train_path, args.val_data):   # a bad token file is found before the model is compiled
        if data_file:
            read_header(data_file)

    model = _build_model(args, say, resume_meta)
    if isinstance(model, Model):       # training writes all six arenas: refuse now what cannot fit
        check_training_memory(model)
    V = int(model.config["V"])
    loader = dp.loader(train_path, args.batch_size, args.seq_len, shuffle=args.shuffle,
                       seed=args.seed, vocab_size=V)   # data-parallel: this rank's rows of each global batch
    val_loader = None
    if args.val_data:
        val_loader = dp.loader(args.val_data, args.batch_size, args.seq_len, vocab_size=V)
    rng = np.random.default_rng(args.seed)
    start = 0
    if resume_path is not None:
        meta = ckpt.load_state(resume_path, model)
        start = meta["step"]
        loader.load_state_dict(meta["data"]["train"])
        rng.bit_generator.state = meta["rng"]["sample"]
        say(f"resumed from {resume_path} at step {start}")
        if "hparams" not in prev and prev.get("steps") not in (None, args.steps):
            warn(f"the resumed run was planned for {prev['steps']} steps, this one for "
                 f"{args.steps}: the learning-rate schedule changes")
    dp.prepare(model, args)   # data-parallel: the same weights everywhere; ZeRO-1 keeps this rank's moments
    dp.checkpoint_dir = ckpt_dir if save_states else None
    if args.export_llmc:   # fail now, not after training, when the weights cannot be exported
        try:
            ckpt.check_llmc_compatible(model)
        except ckpt.CheckpointError as e:
            raise ckpt.CheckpointError(f"--export-llmc: this model cannot be written as an llm.c "
                                       f"model file: {e}") from None
    if getattr(args, "export_hf", None):   # likewise a model file whose weights have no HuggingFace names
        from .export import check_hf_exportable
        try:
            check_hf_exportable(model)
        except ckpt.CheckpointError as e:
            raise ckpt.CheckpointError(f"--export-hf: this model cannot be written as a HuggingFace "
                                       f"checkpoint: {e}") from None
    result = TrainResult(model=model, step=start, log_path=log_path)
    ctrl_c = _CtrlC(
        f"interrupt: finishing the current step, then saving the state in {ckpt_dir} and stopping (Ctrl-C "
        f"again to stop sooner: the state saved is still exact)" if save_states else
        "interrupt: finishing the current step, then stopping; this run saves no training state (Ctrl-C "
        "again to stop at once)", lambda msg: tqdm.write(msg, file=sys.stderr) if dp.is_main else None)
    # the newest state this run wrote, or the one it resumed from (it holds the weights at `start`)
    saved: dict[str, Any] = {"step": None, "post_done": None, "path": None}
    if resume_path is not None:
        saved.update(step=start, post_done=not prev.get("post_step_pending"), path=resume_path)

    def export() -> None:
        """Write --export-llmc and --export-hf; if one fails, the message names the state file holding the
        trained weights."""
        if args.export_llmc:
            export_one("--export-llmc", args.export_llmc, f"the llm.c model file {args.export_llmc}",
                       lambda: ckpt.save_llmc(model, args.export_llmc, args.export_dtype),
                       f"exported llm.c model file {args.export_llmc} ({args.export_dtype})")
        if getattr(args, "export_hf", None):
            from .export import save_hf
            export_one("--export-hf", args.export_hf, f"the HuggingFace directory {args.export_hf}",
                       lambda: save_hf(model, args.export_hf),
                       f"exported HuggingFace checkpoint {args.export_hf} (config.json + model.safetensors)")

    def export_one(option: str, dest: str, what: str, write, done: str) -> None:
        try:
            with ctrl_c.writing(what):
                write()
        except OSError as e:
            text, hint = error_parts(e)
            kept, why_not = keep_trained_weights()
            if kept is not None:
                later = f"export them later with --resume {kept} {option} PATH"
                text += f"; the trained weights are kept in {kept}"
                hint = f"{hint}; then {later}" if hint else later
            else:
                text += f"; saving the trained weights as a training state failed too: {why_not}"
            raise UsageError(f"{option} {dest}: could not write it: {text}", hint=hint) from None
        say(done)

    def keep_trained_weights() -> tuple[Path | None, str | None]:
        """After a failed export: the state file holding the trained weights -- the one saved or resumed
        from at this step, else one saved now -- or None and why it could not be saved. The fallback save
        prunes nothing: the states already in the directory may be the only copies of other weights."""
        if saved["step"] == result.step:
            return saved["path"], None
        try:
            return save(result.step, prune=False, alone=True), None
        except (OSError, distributed.DistributedError) as e:
            return None, error_parts(e)[0]

    def save(step: int, data_state: dict | None = None, rng_state: dict | None = None,
             post_done: bool = True, prune: bool = True, alone: bool = False) -> Path:
        """Save the state at ``step``: the model's arenas as they are now, with the given (default:
        current) loader and sampler states. ``post_done=False``: the step's update is applied but
        its validation/sample/checkpoint are not, and a resume does them first. ``prune``: keep only
        the newest --keep-checkpoints states. Data-parallel: every rank calls it (with ZeRO-1 they send
        their moments to rank 0), rank 0 writes; ``alone``: rank 0 without the others (ranks not in step)."""
        path = ckpt_dir / f"state_{step:06d}.safetensors"
        state_model = dp.consolidate(model, alone=alone)
        if state_model is None:   # another rank of a data-parallel run: rank 0 writes
            saved.update(step=step, post_done=post_done, path=path)
            return path
        extra = {"run_name": run_name, "log": str(log_path), "checkpoint_dir": str(ckpt_dir),
                 "steps": args.steps, "hparams": {k: getattr(args, k) for k in HPARAMS}, **dp.state_extra()}
        if not post_done:
            extra["post_step_pending"] = True
        with ctrl_c.writing(f"the training state {path}"):
            ckpt.save_state(path, state_model, step=step,
                            data={"train": data_state if data_state is not None else loader.state_dict()},
                            rng={"sample": rng_state if rng_state is not None else rng.bit_generator.state},
                            extra=extra)
            saved.update(step=step, post_done=post_done, path=path)
            result.checkpoints.append(path)
            log.write(type="checkpoint", step=step, path=str(path))
            if prune and args.keep_checkpoints > 0:
                for old in sorted(ckpt_dir.glob("state_*.safetensors"), key=_state_step)[:-args.keep_checkpoints]:
                    old.unlink(missing_ok=True)
        return path

    if resume_path is not None and start >= args.steps and not prev.get("post_step_pending"):
        log = JsonlLog(None)
        if export_any and dp.is_main:
            export()
        say(_describe_finished(args.resume, start, args.steps))
        return result

    n_params = sum(int(p.size) for p in model.params.values())
    say(f"model: {n_params / 1e6:.2f}M parameters ("
        + ", ".join(f"{k}={model.config[k]}" for k in ("L", "NH", "C", "V", "maxT") if k in model.config)
        + f"); data: {len(loader.tokens):,} training tokens; B={args.batch_size} T={args.seq_len} "
        f"grad_accum={grad_accum}")

    tok = get_tokenizer() if args.sample_tokens > 0 and dp.is_main else None
    prompt = [tok.eot] + (tok.encode(args.prompt) if tok and args.prompt else []) if tok else []
    log = JsonlLog(log_path if dp.is_main else None)
    log.write(type="config", run=run_name, start_step=start, argv=sys.argv[1:],
              args={k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                    for k, v in vars(args).items() if k != "func" and not k.startswith("_")},
              config={k: (int(v) if float(v).is_integer() else float(v))
                      for k, v in model.config.items()}, n_params=n_params,
              grad_accum=grad_accum)
    if dp.world > 1 or dp.zero:
        info = dp.summary()   # a collective: every rank
        say(f"distributed: {dp.describe()}")
        if info:
            log.write(type="distributed", **info)
    tokens_per_step = grad_accum * args.batch_size * args.seq_len * dp.world
    stop = min(args.steps, args.stop_after) if args.stop_after > 0 else args.steps

    def run_val(step: int) -> None:
        if val_loader is None:
            return
        t0 = time.time()
        vl = dp.mean(evaluate(model, val_loader, args.val_steps))   # data-parallel: each rank's share
        result.val_losses.append((step, vl))
        log.write(type="val", step=step, loss=vl, ms=round(1e3 * (time.time() - t0), 1))
        say(f"step {step:5d} | val loss {vl:.4f}"
            + (f" | train loss {result.train_losses[-1][1]:.4f}" if result.train_losses else ""))

    def run_sample(step: int) -> None:
        if tok is None:
            return
        ids = generate(model, prompt, args.sample_tokens, rng, temperature=args.temperature,
                       top_k=args.top_k, max_context=args.seq_len)
        # <|endoftext|> separates documents; the text before it already ends in a blank line
        text = tok.decode([i for i in ids if i != tok.eot])
        result.samples.append((step, text))
        log.write(type="sample", step=step, text=text)
        say(f"---- sample at step {step} ----\n{args.prompt}{text}\n" + "-" * 30)

    def post_step(step: int, *, checkpoint: bool = True) -> None:
        """What follows a step's update: validation, a sample, a periodic checkpoint (the final
        validation and sample after the last step)."""
        final = step == args.steps
        if (args.val_every > 0 and step % args.val_every == 0) or final:
            run_val(step)
        if (args.sample_every > 0 and step % args.sample_every == 0 and not final) or \
                (final and args.sample_tokens > 0):
            run_sample(step)
        if checkpoint and args.checkpoint_every > 0 and step % args.checkpoint_every == 0 and step != stop:
            save(step)

    def save_on_stop(alone: bool = False) -> str:
        """After Ctrl-C or a diverged loss: save the last state known to be consistent -- `snap` after the
        last completed step or, once a step's update has been applied, `pending`, that step with its
        post-step work marked as still to do. Returns what became of it, for the user. ``alone``: the
        ranks of a data-parallel run stopped at different points, so rank 0 saves without them (if it can)."""
        if not save_states:
            return "no training state was saved (pass --checkpoint-dir or --checkpoint-every to make runs resumable)"
        if alone and not dp.can_save_alone:
            return (f"no new state was saved: the ranks stopped at different points and with --zero 1 the "
                    f"optimizer state is spread over them; the newest state in {ckpt_dir} is intact")
        state, post_done = (pending, False) if pending is not None and pending["step"] > start else (snap, True)
        if state["step"] <= start:
            return f"no step completed, so no new state was saved (the run is still at step {start})"
        # a state of this step saved with its post-step work done (a checkpoint) is as good or better
        if saved["step"] != state["step"] or (post_done and not saved["post_done"]):
            save(state["step"], state["data"], state["rng"], post_done=post_done, alone=alone)
        return f"the state at step {state['step']} is saved in {ckpt_dir}"

    bar = tqdm(total=stop, initial=start, disable=quiet or not args.progress, unit="step",
               dynamic_ncols=True, file=sys.stderr)
    step = start
    snap: dict[str, Any] = {"step": start, "data": loader.state_dict(), "rng": rng.bit_generator.state}
    pending: dict[str, Any] | None = None
    ctrl_c.install()
    try:
        try:
            if start == 0:
                run_val(0)
            elif prev.get("post_step_pending"):
                pending = dict(snap)
                post_step(start, checkpoint=False)
                pending = None
                snap = {"step": start, "data": loader.state_dict(), "rng": rng.bit_generator.state}
            for step in range(start + 1, stop + 1):
                if dp.should_stop(ctrl_c.requested):   # data-parallel: if any rank was interrupted
                    raise ctrl_c.stop_now()
                t0 = time.perf_counter()
                lr = lr_at(step, lr=args.lr, warmup=args.warmup_steps, steps=args.steps,
                           final_frac=args.lr_final_frac)
                model.zero_grad()
                loss = 0.0
                for _ in range(grad_accum):
                    x, y = loader.next_batch()
                    loss += float(model.forward(x, y))
                    model.backward()
                loss /= grad_accum
                # data-parallel: gradients summed over the ranks; the mean loss and the global norm
                loss, norm = dp.reduce_gradients(model, loss, grad_accum)
                overflow = model.loss_scaling and not math.isfinite(norm)   # fp16: a skipped step, not divergence   # the update skips it, lowers the scale
                if not (math.isfinite(loss) and (math.isfinite(norm) or overflow)):   # before the update spreads it
                    raise FloatingPointError(f"training diverged: the loss became {loss} (gradient norm "
                                             f"{norm}) at step {step}")
                scale = 1.0 / (grad_accum * dp.world)
                if args.grad_clip > 0 and norm > args.grad_clip and not overflow:
                    scale *= args.grad_clip / norm
                data_after = loader.state_dict()
                # the update and the record that it was applied are one: a Ctrl-C between them would save
                # this step's weights with the previous step's loader and RNG state
                with ctrl_c.protected(f"applying the update of step {step}"):
                    taken = dp.update(model, lr, args.beta1, args.beta2, args.eps, args.weight_decay, step,
                                      grad_scale=scale)
                    pending = {"step": step, "data": data_after, "rng": rng.bit_generator.state}
                dt = time.perf_counter() - t0
                result.train_losses.append((step, loss))
                result.step = step
                extra = {"skipped": True} if taken is False else {}   # overflowed: no update, the scale halves
                if model.loss_scaling:
                    extra["loss_scale"] = model.loss_scale
                log.write(type="train", step=step, loss=loss, lr=lr, norm=norm if math.isfinite(norm) else None,
                          ms=round(dt * 1e3, 2), tok_s=round(tokens_per_step / dt, 1), **extra)
                bar.update(1)
                bar.set_postfix_str(f"loss {loss:.4f} | {dt * 1e3:.0f} ms/step | "
                                    f"{tokens_per_step / dt:,.0f} tok/s", refresh=False)
                post_step(step)
                snap = {"step": step, "data": loader.state_dict(), "rng": rng.bit_generator.state}
                pending = None
        except (KeyboardInterrupt, FloatingPointError) as stopped:
            ctrl_c.stopping = True
            bar.close()
            # the ranks of a data-parallel run are in step unless a second Ctrl-C stopped each where it was
            kept = save_on_stop(alone=dp.world > 1 and isinstance(stopped, KeyboardInterrupt)
                                and not dp.stop_agreed)
            log.close()
            if isinstance(stopped, FloatingPointError):
                raise FloatingPointError(f"{stopped}; {kept}\n  hint: resume with a lower --lr (or more "
                                         f"--warmup-steps, a lower --grad-clip)") from None
            say(f"interrupted: {kept}")
            raise
        ctrl_c.stopping = True   # the run is complete: a Ctrl-C now must not cost its final state
        bar.close()
        if (save_states and result.step > start) or args.stop_after:
            save(result.step)
        if export_any and dp.is_main:
            export()
    finally:
        ctrl_c.restore()
    result.wall_s = time.time() - t_start
    log.write(type="done", step=result.step, wall_s=round(result.wall_s, 2))
    log.close()
    summary = f"done: {result.step} steps in {result.wall_s:.1f} s"
    if result.train_losses:
        first = result.train_losses[0][1]
        summary += f"; train loss {first:.3f} -> {result.train_losses[-1][1]:.3f}"
    if result.val_losses:
        summary += f"; val loss {result.val_losses[-1][1]:.3f}"
    say(summary + f"; log: {log_path}")
    if saved["path"] is not None and saved["step"] == result.step and result.step > start:
        say(f"final weights: {saved['path']}\n  try: gpt2gen sample --checkpoint {saved['path']} --prompt 'ROMEO:'"
            if Path(args.train_data) == DEFAULT_TRAIN else
            f"final weights: {saved['path']} (gpt2gen sample / eval / export --checkpoint PATH)")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_cmd_train, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
