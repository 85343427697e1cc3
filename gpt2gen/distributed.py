"""Data-parallel training on torch.distributed: ``torchrun --nproc_per_node=N -m gpt2gen.train ...``.

The trainer asks this module for a *context* (:func:`setup`). Outside torchrun (no ``RANK`` /
``WORLD_SIZE`` in the environment) that is :class:`Single`, whose every method is what the one-process
trainer always did, so a plain run is unchanged bit for bit. Under torchrun with more than one process
it is :class:`DataParallel`, which joins the process group torchrun's rendezvous set up and does, per
optimiser step:

* **data**: every rank reads only its own rows of a *global* batch of ``world * B`` windows
  (:class:`ShardedLoader`). Global batch k is exactly what a one-process loader with batch
  ``world * B`` serves as batch k, so no two ranks see the same window in an epoch and N ranks at B
  train on the same tokens as one process at N*B.
* **gradients**: summed across ranks straight in the gradient arena -- ``torch.from_numpy`` over
  slices of the arena's numpy array (DLPack for arenas that live on a device), no copy -- in
  contiguous buckets of ``--bucket-mb`` issued back to back as asynchronous collectives. The
  generated backward is one C call with no per-layer hook, so communication does not overlap the
  backward's compute; it overlaps itself (gloo runs several buckets at once) and the norm of the
  buckets already reduced.
* **ZeRO stage 1** (``--zero 1``): rank r owns one contiguous shard of the parameter arena and keeps
  AdamW's m and v for that shard only (:class:`ZeroAdamW`). Each gradient bucket is reduced to its
  owner (a reduce-scatter done as one in-place ``reduce`` per bucket; on gloo this measured 3x
  faster than ``reduce_scatter_tensor``), the owner updates its shard, and every updated bucket is
  broadcast from its owner (an in-place all-gather) as soon as it is done, while the owner updates
  the next one.
* **clipping** uses the global norm: each rank sums the squares of its shard of the reduced
  gradient in float64 and one all-reduce adds them up.
* **only rank 0** logs, samples, writes checkpoints and exports; validation is sharded like training
  and its mean all-reduced. A checkpoint holds the full m and v (gathered onto rank 0 with ZeRO), so
  a state is the same file whatever ``--zero`` was; resuming needs the same world size (the data
  order is a function of it) and is refused otherwise.

Failures are torch.distributed's: the process group has a timeout (``--dist-timeout``), a collective
that fails or times out raises :class:`DistributedError` (a :class:`~gpt2gen.checks.UsageError`: one
message, exit status 2), and nothing is saved after it, so the newest checkpoint stays the last good
one. docs/distributed.md is the user's guide.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import datetime
import json
import math
import mmap
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .checks import Bounded, UsageError
from .data import DataFormatError, DataLoader, DataError

# what torchrun (torch.distributed.run) puts in every worker's environment
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_HINT = ("launch the trainer with torchrun, which sets all of them: torchrun --nproc_per_node=N -m "
               "gpt2gen.train ... (docs/distributed.md); or unset them to train in one process")
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_BUCKET_MB = 8.0
ALIGN = 16                      # floats: shard boundaries stay on the arenas' 64-byte alignment
UPDATE_CHUNK = 1 << 20          # floats per step of the sharded AdamW (bounds its scratch memory)


class DistributedError(UsageError):
    """A collective of a data-parallel run failed: another rank died or was killed, the network broke,
    or a rank did not reach the collective within the timeout. Nothing is saved after it."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data-parallel training (under torchrun; docs/distributed.md)")
    g.add_argument("--zero", type=int, choices=[0, 1], default=0,
                   help="1 = ZeRO stage 1: shard the optimizer state (AdamW's moments, master weights) across the "
                        "ranks: optimizer memory / N")
    g.add_argument("--dist-backend", choices=["auto", "gloo", "nccl"], default="auto",
                   help="torch.distributed backend (auto: gloo for the cpu target, nccl for a GPU target)")
    g.add_argument("--dist-timeout", type=Bounded(float, 0, lo_open=True), default=DEFAULT_TIMEOUT_S,
                   metavar="SECONDS", help="a rank that waits this long in a collective gives up with an "
                                           "error (a dead or hung peer never hangs the job)")
    g.add_argument("--bucket-mb", type=Bounded(float, 0, lo_open=True), default=DEFAULT_BUCKET_MB,
                   metavar="MB", help="gradient bucket size of the all-reduce (MiB)")


# --------------------------------------------------------------------------------------------
# the launch environment

@dataclass(frozen=True)
class Launch:
    rank: int
    world: int
    local_rank: int


def launch_from_env(environ=os.environ) -> Launch | None:
    """The rank, world size and local rank torchrun set, or None outside torchrun. A partial or invalid
    set of variables is a UsageError naming them (a run that silently trained alone would be wrong)."""
    present = {k: environ[k] for k in LAUNCH_ENV if environ.get(k, "") != ""}
    if not present:
        return None
    if set(present) == {"LOCAL_RANK"}:      # a stray LOCAL_RANK alone launches nothing
        return None
    missing = [k for k in LAUNCH_ENV if k not in present]
    world_text = present.get("WORLD_SIZE")
    if missing and world_text == "1" and set(missing) <= {"MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"}:
        return None                         # one process: nothing to rendezvous with
    if missing:
        given = ", ".join(f"{k}={v}" for k, v in present.items())
        raise UsageError(f"the torch.distributed environment is incomplete: {given} "
                         f"{'is' if len(present) == 1 else 'are'} set but {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not", hint=LAUNCH_HINT)
    nums = {}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        try:
            nums[k] = int(present[k])
        except ValueError:
            raise UsageError(f"the torch.distributed environment has {k}={present[k]!r}, which is not a "
                             f"whole number", hint=LAUNCH_HINT) from None
    if nums["WORLD_SIZE"] < 1 or not 0 <= nums["RANK"] < nums["WORLD_SIZE"] or nums["LOCAL_RANK"] < 0:
        raise UsageError(f"the torch.distributed environment is inconsistent: RANK={nums['RANK']}, "
                         f"WORLD_SIZE={nums['WORLD_SIZE']}, LOCAL_RANK={nums['LOCAL_RANK']} (need "
                         f"0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0)", hint=LAUNCH_HINT)
    if nums["WORLD_SIZE"] == 1:
        return None
    return Launch(nums["RANK"], nums["WORLD_SIZE"], nums["LOCAL_RANK"])


def setup(args: argparse.Namespace, environ=os.environ) -> "Single | DataParallel":
    """The trainer's context: :class:`Single` outside torchrun, else :class:`DataParallel` (which joins
    the process group; :meth:`DataParallel.close` leaves it)."""
    launch = launch_from_env(environ)
    if launch is None:
        return Single(zero=getattr(args, "zero", 0))
    return DataParallel(launch, args)


# --------------------------------------------------------------------------------------------
# how the arenas are cut

def shard_bounds(n: int, world: int, align: int = ALIGN) -> list[int]:
    """``world + 1`` offsets cutting ``n`` floats into contiguous shards of nearly equal size, each
    boundary a multiple of ``align`` (rank r owns ``[b[r], b[r+1])``)."""
    bounds = [min(n, (r * n // world) // align * align) for r in range(world)] + [n]
    bounds[0] = 0
    return bounds


def buckets(n: int, cap: int, cuts: list[int] | None = None) -> list[tuple[int, int]]:
    """Contiguous ``[lo, hi)`` ranges covering ``n`` floats, each at most ``cap`` long and none crossing
    one of ``cuts`` (the shard boundaries)."""
    cap = max(ALIGN, cap // ALIGN * ALIGN)
    edges = sorted({0, n, *(c for c in (cuts or []) if 0 < c < n)})
    out: list[tuple[int, int]] = []
    for a, b in zip(edges, edges[1:]):
        out += [(lo, min(b, lo + cap)) for lo in range(a, b, cap)]
    return out


def zero_shard_floats(n: int, world: int, zero: int) -> int:
    """The largest number of floats of m (and of v) one rank holds."""
    if zero == 0 or world == 1:
        return n
    b = shard_bounds(n, world)
    return max(b[r + 1] - b[r] for r in range(world))


def memory_report(layout, world: int, zero: int) -> str:
    """Per-rank memory of a data-parallel run, for ``gpt2gen layout --world N --zero Z``."""
    n = layout.params.size
    item = getattr(layout.params, "itemsize", 4)          # 2 for 16-bit parameters and gradients
    prec = getattr(layout, "precision", None)
    master = bool(getattr(prec, "master", False))
    mib = lambda nbytes: f"{nbytes / 2**20:,.1f} MiB"
    sharded = bool(zero and world > 1)
    shard = zero_shard_floats(n, world, zero)
    part = f", 1/{world} shard" if sharded else ""
    lines = [f"data-parallel training over {world} rank(s)"
             + (", ZeRO stage 1 (optimizer state sharded)" if sharded else
                (", ZeRO stage 1 (one rank: nothing to shard)" if zero else ", no ZeRO")) + ": memory per rank"]
    rows = [("params", n * item, "full copy on every rank"),
            ("grads", n * item, "full; each bucket reduced to its owner" if sharded else "full; all-reduced")]
    if master:
        rows.append(("master", 4 * shard, "fp32 master weights" + part))
    rows += [("m", 4 * shard, "AdamW first moment" + part), ("v", 4 * shard, "AdamW second moment" + part),
             ("acts", layout.acts.nbytes, "activations at the build-time B x T"),
             ("dacts", layout.dacts.nbytes, "activation gradients")]
    for name, nbytes, note in rows:
        lines.append(f"  {name:<6} {mib(nbytes):>14}  {note}")
    lines.append(f"  {'total':<6} {mib(sum(b for _, b, _ in rows)):>14}")
    k = 3 if master else 2
    opt, full = k * 4 * shard, k * 4 * n
    what = "m + v + master" if master else "m + v"
    lines.append(f"optimizer state ({what}) per rank: {mib(opt)}"
                 + (f", {full / opt:.2f}x less than without ZeRO ({mib(full)})" if opt < full else
                    f" (with --zero 1 over {max(world, 2)} ranks: "
                    f"{mib(k * 4 * zero_shard_floats(n, max(world, 2), 1))})"))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the data

class ShardedLoader(DataLoader):
    """Rank ``rank``'s rows of a global batch of ``world * B`` windows.

    Global batch k (its windows, epochs and shuffling) is exactly what ``DataLoader(source, world * B,
    T)`` serves as batch k; this rank gets its rows ``[rank * B, (rank + 1) * B)``, reading only those
    tokens. ``position`` counts global batches, so the state is the same on every rank and resumes any
    of them.
    """

    def __init__(self, source, B: int, T: int, *, rank: int, world: int, shuffle: bool = False,
                 seed: int = 0, vocab_size: int | None = None):
        try:
            super().__init__(source, B * world, T, shuffle=shuffle, seed=seed, vocab_size=vocab_size)
        except DataFormatError as e:
            if "too few for one batch" not in str(e):
                raise
            raise DataFormatError(f"{e} -- one global batch is {world} ranks x B={B}") from None
        self.local_B, self.rank, self.world = B, rank, world

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        B, T = self.local_B, self.T
        first = self.position * self.B + self.rank * B       # self.B is the global batch
        order = self._order()
        if order is None:
            buf = np.asarray(self.tokens[first * T:first * T + B * T + 1], dtype=np.int32)
            x, y = buf[:-1].reshape(B, T), buf[1:].reshape(B, T)
        else:
            rows = np.stack([np.asarray(self.tokens[i * T:i * T + T + 1], dtype=np.int32)
                             for i in order[first:first + B]])
            x, y = rows[:, :-1], rows[:, 1:]
        self.position += 1
        return np.ascontiguousarray(x), np.ascontiguousarray(y)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "world_size": self.world}

    def load_state_dict(self, state: dict) -> None:
        if state.get("world_size", 1) != self.world:
            raise DataError(f"data loader state of a run over {state.get('world_size', 1)} process(es); "
                            f"this one has {self.world}")
        super().load_state_dict(state)


# --------------------------------------------------------------------------------------------
# one process

class Single:
    """The context of a one-process run: every method is what the trainer did before data parallelism."""

    rank = 0
    local_rank = 0
    world = 1
    is_main = True
    can_save_alone = True
    stop_agreed = False

    def __init__(self, zero: int = 0):
        self.zero = zero
        self.checkpoint_dir: Path | None = None

    def describe(self) -> str | None:
        return "--zero 1 has no effect in one process (nothing to shard)" if self.zero else None

    def check_resume(self, path, extra: dict) -> None:
        _check_world(path, extra, 1)

    def state_extra(self) -> dict:
        return {}

    def loader(self, source, B: int, T: int, **kw) -> DataLoader:
        return DataLoader(source, B, T, **kw)

    def barrier(self, what: str = "") -> None:
        pass

    def from_main(self, value):
        return value

    def prepare(self, model, args=None) -> None:
        pass

    def summary(self) -> dict:
        return {}

    def should_stop(self, requested: bool) -> bool:
        return requested

    def reduce_gradients(self, model, loss: float, grad_accum: int) -> tuple[float, float]:
        """The mean loss and the norm of the mean gradient (a loss-scaled model's gradients are unscaled here)."""
        from .train import grad_norm
        return loss, grad_norm(model.arenas["grads"]) / (grad_accum * model.loss_scale)

    def update(self, model, *args, **kwargs) -> bool:
        """The AdamW step; False when a loss-scaled model skipped it (its gradients overflowed)."""
        return model.update(*args, **kwargs)

    def mean(self, value: float) -> float:
        return value

    def consolidate(self, model, alone: bool = False):
        return model

    def close(self) -> None:
        pass


def _check_world(path, extra: dict, world: int) -> None:
    saved = extra.get("world_size", 1)
    if saved != world:
        launch = (f"torchrun --nproc_per_node={saved} -m gpt2gen.train --resume {path}" if saved > 1 else
                  f"python -m gpt2gen.train --resume {path} (one process, no torchrun)")
        raise UsageError(f"--resume {path}: the state was saved by a run over {saved} process(es), this run "
                         f"has {world}; the order of the training data is a function of the number of "
                         f"processes, so only the same number resumes it exactly",
                         hint=f"resume with {saved} process(es) in all, e.g. {launch} (over several machines: "
                              f"--nnodes x --nproc_per_node = {saved})")


# --------------------------------------------------------------------------------------------
# several processes

def _tensor(array):
    """A torch tensor sharing ``array``'s memory: numpy on the CPU, DLPack for a device arena."""
    import torch
    if isinstance(array, np.ndarray):
        if array.dtype.name == "bfloat16":     # ml_dtypes' bfloat16, which torch.from_numpy does not know
            return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
        return torch.from_numpy(array)
    if isinstance(array, torch.Tensor):
        return array
    return torch.from_dlpack(array)


def _sumsq(t) -> float:
    """Sum of squares of a flat float tensor in float64 (numpy's dot on the CPU, as grad_norm does)."""
    if t.device.type == "cpu" and t.dtype == _torch().float32:
        a = t.numpy()
        total = 0.0
        for i in range(0, a.size, 1 << 22):
            g = a[i:i + (1 << 22)].astype(np.float64)
            total += float(np.dot(g, g))
        return total
    return float(t.double().square().sum().item())


def _torch():
    import torch
    return torch


_MADV_DONTNEED = 4


def release_pages(a: np.ndarray) -> None:
    """Give the memory pages of ``a`` back to the system (Linux madvise(MADV_DONTNEED)); they read as zeros
    afterwards. Used on the model's full m and v arenas, which ZeRO-1 never uses."""
    page = mmap.PAGESIZE
    start = -(-a.ctypes.data // page) * page
    end = (a.ctypes.data + a.nbytes) // page * page
    if end <= start or not sys.platform.startswith("linux"):
        a[...] = 0
        return
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        a[...] = 0
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if madvise(start, end - start, _MADV_DONTNEED) != 0:
        a[...] = 0
        return
    head = (start - a.ctypes.data) // a.itemsize          # the partial pages at the ends stay mapped
    a.reshape(-1)[:head] = 0
    a.reshape(-1)[(end - a.ctypes.data) // a.itemsize:] = 0


def _first_sentence(err: BaseException) -> str:
    """What a torch.distributed error says, without its C++ source location and boilerplate advice."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", text)
    return re.split(r"(?<=[^.\s])\.\s+(?=[A-Z])", text, maxsplit=1)[0].rstrip(".")


def _exit_without_teardown() -> None:
    """At exit after a failed collective: end the process without destroying the broken process group.

    Its collectives may still be in flight on gloo's threads (waiting for a peer that is gone), and tearing
    it down then aborts the process ("terminate called without an active exception") or blocks. The error
    has been reported by then; the exit status is that of a user error (gpt2gen.cli.EXIT_USER_ERROR)."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(2)


def _f32(x: float) -> float:
    return float(np.float32(x))


class ZeroAdamW:
    """AdamW over one contiguous shard ``[lo, hi)`` of the parameter arena, holding the optimizer state --
    m, v, and for 16-bit parameters the fp32 master weights -- for that shard only (``state``).

    The generated ``adamw_update``'s arithmetic (templates/c/optim/adamw.c.j2, the same float32 constants),
    applied per tensor with the tensor's own weight-decay flag; floats of alignment padding between tensors
    are skipped as the generated update skips them. fp32 parameters go through torch's fused AdamW kernel
    (the same formula in another order, see :meth:`_fused_step`); otherwise elementwise torch ops in the
    generated kernel's order. With master weights the update runs on them and the parameters are their
    rounding to the storage dtype.
    """

    def __init__(self, slots, lo: int, hi: int, device=None, master: bool = False, fused: bool | None = None):
        import torch
        self.lo, self.hi = lo, hi
        # torch's fused AdamW kernel where this PyTorch has it (CPU since 2.4), else plain elementwise ops
        self.fused = hasattr(torch, "_fused_adamw_") if fused is None else fused
        n = hi - lo
        names = ("m", "v", "master") if master else ("m", "v")
        self.state = {k: torch.zeros(n, dtype=torch.float32, device=device) for k in names}
        self.segments = [(max(lo, s.offset), min(hi, s.offset + s.numel), bool(s.decay)) for s in slots
                         if max(lo, s.offset) < min(hi, s.offset + s.numel)]
        chunk = min(UPDATE_CHUNK, max([b - a for a, b, _ in self.segments] or [1]))
        self._tmp = torch.empty((2, chunk), dtype=torch.float32, device=device)

    @property
    def m(self):
        return self.state["m"]

    @property
    def v(self):
        return self.state["v"]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())

    def pieces(self, lo: int, hi: int) -> Iterator[tuple[int, int, bool]]:
        """The segments (tensor parts) inside ``[lo, hi)``, cut to at most UPDATE_CHUNK floats."""
        for a, b, decay in self.segments:
            a, b = max(a, lo), min(b, hi)
            for c in range(a, b, UPDATE_CHUNK):
                yield c, min(b, c + UPDATE_CHUNK), decay

    def step(self, params, grads, lo: int, hi: int, lr: float, beta1: float, beta2: float, eps: float,
             weight_decay: float, step: int, grad_scale: float) -> None:
        """Update the parameters of ``[lo, hi)`` (inside this shard) from the reduced gradients there (which
        it scales in place)."""
        import torch
        b1, b2 = _f32(beta1), _f32(beta2)
        one_b1 = float(np.float32(1.0) - np.float32(beta1))
        one_b2 = float(np.float32(1.0) - np.float32(beta2))
        bc1 = _f32(1.0 - b1 ** step)
        bc2 = _f32(1.0 - b2 ** step)
        lr, eps, scale, wd = _f32(lr), _f32(eps), _f32(grad_scale), _f32(weight_decay)
        master = self.state.get("master")
        if self.fused and master is None and params.dtype == grads.dtype == torch.float32:
            self._fused_step(params, grads, lo, hi, lr, b1, b2, eps, wd, step, scale)
            return
        for a, b, decay in self.pieces(lo, hi):
            n, at = b - a, slice(a - self.lo, b - self.lo)
            p, g = params[a:b], grads[a:b]
            w = master[at] if master is not None else p        # the weights the update runs on (fp32)
            m, v = self.m[at], self.v[at]
            grad, den = self._tmp[0, :n], self._tmp[1, :n]
            grad.copy_(g).mul_(scale)                            # as the kernel: float(g) * grad_scale
            m.mul_(b1).add_(grad, alpha=one_b1)
            v.mul_(b2).addcmul_(grad, grad, value=one_b2)
            torch.div(v, bc2, out=den).sqrt_().add_(eps)
            torch.div(m, bc1, out=grad).div_(den)
            if decay and wd:
                grad.add_(w, alpha=wd)
            w.sub_(grad, alpha=lr)
            if master is not None:
                p.copy_(w)                                       # rounded to the storage dtype (nearest even)

    def _fused_step(self, params, grads, lo, hi, lr, b1, b2, eps, wd, step, scale) -> None:
        """The same update through torch's fused AdamW kernel (one pass over memory instead of nine; about 10x
        faster on the CPU here). Its formula is the generated kernel's written in another order -- weight decay
        first, the bias corrections folded into the step size -- so the two agree to rounding."""
        import torch
        groups: dict[bool, tuple[list, list, list, list]] = {True: ([], [], [], []), False: ([], [], [], [])}
        for a, b, decay in self.pieces(lo, hi):
            at = slice(a - self.lo, b - self.lo)
            g = grads[a:b]
            if scale != 1.0:
                g.mul_(scale)                                    # as the kernel: g * grad_scale, rounded once
            for lst, t in zip(groups[decay], (params[a:b], g, self.m[at], self.v[at])):
                lst.append(t)
        steps = torch.full((), float(step), dtype=torch.float32, device=self.m.device)
        for decay, (ps, gs, ms, vs) in groups.items():
            if ps:
                torch._fused_adamw_(ps, gs, ms, vs, [], [steps] * len(ps), lr=lr, beta1=b1, beta2=b2,
                                    weight_decay=wd if decay else 0.0, eps=eps, amsgrad=False, maximize=False)


class _Consolidated:
    """A model whose sharded arenas (m, v, master) are the full ones gathered on rank 0 (what save_state reads)."""

    def __init__(self, model, full: dict[str, np.ndarray]):
        self._model = model
        self.arenas = {**model.arenas, **full}

    def __getattr__(self, name):
        return getattr(self._model, name)


class DataParallel:
    """The context of one rank of a data-parallel run (see the module docstring)."""

    stop_agreed = False

    def __init__(self, launch: Launch, args: argparse.Namespace):
        try:
            import torch
            import torch.distributed as dist
        except ImportError:
            raise UsageError("data-parallel training needs PyTorch (torch.distributed), which is not installed",
                             hint="pip install torch") from None
        if not dist.is_available():
            raise UsageError("this PyTorch was built without torch.distributed", hint="install a PyTorch "
                             "build with distributed support (the pip wheels have it)")
        self.torch, self.dist = torch, dist
        self.rank, self.world, self.local_rank = launch.rank, launch.world, launch.local_rank
        self.is_main = self.rank == 0
        self.zero = int(getattr(args, "zero", 0))
        self.timeout_s = float(getattr(args, "dist_timeout", DEFAULT_TIMEOUT_S))
        self.bucket_floats = int(float(getattr(args, "bucket_mb", DEFAULT_BUCKET_MB)) * 2**20 / 4)
        self.checkpoint_dir: Path | None = None
        self.broken = False
        self._owned = False
        target = str(getattr(args, "target", "cpu"))
        backend = getattr(args, "dist_backend", "auto")
        if backend == "auto":
            backend = "gloo" if target == "cpu" else "nccl"
        if backend == "nccl":
            if target == "cpu":
                raise UsageError("--dist-backend nccl: the cpu target's arenas are host memory, and NCCL "
                                 "reduces GPU memory only", hint="use --dist-backend gloo (the default for "
                                 "--target cpu), or a GPU target")
            if not (dist.is_nccl_available() and torch.cuda.is_available()):
                raise UsageError("--dist-backend nccl: this PyTorch has no NCCL or sees no GPU",
                                 hint="use --dist-backend gloo, or a CUDA build of PyTorch on a GPU machine")
            torch.cuda.set_device(self.local_rank)
        self.backend = backend
        # where the small tensors of the collectives (loss, norm, flags) live: NCCL reduces GPU memory only
        self.device = torch.device("cuda", self.local_rank) if backend == "nccl" else torch.device("cpu")
        # a rank waiting in a collective also runs the generated code's OpenMP threads: keep torch's own
        # pool (used by the ZeRO update) to the same size so that the two do not oversubscribe the cores
        threads = os.environ.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and int(threads) > 0:
            torch.set_num_threads(int(threads))
        if dist.is_initialized():
            if dist.get_world_size() != self.world or dist.get_rank() != self.rank:
                raise UsageError(f"a process group of {dist.get_world_size()} ranks is already set up, but the "
                                 f"environment says rank {self.rank} of {self.world}", hint=LAUNCH_HINT)
        else:
            try:
                dist.init_process_group(backend, timeout=datetime.timedelta(seconds=self.timeout_s))
            except (RuntimeError, TimeoutError, ConnectionError) as e:
                raise DistributedError(
                    f"rank {self.rank} of {self.world}: could not join the process group ({backend}, MASTER_ADDR="
                    f"{os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')}): "
                    f"{_first_sentence(e)}",
                    hint=f"every process must reach MASTER_ADDR:MASTER_PORT (torchrun's --rdzv-endpoint or "
                         f"--master-addr/--master-port) and start within --dist-timeout {self.timeout_s:g} s; "
                         f"on one machine, torchrun --standalone picks a free port") from None
            self._owned = True
        self.model = None
        self.opt: ZeroAdamW | None = None

    # ---- errors ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _guard(self, what: str):
        """Turn a failed or timed-out collective into one DistributedError that says what to do."""
        try:
            yield
        except DistributedError:
            raise
        except (RuntimeError, TimeoutError, ConnectionError) as e:   # torch's DistError is a RuntimeError
            if not self.broken:
                self.broken = True
                atexit.register(_exit_without_teardown)
            kept = (f"; the newest training state in {self.checkpoint_dir} is intact (nothing was saved after "
                    f"the failure)" if self.checkpoint_dir is not None else "")
            raise DistributedError(
                f"rank {self.rank} of {self.world}: {what} failed: {_first_sentence(e)}. Another process of this "
                f"run has probably failed or been killed (its own error comes first), or did not reach this "
                f"point within --dist-timeout {self.timeout_s:g} s{kept}",
                hint=f"resume from the newest state with the same number of processes ({self.world}): torchrun "
                     f"... -m gpt2gen.train --resume {self.checkpoint_dir or 'CHECKPOINT_DIR'}") from None

    def _wait(self, works, what: str) -> None:
        with self._guard(what):
            for w in works:
                w.wait()

    # ---- set-up ---------------------------------------------------------------------------------------------
    def describe(self) -> str:
        return (f"data-parallel over {self.world} processes ({self.backend}); this is rank {self.rank}"
                + (", ZeRO stage 1" if self.zero else "") + f"; timeout {self.timeout_s:g} s")

    def check_resume(self, path, extra: dict) -> None:
        _check_world(path, extra, self.world)

    def state_extra(self) -> dict:
        return {"world_size": self.world, "zero": self.zero}

    def loader(self, source, B: int, T: int, **kw) -> ShardedLoader:
        return ShardedLoader(source, B, T, rank=self.rank, world=self.world, **kw)

    def barrier(self, what: str = "waiting for the other ranks") -> None:
        with self._guard(what):
            self.dist.barrier()

    def from_main(self, value):
        """Rank 0's ``value`` on every rank (e.g. a run name made from the clock)."""
        box = [value]
        with self._guard("agreeing on the run's name"):
            self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def _fingerprint(self, model, args) -> dict:
        from .train import HPARAMS
        settings = {k: getattr(args, k) for k in HPARAMS if args is not None and hasattr(args, k)}
        settings["zero"] = self.zero
        return {"config": {k: float(v) for k, v in model.config.items()},
                "params": int(model.arenas["params"].size), "settings": json.loads(json.dumps(settings, default=str))}

    def prepare(self, model, args=None) -> None:
        """Before the first step: check that every rank built the same model with the same settings, give
        every rank rank 0's weights, and (ZeRO) keep this rank's shard of m and v, freeing the full ones."""
        mine = self._fingerprint(model, args)
        theirs: list = [None] * self.world
        with self._guard("comparing the ranks' settings"):
            self.dist.all_gather_object(theirs, mine)
        for r, other in enumerate(theirs):
            if other != mine:
                keys = sorted(k for part in ("config", "settings") for k in set(mine[part]) | set(other[part])
                              if mine[part].get(k) != other[part].get(k)) or ["the parameter count"]
                raise UsageError(f"rank {self.rank} and rank {r} were started with different settings: "
                                 f"{', '.join(keys)}", hint="every process of a run must get the same "
                                 "command line (and, resuming, the same state file)")
        self.model = model
        self._params = _tensor(model.arenas["params"])
        self._grads = _tensor(model.arenas["grads"])
        if self.backend == "nccl" and self._grads.device.type != "cuda":
            raise UsageError("--dist-backend nccl: this model's gradient arena is host memory, and NCCL reduces "
                             "GPU memory only", hint="use --dist-backend gloo, or a GPU target")
        n = self._params.numel()
        self.bounds = shard_bounds(n, self.world)
        self.lo, self.hi = self.bounds[self.rank], self.bounds[self.rank + 1]
        self.buckets = buckets(n, self.bucket_floats, self.bounds)
        self.owner = [next(r for r in range(self.world) if self.bounds[r] <= lo < self.bounds[r + 1])
                      for lo, _ in self.buckets]
        with self._guard("broadcasting rank 0's weights"):
            works = [self.dist.broadcast(self._params[lo:hi], src=0, async_op=True) for lo, hi in self.buckets]
        self._wait(works, "broadcasting rank 0's weights")
        if self.zero and model.loss_scaling:
            raise UsageError("--zero 1 with dynamic loss scaling (fp16): the sharded optimizer does not check the "
                             "gradients for overflow", hint="use --zero 0, or --precision bf16 (no loss scaling)")
        if self.zero:
            master = "master" in model.arenas and int(getattr(model.arenas["master"], "size", 0)) > 0
            self.opt = ZeroAdamW(model.layout.params.slots, self.lo, self.hi, device=self._params.device,
                                 master=master)
            for k, mine in self.opt.state.items():    # zeros, or what a resume loaded
                mine.copy_(_tensor(model.arenas[k])[self.lo:self.hi])
                if isinstance(model.arenas[k], np.ndarray):
                    release_pages(model.arenas[k])    # never used again: ZeRO-1 keeps the shard only

    def summary(self) -> dict:
        """What the log records about the run (gathered from every rank): the optimizer memory each holds."""
        from .runtime import _resident_bytes
        opt = self.opt.nbytes if self.opt is not None else 2 * self._params.numel() * 4
        full_mv = sum(_resident_bytes(self.model.arenas[k]) for k in self.opt.state
                      if isinstance(self.model.arenas[k], np.ndarray)) if self.opt is not None else 0
        mine = {"rank": self.rank, "optimizer_bytes": opt, "unused_full_mv_resident_bytes": full_mv}
        every: list = [None] * self.world
        with self._guard("gathering the run summary"):
            self.dist.all_gather_object(every, mine)
        return {"world_size": self.world, "backend": self.backend, "zero": self.zero,
                "bucket_floats": self.bucket_floats, "n_buckets": len(self.buckets), "ranks": every}

    # ---- every step -------------------------------------------------------------------------------------------
    def should_stop(self, requested: bool) -> bool:
        """Whether any rank was asked to stop (Ctrl-C): all ranks stop at the same step boundary."""
        flag = self.torch.tensor([1 if requested else 0], dtype=self.torch.int32, device=self.device)
        with self._guard("agreeing whether to stop"):
            self.dist.all_reduce(flag, op=self.dist.ReduceOp.MAX)
        self.stop_agreed = bool(flag.item())
        return self.stop_agreed

    def reduce_gradients(self, model, loss: float, grad_accum: int) -> tuple[float, float]:
        """Sum the gradient arena over the ranks (ZeRO: each bucket onto its owner); returns the global mean
        loss and the global norm of the mean gradient."""
        dist, what = self.dist, "reducing the gradients"
        with self._guard(what):
            if self.zero:
                works = [dist.reduce(self._grads[lo:hi], dst=o, async_op=True)
                         for (lo, hi), o in zip(self.buckets, self.owner)]
            else:
                works = [dist.all_reduce(self._grads[lo:hi], async_op=True) for lo, hi in self.buckets]
        sumsq = 0.0
        for (lo, hi), w in zip(self.buckets, works):
            self._wait([w], what)   # the norm of this rank's part of the reduced buckets, while others fly
            a, b = max(lo, self.lo), min(hi, self.hi)
            if a < b:
                sumsq += _sumsq(self._grads[a:b])
        stats = self.torch.tensor([loss, sumsq], dtype=self.torch.float64, device=self.device)
        with self._guard("reducing the loss and the gradient norm"):
            dist.all_reduce(stats)
        total_loss, total_sq = (float(x) for x in stats.tolist())
        return total_loss / self.world, math.sqrt(total_sq) / (grad_accum * self.world * model.loss_scale)

    def update(self, model, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
               step: int, grad_scale: float = 1.0) -> bool:
        """The AdamW step: without ZeRO, the generated update on every rank (the reduced gradients are the
        same everywhere, so every rank takes or skips a loss-scaled step alike); with ZeRO, this rank's shard,
        each updated bucket then broadcast from its owner. Returns whether the step was taken."""
        if self.opt is None:
            return model.update(lr, beta1, beta2, eps, weight_decay, step, grad_scale=grad_scale)
        works, what = [], "gathering the updated parameters"
        for (lo, hi), o in zip(self.buckets, self.owner):
            if o == self.rank:
                self.opt.step(self._params, self._grads, lo, hi, lr, beta1, beta2, eps, weight_decay,
                              step, grad_scale)
            with self._guard(what):
                works.append(self.dist.broadcast(self._params[lo:hi], src=o, async_op=True))
        self._wait(works, what)
        return True

    def mean(self, value: float) -> float:
        t = self.torch.tensor([value], dtype=self.torch.float64, device=self.device)
        with self._guard("averaging the validation loss"):
            self.dist.all_reduce(t)
        return float(t.item()) / self.world

    # ---- checkpoints -------------------------------------------------------------------------------------------
    @property
    def can_save_alone(self) -> bool:
        """Whether rank 0 can write a state without the others (only with ZeRO are the moments spread)."""
        return self.opt is None

    def consolidate(self, model, alone: bool = False):
        """What rank 0 saves (None on the other ranks). With ZeRO every rank sends its shard of m and v (and
        master weights) to rank 0, which holds the full arenas only while the state is written. ``alone``: the ranks are not
        in step (an interrupt mid-step), so no collective may be issued."""
        if self.opt is None:
            return model if self.is_main else None
        if alone:
            raise DistributedError("with --zero 1 the AdamW moments are spread over the ranks, and the ranks are "
                                   "not in step, so no state could be saved")
        dist, torch = self.dist, self.torch
        with self._guard("gathering the optimizer state for a checkpoint"):
            if not self.is_main:
                for mine in self.opt.state.values():
                    dist.send(mine, dst=0)
                return None
            n = self._params.numel()
            full = {}
            for k, mine in self.opt.state.items():
                full[k] = np.zeros(n, dtype=np.float32)
                full[k][self.lo:self.hi] = mine.cpu().numpy()
            for r in range(1, self.world):
                a, b = self.bounds[r], self.bounds[r + 1]
                for k in self.opt.state:
                    if self.device.type == "cpu":      # straight into the full array
                        dist.recv(torch.from_numpy(full[k][a:b]), src=r)
                    else:
                        buf = torch.empty(b - a, dtype=torch.float32, device=self.device)
                        dist.recv(buf, src=r)
                        full[k][a:b] = buf.cpu().numpy()
        return _Consolidated(model, full)

    def close(self) -> None:
        """Leave the process group (not after a failure: tearing down a broken group can block)."""
        if self._owned and not self.broken and self.dist.is_initialized():
            with contextlib.suppress(Exception):
                self.dist.destroy_process_group()
        self._owned = False
