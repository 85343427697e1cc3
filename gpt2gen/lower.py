"""Lowering: from a checked model spec to a target-neutral program of op invocations over named buffers.

The stages, each a function of its own:

1. ``bind_graph``: every graph node finds its op and binds the op's dimension letters against the
   model's tensor shapes (reporting the node, its line and both shapes when they disagree); what the
   target's kernel keeps for the backward gets a buffer named after the node;
2. ``fuse_pairs``: adjacent node pairs the target has one kernel for become one node (gpt2gen/fusion.py);
3. ``plan_scratch``: activations no backward reads share scratch slots by live interval;
4. ``emit_forward``: the forward, one ``Invoke`` per node, with per-layer views inside the layer loop;
5. ``derive_backward``: the nodes in reverse, and where each activation gradient is used;
6. ``plan_gradients``: every activation gradient gets a slot in the dacts arena by live interval, so
   gradients whose lifetimes do not overlap share memory and a layer's slots serve every layer;
7. ``emit_backward``: each op's backward invocation; since every backward kernel accumulates, a
   gradient buffer is zeroed right before its first use.

Output: a ``gpt2gen.program.Program``. Nothing here is any target's language: a target
(``gpt2gen.targets``) renders the statements. All offset arithmetic happens in ``gpt2gen.layout``.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from . import expr as E
from . import ops as O
from . import precision as _precision
from . import targets
from .fusion import FUSIONS, Fusion
from .fusion import choose as choose_fusions
from .layout import Layout, align, plan_intervals
from .program import (Alias, Assign, Buffer, Guard, Invoke, Local, Loop, Loss, Program, Ref, Seed, Stmt, Tensor,
                      View, Zero, locals_used)
from .spec import ModelSpec, Node, Repeat, SpecError, TensorDecl
from .targets import Target

# ---------------------------------------------------------------------------------------------------
# Binding an op to a node


@dataclass
class Bound:
    """A node bound to its op: operand name -> tensor, letter -> (model expr, value), attrs."""
    node: Node
    op: O.OpDef
    tensors: dict[str, TensorDecl | None]
    carries: dict[str, str]               # operand -> carry name, where the operand is a carry
    dims: dict[str, tuple[E.Expr, int]]
    values: dict[str, float | int]        # attributes that bind no letter: floats, and ints such as a window
    saved: dict[str, TensorDecl] = field(default_factory=dict)   # what the target's forward keeps for the backward
    cache: dict[str, TensorDecl] = field(default_factory=dict)   # what its decode kernel keeps across calls
    capacity: int = 0                     # positions that cache holds (S)
    cache_size: E.Expr | None = None      # the same as the model file names it (maxT) or a number


class _Ctx:
    def __init__(self, spec: ModelSpec, config: dict[str, int | float]):
        self.spec = spec
        self.config = config
        self.env = dict(config)        # B and T at their maxima
        self.saved: dict[str, TensorDecl] = {}     # buffers the ops' kernels keep for the backward, by name
        self.saved_by_node: dict[str, list[str]] = {}
        self.cache: dict[str, TensorDecl] = {}     # the decode program's KV cache buffers, by name
        self.cache_by_node: dict[str, list[str]] = {}
        self.notes: dict[str, str] = {}             # buffer -> what it is, for the layout table
        self.scratch: dict[str, int] = {}           # activation no backward reads -> its shared scratch slot
        self.policy = _precision.policy("fp32")

    def dtype(self, t: TensorDecl) -> str:
        """The storage dtype of tensor ``t`` (and of its gradient) under the build's precision."""
        if t.dtype == "int":
            return "i32"
        if t.name in self.saved or t.name == self.spec.loss:
            return self.policy.dtype("saved")
        return self.policy.storage

    def tensor(self, name: str) -> TensorDecl | None:
        return self.spec.tensors.get(name) or self.saved.get(name) or self.cache.get(name)

    def err(self, msg: str, node: Node | None = None, line: int | None = None, hint: str | None = None,
            symbols=()) -> SpecError:
        """``symbols``: the config names whose values the error concerns (it names an override among them)."""
        return self.spec.error(msg, line if line is not None else (node.line if node else None),
                               node.name if node else None, hint, symbols=symbols, config=self.config)

    def dim_values(self, t: TensorDecl, node: Node | None = None) -> tuple[int, ...]:
        out = []
        for d in t.shape:
            try:
                v = E.c_int(d.eval_int(self.env, f"a dimension of `{t.name}`"), f"dimension `{d.text()}`")
            except E.ExprError as err:
                raise self.err(f"shape of `{t.name}`: {err}", node, t.line, symbols=d.names()) from None
            if v < 1:
                raise self.err(f"shape of `{t.name}` has a dimension `{d}` = {v}; dimensions must be positive",
                               node, t.line, symbols=d.names())
            out.append(v)
        return tuple(out)


def _shape_text(t: TensorDecl, values: tuple[int, ...]) -> str:
    sym = "(" + ", ".join(d.text() for d in t.shape) + ")"
    num = "(" + ", ".join(str(v) for v in values) + ")"
    return sym if sym == num else f"{sym} = {num}"


def bind(ctx: _Ctx, node: Node, resolve, saved_names: tuple[str, ...] = ()) -> Bound:
    """Check a node against its op and bind the op's dimension letters. ``saved_names``: what the target's
    kernel keeps for the backward by itself (a model file that still lists it among the outputs is told)."""
    op = O.get(node.op)
    if op is None:
        raise ctx.err(f"unknown op `{node.op}`", node,
                      hint=f"known ops: {', '.join(sorted(O.OPS))} (docs/adding-an-op.md adds one)")
    n_req = sum(1 for o in op.inputs if not o.optional)
    if not n_req <= len(node.inputs) <= len(op.inputs):
        want = f"{n_req}" if n_req == len(op.inputs) else f"{n_req} to {len(op.inputs)}"
        raise ctx.err(f"op `{op.name}` takes {want} inputs ({', '.join(o.name for o in op.inputs)}), "
                      f"got {len(node.inputs)}", node)
    if len(node.outputs) != len(op.outputs):
        extra = node.outputs[len(op.outputs):]
        hint = None
        if saved_names and len(extra) == len(saved_names):
            hint = (f"`{op.name}` keeps its {', '.join(saved_names)} for the backward by itself (under the node's "
                    f"name, see `gpt2gen layout`): drop {', '.join(f'`{x}`' for x in extra)} from `out:` and from "
                    f"`activations:`")
        raise ctx.err(f"op `{op.name}` gives {len(op.outputs)} output{'s' if len(op.outputs) != 1 else ''} "
                      f"({', '.join(o.name for o in op.outputs)}), got {len(node.outputs)}", node, hint=hint)
    for k in node.attrs:
        if k not in {a.name for a in op.attrs}:
            raise ctx.err(f"op `{op.name}` has no attribute `{k}`", node,
                          hint=f"its attributes: {', '.join(a.name for a in op.attrs) or 'none'}")
    tensors: dict[str, TensorDecl | None] = {}
    carries: dict[str, str] = {}
    for operand, name in list(zip(op.inputs, node.inputs)) + list(zip(op.outputs, node.outputs)):
        t, carry = resolve(name, node)
        tensors[operand.name] = t
        if carry:
            carries[operand.name] = carry
        want = "int" if operand.dtype == "int" else "float"
        if t.dtype != want:
            raise ctx.err(f"operand `{operand.name}` of `{op.name}` must be a {want} tensor, but `{name}` is {t.dtype}",
                          node)
    for operand in op.inputs[len(node.inputs):]:
        tensors[operand.name] = None
    indexed = [(o, tensors[o.name]) for o in op.inputs if o.indexes and tensors[o.name] is not None]

    dims: dict[str, tuple[E.Expr, int]] = {}
    attr_values: dict[str, float | int] = {}     # attributes that do not bind a dimension letter
    for a in op.attrs:
        ex = node.attrs.get(a.name)
        if ex is None and a.default is None:
            raise ctx.err(f"op `{op.name}` needs attribute `{a.name}`", node)
        try:
            if a.kind == "int":
                v = ex.eval_int(ctx.env, f"attribute `{a.name}`") if ex is not None else int(a.default)
                E.c_int(v, f"`{a.name}`")
                if a.binds:
                    dims[a.binds] = (ex if ex is not None else E.Num(v), v)
                else:
                    attr_values[a.name] = v
            else:
                attr_values[a.name] = float(ex.eval(ctx.env)) if ex is not None else float(a.default)
                problem = E.c_float_problem(attr_values[a.name])   # it is passed to the kernel as a C float
                if problem:
                    raise ctx.err(f"attribute `{a.name}`: {problem}", node, symbols=ex.names() if ex else ())
        except E.ExprError as err:
            raise ctx.err(f"attribute `{a.name}`: {err}", node, symbols=ex.names() if ex else ()) from None

    bound_by: dict[str, str] = {a.binds: f"attribute `{a.name}`" for a in op.attrs if a.binds}
    star: tuple[str, TensorDecl, tuple] | None = None
    deferred: list[tuple[O.Operand, TensorDecl, int, E.Expr, int]] = []
    for operand in op.inputs + op.outputs:
        t = tensors[operand.name]
        if t is None:
            continue
        values = ctx.dim_values(t, node)
        if operand.shape == ("*",):
            key = tuple(str(d) if str(d) in ("B", "T") else v for d, v in zip(t.shape, values))
            if star is None:
                star = (operand.name, t, key)
            elif star[2] != key:
                raise ctx.err(f"`{op.name}` needs `{operand.name}` and `{star[0]}` of the same shape, but `{t.name}` is "
                              f"{_shape_text(t, values)} and `{star[1].name}` is "
                              f"{_shape_text(star[1], ctx.dim_values(star[1]))}", node)
            continue
        if len(operand.shape) != len(t.shape):
            raise ctx.err(f"operand `{operand.name}` of `{op.name}` must have shape ({', '.join(operand.shape)}), "
                          f"but `{t.name}` is {_shape_text(t, values)}", node,
                          hint=f"fix the shape of `{t.name}` (line {t.line}) or feed the node another tensor")
        for i, (pat, d, v) in enumerate(zip(operand.shape, t.shape, values)):
            pe = O.pattern(pat)
            if pat in ("B", "T"):
                if str(d) != pat:
                    raise ctx.err(f"operand `{operand.name}` of `{op.name}` needs the run-time `{pat}` as dimension {i}, "
                                  f"but `{t.name}` has `{d}`", node,
                                  hint=f"declare `{t.name}` with `{pat}` in that place")
            elif isinstance(pe, E.Name):
                if pat in dims and dims[pat][1] != v:
                    raise ctx.err(f"shape mismatch in `{op.name}`: its `{pat}` is {dims[pat][1]} (from {bound_by[pat]}) "
                                  f"but dimension {i} of `{operand.name}` = `{t.name}` {_shape_text(t, values)} is {v}",
                                  node, hint=f"`{op.name}` takes " + ", ".join(
                                      f"{o.name} ({', '.join(o.shape)})" for o in op.inputs + op.outputs))
                if pat not in dims:
                    dims[pat] = (d, v)
                    bound_by[pat] = f"`{operand.name}` = `{t.name}` {_shape_text(t, values)}"
            else:
                deferred.append((operand, t, i, pe, v))
    for operand, t, i, pe, v in deferred:
        env = {k: val for k, (_, val) in dims.items()}
        try:
            want = pe.eval_int(env)
        except E.ExprError:
            raise ctx.err(f"internal: op `{op.name}` pattern `{pe}` uses an unbound letter", node) from None
        if want != v:
            raise ctx.err(f"shape mismatch in `{op.name}`: dimension {i} of `{t.name}` "
                          f"{_shape_text(t, ctx.dim_values(t))} must be {pe} = {want}, got {v}", node,
                          hint=f"operand `{operand.name}` must be ({', '.join(operand.shape)})")
    for operand, t in indexed:
        limit = dims[operand.indexes][1]
        rng = t.range.eval_int(ctx.env, f"range of `{t.name}`") if t.range is not None else None
        if rng is None or rng > limit:
            raise ctx.err(f"`{t.name}` indexes `{operand.indexes}` = {limit} of `{op.name}`, but its range is {rng}", node,
                          hint=f"declare `{t.name}` with a range of at most {limit} (line {t.line})")
    env = {k: val for k, (_, val) in dims.items()} | {"B": ctx.config["B"], "T": ctx.config["T"]}
    labels = {k: ex.text() for k, (ex, _) in dims.items()}
    for rel, meaning in op.checks:
        failed = _failed_check(rel, env, labels)
        if failed:
            letters = re.findall(r"[A-Za-z_]\w*", rel)      # the config names behind them: B and T are their own
            symbols = set().union(*(dims[n][0].names() if n in dims else {n} for n in letters))
            raise ctx.err(f"`{op.name}` requires {failed[0]}: {meaning}", node, hint=failed[1], symbols=symbols)
    return Bound(node, op, tensors, carries, dims, attr_values)


def _failed_check(rel: str, values: dict[str, int], labels: dict[str, str]) -> tuple[str, str | None] | None:
    """Check an op's relation between letters, ``C % NH == 0`` or ``T <= P``: None when it holds, else what
    fails, with every letter's value, and a hint that says which value to change and to what.

    ``labels`` name each letter as the model file does (``heads: NKV`` binds an op's ``K`` to ``NKV``);
    a hint can only suggest ``--set`` for a letter whose label is a plain name."""
    cmp = "<=" if "<=" in rel else "=="
    lhs, rhs = (E.parse(side) for side in rel.split(cmp))
    try:
        a, b = lhs.eval(values), rhs.eval(values)
    except E.ExprError as err:                     # e.g. `C % NH` where NH is 0
        return f"{rel}, which cannot be evaluated: {err}", None
    if (a <= b) if cmp == "<=" else (a == b):
        return None
    letters = list(dict.fromkeys(re.findall(r"[A-Za-z_]\w*", rel)))

    def label(n: str) -> str:
        return labels.get(n, n)
    shown = ", ".join(f"{n} = {values[n]}" if label(n) in (n, str(values[n])) else f"{n} = {label(n)} = {values[n]}"
                      for n in letters)
    text = f"{rel}, which does not hold: {shown}"
    if not isinstance(lhs, (E.Name, E.Num)):
        text += f" ({lhs.text()} = {a})"
    return text, _check_hint(lhs, rhs, cmp, a, b, values, label)


def _check_hint(lhs: E.Expr, rhs: E.Expr, cmp: str, a, b, values: dict[str, int], label) -> str | None:
    """What to change so that ``x % y == 0`` (``lhs`` = ``x % y``) or ``a <= b`` holds, in the model file's
    names; ``a`` and ``b`` are the values of ``lhs`` and ``rhs``."""
    def setting(e: E.Expr, goal: str, examples: list[int] = ()) -> str:
        name = label(e.id) if isinstance(e, E.Name) else e.text()
        if not re.fullmatch(r"[A-Za-z_]\w*", name):
            return f"make `{name}` {goal}"
        eg = " or ".join(f"--set {name}={v}" for v in examples)
        return f"set {name} to {goal}" + (f" (e.g. {eg})" if eg else "")

    parts = []
    if cmp == "==" and isinstance(lhs, E.BinOp) and lhs.op == "%" and rhs == E.Num(0):
        x, y = lhs.left.eval(values), lhs.right.eval(values)
        if not (isinstance(x, int) and isinstance(y, int) and x > 0 and y > 0):
            return None
        below = next((d for d in range(y - 1, max(y - 10_000, 0), -1) if x % d == 0), None)
        above = next((d for d in range(y + 1, min(y + 10_000, x) + 1) if x % d == 0), None)
        if not isinstance(lhs.right, E.Num):
            parts.append(setting(lhs.right, f"a divisor of {x}", [d for d in (below, above) if d is not None]))
        if not isinstance(lhs.left, E.Num):
            parts.append(setting(lhs.left, f"a multiple of {y}", [-(-x // y) * y]))
    elif cmp == "<=":
        if not isinstance(lhs, E.Num):
            parts.append(setting(lhs, f"at most {b}"))
        if not isinstance(rhs, E.Num):
            parts.append(setting(rhs, f"at least {a}"))
    return ", or ".join(parts) or None


# ---------------------------------------------------------------------------------------------------
# Lowering, stage by stage: bind the graph, emit the forward, derive the backward and plan its gradient
# memory, emit the backward.


def shape_comment(t: TensorDecl) -> str:
    return "(" + ",".join(d.text().replace(" ", "") for d in t.shape) + ")"




@dataclass
class _Graph:
    """The bound graph: every node with its op, in order, and what the forward learned about it."""
    bound: dict[str, Bound]
    guarded: set[str]                 # nodes that run only when the optional inputs are given
    carries_init: dict[str, str]      # carry -> its value after the loop (the last layer's next)
    optional_inputs: set[str]
    target: Target                    # whose kernels run the ops: what each phase reads
    items: list = field(default_factory=list)   # the graph as the later stages see it (after fusion)

    def invoke(self, node: Node, phase: str, in_body: bool) -> Invoke:
        b = self.bound[node.name]
        return invoke(b, phase, in_body, self.target.kernels[b.op.name].reads(phase))

    def nodes(self):
        """Every node of the graph as the later stages see it, with its repeat block (or None)."""
        for item in self.items:
            for n in (item.body if isinstance(item, Repeat) else [item]):
                yield n, item if isinstance(item, Repeat) else None


def lower(spec: ModelSpec, config: dict[str, int | float], target: str = "cpu", precision: str = "fp32",
          fuse: str | None = "all", loss_scaling: bool | None = None) -> Program:
    """The program of one training step of ``spec`` at ``config`` for ``target`` (whose kernels say what
    each op's forward and backward read) in ``precision`` (each buffer's storage dtype), with the fusions
    ``fuse`` names (``all``, ``none`` or ``a,b``): forward, derived backward, layout. A precision or fusion
    the target lacks is a ValueError naming the ones it has. ``loss_scaling``: dynamic loss scaling in the
    derived step (default: where the precision needs it, fp16)."""
    tgt = targets.get(target)
    tgt.check_precision(precision)
    chosen = choose_fusions(fuse, tgt.fusions, tgt.name)
    ctx = _Ctx(spec, config)
    ctx.policy = _precision.policy(precision)
    n_layers = _layer_count(ctx)
    if config["T"] > config.get("maxT", config["T"]):
        raise ctx.err(f"batch T = {config['T']} exceeds maxT = {config['maxT']}", line=spec.config_lines.get("T"),
                      hint="lower T (e.g. an override T=...) or raise maxT")
    graph = bind_graph(ctx, tgt)
    fused = fuse_pairs(ctx, graph, chosen)
    ctx.scratch = plan_scratch(ctx, graph)
    positions = plan_cache(ctx, graph)
    dtypes = {t.name: ctx.dtype(t) for t in list(spec.tensors.values()) + list(ctx.saved.values())}
    layout = Layout.plan(spec, config, n_layers or 1, ctx.dim_values, saved=ctx.saved, notes=ctx.notes,
                         scratch=ctx.scratch, precision=ctx.policy, dtypes=dtypes, cache=ctx.cache)
    forward = emit_forward(ctx, graph)
    decode = emit_forward(ctx, graph, "decode")
    steps, events, body_local = derive_backward(ctx, graph)
    plan = plan_gradients(ctx, graph, layout, events, body_local, steps)
    backward = emit_backward(ctx, graph, plan, steps, forward)
    used: list[str] = []
    for item in graph.items:
        for n in (item.body if isinstance(item, Repeat) else [item]):
            if n.op not in used:
                used.append(n.op)
    loss = None
    if spec.loss:
        loss = Loss(spec.loss, spec.tensors[spec.loss].shape, tuple(sorted(graph.optional_inputs)))
    return Program(spec, config, layout, _buffers(ctx, layout), forward, backward, used, spec.of_kind("input"), loss,
                   precision=ctx.policy, fused=fused,
                   loss_scaling=ctx.policy.loss_scaling if loss_scaling is None else bool(loss_scaling),
                   decode=decode, decode_positions=positions)


def _buffers(ctx: _Ctx, layout: Layout) -> dict[str, Buffer]:
    """Every buffer of the program with its role and dtype: the model's tensors, what the ops keep for their
    backward (``saved``), each parameter's gradient, master weight (mixed precision) and AdamW moments
    (``grad:wte``, ``master:wte``, ``m:wte``, ``v:wte``), and the activation-gradient slots."""
    out = {}
    pol = ctx.policy
    for t in ctx.spec.tensors.values():
        role = {"input": "input", "param": "param"}.get(t.kind, "scratch" if t.name in ctx.scratch else "act")
        out[t.name] = Buffer(t.name, tuple(t.shape), ctx.dtype(t), role, t.per_layer, t.line)
        if t.kind == "param":
            out[f"grad:{t.name}"] = Buffer(f"grad:{t.name}", tuple(t.shape), pol.dtype("grad"), "grad", t.per_layer,
                                           t.line)
            if pol.master:
                out[f"master:{t.name}"] = Buffer(f"master:{t.name}", tuple(t.shape), "f32", "master", t.per_layer,
                                                 t.line)
            for moment in ("m", "v"):
                out[f"{moment}:{t.name}"] = Buffer(f"{moment}:{t.name}", tuple(t.shape), "f32", "moment",
                                                   t.per_layer, t.line)
    for t in ctx.saved.values():
        out[t.name] = Buffer(t.name, tuple(t.shape), "f32", "saved", t.per_layer, t.line)
    for t in ctx.cache.values():
        out[t.name] = Buffer(t.name, tuple(t.shape), pol.storage, "cache", t.per_layer, t.line)
    for slot in layout.dacts.slots:
        out[f"dacts:{slot.name}"] = Buffer(f"dacts:{slot.name}", (E.Num(slot.numel),), slot.dtype, "act_grad")
    return out


def _layer_count(ctx: _Ctx) -> int | None:
    repeats = [g for g in ctx.spec.graph if isinstance(g, Repeat)]
    if not repeats:
        return None
    counts = {str(r.count) for r in repeats}
    if len(counts) > 1:
        raise ctx.err("all repeat blocks must have the same count (per-layer tensors are stacked over it)",
                      line=repeats[1].line)
    try:
        n_layers = repeats[0].count.eval_int(ctx.env, "repeat count")
    except E.ExprError as err:
        raise ctx.err(str(err), line=repeats[0].line) from None
    if n_layers < 1:
        raise ctx.err(f"repeat count `{repeats[0].count}` = {n_layers} must be positive", line=repeats[0].line)
    return n_layers


# ---- stage 1: bind every node, in order ------------------------------------------------------------------

def bind_graph(ctx: _Ctx, target: Target) -> _Graph:
    """Check the graph (single writers, no cycles, reads after writes, carries) and bind every node."""
    spec, tensors = ctx.spec, ctx.spec.tensors
    order: list[tuple[Node, Repeat | None]] = []
    for item in spec.graph:
        if isinstance(item, Repeat):
            for n in item.body:
                order.append((n, item))
        else:
            order.append((item, None))
    writers: dict[str, Node] = {}
    for n, rep in order:
        for name in n.outputs:
            if rep is not None and name in rep.carry:
                raise ctx.err(f"a node cannot write the carry `{name}`", n,
                              hint="write a per-layer activation and name it in the block's `next`")
            if name in writers:
                raise ctx.err(f"`{name}` is written by node '{writers[name].name}' (line {writers[name].line}) and "
                              f"again here", n, hint="each activation is written by exactly one node")
            writers[name] = n
    _check_cycles(ctx, order, writers)

    carries_init: dict[str, str] = {}
    available: set[str] = {t.name for t in spec.of_kind("input")} | {t.name for t in spec.of_kind("param")}
    bound: dict[str, Bound] = {}
    conditional: set[str] = set()             # tensors that exist only when an optional input is given
    guarded: set[str] = set()
    optional_inputs = {t.name for t in spec.of_kind("input") if t.optional}
    block_of: dict[str, Repeat] = {}          # per-layer activation -> the repeat block that writes it

    def resolve_in(rep: Repeat | None):
        def resolve(name: str, node: Node) -> tuple[TensorDecl, str | None]:
            if rep is not None and name in rep.carry:
                init = tensors.get(rep.carry[name])
                if init is None:
                    raise ctx.err(f"carry `{name}` starts as undeclared tensor `{rep.carry[name]}`", line=rep.line)
                return init, name
            if rep is None and name in carries_init:
                return tensors[carries_init[name]], name
            t = tensors.get(name)
            if t is None:
                near = [k for k in list(tensors) + list(carries_init) if k.lower() == name.lower()]
                raise ctx.err(f"`{name}` is not a declared tensor", node,
                              hint=(f"did you mean `{near[0]}`? " if near else "") +
                                   "declare it under `inputs`, `parameters` or `activations`")
            if t.per_layer and rep is None:
                raise ctx.err(f"per-layer tensor `{name}` used outside a repeat block", node,
                              hint="read it inside the repeat body, or carry it out with `carry`/`next`")
            if t.kind == "act" and t.per_layer and rep is not None:
                owner = block_of.setdefault(name, rep) if name in node.outputs else block_of.get(name, rep)
                if owner is not rep:
                    raise ctx.err(f"per-layer activation `{name}` is written in the repeat block at line {owner.line} "
                                  f"and read in another one", node,
                                  hint="a block reads its own per-layer activations; pass values between blocks "
                                       "through a carry")
            if t.kind == "act" and not t.per_layer and rep is not None and name in node.outputs:
                raise ctx.err(f"`{name}` is written inside a repeat block but is not per_layer, so each layer would "
                              f"overwrite it", node, hint=f"add `per_layer: true` to `{name}` (line {t.line})")
            return t, None
        return resolve

    for item in spec.graph:
        items = item.body if isinstance(item, Repeat) else [item]
        rep = item if isinstance(item, Repeat) else None
        if rep:
            _check_carries(ctx, rep, available)
        for n in items:
            for name in n.inputs:
                if not (rep and name in rep.carry) and name not in carries_init and name not in available:
                    if name in writers:
                        w = writers[name]
                        raise ctx.err(f"`{name}` is read before node '{w.name}' (line {w.line}) writes it", n,
                                      hint=f"move node '{n.name}' after node '{w.name}'")
                    if name in tensors and tensors[name].kind == "act":
                        raise ctx.err(f"`{name}` is read but no node writes it", n,
                                      hint="add a node that produces it, or read another tensor")
            kernel = target.kernels.get(n.op)
            b = bind(ctx, n, resolve_in(rep), tuple(sv.name for sv in kernel.saved) if kernel else ())
            if kernel is None:
                raise ctx.err(f"op `{n.op}` has no kernels on target `{target.name}`", n,
                              hint=f"that target runs {', '.join(sorted(target.kernels))}")
            b.saved = _saved_buffers(ctx, b, kernel.saved, rep is not None)
            bound[n.name] = b
            for name in n.outputs:
                available.add(name)
                t = tensors[name]
                if t.kind != "act":
                    raise ctx.err(f"node writes `{name}`, which is a {t.kind}, not an activation", n)
            if any(x in optional_inputs or x in conditional for x in n.inputs):
                conditional.update(n.outputs)
                guarded.add(n.name)
        if rep:
            for c, nxt in rep.next.items():
                if nxt not in available:
                    raise ctx.err(f"carry `{c}`'s next value `{nxt}` is not produced in the body", line=rep.line)
                carries_init[c] = nxt
                available.add(c)
    return _Graph(bound, guarded, carries_init, optional_inputs, target, list(spec.graph))


def _saved_buffers(ctx: _Ctx, b: Bound, saved, per_layer: bool, prefix: str | None = None) -> dict[str, TensorDecl]:
    """The buffers node ``b``'s kernel keeps for its backward, named ``<node>_<what>`` (``prefix``: another
    name than the node's) and shaped by the node's letters; each is an activation of the model (per layer
    inside a repeat block)."""
    out: dict[str, TensorDecl] = {}
    letters = {k: ex for k, (ex, _) in b.dims.items()}
    for sv in saved:
        name = f"{prefix or b.node.name}_{sv.name}"
        clash = ("a tensor" if name in ctx.spec.tensors else "a config name" if name in ctx.spec.config else
                 "what another node keeps" if name in ctx.saved else None)
        reason = clash or targets.reserved_reason(name)
        if reason:
            raise ctx.err(f"node '{b.node.name}' keeps its `{sv.name}` for the backward as `{name}`, which is "
                          f"{'already ' + clash if clash else 'reserved: ' + reason}", b.node,
                          hint="rename the node")
        shape = tuple(E.substitute(O.pattern(p), letters) for p in sv.shape)
        t = TensorDecl(name, "act", shape, per_layer, b.node.line)
        ctx.saved[name] = out[sv.name] = t
        ctx.saved_by_node.setdefault(b.node.name, []).append(name)
        ctx.notes[name] = f"kept by '{b.node.name}' ({b.op.name}) for its backward: {sv.doc}"
    return out


# ---- stage 2: fuse pairs of nodes the target has one kernel for -------------------------------------------

def fuse_pairs(ctx: _Ctx, graph: _Graph, chosen: tuple[str, ...]) -> list[str]:
    """Replace each producer/consumer pair of a chosen fusion (gpt2gen/fusion.py) by one node of the fused op,
    where that changes nothing else: the two adjacent in one block, equally guarded (or, for a fusion whose
    kernel runs without the consumer's optional inputs, guarded as the producer), and for an exclusive
    fusion the producer's output read by the consumer alone. Returns the fused nodes' names."""
    if not chosen:
        return []
    readers: dict[str, int] = {}
    for item in graph.items:
        for n in (item.body if isinstance(item, Repeat) else [item]):
            for x in n.inputs:
                readers[x] = readers.get(x, 0) + 1
    special = {ctx.spec.loss} | {t for item in graph.items if isinstance(item, Repeat)
                                 for t in list(item.carry) + list(item.carry.values()) + list(item.next.values())}
    done: list[str] = []

    def match(a: Node, b: Node) -> Fusion | None:
        for name in chosen:
            f = FUSIONS[name]
            if (a.op, b.op) != (f.producer, f.consumer) or len(a.outputs) != 1 or b.inputs[:1] != a.outputs:
                continue
            if f.exclusive and (readers.get(a.outputs[0]) != 1 or a.outputs[0] in special):
                continue
            if not f.producer_guards and (a.name in graph.guarded) != (b.name in graph.guarded):
                continue
            return f
        return None

    def block(nodes: list[Node], rep: Repeat | None) -> list[Node]:
        out: list[Node] = []
        i = 0
        while i < len(nodes):
            f = match(nodes[i], nodes[i + 1]) if i + 1 < len(nodes) else None
            if f is None:
                out.append(nodes[i])
                i += 1
                continue
            out.append(_fused_node(ctx, graph, f, nodes[i], nodes[i + 1], rep))
            done.append(out[-1].name)
            i += 2
        return out

    items: list = []
    top: list[Node] = []
    for item in graph.items:
        if isinstance(item, Repeat):
            items += block(top, None)
            top = []
            items.append(dataclasses.replace(item, body=block(item.body, item)))
        else:
            top.append(item)
    graph.items = items + block(top, None)
    return done


def _fused_node(ctx: _Ctx, graph: _Graph, f: Fusion, a: Node, b: Node, rep: Repeat | None) -> Node:
    """Bind the fused op to the tensors the two nodes were bound to; its saved state takes the consumer's names."""
    pair = (graph.bound[a.name], graph.bound[b.name])

    def name_of(bd: Bound, operand: str) -> str | None:
        ops = bd.op.inputs + bd.op.outputs
        names = bd.node.inputs + [None] * (len(bd.op.inputs) - len(bd.node.inputs)) + bd.node.outputs
        return names[[o.name for o in ops].index(operand)]
    tensors, carries, names = {}, {}, {}
    for fo, which, oo in f.operands:
        bd = pair[which]
        tensors[fo] = bd.tensors.get(oo)
        names[fo] = name_of(bd, oo)
        if oo in bd.carries:
            carries[fo] = bd.carries[oo]
    inputs = [names[o.name] for o in f.op.inputs if tensors[o.name] is not None]
    outputs = [names[o.name] for o in f.op.outputs]
    node = Node(f"{a.name}+{b.name}", f.op.name, inputs, outputs, {**a.attrs, **b.attrs}, a.line)
    attrs = {x.name for x in f.op.attrs}
    fused = Bound(node, f.op, tensors, carries, {**pair[0].dims, **pair[1].dims},
                  {k: v for k, v in {**pair[0].values, **pair[1].values}.items() if k in attrs})
    env = {k: v for k, (_, v) in fused.dims.items()} | {"B": ctx.config["B"], "T": ctx.config["T"]}
    for rel, meaning in f.op.checks:               # the pair's own checks held; the fused op's must too
        failed = _failed_check(rel, env, {k: ex.text() for k, (ex, _) in fused.dims.items()})
        if failed:
            raise ctx.err(f"`{f.op.name}` (fusing '{a.name}' and '{b.name}') requires {failed[0]}: {meaning}", a,
                          hint="build with --fuse none, or fix the shapes")
    for old in (a.name, b.name):                   # their saved state is the fused kernel's now
        for name in ctx.saved_by_node.pop(old, []):
            del ctx.saved[name]
            ctx.notes.pop(name, None)
        del graph.bound[old]
    fused.saved = _saved_buffers(ctx, fused, graph.target.kernels[f.op.name].saved, rep is not None, prefix=b.name)
    graph.bound[node.name] = fused
    if a.name in graph.guarded:
        graph.guarded.add(node.name)
    return node


def _check_carries(ctx: _Ctx, rep: Repeat, available: set[str]) -> None:
    tensors = ctx.spec.tensors
    for c, start in rep.carry.items():
        if start not in available:
            raise ctx.err(f"carry `{c}` starts as `{start}`, which nothing has produced before the repeat",
                          line=rep.line)
        st, nx = tensors.get(start), tensors.get(rep.next[c])
        if st is None or st.kind != "act" or st.per_layer:
            raise ctx.err(f"carry `{c}` starts as `{start}`, which is not an activation of the whole model",
                          line=rep.line, hint="a carry starts as an activation that is not per_layer, written "
                                              "before the repeat block")
        if nx is None or not nx.per_layer:
            raise ctx.err(f"carry `{c}`'s next value `{rep.next[c]}` must be a per-layer activation", line=rep.line)
        if ctx.dim_values(st) != ctx.dim_values(nx) or [str(d) for d in st.shape] != [str(d) for d in nx.shape]:
            raise ctx.err(f"carry `{c}` starts as `{start}` {shape_comment(st)} but continues as `{nx.name}` "
                          f"{shape_comment(nx)}; both must have one shape", line=rep.line)


# ---- references to buffers, and the statements that declare them ---------------------------------------------

def _ref(t: TensorDecl, carry: str | None, in_body: bool) -> Ref:
    """The tensor an operand names: a carry's view, an input, a layer's slice, or a whole buffer."""
    if carry is not None:
        return Local(carry)
    if t.kind == "input":
        return Tensor(t.name, "input")
    if t.per_layer and in_body:
        return Local(t.name)
    return Tensor(t.name, t.kind)


def _grad_ref(t: TensorDecl, carry: str | None, in_body: bool) -> Ref:
    """Where the gradient of the tensor an operand names goes (activation gradients live in views)."""
    if t.kind == "input":
        return None
    if t.kind == "param":
        return Local(f"d_{t.name}") if t.per_layer and in_body else Tensor(t.name, "grad")
    return Local(f"d_{carry or t.name}")


def invoke(b: Bound, phase: str, in_body: bool, reads: set[str]) -> Invoke:
    """The statement that runs node ``b``'s op for ``phase`` on the node's tensors; ``reads``: the operands
    (and ``d_<operand>`` gradients) the target's kernel for that phase is given."""
    operands: dict[str, Ref] = {}
    shapes: dict[str, tuple] = {}
    for o in b.op.inputs + b.op.outputs:
        t = b.tensors[o.name]
        carry = b.carries.get(o.name)
        if o.name in reads:
            operands[o.name] = None if t is None else _ref(t, carry, in_body)
        if "d_" + o.name in reads:
            needs = t is not None and o.grad and o.dtype == "float"
            operands["d_" + o.name] = _grad_ref(t, carry, in_body) if needs else None
        if t is not None:
            shapes[o.name] = tuple(t.shape)
    for name, t in list(b.saved.items()) + list(b.cache.items()):
        if name in reads:
            operands[name] = _ref(t, None, in_body)
        shapes[name] = tuple(t.shape)
    dims = {k: ex for k, (ex, _) in b.dims.items()}
    if phase == "decode" and b.cache:
        dims["S"] = b.cache_size
    return Invoke(b.op.name, phase, operands, shapes, dims, dict(b.values), b.node.name, b.node.line)


def _layer_views(ctx: _Ctx, items: list[Node], rep: Repeat, used: set[str]) -> list[Stmt]:
    """Views at the top of a layer: this layer's slices of the stacked tensors its statements use."""
    out: list[Stmt] = []
    seen: set[str] = set()
    for n in items:
        for name in n.inputs + n.outputs + ctx.saved_by_node.get(n.name, []) + ctx.cache_by_node.get(n.name, []):
            t = ctx.tensor(name)
            if name in rep.carry or t is None or not t.per_layer or name in seen:
                continue
            seen.add(name)
            if name in used and name in ctx.scratch:
                out.append(View(name, "scratch", ctx.dtype(t), f"{shape_comment(t)} gg_scratch{ctx.scratch[name]}, every layer's",
                                of=Tensor(name, t.kind)))
            elif name in used:
                out.append(View(name, "layer", ctx.dtype(t), shape_comment(t), of=Tensor(name, t.kind), shape=t.shape))
            if t.kind == "param" and f"d_{name}" in used:
                out.append(View(f"d_{name}", "layer", ctx.dtype(t), shape_comment(t), of=Tensor(name, "grad"),
                                shape=t.shape))
    return out


def _carry_views(ctx: _Ctx, rep: Repeat) -> list[Stmt]:
    out: list[Stmt] = []
    for c, start in rep.carry.items():
        st, nx = ctx.spec.tensors[start], ctx.spec.tensors[rep.next[c]]
        out.append(View(c, "carry", ctx.dtype(nx), f"{shape_comment(st)} carry: `{start}` for layer 0, then the previous "
                                                f"layer's `{nx.name}`",
                        of=Tensor(nx.name, "act"), shape=nx.shape, start=_ref(st, None, False)))
    return out


def _guarded(calls: list[tuple[Invoke, bool]], optional_inputs: set[str]) -> list[Stmt]:
    """Wrap runs of statements that need an optional input in a guard on those inputs."""
    out: list[Stmt] = []
    for c, needs in calls:
        if needs:
            if out and isinstance(out[-1], Guard):
                out[-1].body.append(c)
            else:
                out.append(Guard(tuple(sorted(optional_inputs)), [c], "only when the optional inputs are given"))
        else:
            out.append(c)
    return out


# ---- stage 3: plan the forward's memory: what no backward reads is scratch ----------------------------------

def plan_scratch(ctx: _Ctx, graph: _Graph) -> dict[str, int]:
    """Activations that no backward reads (a residual's summands, say) need to live only until the forward
    has read them: each gets a scratch slot by live interval over the forward, one layer's worth for a
    per-layer tensor (every layer reuses it). Returns tensor -> slot. Kept whole: what a backward kernel
    of the target reads, the carries' stacked tensors, the loss and the logits (the runtime reads them)."""
    spec = ctx.spec
    kept = {spec.loss, spec.logits}
    for b in graph.bound.values():
        reads = graph.target.kernels[b.op.name].reads("backward")
        kept |= {b.tensors[o.name].name for o in b.op.inputs + b.op.outputs
                 if o.name in reads and b.tensors[o.name] is not None}
    repeats = [item for item in graph.items if isinstance(item, Repeat)]
    for rep in repeats:
        kept |= set(rep.carry.values()) | set(rep.next.values())
    candidates = {t.name for t in spec.tensors.values() if t.kind == "act" and t.name not in kept}
    events: dict[str, list[int]] = {}
    loops: list[tuple[int, int]] = []
    pos = 0
    for item in graph.items:
        start = pos
        for n in (item.body if isinstance(item, Repeat) else [item]):
            for name in n.inputs + n.outputs:
                if name in candidates:
                    events.setdefault(name, []).append(pos)
            pos += 1
        if isinstance(item, Repeat):
            loops.append((start, pos - 1))

    def interval(name: str) -> tuple[int, int]:
        lo, hi = min(events[name]), max(events[name])
        if not spec.tensors[name].per_layer:       # used in a loop: alive through all of it
            for s, e in loops:
                if any(s <= p <= e for p in events[name]):
                    lo, hi = min(lo, s), max(hi, e)
        return lo, hi

    items = [(name, align(math.prod(ctx.dim_values(spec.tensors[name]))), *interval(name))
             for name in sorted(events, key=lambda k: (min(events[k]), k))]
    return plan_intervals(items)[1]


# ---- stage 4: the forward ------------------------------------------------------------------------------------

def emit_forward(ctx: _Ctx, graph: _Graph, phase: str = "forward") -> list[Stmt]:
    """The forward's statements; ``phase`` ``decode``: the decode program's, the same statements with each op's
    decode kernel where it has one (positions from t0, attention over and into the KV cache)."""
    fwd: list[Stmt] = []
    for item in graph.items:
        if isinstance(item, Repeat):
            calls = _guarded([(graph.invoke(n, phase, True), n.name in graph.guarded) for n in item.body],
                             graph.optional_inputs)
            body: list[Stmt] = _carry_views(ctx, item) + _layer_views(ctx, item.body, item, locals_used(calls)) + calls
            fwd.append(Loop(item.count, False, body, "layers"))
            for c in item.carry:
                nx = ctx.spec.tensors[item.next[c]]
                fwd.append(View(c, "last_layer", ctx.dtype(nx), f"{shape_comment(nx)} carry `{c}` after the last layer",
                                of=Tensor(nx.name, "act"), shape=nx.shape, count=item.count))
        else:
            fwd += _guarded([(graph.invoke(item, phase, False), item.name in graph.guarded)],
                            graph.optional_inputs)
    return fwd


# ---- stage 3b: the decode program's KV cache ------------------------------------------------------------------

def plan_cache(ctx: _Ctx, graph: _Graph) -> int:
    """What each node's decode kernel keeps across decode calls (its target kernel's ``cache``: attention's keys
    and values), named ``<node>_<what>`` and sized for S positions: the model's ``maxT``, or the node's
    ``window`` where that is smaller (a sliding window needs no more: the cache is a ring). Returns the most
    positions a decoded sequence may reach (``maxT``)."""
    max_t = int(ctx.config.get("maxT", ctx.config["T"]))
    for n, rep in graph.nodes():
        b = graph.bound[n.name]
        kernel = graph.target.kernels[b.op.name]
        if not kernel.cache:
            continue
        window = int(b.values.get("window", 0) or 0)
        b.capacity = window if 0 < window < max_t else max_t
        size = E.Num(b.capacity) if b.capacity != max_t or "maxT" not in ctx.config else E.Name("maxT")
        b.cache_size = size
        letters = {k: ex for k, (ex, _) in b.dims.items()} | {"S": size}
        for sv in kernel.cache:
            name = f"{n.name}_{sv.name}"
            clash = ("a tensor" if name in ctx.spec.tensors else "a config name" if name in ctx.spec.config else
                     "what another node keeps" if name in ctx.saved or name in ctx.cache else None)
            reason = clash or targets.reserved_reason(name)
            if reason:
                raise ctx.err(f"node '{n.name}' keeps its `{sv.name}` for decoding as `{name}`, which is "
                              f"{'already ' + clash if clash else 'reserved: ' + reason}", n, hint="rename the node")
            shape = tuple(E.substitute(O.pattern(p), letters) for p in sv.shape)
            t = TensorDecl(name, "cache", shape, rep is not None, n.line)
            ctx.cache[name] = b.cache[sv.name] = t
            ctx.cache_by_node.setdefault(n.name, []).append(name)
            ctx.notes[name] = f"kept by '{n.name}' ({b.op.name}) across decode calls: {sv.doc}"
    return max_t


# ---- stage 5: derive the backward: the nodes in reverse and every use of each gradient ------------------------

def derive_backward(ctx: _Ctx, graph: _Graph) -> tuple[list[tuple], dict[str, list[int]], dict[str, Repeat]]:
    """The backward's steps (seed, loop bounds, nodes), each activation gradient's positions of use, and
    which gradients belong to a repeat body (one buffer per layer, reused by every layer)."""
    spec, bound = ctx.spec, graph.bound
    loss_t = spec.tensors.get(spec.loss) if spec.loss else None
    events: dict[str, list[int]] = {}           # grad buffer key -> positions of use
    body_local: dict[str, Repeat] = {}          # grad key -> repeat whose body owns it (per-layer acts, carries in body)
    steps: list[tuple] = []
    consumed: set[str] = set()                  # outer gradients that some node contributes to

    def note(key: str, pos: int) -> None:
        events.setdefault(key, []).append(pos)

    pos = 0
    if loss_t is not None:
        steps.append(("seed", loss_t))
        note(loss_t.name, pos)
        pos += 1
    for item in reversed(graph.items):
        if isinstance(item, Repeat):
            loop_start = pos
            steps.append(("loop_start", item, pos))
            pos += 1
            for n in reversed(item.body):
                steps.append(("node", bound[n.name], True, pos))
                for o, name in _pairs(bound[n.name]):
                    t = bound[n.name].tensors[o.name]
                    if not _has_act_grad(o, t):
                        continue
                    key = t.name
                    if name in item.carry:
                        key = f"{name}@body"
                    elif name in item.next.values():
                        key = f"{[c for c, v in item.next.items() if v == name][0]}@next"
                    if t.per_layer or "@" in key:
                        body_local[key] = item
                    note(key, pos)
                    if o in bound[n.name].op.inputs:
                        consumed.add(key)
                pos += 1
            loop_end = pos
            steps.append(("loop_end", item, pos))
            pos += 1
            for c in item.carry:
                # the outer carry buffer holds d(carry after the last layer) before the loop and d(start) after it
                note(c, loop_start)
                note(c, loop_end)
                note(f"{c}@spare", loop_start)
                note(f"{c}@spare", loop_end)
        else:
            b = bound[item.name]
            steps.append(("node", b, False, pos))
            for o, name in _pairs(b):
                t = b.tensors[o.name]
                if not _has_act_grad(o, t):
                    continue
                key = name if name in graph.carries_init else t.name
                note(key, pos)
                if o in b.op.inputs:
                    consumed.add(key)
            pos += 1

    # carries: d(start tensor) is the outer carry buffer after the loop
    for item in graph.items:
        if isinstance(item, Repeat):
            for c, start in item.carry.items():
                if start in consumed:
                    raise ctx.err(f"carry start `{start}` is also read outside the carry; not supported yet",
                                  line=item.line, hint=f"read `{c}` instead of `{start}` where you can")
                for p in events.get(start, []):     # the carry's buffers hold d(start) until its last use
                    note(c, p)
                    note(f"{c}@spare", p)
    return steps, events, body_local


# ---- stage 6: plan the gradients' memory by live interval ----------------------------------------------------

@dataclass
class _GradPlan:
    keys: list[str]                   # gradients with a slot of their own, by first use
    assignment: dict[str, int]        # key -> slot
    body_local: dict[str, Repeat]
    grad_tensor: dict[str, TensorDecl]
    dtypes: dict[str, str]            # key -> the gradient's storage dtype (its tensor's)

    def view(self, key: str, var: str, comment: str | None = None) -> View:
        t = self.grad_tensor[key]
        return View(var, "slot", self.dtypes[key], comment or f"{shape_comment(t)} dslot{self.assignment[key]}",
                    slot=self.assignment[key])


def plan_gradients(ctx: _Ctx, graph: _Graph, layout: Layout, events: dict[str, list[int]],
                   body_local: dict[str, Repeat], steps: list[tuple]) -> _GradPlan:
    """Give every activation gradient a slot of the dacts arena; gradients never alive at once share one."""
    spec = ctx.spec
    starts = {start for item in graph.items if isinstance(item, Repeat) for start in item.carry.values()}
    # every buffer lives from its first to its last event; events inside a loop stretch outer buffers over the loop
    loops = [(s[2], next(e[2] for e in steps if e[0] == "loop_end" and e[1] is s[1])) for s in steps
             if s[0] == "loop_start"]

    def interval(key: str) -> tuple[int, int]:
        ps = events[key]
        lo, hi = min(ps), max(ps)
        if key not in body_local:
            for s, e in loops:
                if any(s < p < e for p in ps):
                    lo, hi = min(lo, s), max(hi, e)
        return lo, hi

    def grad_tensor(key: str) -> TensorDecl:
        base = key.split("@")[0]
        if base in graph.carries_init:
            return spec.tensors[graph.carries_init[base]]
        for item in graph.items:
            if isinstance(item, Repeat) and base in item.carry:
                return spec.tensors[item.next[base]]
        return spec.tensors[base]

    # gradients that need a buffer of their own (carry views and carry starts reuse the carry's buffers)
    keys = sorted((k for k in events if not k.endswith(("@body", "@next")) and k not in starts),
                  key=lambda k: (interval(k)[0], k))
    sizes = {k: layout.grad_slot_size(grad_tensor(k), ctx.dtype(grad_tensor(k))) for k in keys}
    slots, assignment = plan_intervals([(k, sizes[k], *interval(k)) for k in keys])
    layout.set_grad_slots(slots)
    return _GradPlan(keys, assignment, body_local, {k: grad_tensor(k) for k in events},
                     {k: ctx.dtype(grad_tensor(k)) for k in events})


# ---- stage 7: the backward -----------------------------------------------------------------------------------

def emit_backward(ctx: _Ctx, graph: _Graph, plan: _GradPlan, steps: list[tuple], forward: list[Stmt]) -> list[Stmt]:
    tensors, bound = ctx.spec.tensors, graph.bound
    bwd: list[Stmt] = [s for s in forward if isinstance(s, View)]   # carries after the last layer
    zeroed: set[str] = set()
    for k in plan.keys:
        if k in plan.body_local:
            continue
        if "@spare" in k:
            base = k.split("@")[0]
            bwd.append(plan.view(k, f"d_{base}_spare", f"{shape_comment(plan.grad_tensor[k])} second buffer for "
                                                       f"d_{base}, swapped with it layer by layer"))
        else:
            bwd.append(plan.view(k, f"d_{k}"))

    def zero_first(key: str, var: str, out: list[Stmt]) -> None:
        if key not in zeroed:
            zeroed.add(key)
            out.append(Zero(Local(var), tuple(plan.grad_tensor[key].shape),
                            f"{var} starts from zero (backward kernels accumulate)", plan.dtypes[key]))

    def backward_of(b: Bound, in_body: bool, rep: Repeat | None, out: list[Stmt]) -> None:
        for o, name in _pairs(b):
            t = b.tensors[o.name]
            if not _has_act_grad(o, t):
                continue
            if rep and name in rep.carry:
                continue   # zeroed at the top of the layer
            if rep and name in rep.next.values():
                continue   # the incoming gradient from the layer above
            zero_first(name, f"d_{name}", out)
        out.append(graph.invoke(b.node, "backward", in_body))

    for st in steps:
        kind = st[0]
        if kind == "seed":
            t = st[1]
            zeroed.add(t.name)
            bwd.append(Seed(Local(f"d_{t.name}"), tuple(t.shape),
                            f"d_{t.name} = loss_scale/(B*T): the loss is the mean of `{t.name}` (scale 1 "
                            f"without loss scaling)", ctx.dtype(t)))
        elif kind == "loop_start":
            rep = st[1]
            for c in rep.carry:
                zero_first(c, f"d_{c}", bwd)
            # a gradient that lives outside the loop but is first touched inside it starts from zero once,
            # before the loop, so that every layer adds to it
            for n in reversed(rep.body):
                for o, name in _pairs(bound[n.name]):
                    t = bound[n.name].tensors[o.name]
                    if _has_act_grad(o, t) and not t.per_layer and name not in rep.carry:
                        zero_first(name, f"d_{name}", bwd)
            body: list[Stmt] = []
            for c, nx in rep.next.items():
                body.append(Alias(f"d_{nx}", Local(f"d_{c}"), ctx.dtype(tensors[nx]),
                                  f"{shape_comment(tensors[nx])} this layer's output is the next layer's `{c}`: "
                                  f"its gradient so far"))
            for c in rep.carry:
                body.append(Assign(f"d_{c}", Local(f"d_{c}_spare"), "a fresh buffer for the gradient of this layer's input"))
                body.append(Zero(Local(f"d_{c}"), tuple(plan.grad_tensor[c].shape), f"d_{c} starts from zero",
                                 plan.dtypes[c]))
            calls: list[Stmt] = []
            for n in reversed(rep.body):
                backward_of(bound[n.name], True, rep, calls)
            used = locals_used(calls)
            body += [v for v in _carry_views(ctx, rep) if v.var in used]
            body += _layer_views(ctx, rep.body, rep, used)
            for k in plan.keys:
                if plan.body_local.get(k) is rep and "@" not in k:
                    body.append(plan.view(k, f"d_{k}"))
            body += calls
            for c, nx in rep.next.items():
                body.append(Assign(f"d_{c}_spare", Local(f"d_{nx}"), "free again for the layer below"))
            bwd.append(Loop(rep.count, True, body, "layers, last to first"))
            for c, start in rep.carry.items():
                bwd.append(Alias(f"d_{start}", Local(f"d_{c}"), ctx.dtype(tensors[start]),
                                 f"{shape_comment(tensors[start])} gradient of `{start}`, the carry's start"))
                zeroed.add(start)
        elif kind == "node":
            b, in_body = st[1], st[2]
            if not in_body:
                backward_of(b, False, None, bwd)
    return bwd


def _has_act_grad(o: O.Operand, t: TensorDecl | None) -> bool:
    """Whether operand ``o``, bound to ``t``, carries a gradient through an activation-gradient buffer."""
    return t is not None and t.kind == "act" and o.grad and o.dtype == "float"


def _pairs(b: Bound) -> list[tuple[O.Operand, str]]:
    """(operand, tensor name) for every operand the node gives (optional inputs it leaves out are skipped)."""
    return list(zip(b.op.inputs, b.node.inputs)) + list(zip(b.op.outputs, b.node.outputs))


def _check_cycles(ctx: _Ctx, order: list[tuple[Node, Repeat | None]], writers: dict[str, Node]) -> None:
    """Report a dependency cycle between nodes (A reads what B writes, B reads what A writes, ...)."""
    deps = {n.name: [writers[i].name for i in n.inputs if i in writers] for n, _ in order}
    by_name = {n.name: n for n, _ in order}
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for d in deps[name]:
            if state.get(d) == 1:
                cyc = path[path.index(d):] + [d] if d in path else [name, d]
                text = " -> ".join(f"'{c}' (line {by_name[c].line})" for c in cyc)
                raise ctx.err(f"the graph has a cycle: {text}", by_name[d],
                              hint="each node may read only tensors written by nodes before it")
            if state.get(d) is None:
                visit(d, path + [d])
        state[name] = 2

    for n, _ in order:
        if state.get(n.name) is None:
            visit(n.name, [n.name])
