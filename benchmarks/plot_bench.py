"""Bar chart of `gpt2gen bench --json` results: tokens/s per contender, one group per run.

    gpt2gen bench -b 4 -t 64 --json > a.json
    gpt2gen bench -b 1 -t 1024 --json > b.json
    python benchmarks/plot_bench.py a.json b.json -o docs/performance.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", help="files written by gpt2gen bench --json")
    ap.add_argument("-o", "--out", default="bench.png")
    a = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [json.loads(Path(p).read_text()) for p in a.results]
    kinds = ["gpt2gen", "compile", "eager"]
    labels = []
    for r in runs:
        cfg = r["config"]
        name = Path(r["model"]).stem
        labels.append(f"{name} L={cfg['L']} C={cfg['C']}\nB={r['B']} T={r['T']}")
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        xs = [j + (i - 1) * width for j in range(len(runs))]
        ys = [r["contenders"].get(kind, {}).get("tokens_per_s", 0) / (r["contenders"]["gpt2gen"]["tokens_per_s"])
              for r in runs]
        label = {"gpt2gen": "gpt2gen", "compile": "PyTorch torch.compile", "eager": "PyTorch eager"}[kind]
        ax.bar(xs, ys, width, label=label)
    ax.set_xticks(range(len(runs)), labels, fontsize=8)
    ax.set_ylabel("training throughput relative to gpt2gen")
    ax.set_title(f"training step, fp32, {runs[0]['threads']} threads ({', '.join(runs[0]['cpu_features'])})",
                 fontsize=10)
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.set_ylim(0, 1.2)
    ax.legend(fontsize=8, ncol=3, loc="upper center")
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
