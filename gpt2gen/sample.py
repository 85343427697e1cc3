"""Generate text from a checkpoint: ``gpt2gen sample --checkpoint PATH``.

    gpt2gen sample --checkpoint PATH [--prompt TEXT | --tokens ID,ID,...] [-n TOKENS] [--temperature T]
                   [--top-k K] [--top-p P] [--seed S] [--context N] [--threads N] [--json]

The checkpoint is anything :mod:`gpt2gen.weights` opens: a training state (or a run's directory of them,
or ``out`` for the newest run), an llm.c model file, a HuggingFace directory. Text is printed as it is
generated; the speed in tokens/s goes to stderr at the end (``--json``: one JSON object instead).

How the next token is chosen (:func:`next_token`): the logits are divided by the temperature (0: the most
likely token, greedy), cut to the ``top_k`` most likely tokens and then to the smallest set whose
probability reaches ``top_p`` (nucleus), renormalised, and one token is drawn with a uniform number from
a numpy ``default_rng(seed)``: the same seed, checkpoint and options give the same tokens.

Where the logits come from is :class:`Decoder`'s business: :meth:`Decoder.next_logits` is the one call
the sampler makes. :class:`CachedDecoder` (what :func:`make_decoder` gives a built model) runs the model's
decode program: the prompt in chunks of up to the build's T tokens, then one position per new token over
the KV cache, O(1) layers' worth of work per token besides attention's read of the cache. :class:`Decoder`
runs the full forward pass over the window for every new token, as llm.c does: O(window) work per token.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Iterator, Sequence

import numpy as np

from .checks import Bounded, UsageError, check_bounds
from .threads import add_threads_argument, apply_threads, current_threads, set_threads, threads_text

BOUNDS = {"n_tokens": Bounded(int, 1), "temperature": Bounded(float, 0), "top_k": Bounded(int, 1),
          "top_p": Bounded(float, 0, 1, lo_open=True), "seed": Bounded(int, 0), "context": Bounded(int, 1)}


# --------------------------------------------------------------------------------------------
# where logits come from

class Decoder:
    """Next-token logits for a sequence that grows one token at a time.

    The contract a faster decoder keeps: :meth:`next_logits` takes every token so far (only the last
    :attr:`window` are seen) and returns the logits of the token that follows, as a new float32 array of
    the model's vocabulary size. Calls normally extend the previous call's tokens by one (a KV cache then
    runs one position); any other sequence starts over (:meth:`reset` says so explicitly).

    This one keeps no state: each call runs the full forward pass over the window at B = 1 and the
    shortest run-time T that covers it (no rebuild: T is a run-time value up to the build-time maximum).
    """

    kind = "full-forward"

    def __init__(self, model):
        self.model = model
        cfg = model.config
        self.window = int(min(cfg["T"], cfg.get("maxT", cfg["T"])))
        self.vocab_size = int(cfg["V"])
        self.positions = 0          # positions computed so far (what a cache saves is the difference)

    def reset(self) -> None:
        """Start a new sequence (a cached decoder drops its cache)."""

    def next_logits(self, tokens: Sequence[int]) -> np.ndarray:
        ctx = list(tokens)[-self.window:]
        if not ctx:
            raise ValueError("next_logits needs at least one token")
        self.model.forward(np.asarray(ctx, dtype=np.int32).reshape(1, -1))
        self.positions += len(ctx)
        return np.array(self.model.logits[0, len(ctx) - 1], dtype=np.float32)


class CachedDecoder(Decoder):
    """Next-token logits from the model's decode program (``Model.decode``) over its KV cache.

    The cache holds one sequence: the tokens from :attr:`start` on, at positions 0, 1, ... A call that extends
    them runs only the new tokens (in chunks of up to the build's T); any other sequence starts over. The
    window is the cache's length (the model's maxT): when the sequence outgrows it, the cache restarts from
    the last half window of tokens (one prefill, then one position per token again), so the model always
    sees between half a window and a whole one."""

    kind = "kv-cache"

    def __init__(self, model):
        super().__init__(model)
        self.window = int(model.decode_positions)
        self.chunk = int(model.config["T"])
        self.start = 0              # the index in the token sequence of the cache's position 0
        self._held: list[int] = []  # the tokens the cache holds

    def reset(self) -> None:
        self.start, self._held = 0, []

    def next_logits(self, tokens: Sequence[int]) -> np.ndarray:
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("next_logits needs at least one token")
        n = len(self._held)
        if not (len(tokens) > self.start + n and tokens[self.start:self.start + n] == self._held):
            self.reset()                            # not a continuation: start over (the window's last tokens)
            self.start, n = max(0, len(tokens) - self.window), 0
        if len(tokens) - self.start > self.window:  # the cache is full: restart from the last half window
            self._held, n = [], 0
            self.start = len(tokens) - max(1, self.window // 2)
        new = tokens[self.start + n:]
        for i in range(0, len(new), self.chunk):
            piece = new[i:i + self.chunk]
            logits = self.model.decode(np.asarray(piece, dtype=np.int32), n + i)
        self._held.extend(new)
        self.positions += len(new)
        return np.array(logits[-1], dtype=np.float32)


def make_decoder(model) -> Decoder:
    """The fastest decoder this model has: its KV-cache decode program, else the full forward pass."""
    if getattr(model, "decode_positions", 0):
        return CachedDecoder(model)
    return Decoder(model)


# --------------------------------------------------------------------------------------------
# choosing a token

def next_token(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0,
               top_k: int | None = None, top_p: float = 1.0) -> int:
    """One token id from a row of logits: greedy at temperature 0, else a draw from the softmax of
    logits / temperature restricted to the ``top_k`` likeliest tokens and then to the smallest set of them
    whose probability reaches ``top_p``. Exactly one uniform number is drawn per sampled token."""
    z = np.asarray(logits, dtype=np.float64)
    if temperature <= 0:
        return int(np.argmax(z))
    z = z / temperature
    if top_k is not None and 0 < top_k < z.size:
        cut = np.partition(z, -top_k)[-top_k]     # the k-th largest: ties with it stay in
        z = np.where(z >= cut, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = int(np.searchsorted(cum, top_p, side="left")) + 1   # the first prefix whose mass reaches top_p
        dropped = order[keep:]
        p[dropped] = 0.0
        p /= p.sum()
    c = np.cumsum(p)
    return int(min(np.searchsorted(c, rng.random() * c[-1], side="right"), z.size - 1))


def generate(decoder: Decoder, prompt: Sequence[int], n_tokens: int, rng: np.random.Generator, *,
             temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0) -> Iterator[int]:
    """Yield ``n_tokens`` tokens continuing ``prompt``, one at a time (for streaming)."""
    tokens = [int(t) for t in prompt]
    decoder.reset()
    for _ in range(n_tokens):
        nxt = next_token(decoder.next_logits(tokens), rng, temperature, top_k, top_p)
        tokens.append(nxt)
        yield nxt


# --------------------------------------------------------------------------------------------
# the command

def parse_token_ids(text: str) -> list[int]:
    """``"50256,464, 3290"`` -> [50256, 464, 3290] (commas and/or spaces)."""
    parts = [p for p in text.replace(",", " ").split() if p]
    if not parts:
        raise UsageError("--tokens: no token ids given", hint="e.g. --tokens 50256,464")
    out = []
    for p in parts:
        try:
            v = int(p)
        except ValueError:
            raise UsageError(f"--tokens: {p!r} is not a token id (a whole number)",
                             hint="give comma-separated ids, e.g. --tokens 50256,464") from None
        if v < 0:
            raise UsageError(f"--tokens: {v} is negative; token ids are >= 0")
        out.append(v)
    return out


def _tokenizer_for(vocab_size: int):
    """GPT-2's tokenizer when the model has its vocabulary (every model trained on this project's token
    files), else None: ids only."""
    from .tokenizer import N_VOCAB, get_tokenizer
    return get_tokenizer() if vocab_size == N_VOCAB else None


def prompt_tokens(args, vocab_size: int, tok) -> list[int]:
    """The prompt as token ids: ``--tokens`` as given; ``--prompt`` (default empty) after ``<|endoftext|>``,
    the document start GPT-2 and the trainer's data use."""
    if args.tokens is not None and args.prompt is not None:
        raise UsageError("--prompt and --tokens exclude each other", hint="give the prompt as text or as ids")
    if args.tokens is not None:
        ids = parse_token_ids(args.tokens)
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise UsageError(f"--tokens: id {bad[0]} is out of range for this model's vocabulary of "
                             f"{vocab_size} (ids 0 to {vocab_size - 1})")
        return ids
    if tok is None:
        raise UsageError(f"{'--prompt: ' if args.prompt else ''}this model's vocabulary has {vocab_size} tokens, "
                         f"not GPT-2's 50257, so gpt2gen has no tokenizer for it",
                         hint="give the prompt as token ids with --tokens ID,ID,...")
    return [tok.eot] + (tok.encode(args.prompt) if args.prompt else [])


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_sample(args: argparse.Namespace, out=None) -> dict:
    """``gpt2gen sample``: returns what ``--json`` prints."""
    from . import weights
    out = out if out is not None else sys.stdout
    check_bounds(args, {k: b for k, b in BOUNDS.items() if getattr(args, k, None) is not None})
    if args.tokens is not None:      # a malformed prompt is refused before the model is built
        if args.prompt is not None:
            raise UsageError("--prompt and --tokens exclude each other", hint="give the prompt as text or as ids")
        parse_token_ids(args.tokens)
    threads = apply_threads(args.threads)
    quiet = args.json
    note = (lambda msg: None) if quiet else _say
    opened = weights.open_checkpoint(args.checkpoint, model=args.model, T=args.context,
                                     B=1 if args.context is not None else None,
                                     warn=lambda m: _say(f"warning: {m}"))
    if threads is not None:
        set_threads(threads)      # the runtime loaded with the model: tell it too
    model = opened.model
    decoder = make_decoder(model)
    V = decoder.vocab_size
    tok = _tokenizer_for(V)
    prompt = prompt_tokens(args, V, tok)
    note(f"{opened.description}: {model.spec.name} ({weights.describe_config(model)}); window "
         f"{decoder.window} tokens; {threads_text()}")
    if len(prompt) > decoder.window:
        how = ("the window slides on as tokens are generated; --context sets it" if decoder.kind == "full-forward"
               else "the KV cache covers the model's maxT; when it is full it restarts from the last half window")
        note(f"note: the prompt has {len(prompt)} tokens, more than the window of {decoder.window}: the model "
             f"sees its last {decoder.window} ({how})")
    rng = np.random.default_rng(args.seed)
    stream = tok.stream_decoder() if tok is not None else None
    if not quiet:   # the prompt first (through the same decoder: it may end inside a character)
        shown = prompt[1:] if args.tokens is None else prompt    # not the <|endoftext|> put before --prompt
        out.write("".join(stream.feed(t) for t in shown) if stream is not None else " ".join(map(str, shown)))
        out.flush()
    got: list[int] = []
    t0 = time.perf_counter()
    for nxt in generate(decoder, prompt, args.n_tokens, rng, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p):
        got.append(nxt)
        if not quiet:
            out.write(stream.feed(nxt) if stream is not None else f" {nxt}")
            out.flush()
    dt = time.perf_counter() - t0
    if not quiet:
        out.write((stream.flush() if stream is not None else "") + "\n")
        out.flush()
    rate = len(got) / dt if dt > 0 else float("inf")
    result = {
        "checkpoint": str(opened.path), "kind": opened.kind, "model": model.spec.name,
        "prompt": (args.prompt or "") if args.tokens is None and tok is not None else None,
        "prompt_tokens": prompt, "tokens": got, "text": tok.decode(got) if tok is not None else None,
        "n_tokens": len(got), "seconds": round(dt, 4), "tokens_per_s": round(rate, 2),
        "window": decoder.window, "decode": decoder.kind, "threads": current_threads(),
        "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
    }
    how = (f" ({decoder.kind}: every token runs the forward pass over up to {decoder.window} positions)"
           if decoder.kind == "full-forward" else f" ({decoder.kind}: one position per token over a cache of "
                                                  f"{decoder.window})")
    note(f"{len(got)} tokens in {dt:.2f} s: {rate:.1f} tokens/s{how}")
    return result


def _cmd_sample(args: argparse.Namespace) -> int:
    result = run_sample(args)
    if args.json:
        print(json.dumps(result))
    return 0


DESCRIPTION = ("Generate text from a checkpoint (a training state, a run directory, an llm.c model file or a "
               "HuggingFace directory), printing it as it is generated and the speed in tokens/s.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a training state (or a run's directory, or `out` for the newest run), an llm.c .bin "
                        "or a HuggingFace directory")
    p.add_argument("--model", default=None, metavar="FILE",
                   help="model file (default: the one a training state records; model.yaml for llm.c; the "
                        "shipped file matching a HuggingFace config.json's model_type)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", default=None, metavar="TEXT",
                   help="text to continue, after <|endoftext|> (default: <|endoftext|> alone)")
    g.add_argument("--tokens", default=None, metavar="ID,ID,...", help="the prompt as token ids, used as given")
    p.add_argument("-n", "--n-tokens", type=BOUNDS["n_tokens"], default=64, metavar="TOKENS",
                   help="tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=BOUNDS["temperature"], default=1.0,
                   help="softmax temperature; 0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=BOUNDS["top_k"], default=None, metavar="K",
                   help="sample among the K likeliest tokens only (default: all)")
    p.add_argument("--top-p", type=BOUNDS["top_p"], default=1.0, metavar="P",
                   help="nucleus sampling: the smallest set of tokens whose probability reaches P, in (0, 1] "
                        "(default: %(default)s = all)")
    p.add_argument("--seed", type=BOUNDS["seed"], default=1337, help="random seed (default: %(default)s)")
    p.add_argument("--context", type=BOUNDS["context"], default=None, metavar="N",
                   help="the build's sequence length T (at most its maxT; default: a training state's, else "
                        "min(maxT, 256)): the KV-cache decoder's prefill chunk (its window is the model's maxT), "
                        "the full-forward decoder's window")
    add_threads_argument(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (token ids, text, tokens/s) instead of streaming text")


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sample", help="generate text from a checkpoint", description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=_cmd_sample)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import run_command
    p = argparse.ArgumentParser(prog="python -m gpt2gen.sample", description=DESCRIPTION)
    add_arguments(p)
    return run_command(_cmd_sample, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
