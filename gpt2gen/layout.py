"""Layout: every tensor's place in the flat arenas, computed once in Python.

The arenas hold a model's state: ``params`` (and ``grads``, the optimizer's ``m`` and ``v`` and, in mixed
precision, the fp32 ``master`` weights, all with the same layout in elements), ``acts`` (activations,
sized for the build-time maxima of B and T) and ``dacts`` (activation gradients, whose slots the lowering
plans by live interval), and ``cache`` (the decode program's KV cache: what each attention node keeps across
decode calls, per layer and kv head; training never touches it). Each arena has an element type (the precision's storage dtype; fp32 for
master, m and v) and every offset counts elements of it; a tensor of another dtype inside an arena (an
fp32 statistic among bf16 activations) occupies its bytes' worth of elements. Every offset is a multiple
of 64 bytes. Per-layer tensors are stacked over layers, as in llm.c: a parameter of shape (C) is stored
as (L, C).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .precision import DTYPES, Policy, policy as _policy
from .spec import ModelSpec, TensorDecl

ALIGN_BYTES = 64


def align(n: int, itemsize: int = 4) -> int:
    """``n`` elements of ``itemsize`` bytes rounded up to a whole number of 64-byte lines."""
    unit = ALIGN_BYTES // itemsize
    return (n + unit - 1) // unit * unit


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
    dtype: str = "f32"             # the tensor's own storage dtype
    role: str = ""                 # gpt2gen.program.ROLES: param, act, saved, scratch, act_grad

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize


@dataclass
class Arena:
    name: str
    slots: list[Slot] = field(default_factory=list)
    size: int = 0                  # elements of the arena's dtype, aligned
    dtype: str = "f32"             # the element type offsets count

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize

    def _elements(self, numel: int, dtype: str) -> int:
        """How many of the arena's elements a tensor of ``numel`` ``dtype`` values occupies."""
        return -(-numel * DTYPES[dtype].itemsize // self.itemsize)

    def add(self, name: str, shape: str, dims: tuple[int, ...], decay: bool = True, note: str = "",
            dtype: str | None = None, role: str = "") -> Slot:
        numel = 1
        for d in dims:
            numel *= d
        dtype = dtype or self.dtype
        slot = Slot(name, shape, dims, self.size, numel, decay, note, dtype=dtype, role=role)
        self.slots.append(slot)
        self.size = align(self.size + self._elements(numel, dtype), self.itemsize)
        return slot

    def alias(self, name: str, shape: str, dims: tuple[int, ...], offset: int, note: str = "",
              dtype: str | None = None) -> Slot:
        """A tensor placed inside an existing slot (scratch shared by tensors never alive at once); it adds
        nothing to the arena's size."""
        numel = 1
        for d in dims:
            numel *= d
        slot = Slot(name, shape, dims, offset, numel, True, note, alias=True, dtype=dtype or self.dtype, role="scratch")
        self.slots.append(slot)
        return slot

    def __getitem__(self, name: str) -> Slot:
        for s in self.slots:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def nbytes(self) -> int:
        return self.size * self.itemsize


@dataclass
class Layout:
    config: dict
    n_layers: int
    params: Arena
    acts: Arena
    dacts: Arena
    _numel_max: dict[str, int]
    precision: Policy = field(default_factory=lambda: _policy("fp32"))
    cache: Arena = field(default_factory=lambda: Arena("cache"))

    @classmethod
    def plan(cls, spec: ModelSpec, config: dict, n_layers: int,
             dim_values: Callable[[TensorDecl], tuple[int, ...]],
             saved: dict[str, TensorDecl] | None = None, notes: dict[str, str] | None = None,
             scratch: dict[str, int] | None = None, precision: Policy | None = None,
             dtypes: dict[str, str] | None = None, cache: dict[str, TensorDecl] | None = None) -> "Layout":
        """``saved``: the buffers ops keep for their backward (named after their node), placed after the
        model's own tensors; ``notes``: what a buffer is, shown beside it; ``scratch``: activations that
        no backward reads -> the scratch slot they share (one layer's worth, reused by every layer);
        ``precision``: the storage policy; ``dtypes``: each tensor's storage dtype (default: the policy's); ``cache``: the decode program's KV cache
        buffers (stored as the activations are)."""
        precision = precision or _policy("fp32")
        dtypes = dtypes or {}
        params, acts = Arena("params", dtype=precision.storage), Arena("acts", dtype=precision.storage)
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
            role = "param" if t.kind == "param" else "saved" if saved and t.name in saved else "act"
            arena.add(t.name, f"({shape})", dims, t.decay if t.kind == "param" else True, (notes or {}).get(t.name, ""),
                      dtypes.get(t.name, arena.dtype), role)
        sizes: dict[int, int] = {}
        for t, _, _ in shared:
            need = acts._elements(numel_max[t.name], dtypes.get(t.name, acts.dtype))
            sizes[scratch[t.name]] = max(sizes.get(scratch[t.name], 0), align(need, acts.itemsize))
        offsets = {}
        for i in sorted(sizes):
            users = [t.name for t, _, _ in shared if scratch[t.name] == i]
            offsets[i] = acts.add(f"gg_scratch{i}", f"({sizes[i]})", (sizes[i],), note="shared by " + ", ".join(users),
                                  role="scratch").offset
        for t, shape, dims in shared:
            acts.alias(t.name, shape, dims, offsets[scratch[t.name]], f"in gg_scratch{scratch[t.name]}: no backward reads it",
                       dtypes.get(t.name, acts.dtype))
        kv = Arena("cache", dtype=precision.storage)
        for t in (cache or {}).values():
            dims = dim_values(t)
            shape = ", ".join(d.text().replace(" ", "") for d in t.shape)
            if t.per_layer:
                dims, shape = (n_layers,) + dims, "L, " + shape
            kv.add(t.name, f"({shape})", dims, note=(notes or {}).get(t.name, ""), role="cache")
        return cls(config, n_layers, params, acts, Arena("dacts", dtype=precision.storage), numel_max, precision, kv)

    def numel_max(self, t: TensorDecl) -> int:
        """Elements of one layer's slice of ``t`` at the build-time maxima."""
        return self._numel_max[t.name]

    def grad_slot_size(self, t: TensorDecl, dtype: str) -> int:
        """Elements of the dacts arena that one layer's gradient of ``t``, stored as ``dtype``, occupies."""
        return align(self.dacts._elements(self._numel_max[t.name], dtype), self.dacts.itemsize)

    def set_grad_slots(self, slots: list[tuple[int, list[str]]]) -> None:
        self.dacts = Arena("dacts", dtype=self.precision.storage)
        for i, (size, keys) in enumerate(slots):
            self.dacts.add(f"dslot{i}", f"({size})", (size,), note="d_" + ", d_".join(k.replace("@", " ") for k in keys),
                           role="act_grad")

    def arenas(self) -> list[Arena]:
        return [self.params, self.acts, self.dacts, self.cache]

    def arena_bytes(self) -> dict[str, int]:
        """Bytes of each arena a model allocates: params, grads (the parameters' dtype), master (mixed
        precision only), m and v (fp32, the parameters' layout in elements), acts, dacts."""
        n = self.params.size
        out = {"params": self.params.nbytes, "grads": self.params.nbytes}
        if self.precision.master:
            out["master"] = 4 * n
        out |= {"m": 4 * n, "v": 4 * n, "acts": self.acts.nbytes, "dacts": self.dacts.nbytes}
        return out | {"cache": self.cache.nbytes}

    def arena_dtypes(self) -> dict[str, str]:
        st = self.precision.storage
        out = {"params": st, "grads": st}
        if self.precision.master:
            out["master"] = "f32"
        return out | {"m": "f32", "v": "f32", "acts": st, "dacts": st, "cache": st}

    def table(self) -> str:
        """The human-readable layout: one line per tensor, then the totals per arena and per role."""
        lines = []
        same = ", ".join(k for k in self.arena_bytes() if k in ("grads", "master", "m", "v"))
        for arena in self.arenas():
            lines.append(f"{arena.name} arena, {arena.dtype}" + (f" ({same} share this layout in elements)"
                                                               if arena.name == "params" else ""))
            lines.append(f"  {'name':<12} {'dtype':<5} {'shape':<22} {'dims':<26} {'offset':>12} {'bytes':>13}")
            for s in arena.slots:
                dims = "(" + ", ".join(map(str, s.dims)) + ")"
                extra = f"  {s.note}" if s.note else ""
                lines.append(f"  {s.name:<12} {s.dtype:<5} {s.shape:<22} {dims:<26} {s.offset:>12,} {s.nbytes:>13,}{extra}")
            lines.append(f"  {'total':<12} {'':<5} {'':<22} {'':<26} {'':>12} {arena.nbytes:>13,}  "
                         f"({arena.nbytes / 2**20:.1f} MiB)")
            lines.append("")
        n_params = sum(s.numel for s in self.params.slots)
        sizes = self.arena_bytes()
        dtypes = self.arena_dtypes()
        total = sum(sizes.values())
        roles: dict[str, int] = {}
        for s in self.acts.slots:
            if not s.alias:
                roles[s.role] = roles.get(s.role, 0) + self.acts._elements(s.numel, s.dtype) * self.acts.itemsize
        lines.append("acts by role: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in roles.items()))
        lines.append(f"precision {self.precision.name}; by arena: " +
                     ", ".join(f"{k} {dtypes[k]} {v / 2**20:.1f} MiB" for k, v in sizes.items()))
        lines.append(f"parameters: {n_params:,}; all arenas ({', '.join(sizes)}): "
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
