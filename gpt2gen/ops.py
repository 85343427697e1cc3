"""The op library: what each op takes and gives, and how its shapes relate -- on every target alike.

An op is data. Its operands carry shape patterns over dimension letters (``B``, ``T`` are the run-time
batch shape; other letters bind to whatever the model's tensors say, and must agree across operands);
``*`` means "any shape, the same for every ``*`` operand". How an op runs is a target's business: each
target's kernel table (``gpt2gen.targets``) names the kernels of its forward and backward and the
template that defines them. The backward of every op *accumulates* into every gradient it is given, so
the lowering decides where gradient buffers start from zero. What an op keeps from its forward for its
backward (a norm's statistics, attention's log-sum-exp per row) is not part of the op either: it depends
on how the target implements the op, so each target's kernel declares it and the lowering places it.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import expr as E


@dataclass(frozen=True)
class Operand:
    name: str
    shape: tuple[str, ...]          # pattern: letters, expressions over letters, or ("*",)
    dtype: str = "float"            # "float" | "int"
    grad: bool = True               # differentiable (inputs: receives a gradient; outputs: carries one back)
    optional: bool = False          # an input that may be left out (passed as NULL)
    indexes: str | None = None      # an int input whose values index this dimension letter (checked vs its range)


@dataclass(frozen=True)
class Attr:
    name: str
    kind: str                       # "int" | "float"
    default: float | None = None    # None: the node must give it
    binds: str | None = None        # an int attribute may bind a dimension letter (e.g. heads -> NH)


@dataclass(frozen=True)
class OpDef:
    name: str
    doc: str
    inputs: tuple[Operand, ...]
    outputs: tuple[Operand, ...]
    attrs: tuple[Attr, ...] = ()
    checks: tuple[tuple[str, str], ...] = ()   # (relation over letters, what it means) e.g. ("C % NH", ...)

    def operand(self, name: str) -> Operand:
        for o in self.inputs + self.outputs:
            if o.name == name:
                return o
        raise KeyError(name)


def _op(name, doc, inputs, outputs, attrs=(), checks=()) -> OpDef:
    return OpDef(name, doc, tuple(inputs), tuple(outputs), tuple(attrs), tuple(checks))


def I(name, shape, **kw) -> Operand:  # noqa: E743 - reads like the table it builds
    return Operand(name, tuple(s.strip() for s in shape.split(",")), **kw)


O = I

OPS: dict[str, OpDef] = {op.name: op for op in [
    _op("embedding", "out[b,t] = table[idx[b,t]] + pos[t] (token plus position embedding)",
        [I("idx", "B,T", dtype="int", grad=False, indexes="Vt"), I("table", "Vt,C"), I("pos", "P,C")],
        [O("out", "B,T,C")],
        checks=[("T <= P", "the sequence length must fit the position table")]),
    _op("layernorm", "out = (inp - mean) * rstd * weight + bias over the last dimension",
        [I("inp", "B,T,C"), I("weight", "C"), I("bias", "C")],
        [O("out", "B,T,C")],
        attrs=[Attr("eps", "float", 1e-5)]),
    _op("matmul", "out = inp @ weight^T (+ bias); weight is (OC, C) as in torch.nn.Linear",
        [I("inp", "B,T,C"), I("weight", "OC,C"), I("bias", "OC", optional=True)],
        [O("out", "B,T,OC")]),
    _op("attention", "causal multi-head self-attention over a packed (q, k, v) input",
        [I("qkv", "B,T,3 * C")],
        [O("out", "B,T,C")],
        attrs=[Attr("heads", "int", binds="NH")],
        checks=[("C % NH == 0", "channels must divide evenly into heads")]),
    _op("gelu", "out = GELU(inp), tanh approximation",
        [I("inp", "*")], [O("out", "*")]),
    _op("residual", "out = a + b",
        [I("a", "*"), I("b", "*")], [O("out", "*")]),
    _op("softmax_crossentropy", "losses = -log softmax(logits[..., :vocab])[target]",
        [I("logits", "B,T,Vp"), I("targets", "B,T", dtype="int", grad=False, indexes="V")],
        [O("losses", "B,T")],
        attrs=[Attr("vocab", "int", binds="V")],
        checks=[("V <= Vp", "the vocabulary cannot exceed the logits' width")]),
    # ---- the ops of Llama, Mistral and Gemma (docs/adding-an-architecture.md) ----------------------------
    _op("token_embedding", "out[b,t] = table[idx[b,t]] * scale (no position table; tokens == padding_idx get "
        "no gradient, as in torch.nn.Embedding)",
        [I("idx", "B,T", dtype="int", grad=False, indexes="Vt"), I("table", "Vt,C")],
        [O("out", "B,T,C")],
        attrs=[Attr("scale", "float", 1.0), Attr("padding_idx", "int", -1)]),
    _op("rmsnorm", "out = inp / sqrt(mean(inp^2) + eps) * (weight + weight_offset) over the last dimension "
        "(weight_offset 1: Gemma's (1 + weight) form)",
        [I("inp", "B,T,C"), I("weight", "C")],
        [O("out", "B,T,C")],
        attrs=[Attr("eps", "float", 1e-6), Attr("weight_offset", "float", 0.0)]),
    _op("rope", "rotary position embedding (rotate-half pairs i, i + D/2 of each of H heads; angle t * theta^(-2i/D))",
        [I("inp", "B,T,H * D")],
        [O("out", "B,T,H * D")],
        attrs=[Attr("heads", "int", binds="H"), Attr("head_dim", "int", binds="D"), Attr("theta", "float", 10000.0)],
        checks=[("D % 2 == 0", "the head dimension must be even to rotate pairs")]),
    _op("gqa_attention", "causal self-attention, grouped-query (K kv heads shared by H query heads), with an "
        "optional sliding window (a query at t sees keys t - window < t2 <= t; window 0: all t2 <= t)",
        [I("q", "B,T,H * D"), I("k", "B,T,K * D"), I("v", "B,T,K * D")],
        [O("out", "B,T,H * D")],
        attrs=[Attr("heads", "int", binds="H"), Attr("kv_heads", "int", binds="K"),
               Attr("head_dim", "int", binds="D"), Attr("window", "int", 0)],
        checks=[("H % K == 0", "query heads must divide evenly into groups over the kv heads")]),
    _op("swiglu", "out = silu(gate) * up (the gated feed-forward of Llama and Mistral)",
        [I("gate", "*"), I("up", "*")], [O("out", "*")]),
    _op("geglu", "out = gelu_tanh(gate) * up (the gated feed-forward of Gemma)",
        [I("gate", "*"), I("up", "*")], [O("out", "*")]),
]}


def get(name: str) -> OpDef | None:
    return OPS.get(name)


def pattern(dim: str) -> E.Expr:
    return E.parse(dim)
