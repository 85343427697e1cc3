"""Draw loss curves from training logs: ``gpt2gen plot LOG... [-o loss.png]``.

Reads the JSONL logs the trainer writes (records with ``type`` "train" and "val") and plots the
training loss (optionally smoothed) as a line and the validation loss as markers, one colour per log.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence


def read_log(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Training and validation losses of one JSONL log; later records for a step win (resumes)."""
    train: dict[int, float] = {}
    val: dict[int, float] = {}
    path = Path(path)
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: not a JSON line") from None
            kind = rec.get("type")
            if kind in ("train", "val") and "step" in rec and "loss" in rec:
                (train if kind == "train" else val)[int(rec["step"])] = float(rec["loss"])
    return {"train": sorted(train.items()), "val": sorted(val.items())}


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with bias correction (weight 0 = no smoothing)."""
    if weight <= 0:
        return list(values)
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def plot_logs(logs: Sequence[str | Path], output: str | Path = "loss.png", *,
              smoothing: float = 0.0, title: str | None = None, logy: bool = False) -> Path:
    """Plot the loss curves of ``logs`` into the PNG ``output``; returns its path."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'gpt2gen[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    drawn = 0
    for i, log in enumerate(logs):
        data = read_log(log)
        color = f"C{i % 10}"
        label = Path(log).stem
        if data["train"]:
            steps, losses = zip(*data["train"])
            ax.plot(steps, smooth(list(losses), smoothing), color=color, lw=1.2,
                    label=f"{label} train")
            drawn += 1
        if data["val"]:
            steps, losses = zip(*data["val"])
            ax.plot(steps, losses, color=color, ls="--", marker="o", ms=4, label=f"{label} val")
            drawn += 1
    if not drawn:
        plt.close(fig)
        raise ValueError("no loss records found in " + ", ".join(str(p) for p in logs))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "training loss")
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    plt.close(fig)
    return output


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def _cmd_plot(args: argparse.Namespace) -> int:
    try:
        out = plot_logs(args.logs, args.output, smoothing=args.smooth, title=args.title,
                        logy=args.logy)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"gpt2gen: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("logs", nargs="+", metavar="LOG", help="JSONL logs written by the trainer")
    p.add_argument("-o", "--output", default="loss.png", help="PNG file to write")
    p.add_argument("--smooth", type=float, default=0.0,
                   help="exponential smoothing of the training loss, in [0, 1)")
    p.add_argument("--title", default=None, help="plot title")
    p.add_argument("--logy", action="store_true", help="logarithmic loss axis")


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    """Add ``plot`` to an argparse subparsers object (handler: ``args.func(args)``)."""
    p = subparsers.add_parser("plot", help="draw loss curves from training logs to a PNG",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=_HelpFormatter)
    add_arguments(p)
    p.set_defaults(func=_cmd_plot)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt2gen.plot", description=__doc__.split("\n\n")[0],
                                formatter_class=_HelpFormatter)
    add_arguments(p)
    return _cmd_plot(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
