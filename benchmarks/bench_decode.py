"""Decode speed: ``gpt2gen sample``'s decoder against transformers' ``generate`` on the same model and threads.

One random-weight model (gpt2gen's init) is exported to a HuggingFace directory (``gpt2gen export``'s code);
each contender loads that directory in its own process (its own OpenMP runtime, ``--threads`` threads):

- ``gpt2gen``: :class:`gpt2gen.sample.CachedDecoder`, what ``gpt2gen sample`` runs (the decode program over
  the KV cache: one position per token);
- ``gpt2gen-full``: :class:`gpt2gen.sample.Decoder` (the full forward pass over the window for every token);
- ``hf-cache``: ``model.generate(..., use_cache=True)``, transformers' KV cache (its default);
- ``hf-nocache``: ``model.generate(..., use_cache=False)``, the full forward for every token.

All decode greedily from the same prompt, ``--new`` tokens each; the processes take turns ``--rounds`` times
and the report gives each one's median tokens/s and whether the greedy tokens agree.

    python benchmarks/bench_decode.py                                       # the demo preset's GPT-2
    python benchmarks/bench_decode.py --set L=12 --set C=768 --set NH=12 --set maxT=1024 --context 256 --new 128
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KINDS = ("gpt2gen", "gpt2gen-full", "hf-cache", "hf-nocache")


def worker(kind: str, directory: str, context: int, threads: int) -> int:
    import numpy as np
    prompt = [50256]
    if kind.startswith("gpt2gen"):
        import gpt2gen
        from gpt2gen.sample import CachedDecoder, Decoder, generate
        from gpt2gen.threads import set_threads
        model = gpt2gen.from_hf(directory, B=1, T=context)
        set_threads(threads)
        dec = CachedDecoder(model) if kind == "gpt2gen" else Decoder(model)

        def run(n):
            return list(generate(dec, prompt, n, np.random.default_rng(0), temperature=0))
    else:
        import torch
        import transformers
        torch.set_num_threads(threads)
        hf = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
        hf.generation_config.eos_token_id = None     # no early stop, and no suppressed end-of-text token:
        hf.generation_config.pad_token_id = 50256    # the same greedy choices as gpt2gen's, all `--new` of them
        ids = torch.tensor([prompt])
        cache = kind == "hf-cache"

        def run(n):
            with torch.no_grad():
                out = hf.generate(ids, max_new_tokens=n, do_sample=False, use_cache=cache,
                                  attention_mask=torch.ones_like(ids))
            return out[0, len(prompt):].tolist()
    run(4)    # warm up
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        n = int(cmd[1])
        t0 = time.perf_counter()
        toks = run(n)
        dt = time.perf_counter() - t0
        print(json.dumps({"s": dt, "tokens": toks}), flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="model.yaml")
    p.add_argument("--set", action="append", dest="overrides", default=[], metavar="K=V",
                   help="config overrides (default: the demo preset L=4 C=128 NH=4 maxT=64)")
    p.add_argument("--context", type=int, default=64, help="the window (build-time T)")
    p.add_argument("--new", type=int, default=63, help="tokens to generate after a 1-token prompt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker[0], args.worker[1], args.context, args.threads)

    import gpt2gen
    from gpt2gen.cli import parse_overrides
    from gpt2gen.export import save_hf
    cfg = {"L": 4, "C": 128, "NH": 4, "maxT": 64, **parse_overrides(args.overrides)}
    model = gpt2gen.build(args.model, seed=0, B=1, T=args.context, **cfg)
    # peaked logits: at the init's scale the 50257 logits are within rounding of each other, and which of two
    # near-equal tokens greedy decoding takes would depend on the order of a sum, not on the decoder
    model.params["wte"][...] *= 10.0
    kinds = args.kinds.split(",")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               GPT2GEN_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory(prefix="gpt2gen-decode-") as tmp:
        save_hf(model, Path(tmp) / "hf")
        procs = {}
        for k in kinds:
            procs[k] = subprocess.Popen([sys.executable, __file__, "--worker", k, str(Path(tmp) / "hf"), "--context",
                                         str(args.context), "--threads", str(args.threads)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            assert json.loads(procs[k].stdout.readline())["ready"]
        times = {k: [] for k in kinds}
        tokens = {}
        for _ in range(args.rounds):
            for k in kinds:       # one at a time: a change in the machine's load hits every contender alike
                procs[k].stdin.write(f"run {args.new}\n")
                procs[k].stdin.flush()
                r = json.loads(procs[k].stdout.readline())
                times[k].append(r["s"])
                tokens[k] = r["tokens"]
        for k in kinds:
            procs[k].stdin.write("quit\n")
            procs[k].stdin.close()
            procs[k].wait()
    report = {"config": {k: model.config[k] for k in ("L", "C", "NH", "V", "maxT")}, "context": args.context,
              "new_tokens": args.new, "threads": args.threads, "rounds": args.rounds,
              "tokens_per_s": {k: round(args.new / statistics.median(v), 1) for k, v in times.items()},
              "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
              "same_tokens": len({tuple(v) for v in tokens.values()}) == 1,
              "agreeing_prefix": min(next((i for i, (a, b) in enumerate(zip(v, tokens[kinds[0]])) if a != b), len(v))
                                     for v in tokens.values())}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"GPT-2 {report['config']}, 1-token prompt, {args.new} new tokens (greedy), window {args.context}, "
              f"{args.threads} threads, median of {args.rounds} rounds")
        for k in kinds:
            print(f"  {k:12s} {report['tokens_per_s'][k]:8.1f} tokens/s   ({', '.join(f'{x:.2f}' for x in times[k])} s)")
        print(f"  greedy tokens identical: {report['same_tokens']} (first {report['agreeing_prefix']} agree)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
