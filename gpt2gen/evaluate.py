"""Evaluate a checkpoint on a token file: ``gpt2gen eval --checkpoint PATH --data FILE``.

    gpt2gen eval --checkpoint PATH [--data FILE] [-b B] [-t T] [--steps N] [--threads N] [--json]

Reports the mean next-token loss (cross-entropy, in nats), the perplexity exp(loss) and the number of
tokens evaluated. The file (any llm.c token file, ``gpt2gen prepro``'s output included) is cut into
consecutive windows of T inputs, each followed by its next token, in order: every token after the first
is predicted exactly once, with up to T - 1 tokens of context (the first of each window with none). The
windows go B at a time; the last batch may have fewer rows and the last window fewer positions (B and T
are run-time values, so that needs no rebuild). ``--steps N`` stops after N batches.

The trainer's own validation (``--val-every``, and ``python -m gpt2gen.train --eval-only``) is the mean
over its first ``--val-steps`` batches of B x T: the number its log records.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .checks import Bounded, UsageError, check_bounds
from .threads import add_threads_argument, apply_threads, current_threads, set_threads, threads_text

BOUNDS = {"batch_size": Bounded(int, 1), "seq_len": Bounded(int, 1), "steps": Bounded(int, 1)}


def windows(tokens: np.ndarray, B: int, T: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) batches covering every target of ``tokens`` once (see the module doc)."""
    n_targets = max(0, len(tokens) - 1)
    full = n_targets // T
    for first in range(0, full, B):
        rows = min(B, full - first)
        buf = np.asarray(tokens[first * T:(first + rows) * T + 1], dtype=np.int32)
        yield (np.ascontiguousarray(buf[:-1].reshape(rows, T)), np.ascontiguousarray(buf[1:].reshape(rows, T)))
    tail = n_targets - full * T
    if tail:
        buf = np.asarray(tokens[full * T:], dtype=np.int32)
        yield buf[:-1].reshape(1, tail), buf[1:].reshape(1, tail)


def evaluate_tokens(model, tokens: np.ndarray, B: int, T: int, steps: int | None = None,
                    progress=None) -> dict:
    """Mean loss over the windows of ``tokens`` (at most ``steps`` batches); ``progress(n)`` after each."""
    total = 0.0
    count = 0
    batches = 0
    for x, y in windows(tokens, B, T):
        if steps is not None and batches >= steps:
            break
        loss = model.forward(x, y)
        if loss is None:
            raise UsageError(f"{model.spec.path}: the model computes no loss (outputs.loss), so it cannot be evaluated")
        total += float(loss) * x.size        # forward's loss is the mean over the batch's positions
        count += x.size
        batches += 1
        if progress is not None:
            progress(x.size)
    if count == 0:
        raise UsageError("the token file has fewer than 2 tokens: nothing to evaluate")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf"), "tokens": count,
            "batches": batches}


def run_eval(args: argparse.Namespace, say=None) -> dict:
    """``gpt2gen eval``: returns what ``--json`` prints."""
    from . import weights
    from .data import read_tokens
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    check_bounds(args, {k: b for k, b in BOUNDS.items() if getattr(args, k, None) is not None})
    threads = apply_threads(args.threads)
    kind, where, meta = weights.resolve(args.checkpoint, warn=lambda m: say(f"warning: {m}"))
    data = args.data
    hparams = (meta.get("extra") or {}).get("hparams") or {}
    if data is None:
        data = hparams.get("val_data") or None
        if not data:
            raise UsageError("--data FILE is required" + (" (this training state records no validation file)"
                                                          if kind == "state" else ""),
                             hint="give a token file, e.g. data/tinyshakespeare/tiny_shakespeare_val.bin")
        say(f"data: {data} (the run's --val-data)")
    from .data import read_header
    read_header(data)      # a bad token file is found before the model is compiled
    B, T = args.batch_size, args.seq_len
    if kind == "state":    # the run's own batch shape by default: its build is cached, its numbers comparable
        cfg = meta["config"]
        B = B if B is not None else int(cfg.get("B", 1))
        T = T if T is not None else int(cfg.get("T", 64))
    else:
        B = B if B is not None else 4
    opened = weights.open_checkpoint(where, model=args.model, B=B, T=T, t_option="-t/--seq-len",
                                     warn=lambda m: say(f"warning: {m}"))
    if threads is not None:
        set_threads(threads)
    model = opened.model
    B, T = (int(v) for v in model.max_batch)
    T = min(T, int(model.config.get("maxT", T)))
    tokens = read_tokens(data, vocab_size=int(model.config["V"]))
    say(f"{opened.description}: {model.spec.name} ({weights.describe_config(model)}); {len(tokens):,} tokens "
        f"in {data}; B={B} T={T}; {threads_text()}")
    n_batches = -(-max(0, len(tokens) - 1) // (B * T))
    bar = None
    if not args.json and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=min(n_batches * B * T, max(0, len(tokens) - 1)) if args.steps is None
                   else args.steps * B * T, unit="tok", file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        res = evaluate_tokens(model, tokens, B, T, args.steps, progress=bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
    dt = time.perf_counter() - t0
    return {"checkpoint": str(opened.path), "kind": opened.kind, "model": model.spec.name, "data": str(data),
            **res, "tokens_in_file": int(len(tokens)), "B": B, "T": T, "seconds": round(dt, 3),
            "tokens_per_s": round(res["tokens"] / dt, 1) if dt > 0 else None, "threads": current_threads()}


def format_result(r: dict) -> str:
    return (f"loss {r['loss']:.4f} | perplexity {r['perplexity']:.2f} | {r['tokens']:,} tokens evaluated "
            f"(of {r['tokens_in_file']:,} in {r['data']}) in {r['seconds']:.1f} s")


def _cmd_eval(args: argparse.Namespace) -> int:
    r = run_eval(args)
    print(json.dumps(r) if args.json else format_result(r))
    return 0


# --------------------------------------------------------------------------------------------
# the trainer's --eval-only

def trainer_eval_only(args: argparse.Namespace, say=print, warn=None) -> dict:
    """``python -m gpt2gen.train --eval-only``: the trainer's validation (``--val-steps`` batches of
    ``-b`` x ``-t`` from ``--val-data``) on the weights of ``--resume`` (whose saved settings fill in what is
    not given) or ``--init-from``; trains nothing and writes nothing."""
    from . import train as TR
    from . import weights
    from .data import DataLoader, read_header
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    args = argparse.Namespace(**vars(args))
    if bool(args.resume) == bool(args.init_from):
        raise UsageError("--eval-only needs the weights to evaluate: --resume STATE (a training state or run "
                         "directory) or --init-from PATH (an llm.c .bin or a HuggingFace directory)"
                         + (", not both" if args.resume else ""))
    if args.overrides:
        raise UsageError(f"--set {' '.join(f'{k}={v}' for k, v in args.overrides)} has no effect with --eval-only: "
                         f"the checkpoint fixes the model", hint="drop --set; -b/-t choose the batch")
    source = args.resume or args.init_from
    meta = None
    if args.resume:
        path, meta = TR._find_state(Path(args.resume), warn)
        from_state = TR._apply_saved_settings(args, (meta.get("extra") or {}).get("hparams", {}), warn)
        TR._check_args(args, from_state)
        source = path
    else:
        TR._check_args(args)
    if not args.val_data:
        raise UsageError("--eval-only evaluates on --val-data, and it is empty", hint="give a token file")
    if Path(args.val_data) == TR.DEFAULT_VAL and not TR.DEFAULT_VAL.exists():
        from .data import DEFAULT_DATA_DIR, prepro_tinyshakespeare
        say("validation data not found; preparing tiny Shakespeare ...")
        prepro_tinyshakespeare(DEFAULT_DATA_DIR)
    read_header(args.val_data)
    if meta is not None:
        cfg = meta["config"]
        opened = weights.open_checkpoint(source, model=args.model if "model" in TR.explicit_options(args) else None,
                                         B=max(args.batch_size, int(cfg.get("B", 1))),
                                         T=max(args.seq_len, int(cfg.get("T", 1))), option="--resume",
                                         t_option="-t/--seq-len", warn=warn)
    else:
        opened = weights.open_checkpoint(source, model=args.model, B=args.batch_size, T=args.seq_len,
                                         option="--init-from", t_option="-t/--seq-len", warn=warn)
    model = opened.model
    loader = DataLoader(args.val_data, args.batch_size, args.seq_len, vocab_size=int(model.config["V"]))
    t0 = time.perf_counter()
    loss = TR.evaluate(model, loader, args.val_steps)
    dt = time.perf_counter() - t0
    n = max(1, min(args.val_steps, len(loader)))
    r = {"checkpoint": str(opened.path), "kind": opened.kind, "data": str(args.val_data), "loss": loss,
         "perplexity": math.exp(loss) if loss < 700 else float("inf"),
         "tokens": n * args.batch_size * args.seq_len, "tokens_in_file": int(len(loader.tokens)),
         "batches": n, "B": args.batch_size, "T": args.seq_len, "seconds": round(dt, 3)}
    say(f"{opened.description}: eval loss {loss:.4f} | perplexity {r['perplexity']:.2f} | {r['tokens']:,} tokens "
        f"({n} batches of {args.batch_size} x {args.seq_len} from {args.val_data})")
    return r


DESCRIPTION = ("Evaluate a checkpoint on a token file: mean loss, perplexity and the number of tokens "
               "evaluated (every token of the file after the first, in order, unless --steps).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a training state (or run directory), an llm.c .bin or a HuggingFace directory")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="token file to evaluate on (default for a training state: its run's --val-data)")
    p.add_argument("--model", default=None, metavar="FILE", help="model file (default: the checkpoint's own)")
    p.add_argument("-b", "--batch-size", type=BOUNDS["batch_size"], default=None,
                   help="windows per forward pass (default: a training state's B, else 4)")
    p.add_argument("-t", "--seq-len", type=BOUNDS["seq_len"], default=None,
                   help="window length T, the most context a prediction gets (default: a training state's T, "
                        "else min(maxT, 256))")
    p.add_argument("--steps", type=BOUNDS["steps"], default=None, help="stop after this many batches (default: all)")
    add_threads_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="loss and perplexity of a checkpoint on a token file",
                              description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=_cmd_eval)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import run_command
    p = argparse.ArgumentParser(prog="python -m gpt2gen.evaluate", description=DESCRIPTION)
    add_arguments(p)
    return run_command(_cmd_eval, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
