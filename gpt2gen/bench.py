"""``gpt2gen bench``: a training step of the generated model against PyTorch, measured honestly.

    gpt2gen bench [--model FILE] [--set K=V ...] [-b B] [-t T] [--steps N] [--rounds R] [--threads N]
                  [--no-compile] [--fused-adamw] [--json]

Each contender runs in its own process (two OpenMP runtimes in one process spin against each other):

- ``gpt2gen``: the generated model (forward, backward, AdamW);
- ``eager``: the same model as an ordinary PyTorch ``nn.Module`` (``gpt2gen.bench_torch``) with
  ``torch.optim.AdamW`` (its default CPU implementation, or ``fused=True`` with ``--fused-adamw``);
- ``compile``: that module under ``torch.compile``;
- ``sgemm``: PyTorch's sgemm (MKL) on the step's own GEMM shapes, the machine's throughput for this work.

All start from the same weights (gpt2gen's init, copied into the module) and see the same batches on the
same number of threads. The processes take turns, one at a time, ``--rounds`` times, ``--steps`` steps a
turn, so that a change in the machine's load hits every contender alike; the report gives medians and the
median of per-round ratios, which is what stays meaningful on a shared, noisy machine.

Model FLOPs per step count every GEMM of the forward and backward (6 M K N per matmul node) plus
attention's score and value products (12 B T^2 H D per attention node, the causal half not discounted,
as nanoGPT's MFU estimate does).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .checks import Bounded, UsageError, check_bounds

KINDS = ("gpt2gen", "eager", "compile", "sgemm")
# the numeric options' ranges, checked when parsed and again by run_bench (a Namespace made by hand)
BOUNDS = {"batch_size": Bounded(int, 1), "seq_len": Bounded(int, 1), "steps": Bounded(int, 1),
          "rounds": Bounded(int, 1), "warmup": Bounded(int, 0), "threads": Bounded(int, 1), "seed": Bounded(int, 0)}


# ---- what a step computes ----------------------------------------------------------------------------

def step_work(program, B: int, T: int) -> dict[str, Any]:
    """The GEMMs of one training step, as (M, K, N, count), and its model FLOPs."""
    from .program import Invoke, walk
    env = {**program.config, "B": B, "T": T}
    gemms: dict[tuple[int, int, int], int] = {}
    attn = 0
    for s, n in walk(program.forward, 1, env):
        if not isinstance(s, Invoke):
            continue
        dim = {k: int(ex.eval(env)) for k, ex in s.dims.items()}
        if s.op in ("matmul", "matmul_gelu", "classifier"):     # a GEMM, alone or fused with what follows
            key = (B * T, dim["C"], dim["OC"])
            gemms[key] = gemms.get(key, 0) + n
        elif s.op == "attention":
            attn += n * 12 * B * T * T * dim["C"]
        elif s.op == "gqa_attention":
            attn += n * 12 * B * T * T * dim["H"] * dim["D"]
    gemm_flops = sum(6 * M * K * N * c for (M, K, N), c in gemms.items())
    return {"gemms": [[M, K, N, c] for (M, K, N), c in gemms.items()], "gemm_flops": gemm_flops,
            "flops": gemm_flops + attn}


def _nodes(graph) -> list:
    from . import spec as _spec
    out = []
    for item in graph:
        out.extend(_nodes(item.body) if isinstance(item, _spec.Repeat) else [item])
    return out


def torch_traits(spec, config: dict[str, Any]) -> dict[str, Any]:
    """What the PyTorch module of ``gpt2gen.bench_torch`` must do to compute what the model file computes.
    Here, without torch, so that the command refuses a model file it has no module for before starting
    any process; a file of another family is a UsageError naming it."""
    nodes = {n.op: n for n in reversed(_nodes(spec.graph))}     # the first node of each op
    ops = {n.op for n in _nodes(spec.graph)}

    def attr(op: str, name: str, default):
        n = nodes.get(op)
        ex = n.attrs.get(name) if n else None
        return float(ex.eval(config)) if ex is not None else default

    head = next((n for n in _nodes(spec.graph) if n.op == "matmul" and spec.logits in n.outputs), None)
    if {"embedding", "layernorm", "attention", "gelu"} <= ops:
        return {"family": "gpt2", "eps": attr("layernorm", "eps", 1e-5), "head": head.inputs[1] if head else "wte"}
    if {"token_embedding", "rmsnorm", "rope", "gqa_attention"} <= ops and ops & {"swiglu", "geglu"}:
        return {"family": "llama", "eps": attr("rmsnorm", "eps", 1e-6),
                "offset": attr("rmsnorm", "weight_offset", 0.0), "scale": attr("token_embedding", "scale", 1.0),
                "theta": attr("rope", "theta", 10000.0), "window": int(attr("gqa_attention", "window", 0)),
                "act": "silu" if "swiglu" in ops else "gelu_tanh", "head": head.inputs[1] if head else "wte"}
    raise UsageError(f"{spec.path}: gpt2gen bench has a PyTorch module for GPT-2 and Llama-family model files "
                     f"(ops used here: {', '.join(sorted(ops))})",
                     hint="benchmark one of those, or add a module for this family to gpt2gen/bench_torch.py")


def cpu_features(cc: str, flags: list[str]) -> list[str]:
    """The instruction sets the generated C is compiled for (what the compiler defines with our flags)."""
    want = {"__AVX2__": "avx2", "__FMA__": "fma", "__AVX512F__": "avx512f", "__AVX512BF16__": "avx512_bf16",
            "__AVX512FP16__": "avx512_fp16", "__AMX_TILE__": "amx", "__ARM_NEON": "neon"}
    try:
        out = subprocess.run([*shlex.split(cc), *[f for f in flags if f.startswith("-m")], "-dM", "-E", "-x", "c",
                              os.devnull],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    defined = {line.split()[1] for line in out.splitlines() if line.startswith("#define ")}
    return [name for macro, name in want.items() if macro in defined]


# ---- a contender, in its own process -----------------------------------------------------------------

def _batches(V: int, B: int, T: int, seed: int, n: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, V, (B, T)).astype(np.int32), rng.integers(0, V, (B, T)).astype(np.int32))
            for _ in range(n)]


def _setup(kind: str, job: dict[str, Any]):
    """Build the contender; returns step(i) -> None."""
    B, T, seed = job["B"], job["T"], job["seed"]
    if kind == "sgemm":
        import torch
        torch.set_num_threads(job["threads"])
        mats = []
        for M, K, N, count in job["gemms"]:       # out = x @ w^T, dx = dy @ w, dw = dy^T @ x
            x, w, dy = torch.randn(M, K), torch.randn(N, K), torch.randn(M, N)
            mats.append((count, x, w, dy, torch.empty(M, N), torch.empty(M, K), torch.empty(N, K)))

        def step(i):
            for count, x, w, dy, out, dx, dw in mats:
                for _ in range(count):
                    torch.mm(x, w.t(), out=out)
                    torch.mm(dy, w, out=dx)
                    torch.mm(dy.t(), x, out=dw)
        return step
    if kind == "gpt2gen":
        import gpt2gen
        model = gpt2gen.build(job["model"], seed=seed, **job["overrides"], B=B, T=T)
        np.savez(job["weights"], **model.params)
        batches = _batches(int(model.config["V"]), B, T, seed)

        def step(i):
            idx, tg = batches[i % len(batches)]
            model.forward(idx, tg)
            model.zero_grad()
            model.backward()
            model.update(job["lr"], 0.9, 0.95, 1e-8, 0.1, i + 1)
        return step
    import torch

    from . import bench_torch
    from .builder import generate
    torch.set_num_threads(job["threads"])
    program, _ = generate(job["model"], "cpu", **job["overrides"], B=B, T=T)
    module = bench_torch.make_module(program.spec, program.config)
    with np.load(job["weights"]) as w:
        decay = module.load({k: w[k] for k in w.files})
    opt = bench_torch.adamw(module, decay, job["lr"], 0.1, fused=job["fused_adamw"])
    fn = torch.compile(module) if kind == "compile" else module
    batches = [(torch.from_numpy(a).long(), torch.from_numpy(b).long())
               for a, b in _batches(int(program.config["V"]), B, T, seed)]

    def step(i):
        idx, tg = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = fn(idx, tg)
        loss.backward()
        opt.step()
    return step


def _failure(err: Exception) -> dict[str, Any]:
    """A contender's failed setup as the parent is told it: a user error (a model too large for the
    machine, a file gpt2gen bench has no module for) in its own words, anything else with its type (a bug)."""
    from .checks import describe_error
    from .cli import user_errors
    if isinstance(err, user_errors()):
        return {"ready": False, "error": describe_error(err), "user_error": True}
    return {"ready": False, "error": f"{type(err).__name__}: {err}", "user_error": False}


def worker_main(kind: str, job_path: str) -> int:
    """A contender's process: set up, warm up, then run timed turns as the parent asks on stdin."""
    job = json.loads(Path(job_path).read_text())
    out = sys.stdout
    try:
        t0 = time.perf_counter()
        step = _setup(kind, job)
        for i in range(job["warmup"]):
            step(i)
        ready = {"ready": True, "setup_s": time.perf_counter() - t0}
        if kind in ("eager", "compile", "sgemm"):      # torch is loaded: say what it runs on
            import torch
            ready["note"] = f"torch {torch.__version__}, {torch.get_num_threads()} threads, " \
                            f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    except Exception as e:   # reported to the parent, which benchmarks the others
        print(json.dumps(_failure(e)), file=out, flush=True)
        return 1
    print(json.dumps(ready), file=out, flush=True)
    i = job["warmup"]
    for line in sys.stdin:
        if not line.startswith("run"):
            break
        n = int(line.split()[1])
        ms = []
        c0 = os.times()
        for _ in range(n):
            t = time.perf_counter()
            step(i)
            ms.append((time.perf_counter() - t) * 1e3)
            i += 1
        c1 = os.times()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({"ms": ms, "user_s": (c1.user - c0.user) / n, "sys_s": (c1.system - c0.system) / n,
                          "peak_rss": rss}), file=out, flush=True)
    return 0


class _Contender:
    def __init__(self, kind: str, job_path: Path, threads: int):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.kind = kind
        self.proc = subprocess.Popen([sys.executable, "-m", "gpt2gen.bench", "--worker", kind, str(job_path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._read()
        self.turns: list[dict[str, Any]] = []

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            return {"ready": False, "error": f"the {self.kind} process exited ({self.proc.wait()})"}
        return json.loads(line)

    def run(self, steps: int) -> dict[str, Any]:
        self.proc.stdin.write(f"run {steps}\n")
        self.proc.stdin.flush()
        turn = self._read()
        self.turns.append(turn)
        return turn

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


# ---- the report ---------------------------------------------------------------------------------------

def run_bench(args: argparse.Namespace, say=print) -> dict[str, Any]:
    from .builder import c_flags, generate, toolchain
    from .cli import parse_overrides
    from .resources import find_model
    from .spec import load

    check_bounds(args, {k: b for k, b in BOUNDS.items() if getattr(args, k) is not None})   # None: the default
    overrides = parse_overrides(args.overrides)
    model_path = find_model(args.model)
    defaults = load(model_path).resolve(overrides)          # the model file's batch maxima, unless -b / -t
    B = args.batch_size or int(defaults["B"])
    T = args.seq_len or int(defaults["T"])
    program, _ = generate(model_path, "cpu", **{**overrides, "B": B, "T": T})
    work = step_work(program, B, T)
    from .threads import threads_from_env
    threads = args.threads or threads_from_env() or len(os.sched_getaffinity(0))   # --threads, $GPT2GEN_THREADS
    kinds = [k for k in KINDS if not (k == "compile" and args.no_compile)]
    torch_traits(program.spec, program.config)   # a file with no PyTorch module: refused before any process
    cfg = program.config
    result: dict[str, Any] = {
        "model": str(model_path), "config": dict(cfg), "B": B, "T": T,
        "threads": threads, "steps_per_turn": args.steps, "rounds": args.rounds,
        "step_gflop": work["flops"] / 1e9, "cpu_features": cpu_features(toolchain()["cc"], c_flags()),
        "torch_adamw": "fused" if args.fused_adamw else "default (single-tensor loop on the CPU)",
    }
    say(f"{program.spec.name}: B={B} T={T}, {work['flops'] / 1e9:.1f} GFLOP per step, {threads} threads; "
        f"generated C built for {', '.join(result['cpu_features']) or 'baseline x86-64'}")
    with tempfile.TemporaryDirectory(prefix="gpt2gen-bench-") as tmp:
        job = {"model": str(model_path), "overrides": {k: v for k, v in overrides.items()
                                                                     if k not in ("B", "T")},
               "B": B, "T": T, "seed": args.seed, "threads": threads, "warmup": args.warmup, "lr": 1e-4,
               "weights": str(Path(tmp) / "weights.npz"), "gemms": work["gemms"], "fused_adamw": args.fused_adamw}
        job_path = Path(tmp) / "job.json"
        job_path.write_text(json.dumps(job))
        contenders: list[_Contender] = []
        try:
            for kind in kinds:       # one at a time: gpt2gen writes the weights the others load
                say(f"  starting {kind} ...")
                c = _Contender(kind, job_path, threads)
                if not c.info.get("ready"):
                    c.close()
                    if kind == "gpt2gen":   # the others load its weights: nothing to compare
                        failed = UsageError if c.info.get("user_error") else RuntimeError
                        raise failed(f"gpt2gen bench: the gpt2gen contender could not start: {c.info.get('error')}")
                    say(f"  {kind}: could not start: {c.info.get('error')}")
                    continue
                contenders.append(c)
            for r in range(args.rounds):
                for c in contenders:
                    time.sleep(0.2)          # let the previous process's OpenMP threads go idle
                    c.run(args.steps)
        finally:
            for c in contenders:
                c.close()
    result["contenders"] = {}
    med = {c.kind: [statistics.median(t["ms"]) for t in c.turns] for c in contenders}
    for c in contenders:
        all_ms = [m for t in c.turns for m in t["ms"]]
        ms = statistics.median(all_ms)
        flops = work["gemm_flops"] if c.kind == "sgemm" else work["flops"]
        row = {"ms_per_step": ms, "ms_min": min(all_ms), "gflops": flops / ms / 1e6,
               "user_s_per_step": statistics.median(t["user_s"] for t in c.turns),
               "sys_s_per_step": statistics.median(t["sys_s"] for t in c.turns),
               "peak_rss_gib": max(t["peak_rss"] for t in c.turns) / 2 ** 30, "setup_s": c.info.get("setup_s")}
        if c.kind != "sgemm":
            row["tokens_per_s"] = B * T / ms * 1e3
        if c.info.get("note"):
            row["note"] = c.info["note"]
        result["contenders"][c.kind] = row
    ours = med.get("gpt2gen")
    ratios = {}
    for kind in ("eager", "compile"):
        if kind in med:
            ratios[f"{kind}/gpt2gen"] = statistics.median(a / b for a, b in zip(med[kind], ours))
    if "sgemm" in med:
        # gpt2gen's model FLOP/s as a share of sgemm's FLOP/s on the same GEMMs, round by round
        ratios["gpt2gen share of sgemm"] = statistics.median(
            (work["flops"] / o) / (work["gemm_flops"] / s) for o, s in zip(ours, med["sgemm"]))
    result["ratios"] = ratios
    return result


def format_report(r: dict[str, Any]) -> str:
    lines = [f"{'':10s} {'ms/step':>9s} {'tokens/s':>9s} {'GFLOP/s':>8s} {'user s':>7s} {'sys s':>6s} "
             f"{'peak RSS':>9s}"]
    for kind, row in r["contenders"].items():
        tok = f"{row['tokens_per_s']:9,.0f}" if "tokens_per_s" in row else f"{'':9s}"
        lines.append(f"{kind:10s} {row['ms_per_step']:9.1f} {tok} {row['gflops']:8.1f} "
                     f"{row['user_s_per_step']:7.2f} {row['sys_s_per_step']:6.2f} {row['peak_rss_gib']:7.2f} GiB")
    lines.append("(sgemm: the step's own GEMMs alone, through PyTorch's BLAS; GFLOP/s of those GEMMs)")
    for k, v in r["ratios"].items():
        lines.append(f"{k}: {v:.2f}" + ("x (median of per-round ratios)" if "/" in k else ""))
    note = next((row["note"] for row in r["contenders"].values() if "note" in row), None)
    if note:
        lines.append(f"PyTorch: {note}; AdamW {r['torch_adamw']}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="model.yaml", help="model file (default: %(default)s)")
    p.add_argument("--set", action="append", metavar="NAME=VALUE", dest="overrides",
                   help="override a config value, e.g. --set L=4 (repeatable)")
    p.add_argument("-b", "--batch-size", type=BOUNDS["batch_size"], default=None, help="B (default: the model file's)")
    p.add_argument("-t", "--seq-len", type=BOUNDS["seq_len"], default=None, help="T (default: the model file's)")
    p.add_argument("--steps", type=BOUNDS["steps"], default=3, help="timed steps per turn (default: %(default)s)")
    p.add_argument("--rounds", type=BOUNDS["rounds"], default=5, help="turns of every contender (default: %(default)s)")
    p.add_argument("--warmup", type=BOUNDS["warmup"], default=2, help="untimed steps first (default: %(default)s)")
    p.add_argument("--threads", type=BOUNDS["threads"], default=None,
                   help="threads for every contender (default: $GPT2GEN_THREADS, else all cores)")
    p.add_argument("--seed", type=BOUNDS["seed"], default=0)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    p.add_argument("--fused-adamw", action="store_true", help="PyTorch uses AdamW(fused=True)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def cmd_bench(args: argparse.Namespace) -> int:
    """The handler of ``gpt2gen bench``; errors are reported by :func:`gpt2gen.cli.run_command`."""
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    r = run_bench(args, say)
    print(json.dumps(r, indent=1) if args.json else format_report(r))
    return 0


def add_subcommand(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="time a training step against PyTorch (eager and compiled)",
                       description="Time gpt2gen's training step against the same model as a PyTorch nn.Module, "
                                   "eager and under torch.compile, each in its own process, taking turns; "
                                   "report ms/step, tokens/s, GFLOP/s, the machine's sgemm throughput on the "
                                   "step's GEMMs, peak memory and the median of per-round ratios.")
    add_arguments(p)
    p.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1], argv[2])
    from .cli import run_command

    p = argparse.ArgumentParser(prog="python -m gpt2gen.bench", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run_command(cmd_bench, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
