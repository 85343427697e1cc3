"""How the OpenMP thread count and contention for the cores change the speed of a training step.

Runs the demo preset's training step (GPT-2 L=4 C=128, B=8 T=64: forward, backward, AdamW) in worker
processes, in scenarios: one process alone at each thread count, then two processes at once (two jobs
sharing the machine) with every thread count, and with ``OMP_WAIT_POLICY=passive`` (threads that wait sleep
instead of spinning). Threads are set with ``GPT2GEN_THREADS``, as a user would. Each process reports its
median ms/step.

    python benchmarks/bench_threads.py [--steps 20] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def worker(steps: int) -> int:
    import numpy as np

    import gpt2gen
    from gpt2gen.threads import apply_threads, current_threads
    apply_threads(None)
    m = gpt2gen.build("model.yaml", seed=0, L=4, C=128, NH=4, maxT=64, B=8, T=64)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 50257, (8, 64)).astype(np.int32)
    y = rng.integers(0, 50257, (8, 64)).astype(np.int32)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        m.zero_grad()
        m.forward(x, y)
        m.backward()
        m.update(1e-4, step=i + 1)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"ms": 1e3 * statistics.median(times[2:]), "threads": current_threads()}), flush=True)
    return 0


def scenario(procs: list[dict], steps: int) -> list[float]:
    ps = [subprocess.Popen([sys.executable, __file__, "--worker", "--steps", str(steps)], stdout=subprocess.PIPE,
                           text=True, env={**os.environ, **env}) for env in procs]
    return [round(json.loads(p.communicate()[0])["ms"], 1) for p in ps]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.steps)
    scenario([{"GPT2GEN_THREADS": "1"}], 1)      # build (and cache) the model once
    cases = [
        ("alone, 1 thread", [{"GPT2GEN_THREADS": "1"}]),
        ("alone, 2 threads", [{"GPT2GEN_THREADS": "2"}]),
        ("two jobs, 1 thread each", [{"GPT2GEN_THREADS": "1"}] * 2),
        ("two jobs, 2 threads each", [{"GPT2GEN_THREADS": "2"}] * 2),
        ("two jobs, 2 threads each, OMP_WAIT_POLICY=passive", [{"GPT2GEN_THREADS": "2", "OMP_WAIT_POLICY": "passive"}] * 2),
    ]
    out = {}
    for name, procs in cases:
        load = os.getloadavg()[0]
        out[name] = {"ms_per_step": scenario(procs, args.steps), "load_before": round(load, 2)}
        if not args.json:
            print(f"{name:52s} ms/step {', '.join(map(str, out[name]['ms_per_step']))}   (load average before: {load:.2f})",
                  flush=True)
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
