"""Draw training curves from training logs: ``gpt2gen plot LOG... [-o loss.png] [--metrics loss,lr,norm,tok_s]``.

Reads the JSONL logs the trainer writes (records with ``type`` "train": step, loss, lr, norm, ms, tok_s; and
"val": step, loss) and draws one panel per metric, the panels sharing the step axis: the training loss
(optionally smoothed) as a line and the validation loss as markers, then the learning rate, the gradient
norm and the throughput (tokens/s), each log in its own colour, so several runs compare side by side.
By default every metric some log records is drawn; ``--metrics`` chooses.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from .checks import Bounded, Output, UsageError, check_outputs
from .data import DataError, check_input_file

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SMOOTHING = Bounded(float, 0, 1, hi_open=True)   # an EMA weight of 1 never moves (and divides by zero)


def _record(raw: bytes, path: Path, lineno: int) -> dict | None:
    """One log line as a JSON object (None for a blank line); a line that is not one is a DataError at
    its line."""
    try:
        line = raw.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line)") from None
    if not line:
        return None
    try:
        rec = json.loads(line)
    except (ValueError, RecursionError):   # RecursionError: brackets nested thousands deep
        raise DataError(f"{path}:{lineno}: not a JSON line") from None
    if not isinstance(rec, dict):
        raise DataError(f"{path}:{lineno}: a JSON {type(rec).__name__}, not an object: not a training log line")
    return rec


MAX_STEP = 2 ** 63 - 1   # what the plot's int64 axis holds


def _loss_point(rec: dict, path: Path, lineno: int) -> tuple[int, float]:
    """(step, loss) of a train/val record. JSON integers are unbounded, so a loss is converted under a
    check (``float(10**400)`` raises OverflowError) and a step is held to what the axis holds."""
    step, loss = rec["step"], rec["loss"]
    numeric = not isinstance(loss, bool) and isinstance(loss, (int, float))
    whole = not isinstance(step, bool) and isinstance(step, int)
    try:
        value = float(loss) if numeric else None
    except OverflowError:
        value = None
    if value is None or not whole or not 0 <= step <= MAX_STEP:
        raise DataError(f"{path}:{lineno}: a {rec['type']} record needs a whole-number step in [0, 2^63) "
                        f"and a numeric loss a float can hold, got step {_brief(step)}, loss {_brief(loss)}")
    return step, value


def _brief(value) -> str:
    """A log value in a message: a huge integer by its size, not its 400 digits."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 ** 20:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# the per-step series of a "train" record besides its loss: (log key, panel label)
SERIES = {"lr": "learning rate", "norm": "gradient norm", "tok_s": "tokens/s", "ms": "ms/step"}
METRICS = ("loss", *SERIES)
DEFAULT_METRICS = ("loss", "lr", "norm", "tok_s")   # what is drawn when the logs have it (ms is 1/tok_s)


def _series_point(rec: dict, key: str, path: Path, lineno: int) -> float | None:
    """A train record's ``key`` as a float; None when absent or null (older logs), a DataError when not a number."""
    value = rec.get(key)
    if value is None:
        return None
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError
        return float(value)
    except (TypeError, OverflowError):
        raise DataError(f"{path}:{lineno}: a train record's {key} must be a number a float can hold, got "
                        f"{_brief(value)}") from None


def read_log(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """The curves of one JSONL log: "train" and "val" losses, and the train records' "lr", "norm", "tok_s"
    and "ms"; later records for a step win (resumes)."""
    train: dict[int, float] = {}
    val: dict[int, float] = {}
    series: dict[str, dict[int, float]] = {k: {} for k in SERIES}
    path = check_input_file(path, "a training log")
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            rec = _record(raw, path, lineno)
            kind = rec.get("type") if rec else None
            if kind in ("train", "val") and "step" in rec and "loss" in rec:
                step, loss = _loss_point(rec, path, lineno)
                (train if kind == "train" else val)[step] = loss
                if kind == "train":
                    for key in SERIES:
                        value = _series_point(rec, key, path, lineno)
                        if value is not None:
                            series[key][step] = value
    return {"train": sorted(train.items()), "val": sorted(val.items()),
            **{k: sorted(v.items()) for k, v in series.items()}}


def parse_metrics(text: str | Sequence[str] | None) -> list[str] | None:
    """``"loss,lr"`` -> ["loss", "lr"]; None = the default (every metric the logs record)."""
    if text is None:
        return None
    items = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    bad = [m for m in items if m not in METRICS]
    if bad or not items:
        raise UsageError(f"--metrics {text if isinstance(text, str) else ','.join(text)!r}: "
                         + (f"unknown metric {bad[0]!r}" if bad else "no metric given"),
                         hint=f"choose from {', '.join(METRICS)} (comma-separated)")
    return list(dict.fromkeys(items))


def _labels(logs: Sequence[str | Path]) -> list[str]:
    """A legend label per log: its stem, or parent/stem where two logs share a stem."""
    stems = [Path(p).stem for p in logs]
    return [f"{Path(p).parent.name}/{s}" if stems.count(s) > 1 else s for p, s in zip(logs, stems)]


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
              smoothing: float = 0.0, title: str | None = None, logy: bool = False,
              metrics: str | Sequence[str] | None = None) -> Path:
    """Plot the curves of ``logs`` into the PNG ``output``, one panel per metric sharing the step axis
    (``metrics``: a subset of :data:`METRICS`; None: loss and each of lr, norm, tok_s that a log records);
    returns its path. ``smoothing`` applies to the per-step training loss, gradient norm and throughput."""
    why = SMOOTHING.problem(smoothing)
    if why:
        raise UsageError(f"--smooth {why}")
    chosen = parse_metrics(metrics)
    check_outputs([Output("--output", Path(output), "file", "a PNG image", PNG_SIGNATURE, "loss.png")],
                  [("LOG", log) for log in logs])
    # every log is read (and a bad one refused) before a figure exists, so an error leaks none
    curves = list(zip(_labels(logs), [read_log(log) for log in logs]))
    if not any(data["train"] or data["val"] for _, data in curves):
        raise DataError("no loss records found in " + ", ".join(str(p) for p in logs))
    if chosen is None:
        chosen = ["loss"] + [m for m in DEFAULT_METRICS[1:] if any(data[m] for _, data in curves)]
    missing = [m for m in chosen if m != "loss" and not any(data[m] for _, data in curves)]
    if missing:
        raise DataError(f"no {', '.join(SERIES[m] for m in missing)} records in "
                        + ", ".join(str(p) for p in logs) + " (train records' "
                        + ", ".join(repr(m) for m in missing) + " fields)")
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plotting needs matplotlib",
                         hint="pip install 'gpt2gen[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(chosen)
    fig, axes = plt.subplots(n, 1, sharex=True, squeeze=False, dpi=110,
                             figsize=(8, 5) if n == 1 else (8, 1.2 + 2.4 * n))
    axes = [row[0] for row in axes]
    for ax, metric in zip(axes, chosen):
        for i, (label, data) in enumerate(curves):
            color = f"C{i % 10}"
            if metric == "loss":
                if data["train"]:
                    steps, losses = zip(*data["train"])
                    ax.plot(steps, smooth(list(losses), smoothing), color=color, lw=1.2, label=f"{label} train")
                if data["val"]:
                    steps, losses = zip(*data["val"])
                    ax.plot(steps, losses, color=color, ls="--", marker="o", ms=4, label=f"{label} val")
            elif data[metric]:
                steps, values = zip(*data[metric])
                values = list(values) if metric == "lr" else smooth(list(values), smoothing)
                ax.plot(steps, values, color=color, lw=1.2, label=label)
        ax.set_ylabel("loss" if metric == "loss" else SERIES[metric])
        if metric == "loss" and logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if metric == "loss" or len(curves) > 1:
            ax.legend(fontsize="small")
    axes[-1].set_xlabel("step")
    axes[0].set_title(title or ("training loss" if chosen == ["loss"] else "training curves"))
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
    out = plot_logs(args.logs, args.output, smoothing=args.smooth, title=args.title, logy=args.logy,
                    metrics=getattr(args, "metrics", None))
    print(f"wrote {out}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("logs", nargs="+", metavar="LOG", help="JSONL logs written by the trainer")
    p.add_argument("-o", "--output", default="loss.png", help="PNG file to write")
    p.add_argument("--smooth", type=SMOOTHING, default=0.0,
                   help="exponential smoothing of the per-step curves (training loss, gradient norm, tokens/s), in [0, 1)")
    p.add_argument("--title", default=None, help="plot title")
    p.add_argument("--logy", action="store_true", help="logarithmic loss axis")
    p.add_argument("--metrics", default=None, metavar="M,M,...",
                   help=f"panels to draw, sharing the step axis, from {', '.join(METRICS)} "
                        f"(default: loss and each of {', '.join(DEFAULT_METRICS[1:])} that the logs record)")


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    """Add ``plot`` to an argparse subparsers object (handler: ``args.func(args)``)."""
    p = subparsers.add_parser("plot", help="draw loss, learning-rate, gradient-norm and throughput curves to a PNG",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=_HelpFormatter)
    add_arguments(p)
    p.set_defaults(func=_cmd_plot)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import run_command

    p = argparse.ArgumentParser(prog="python -m gpt2gen.plot", description=__doc__.split("\n\n")[0],
                                formatter_class=_HelpFormatter)
    add_arguments(p)
    return run_command(_cmd_plot, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
