"""Layout: every tensor's place in the flat arenas, computed once in Python.

Five arenas hold a model's state: ``params`` (and ``grads``, ``m``, ``v`` with the same layout),
``acts`` (activations, sized for the build-time maxima of B and T) and ``dacts`` (activation gradients,
whose slots the lowering plans by live interval). Every offset is a multiple of 16 floats (64 bytes).
Per-layer tensors are stacked over layers, as in llm.c: a parameter of shape (C) is stored as (L, C).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .spec import ModelSpec, TensorDecl

ALIGN_FLOATS = 16   # 64 bytes of float32


def align(n: int) -> int:
    return (n + ALIGN_FLOATS - 1) // ALIGN_FLOATS * ALIGN_FLOATS


@dataclass
class Slot:
    name: str
    shape: str                     # symbolic, e.g. "(L, 3*C, C)"
    dims: tuple[int, ...]          # concrete at the build maxima, layers included
    offset: int                    # floats from the arena's start
    numel: int
    decay: bool = True             # parameters: AdamW weight decay applies
    note: str = ""
    alias: bool = False            # lies inside another slot (shared scratch), adds no memory

    @property
    def nbytes(self) -> int:
        return self.numel * 4


@dataclass
class Arena:
    name: str
    slots: list[Slot] = field(default_factory=list)
    size: int = 0                  # floats, aligned

    def add(self, name: str, shape: str, dims: tuple[int, ...], decay: bool = True, note: str = "") -> Slot:
        numel = 1
        for d in dims:
            numel *= d
        slot = Slot(name, shape, dims, self.size, numel, decay, note)
        self.slots.append(slot)
        self.size = align(self.size + numel)
        return slot

    def alias(self, name: str, shape: str, dims: tuple[int, ...], offset: int, note: str = "") -> Slot:
        """A tensor placed inside an existing slot (scratch shared by tensors never alive at once); it adds
        nothing to the arena's size."""
        numel = 1
        for d in dims:
            numel *= d
        slot = Slot(name, shape, dims, offset, numel, True, note, alias=True)
        self.slots.append(slot)
        return slot

    def __getitem__(self, name: str) -> Slot:
        for s in self.slots:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def nbytes(self) -> int:
        return self.size * 4


@dataclass
class Layout:
    config: dict
    n_layers: int
    params: Arena
    acts: Arena
    dacts: Arena
    _numel_max: dict[str, int]

    @classmethod
    def plan(cls, spec: ModelSpec, config: dict, n_layers: int,
             dim_values: Callable[[TensorDecl], tuple[int, ...]],
             saved: dict[str, TensorDecl] | None = None, notes: dict[str, str] | None = None,
             scratch: dict[str, int] | None = None) -> "Layout":
        """``saved``: the buffers ops keep for their backward (named after their node), placed after the
        model's own tensors; ``notes``: what a buffer is, shown beside it; ``scratch``: activations that
        no backward reads -> the scratch slot they share (one layer's worth, reused by every layer)."""
        params, acts = Arena("params"), Arena("acts")
        numel_max: dict[str, int] = {}
        scratch = scratch or {}
        shared: list[tuple[TensorDecl, str, tuple[int, ...]]] = []
        for t in list(spec.tensors.values()) + list((saved or {}).values()):
            if t.kind == "input":
                continue
            dims = dim_values(t)
            n = 1
            for d in dims:
                n *= d
            numel_max[t.name] = n
            shape = ", ".join(d.text().replace(" ", "") for d in t.shape)
            if t.name in scratch:
                shared.append((t, f"({shape})", dims))
                continue
            if t.per_layer:
                dims, shape = (n_layers,) + dims, "L, " + shape
            arena = params if t.kind == "param" else acts
            arena.add(t.name, f"({shape})", dims, t.decay if t.kind == "param" else True, (notes or {}).get(t.name, ""))
        sizes: dict[int, int] = {}
        for t, _, _ in shared:
            sizes[scratch[t.name]] = max(sizes.get(scratch[t.name], 0), align(numel_max[t.name]))
        offsets = {}
        for i in sorted(sizes):
            users = [t.name for t, _, _ in shared if scratch[t.name] == i]
            offsets[i] = acts.add(f"scratch{i}", f"({sizes[i]})", (sizes[i],), note="shared by " + ", ".join(users)).offset
        for t, shape, dims in shared:
            acts.alias(t.name, shape, dims, offsets[scratch[t.name]], f"in scratch{scratch[t.name]}: no backward reads it")
        return cls(config, n_layers, params, acts, Arena("dacts"), numel_max)

    def numel_max(self, t: TensorDecl) -> int:
        """Elements of one layer's slice of ``t`` at the build-time maxima."""
        return self._numel_max[t.name]

    def set_grad_slots(self, slots: list[tuple[int, list[str]]]) -> None:
        self.dacts = Arena("dacts")
        for i, (size, keys) in enumerate(slots):
            self.dacts.add(f"dslot{i}", f"({size})", (size,), note="d_" + ", d_".join(k.replace("@", " ") for k in keys))

    def arenas(self) -> list[Arena]:
        return [self.params, self.acts, self.dacts]

    def table(self) -> str:
        """The human-readable layout: one line per tensor, then the totals."""
        lines = []
        for arena in self.arenas():
            lines.append(f"{arena.name} arena" + (" (grads, m and v share this layout)" if arena.name == "params" else ""))
            lines.append(f"  {'name':<12} {'shape':<22} {'dims':<26} {'offset':>12} {'bytes':>13}")
            for s in arena.slots:
                dims = "(" + ", ".join(map(str, s.dims)) + ")"
                extra = f"  {s.note}" if s.note else ""
                lines.append(f"  {s.name:<12} {s.shape:<22} {dims:<26} {s.offset:>12,} {s.nbytes:>13,}{extra}")
            lines.append(f"  {'total':<12} {'':<22} {'':<26} {'':>12} {arena.nbytes:>13,}  ({arena.nbytes / 2**20:.1f} MiB)")
            lines.append("")
        n_params = sum(s.numel for s in self.params.slots)
        total = 4 * self.params.nbytes + self.acts.nbytes + self.dacts.nbytes
        lines.append(f"parameters: {n_params:,}; all arenas (params, grads, m, v, acts, dacts): "
                     f"{total:,} bytes ({total / 2**20:.1f} MiB)")
        return "\n".join(lines)


def plan_intervals(items: list[tuple[str, int, int, int]]) -> tuple[list[tuple[int, list[str]]], dict[str, int]]:
    """Give each (key, size, start, end) a slot; keys whose [start, end] overlap never share one.

    Greedy by start: reuse the free slot that fits best (the smallest that is large enough, else the
    largest, which then grows), or open a new one. Returns the slots as (size, keys) and key -> slot.
    """
    slots: list[list] = []            # [size, busy_until, keys]
    assignment: dict[str, int] = {}
    for key, size, start, end in sorted(items, key=lambda it: (it[2], it[0])):
        free = [i for i, s in enumerate(slots) if s[1] < start]
        fits = [i for i in free if slots[i][0] >= size]
        if fits:
            i = min(fits, key=lambda i: slots[i][0])
        elif free:
            i = max(free, key=lambda i: slots[i][0])
            slots[i][0] = size
        else:
            slots.append([size, -1, []])
            i = len(slots) - 1
        slots[i][1] = end
        slots[i][2].append(key)
        assignment[key] = i
    return [(s[0], s[2]) for s in slots], assignment
