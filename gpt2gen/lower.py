"""Lowering: from a checked model spec to a target-neutral program of kernel calls over named buffers.

For every graph node this module finds the op, binds the op's dimension letters against the model's
tensor shapes (reporting the node, its line and both shapes when they disagree), and emits the forward
call. The backward pass is *derived*: nodes are walked in reverse, each op's backward call is emitted,
and every activation gradient gets a buffer in a planned arena. Gradient buffers are allocated by live
interval, so buffers whose lifetimes do not overlap share memory; a layer's buffers are reused by every
layer. Because every backward kernel accumulates, a buffer is zeroed right before its first use.

Output: ``Program`` — statements (``Call``, ``Zero``, ``Fill``, ``Loop``, ``Guard``, ``Decl``) whose
arguments are already C expressions; a renderer only places them. All offset arithmetic happens here
and in ``gpt2gen.layout``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from . import expr as E
from . import ops as O
from .layout import Layout, align, plan_intervals
from .spec import ModelSpec, Node, Repeat, SpecError, TensorDecl

# ---------------------------------------------------------------------------------------------------
# The program


@dataclass
class Call:
    fn: str
    args: list[str]           # C expressions
    node: str
    line: int
    op: str


@dataclass
class Zero:
    ptr: str
    numel: str
    what: str


@dataclass
class Fill:
    ptr: str
    numel: str
    value: str
    what: str


@dataclass
class Decl:
    name: str
    init: str
    comment: str = ""
    ctype: str = "float*"


@dataclass
class Assign:
    name: str
    value: str
    comment: str = ""


@dataclass
class Guard:
    cond: str
    body: list["Stmt"]
    comment: str = ""


@dataclass
class Loop:
    var: str
    count: str
    reverse: bool
    body: list["Stmt"]
    comment: str = ""


Stmt = Union[Call, Zero, Fill, Decl, Assign, Guard, Loop]


@dataclass
class Program:
    spec: ModelSpec
    config: dict[str, int | float]
    layout: Layout
    forward: list[Stmt]
    backward: list[Stmt]
    ops_used: list[str]
    inputs: list[TensorDecl]
    loss_numel: str | None


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


class _Ctx:
    def __init__(self, spec: ModelSpec, config: dict[str, int | float]):
        self.spec = spec
        self.config = config
        self.env = dict(config)        # B and T at their maxima

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


def bind(ctx: _Ctx, node: Node, resolve) -> Bound:
    """Check a node against its op and bind the op's dimension letters."""
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
        raise ctx.err(f"op `{op.name}` gives {len(op.outputs)} outputs ({', '.join(o.name for o in op.outputs)}), "
                      f"got {len(node.outputs)}", node)
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
# Naming buffers in C


def _subst_bt(e: E.Expr) -> E.Expr:
    """The expression with the run-time B, T replaced by their build-time maxima."""
    if isinstance(e, E.Name) and e.id in ("B", "T"):
        return E.Name(e.id + "_MAX")
    if isinstance(e, E.BinOp):
        return E.BinOp(e.op, _subst_bt(e.left), _subst_bt(e.right))
    if isinstance(e, E.Neg):
        return E.Neg(_subst_bt(e.x))
    if isinstance(e, E.Call):
        return E.Call(e.fn, tuple(_subst_bt(a) for a in e.args))
    return e


def shape_comment(t: TensorDecl) -> str:
    return "(" + ",".join(d.text().replace(" ", "") for d in t.shape) + ")"


def layer_stride_c(t: TensorDecl) -> str:
    return E.product_c([_subst_bt(d) for d in t.shape])


def runtime_numel_c(t: TensorDecl) -> str:
    """C for the number of elements of ``t`` at the run-time B and T."""
    return E.product_c(list(t.shape))


# ---------------------------------------------------------------------------------------------------
# Lowering


def lower(spec: ModelSpec, config: dict[str, int | float]) -> Program:
    ctx = _Ctx(spec, config)
    tensors = spec.tensors
    repeats = [g for g in spec.graph if isinstance(g, Repeat)]
    n_layers = None
    if repeats:
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
    if config["T"] > config.get("maxT", config["T"]):
        raise ctx.err(f"batch T = {config['T']} exceeds maxT = {config['maxT']}", line=spec.config_lines.get("T"),
                      hint="lower T (e.g. an override T=...) or raise maxT")
    layout = Layout.plan(spec, config, n_layers or 1, ctx.dim_values)

    # ---- forward: check nodes in order, track producers, find cycles -------------------------------------
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
    guarded: set[str] = set()                 # nodes that run only when the optional inputs are given
    optional_inputs = {t.name for t in spec.of_kind("input") if t.optional}

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
            if t.kind == "act" and not t.per_layer and rep is not None and name in node.outputs:
                raise ctx.err(f"`{name}` is written inside a repeat block but is not per_layer, so each layer would "
                              f"overwrite it", node, hint=f"add `per_layer: true` to `{name}` (line {t.line})")
            return t, None
        return resolve

    fwd: list[Stmt] = []
    for item in spec.graph:
        items = item.body if isinstance(item, Repeat) else [item]
        rep = item if isinstance(item, Repeat) else None
        if rep:
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
            b = bind(ctx, n, resolve_in(rep))
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

    # ---- C names of buffers --------------------------------------------------------------------------------
    def ptr(name: str, t: TensorDecl, carry: str | None, in_body: bool) -> str:
        if carry is not None:
            return carry
        if t.kind == "input":
            return name
        arena = "p" if t.kind == "param" else "a"
        if t.per_layer and in_body:
            return name
        return f"{arena}->{name}"

    def gptr(name: str, t: TensorDecl, carry: str | None, in_body: bool) -> str:
        if t.kind == "input":
            return "NULL"
        if t.kind == "param":
            if t.per_layer and in_body:
                return f"d_{name}"
            return f"g->{name}"
        return f"d_{carry or name}"

    def call_for(b: Bound, template: str, in_body: bool) -> Call:
        """A kernel call from an op's call template, with every name replaced by its C expression."""
        fn, args = O.parse_call(template)
        names = {"B": "B", "T": "T"}
        for o in b.op.inputs + b.op.outputs:
            t = b.tensors[o.name]
            if t is None:
                names[o.name] = names["d_" + o.name] = "NULL"
                continue
            carry = b.carries.get(o.name)
            names[o.name] = ptr(t.name, t, carry, in_body)
            names["d_" + o.name] = gptr(t.name, t, carry, in_body) if o.grad and o.dtype == "float" else "NULL"
            names["numel__" + o.name] = E.product_c(list(t.shape))
        for letter, (ex, _) in b.dims.items():
            names[letter] = ex.to_c()
        for k, v in b.values.items():
            names[k] = str(v) if isinstance(v, int) else repr(float(v)) + "f"
        return Call(fn, [_render_arg(a, names) for a in args], b.node.name, b.node.line, b.op.name)

    def layer_decls(items: list[Node], rep: Repeat, used: set[str]) -> list[Stmt]:
        """Declarations at the top of a layer: this layer's slices of the stacked tensors it uses."""
        out: list[Stmt] = []
        seen: set[str] = set()
        for n in items:
            for name in n.inputs + n.outputs:
                t = tensors.get(name)
                if name in rep.carry or t is None or not t.per_layer or name in seen:
                    continue
                seen.add(name)
                arena = "p" if t.kind == "param" else "a"
                if name in used:
                    out.append(Decl(name, f"{arena}->{name} + (size_t)l * {layer_stride_c(t)}", shape_comment(t)))
                if t.kind == "param" and f"d_{name}" in used:
                    out.append(Decl(f"d_{name}", f"g->{name} + (size_t)l * {layer_stride_c(t)}", shape_comment(t)))
        return out

    def used_names(stmts: list[Stmt]) -> set[str]:
        out: set[str] = set()
        for s in stmts:
            if isinstance(s, Call):
                for a in s.args:
                    out.update(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", a))
            elif isinstance(s, (Guard, Loop)):
                out |= used_names(s.body)
        return out

    def carry_decls(rep: Repeat) -> list[Stmt]:
        out: list[Stmt] = []
        for c, start in rep.carry.items():
            st, nx = tensors[start], tensors[rep.next[c]]
            out.append(Decl(c, f"(l == 0) ? {ptr(start, st, None, False)} : a->{nx.name} + (size_t)(l - 1) * "
                               f"{layer_stride_c(nx)}", f"{shape_comment(st)} carry: `{start}` for layer 0, "
                                                        f"then the previous layer's `{nx.name}`"))
        return out

    for item in spec.graph:
        if isinstance(item, Repeat):
            calls = _guarded([(call_for(bound[n.name], bound[n.name].op.forward, True), n.name in guarded)
                              for n in item.body], optional_inputs)
            body: list[Stmt] = carry_decls(item) + layer_decls(item.body, item, used_names(calls)) + calls
            fwd.append(Loop("l", item.count.to_c(), False, body, "layers"))
            for c in item.carry:
                nx = tensors[item.next[c]]
                fwd.append(Decl(c, f"a->{nx.name} + (size_t)({item.count.to_c()} - 1) * {layer_stride_c(nx)}",
                                f"{shape_comment(nx)} carry `{c}` after the last layer"))
        else:
            fwd += _guarded([(call_for(bound[item.name], bound[item.name].op.forward, False), item.name in guarded)],
                            optional_inputs)

    # ---- backward: reverse walk, gradient buffers by live interval ----------------------------------------------
    loss_t = tensors.get(spec.loss) if spec.loss else None
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
    for item in reversed(spec.graph):
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
                key = name if name in carries_init else t.name
                note(key, pos)
                if o in b.op.inputs:
                    consumed.add(key)
            pos += 1

    # carries: d(start tensor) is the outer carry buffer after the loop
    alias: dict[str, str] = {}
    for item in spec.graph:
        if isinstance(item, Repeat):
            for c, start in item.carry.items():
                if start in consumed:
                    raise ctx.err(f"carry start `{start}` is also read outside the carry; not supported yet",
                                  line=item.line, hint=f"read `{c}` instead of `{start}` where you can")
                alias[start] = c
                for p in events.get(start, []):     # the carry's buffers hold d(start) until its last use
                    note(c, p)
                    note(f"{c}@spare", p)
    # every buffer lives from its first to its last event; events inside a loop stretch outer buffers over the loop
    loops: list[tuple[int, int, Repeat]] = [(s[2], next(e[2] for e in steps if e[0] == "loop_end" and e[1] is s[1]), s[1])
                                            for s in steps if s[0] == "loop_start"]

    def interval(key: str) -> tuple[int, int]:
        ps = events[key]
        lo, hi = min(ps), max(ps)
        if key not in body_local:
            for s, e, _ in loops:
                if any(s < p < e for p in ps):
                    lo, hi = min(lo, s), max(hi, e)
        return lo, hi

    def grad_tensor(key: str) -> TensorDecl:
        base = key.split("@")[0]
        if base in carries_init:
            return tensors[carries_init[base]]
        for item in spec.graph:
            if isinstance(item, Repeat) and base in item.carry:
                return tensors[item.next[base]]
        return tensors[base]

    # gradients that need a buffer of their own (carry views and carry starts reuse the carry's buffers)
    keys = sorted((k for k in events if not k.endswith(("@body", "@next")) and k not in alias),
                  key=lambda k: (interval(k)[0], k))
    sizes = {k: align(layout.numel_max(grad_tensor(k))) for k in keys}
    slots, assignment = plan_intervals([(k, sizes[k], *interval(k)) for k in keys])
    layout.set_grad_slots(slots)

    def slot_ptr(key: str) -> str:
        return f"da + DSLOT_{assignment[key]}"

    bwd: list[Stmt] = [s for s in fwd if isinstance(s, Decl)]   # carries after the last layer
    zeroed: set[str] = set()
    outer_keys = [k for k in keys if k not in body_local]
    for k in outer_keys:
        if "@spare" in k:
            base = k.split("@")[0]
            bwd.append(Decl(f"d_{base}_spare", slot_ptr(k), f"{shape_comment(grad_tensor(k))} second buffer for d_{base}, "
                                                            f"swapped with it layer by layer"))
        else:
            bwd.append(Decl(f"d_{k}", slot_ptr(k), f"{shape_comment(grad_tensor(k))} dslot{assignment[k]}"))

    def zero_first(key: str, name: str, out: list[Stmt]) -> None:
        if key not in zeroed:
            zeroed.add(key)
            t = grad_tensor(key)
            out.append(Zero(name, runtime_numel_c(t), f"{name} starts from zero (backward kernels accumulate)"))

    def backward_call(b: Bound, in_body: bool, rep: Repeat | None, out: list[Stmt]) -> None:
        for o, name in _pairs(b):
            t = b.tensors[o.name]
            if not _has_act_grad(o, t):
                continue
            if rep and name in rep.carry:
                continue   # zeroed at the top of the layer
            if rep and name in rep.next.values():
                continue   # the incoming gradient from the layer above
            zero_first(name, f"d_{name}", out)
        out.append(call_for(b, b.op.backward, in_body))

    loss_numel = None
    for st in steps:
        kind = st[0]
        if kind == "seed":
            t = st[1]
            loss_numel = runtime_numel_c(t)
            zeroed.add(t.name)
            bwd.append(Fill(f"d_{t.name}", loss_numel, f"1.0f / (float)({loss_numel})",
                            f"d_{t.name} = 1/(B*T): the loss is the mean of `{t.name}`"))
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
                body.append(Decl(f"d_{nx}", f"d_{c}", f"{shape_comment(tensors[nx])} this layer's output is the next "
                                                   f"layer's `{c}`: its gradient so far"))
            for c in rep.carry:
                body.append(Assign(f"d_{c}", f"d_{c}_spare", "a fresh buffer for the gradient of this layer's input"))
                body.append(Zero(f"d_{c}", runtime_numel_c(grad_tensor(c)), f"d_{c} starts from zero"))
            calls: list[Stmt] = []
            for n in reversed(rep.body):
                backward_call(bound[n.name], True, rep, calls)
            used = used_names(calls)
            body += [d for d in carry_decls(rep) if d.name in used]
            body += layer_decls(rep.body, rep, used)
            for k in keys:
                if body_local.get(k) is rep and "@" not in k:
                    body.append(Decl(f"d_{k}", slot_ptr(k), f"{shape_comment(grad_tensor(k))} dslot{assignment[k]}"))
            body += calls
            for c, nx in rep.next.items():
                body.append(Assign(f"d_{c}_spare", f"d_{nx}", "free again for the layer below"))
            bwd.append(Loop("l", rep.count.to_c(), True, body, "layers, last to first"))
            for c, start in rep.carry.items():
                bwd.append(Decl(f"d_{start}", f"d_{c}", f"{shape_comment(tensors[start])} gradient of `{start}`, "
                                                       f"the carry's start"))
                zeroed.add(start)
        elif kind == "node":
            b, in_body = st[1], st[2]
            if not in_body:
                backward_call(b, False, None, bwd)

    inputs = spec.of_kind("input")
    used = []
    for item in spec.graph:
        for n in (item.body if isinstance(item, Repeat) else [item]):
            if n.op not in used:
                used.append(n.op)
    return Program(spec, config, layout, fwd, bwd, used, inputs, loss_numel)


def _has_act_grad(o: O.Operand, t: TensorDecl | None) -> bool:
    """Whether operand ``o``, bound to ``t``, carries a gradient through an activation-gradient buffer."""
    return t is not None and t.kind == "act" and o.grad and o.dtype == "float"


def _pairs(b: Bound) -> list[tuple[O.Operand, str]]:
    """(operand, tensor name) for every operand the node gives (optional inputs it leaves out are skipped)."""
    return list(zip(b.op.inputs, b.node.inputs)) + list(zip(b.op.outputs, b.node.outputs))


def _render_arg(e: E.Expr, names: dict[str, str]) -> str:
    if isinstance(e, E.Name):
        return names.get(e.id, e.id)
    if isinstance(e, E.Num):
        return e.to_c()
    if isinstance(e, E.BinOp):
        op = "/" if e.op == "//" else e.op

        def side(x: E.Expr) -> str:   # a nested sum or product keeps its parentheses
            return f"({_render_arg(x, names)})" if isinstance(x, E.BinOp) else _render_arg(x, names)
        return f"{side(e.left)} {op} {side(e.right)}"
    if isinstance(e, E.Neg):
        return f"-{_render_arg(e.x, names)}"
    return e.to_c()


def _guarded(calls: list[tuple[Call, bool]], optional_inputs: set[str]) -> list[Stmt]:
    """Wrap runs of calls that need an optional input in ``if (input) { ... }``."""
    out: list[Stmt] = []
    cond = " && ".join(sorted(optional_inputs))
    for c, needs in calls:
        if needs:
            if out and isinstance(out[-1], Guard):
                out[-1].body.append(c)
            else:
                out.append(Guard(cond, [c], "only when the optional inputs are given"))
        else:
            out.append(c)
    return out


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
