"""The program: what lowering produces and every target renders.

A ``Program`` is target-neutral. It names *buffers* (a tensor of the model with its shape, dtype and
role) and lists *statements* over them: an op invoked in its forward or backward phase on named
operands, a per-layer view of a stacked buffer, a gradient slot, zeroing, the loss seed, loops over
layers and guards on optional inputs. Nothing here is C or CUDA: a target (``gpt2gen.targets``) turns
each statement into its own language, with its own kernel for each op and phase.

References to buffers inside statements:

- ``Tensor(name, role)``: a whole buffer of one arena (``param``, ``grad``, ``act``) or an input;
- ``Local(name)``: a view a statement declared before (a layer's slice, a carry, a gradient slot);
- ``None``: an operand the kernel is not given (an optional input left out, a gradient nobody needs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

from . import expr as E
from .cache import digest

if TYPE_CHECKING:
    from .layout import Layout
    from .precision import Policy
    from .spec import ModelSpec, TensorDecl

# what a buffer is for; a target's precision policy gives each role a storage dtype
ROLES = ("input", "param", "grad", "master", "moment", "act", "saved", "scratch", "act_grad", "cache")


@dataclass(frozen=True)
class Buffer:
    name: str
    shape: tuple[E.Expr, ...]      # symbolic, over config names and the run-time B, T
    dtype: str                     # its storage dtype under the build's precision: f32, bf16, f16, i32
    role: str                      # one of ROLES
    per_layer: bool = False        # stacked over the layers (L, *shape)
    line: int | None = None        # where the model file declares it


@dataclass(frozen=True)
class Tensor:
    """A whole buffer: ``role`` says which arena holds it (``param``, ``grad``, ``act``, ``cache``) or ``input``."""
    name: str
    role: str


@dataclass(frozen=True)
class Local:
    """A view declared earlier in the same function (by ``View``, ``Alias`` or ``Assign``)."""
    name: str


Ref = Union[Tensor, Local, None]


@dataclass
class Invoke:
    """Op ``op``'s kernel for ``phase`` on the bound operands.

    ``operands``: operand name -> buffer, and ``d_<operand>`` -> its gradient (None where the kernel is
    not given one); ``shapes``: operand name -> the shape of the tensor bound to it; ``dims``: the op's
    dimension letters -> the model's expressions; ``attrs``: attributes that bind no letter."""
    op: str
    phase: str                     # "forward" | "backward"
    operands: dict[str, Ref]
    shapes: dict[str, tuple[E.Expr, ...]]
    dims: dict[str, E.Expr]
    attrs: dict[str, int | float]
    node: str
    line: int


@dataclass
class View:
    """``var`` names part of a buffer for the statements after it.

    kind ``layer``: layer ``l``'s slice of the stacked ``of``; ``scratch``: all of ``of``, one layer's
    worth that every layer reuses; ``carry``: ``start`` for layer 0, then the previous layer's slice of
    ``of``; ``last_layer``: the last of ``count`` layers' slice of ``of``; ``slot``: gradient slot
    ``slot`` of the activation-gradient arena."""
    var: str
    kind: str
    dtype: str
    comment: str = ""
    of: Tensor | None = None
    shape: tuple[E.Expr, ...] = ()     # one layer's shape of ``of`` (the stride between layers)
    start: Ref = None
    count: E.Expr | None = None
    slot: int | None = None


@dataclass
class Alias:
    """Declare ``var`` as another name for the view ``of``."""
    var: str
    of: Local
    dtype: str
    comment: str = ""


@dataclass
class Assign:
    """Point the view ``var`` where ``value`` points (gradient buffers swap roles layer by layer)."""
    var: str
    value: Local
    comment: str = ""


@dataclass
class Zero:
    ref: Ref
    shape: tuple[E.Expr, ...]
    what: str
    dtype: str = "f32"


@dataclass
class Seed:
    """The backward's start: ``ref`` = loss_scale / numel(shape), since the loss is the mean of the tensor
    (the run-time loss scale is 1 without dynamic loss scaling)."""
    ref: Ref
    shape: tuple[E.Expr, ...]
    what: str
    dtype: str = "f32"


@dataclass
class Guard:
    """``body`` runs only when every one of the optional ``inputs`` is given."""
    inputs: tuple[str, ...]
    body: list["Stmt"]
    comment: str = ""


@dataclass
class Loop:
    """``body`` once per layer ``l`` of ``count``, first to last (or last to first)."""
    count: E.Expr
    reverse: bool
    body: list["Stmt"]
    comment: str = ""


Stmt = Union[Invoke, View, Alias, Assign, Zero, Seed, Guard, Loop]


@dataclass
class Loss:
    tensor: str
    shape: tuple[E.Expr, ...]
    needs: tuple[str, ...]         # optional inputs without which there is no loss


@dataclass
class Program:
    spec: "ModelSpec"
    config: dict[str, int | float]
    layout: "Layout"
    buffers: dict[str, Buffer]
    forward: list[Stmt]
    backward: list[Stmt]
    ops_used: list[str]
    inputs: list["TensorDecl"]
    loss: Loss | None = None
    precision: "Policy" = field(default_factory=lambda: _fp32())
    fused: list[str] = field(default_factory=list)     # the fused nodes ("mlp_fc+mlp_gelu", ...)
    loss_scaling: bool = False     # dynamic: the seed takes a scale, the update skips non-finite steps
    decode: list[Stmt] = field(default_factory=list)   # one sequence's forward over a chunk of new positions
    decode_positions: int = 0      # the most positions a decoded sequence may reach (the KV cache's length)


def _fp32():
    from .precision import policy
    return policy("fp32")


def signature(program: Program) -> str:
    """Names the layout: a runtime refuses arenas laid out for another program."""
    return digest(program.spec.source, program.layout.table(), repr(sorted(program.config.items())))


def walk(stmts: list[Stmt], mult: int = 1, env: dict | None = None):
    """Every statement, depth first, with how many times it runs per step when ``env`` gives the loop
    counts' values (loops multiply, a guard counts once)."""
    for s in stmts:
        yield s, mult
        if isinstance(s, (Loop, Guard)):
            inner = mult * int(s.count.eval(env)) if isinstance(s, Loop) and env is not None else mult
            yield from walk(s.body, inner, env)


def refs(s: Stmt) -> list[Ref]:
    """The buffers a statement reads or writes (what views it needs declared)."""
    if isinstance(s, Invoke):
        return list(s.operands.values())
    if isinstance(s, (Zero, Seed)):
        return [s.ref]
    if isinstance(s, View):
        return [s.start, s.of]
    if isinstance(s, Alias):
        return [s.of]
    if isinstance(s, Assign):
        return [s.value, Local(s.var)]
    return []


def locals_used(stmts: list[Stmt]) -> set[str]:
    """The names of the views that the statements (and their bodies) refer to."""
    return {r.name for s, _ in walk(stmts) for r in refs(s) if isinstance(r, Local)}
