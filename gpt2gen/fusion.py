"""Fusions: two graph nodes run as one op, where a target has a kernel for the pair.

A ``Fusion`` names a producer op and the consumer op that reads the producer's first output as its own
first input, and the fused op that replaces them (an ``OpDef`` like those of ``gpt2gen.ops``, so
binding, the derived backward and the memory plans treat it as any op). What it saves:

- ``matmul_gelu``: ``out = gelu(inp @ weight^T + bias)``; the backward turns ``d_out`` into the
  pre-activation's gradient in place (dGELU) before the matmul's backward, so the pre-activation has no
  gradient buffer of its own;
- ``classifier``: the language-model head and its loss, ``losses = cross_entropy(inp @ weight^T)``; the
  forward writes the logits and the loss, the backward writes the logits' gradient over the logits (no
  ``d_logits`` buffer, no probabilities), then runs the matmul's backward from there;
- ``residual_layernorm``: ``r = a + b; out = layernorm(r)`` in one pass over each row, and one pass
  back over the rows: the norm's input gradient and ``r``'s gradient from its other readers go to ``a``
  and ``b`` at once (the norm's weight gradients take the layernorm's own channel pass). Pairs across the
  layer boundary (the last residual of a layer and the next layer's first norm) are not fused yet.

The pass (``gpt2gen.lower.fuse_pairs``) applies a fusion only where it changes nothing else: the two nodes
adjacent in one block, and for an ``exclusive`` fusion the producer's output read by nobody but the consumer.
Which fusions a build uses is an option (``--fuse all|none|a,b``); a target lists those it has kernels for.
"""
from __future__ import annotations

from dataclasses import dataclass

from .ops import Attr, I, O, OpDef, _op
from .targets import OptionError


@dataclass(frozen=True)
class Fusion:
    name: str
    producer: str                  # op of the first node
    consumer: str                  # op of the second, whose first input is the first's first output
    op: OpDef                      # the fused op
    exclusive: bool                # the producer's output may have no other reader
    operands: tuple[tuple[str, int, str], ...]   # fused operand <- (0: producer / 1: consumer, its operand)
    producer_guards: bool = False  # the kernel runs without the consumer's optional inputs: the fused node is
                                   # guarded as the producer (the classifier: logits without targets)


FUSIONS: dict[str, Fusion] = {f.name: f for f in [
    Fusion("matmul_gelu", "matmul", "gelu", _op(
        "matmul_gelu", "out = gelu(inp @ weight^T + bias), keeping the pre-activation for the backward",
        [I("inp", "B,T,C"), I("weight", "OC,C"), I("bias", "OC", optional=True)],
        [O("pre", "B,T,OC", grad=False), O("out", "B,T,OC")]), exclusive=True,
        operands=(("inp", 0, "inp"), ("weight", 0, "weight"), ("bias", 0, "bias"), ("pre", 0, "out"), ("out", 1, "out"))),
    Fusion("classifier", "matmul", "softmax_crossentropy", _op(
        "classifier", "losses = cross_entropy(softmax((inp @ weight^T + bias)[..., :vocab]), targets); the "
        "logits' gradient is written over the logits",
        [I("inp", "B,T,C"), I("weight", "OC,C"),
         I("targets", "B,T", dtype="int", grad=False, indexes="V", optional=True), I("bias", "OC", optional=True)],
        [O("logits", "B,T,OC", grad=False), O("losses", "B,T")],
        attrs=[Attr("vocab", "int", binds="V")],
        checks=[("V <= OC", "the vocabulary cannot exceed the logits' width")]), exclusive=True,
        operands=(("inp", 0, "inp"), ("weight", 0, "weight"), ("targets", 1, "targets"), ("bias", 0, "bias"),
                  ("logits", 0, "out"), ("losses", 1, "losses")), producer_guards=True),
    Fusion("residual_layernorm", "residual", "layernorm", _op(
        "residual_layernorm", "r = a + b; out = (r - mean) * rstd * weight + bias over the last dimension",
        [I("a", "B,T,C"), I("b", "B,T,C"), I("weight", "C"), I("bias", "C")],
        [O("r", "B,T,C"), O("out", "B,T,C")], attrs=[Attr("eps", "float", 1e-5)]), exclusive=False,
        operands=(("a", 0, "a"), ("b", 0, "b"), ("weight", 1, "weight"), ("bias", 1, "bias"), ("r", 0, "out"),
                  ("out", 1, "out"))),
]}


def choose(spec: str | None, available: tuple[str, ...], target: str) -> tuple[str, ...]:
    """The fusions ``--fuse`` asks for: ``all`` (default: every one the target has), ``none``, or names."""
    if spec in (None, "all"):
        return available
    if spec == "none":
        return ()
    names = tuple(n.strip() for n in spec.split(",") if n.strip())
    unknown = [n for n in names if n not in FUSIONS]
    if unknown:
        raise OptionError(f"--fuse {spec}: unknown fusion {', '.join(unknown)}; the fusions are {', '.join(FUSIONS)} "
                         f"(or all, none)")
    lacking = [n for n in names if n not in available]
    if lacking:
        raise OptionError(f"--fuse {spec}: target `{target}` has no kernels for the fusion {', '.join(lacking)}; it has "
                         f"{', '.join(available) or 'none'}")
    return names
