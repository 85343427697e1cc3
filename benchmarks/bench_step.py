"""Time one training step (forward, backward, AdamW) of the generated model against PyTorch, same config.

Both run in this process on the same threads, with the same weights and batch; the report gives
ms/step for each and the ratio. Example (GPT-2 124M at llm.c's default batch):

    python benchmarks/bench_step.py --set B=4 --set T=64
    python benchmarks/bench_step.py --set L=4 --set C=256 --set NH=4 --set B=8 --set T=128
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import gpt2gen  # noqa: E402
from gpt2gen.cli import parse_overrides  # noqa: E402


def timed(fn, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="model.yaml")
    ap.add_argument("--set", action="append", dest="overrides", metavar="NAME=VALUE", help="config override")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = ap.parse_args(argv)
    import torch
    from reference import adamw, gpt2_forward, params_to_torch
    if args.threads:
        torch.set_num_threads(args.threads)
    model = gpt2gen.build(args.model, **parse_overrides(args.overrides))
    B, T = model.max_batch
    rng = np.random.default_rng(0)
    idx = rng.integers(0, model.config["V"], (B, T)).astype(np.int32)
    tg = rng.integers(0, model.config["V"], (B, T)).astype(np.int32)

    def ours():
        model.forward(idx, tg)
        model.zero_grad()
        model.backward()
        model.update(1e-4, 0.9, 0.95, 1e-8, 0.1)

    p = params_to_torch(model.params)
    opt = adamw(p, {t.name: t.decay for t in model.spec.of_kind("param")}, 1e-4, (0.9, 0.95), 1e-8, 0.1)

    def theirs():
        opt.zero_grad(set_to_none=False)
        _, loss = gpt2_forward(p, idx, model.config, tg)
        loss.backward()
        opt.step()

    phases = {}
    for name, fn in (("forward", lambda: model.forward(idx, tg)), ("backward", model.backward)):
        fn()
        phases[name] = statistics.median(timed(fn, args.steps))
    ours(), theirs()
    a, b = timed(ours, args.steps), timed(theirs, args.steps)
    ma, mb = statistics.median(a), statistics.median(b)
    cfg = ", ".join(f"{k}={model.config[k]}" for k in ("L", "C", "NH", "V", "B", "T") if k in model.config)
    print(f"{model.spec.name} ({cfg}), {model.num_parameters:,} parameters, torch threads {torch.get_num_threads()}")
    print(f"  gpt2gen: {ma:9.1f} ms/step  (forward {phases['forward']:.1f} ms, backward {phases['backward']:.1f} ms)")
    print(f"  pytorch: {mb:9.1f} ms/step")
    print(f"  ratio (pytorch / gpt2gen): {mb / ma:.2f}x  ({B * T / ma * 1e3:,.0f} tokens/s for gpt2gen)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
