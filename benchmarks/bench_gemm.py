"""GEMM throughput of the generated matmul kernel against PyTorch's sgemm, on a training step's shapes.

Each side runs in its own process (its own OpenMP runtime), the two alternate ``--pairs`` times, and the
report gives each side's GFLOP/s and the median of per-pair ratios. The shapes are GPT-2 124M's matmuls at
B*T rows (qkv, attention projection, MLP up and down, the 768 x 50304 classifier): forward and both
backward products (d_inp, d_weight) of each.

    python benchmarks/bench_gemm.py                 # B*T = 256, 2 threads
    python benchmarks/bench_gemm.py --rows 1024 --pairs 5
    GPT2GEN_CFLAGS=-march=x86-64-v3 python benchmarks/bench_gemm.py   # the AVX2 kernel on an AVX-512 machine
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768), (768, 50304)]   # (C, OC) of each matmul


def side(which: str, rows: int, reps: int) -> float:
    rng = np.random.default_rng(0)
    mats = [(rng.standard_normal((rows, C), dtype=np.float32), rng.standard_normal((OC, C), dtype=np.float32),
             rng.standard_normal((rows, OC), dtype=np.float32)) for C, OC in SHAPES]
    flops = sum(6 * rows * C * OC for C, OC in SHAPES)
    if which == "gpt2gen":
        import gpt2gen.builder as b
        lib = ctypes.CDLL(str(b.kernels_library(["matmul"])))
        P = lambda a: a.ctypes.data_as(ctypes.c_void_p)   # noqa: E731
        outs = [(np.zeros((rows, OC), np.float32), np.zeros((rows, C), np.float32), np.zeros((OC, C), np.float32))
                for C, OC in SHAPES]

        def run():
            for (x, w, dy), (o, dx, dw), (C, OC) in zip(mats, outs, SHAPES):
                lib.matmul_forward(P(o), P(x), P(w), None, rows, C, OC)
                lib.matmul_backward(P(dx), P(dw), None, P(dy), P(x), P(w), rows, C, OC)
    else:
        import torch
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count())
        tm = [tuple(torch.from_numpy(a) for a in m) for m in mats]
        outs = [(torch.empty(rows, OC), torch.empty(rows, C), torch.empty(OC, C)) for C, OC in SHAPES]

        def run():
            for (x, w, dy), (o, dx, dw) in zip(tm, outs):
                torch.mm(x, w.t(), out=o)
                torch.mm(dy, w, out=dx)
                torch.mm(dy.t(), x, out=dw)
    run()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        run()
        ts.append(time.perf_counter() - t)
    return flops / statistics.median(ts) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=256, help="B*T (default: %(default)s)")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per process")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--side", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        print(json.dumps(side(a.side, a.rows, a.reps)))
        return 0
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    got = {"gpt2gen": [], "torch": []}
    for _ in range(a.pairs):
        for which in got:
            out = subprocess.run([sys.executable, __file__, "--side", which, "--rows", str(a.rows), "--reps",
                                  str(a.reps)], env=env, capture_output=True, text=True, check=True).stdout
            got[which].append(json.loads(out.strip().splitlines()[-1]))
    for which, v in got.items():
        print(f"{which:8s} GFLOP/s per run: {', '.join(f'{x:.1f}' for x in v)}")
    ratio = statistics.median(g / t for g, t in zip(got["gpt2gen"], got["torch"]))
    print(f"gpt2gen / torch sgemm: {ratio:.2f} (median of per-pair ratios), rows={a.rows}, threads={a.threads}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
