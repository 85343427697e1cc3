"""Graph shapes beyond GPT-2's, and the model-file mistakes around them (found by review).

The gradient checks compare each parameter's analytic gradient along a random direction with a central
finite difference of the loss (fp32, step 2e-3, relative tolerance 1e-2 — a wrong plan is off by far
more, e.g. a gradient buffer zeroed in every layer loses all but one layer's contribution).
"""
from __future__ import annotations

import numpy as np
import pytest

import gpt2gen
from gpt2gen import spec as S
from gpt2gen.lower import lower
from gpt2gen.render import render_program

HEAD = """
name: edge
config: {V: 23, Vp: 32, maxT: 8, L: 3, C: 12, FF: 20}
batch: {B: 2, T: 5}
inputs:
  idx: {shape: [B, T], range: V}
  targets: {shape: [B, T], range: V, optional: true}
parameters:
  wte: {shape: [Vp, C], init: {normal: 0.3}}
  wpe: {shape: [maxT, C], init: {normal: 0.3}}
  w1: {shape: [FF, C], per_layer: true, init: {normal: 0.3}}
  w2: {shape: [C, FF], per_layer: true, init: {normal: 0.3}}
  wf: {shape: [C, C], init: {normal: 0.3}}
activations:
  encoded: [B, T, C]
  extra: [B, T, C]
  h: {shape: [B, T, FF], per_layer: true}
  ga: {shape: [B, T, FF], per_layer: true}
  o: {shape: [B, T, C], per_layer: true}
  r: {shape: [B, T, C], per_layer: true}
  h2: {shape: [B, T, FF], per_layer: true}
  ga2: {shape: [B, T, FF], per_layer: true}
  o2: {shape: [B, T, C], per_layer: true}
  r2: {shape: [B, T, C], per_layer: true}
  f: [B, T, C]
  logits: [B, T, Vp]
  losses: [B, T]
outputs: {logits: {tensor: logits, columns: V}, loss: losses}
"""
LAYER = """
    body:
      - {{name: fc{s}, op: matmul, in: [{x}, w1], out: h{s}}}
      - {{name: act{s}, op: gelu, in: [h{s}], out: ga{s}}}
      - {{name: proj{s}, op: matmul, in: [ga{s}, w2], out: o{s}}}
      - {{name: res{s}, op: residual, in: [o{s}, {skip}], out: r{s}}}
"""
TAIL = """
  - {name: final, op: matmul, in: [FINAL, wf], out: f}
  - {name: head, op: matmul, in: [f, wte], out: logits}
  - {name: loss, op: softmax_crossentropy, in: [logits, targets], out: losses, vocab: V}
"""

GRAPHS = {
    # a non-per-layer activation read in every layer (an x0-style skip connection)
    "skip_read_in_every_layer": """
graph:
  - {name: embed, op: embedding, in: [idx, wte, wpe], out: encoded}
  - {name: embed2, op: embedding, in: [idx, wte, wpe], out: extra}
  - repeat: L
    carry: {x: encoded}""" + LAYER.format(s="", x="x", skip="extra") + """    next: {x: r}""" + TAIL.replace("FINAL", "x"),
    # ... and also read after the loop
    "skip_read_in_and_after_the_loop": """
graph:
  - {name: embed, op: embedding, in: [idx, wte, wpe], out: encoded}
  - {name: embed2, op: embedding, in: [idx, wte, wpe], out: extra}
  - repeat: L
    carry: {x: encoded}""" + LAYER.format(s="", x="x", skip="extra") + """    next: {x: r}
  - {name: mix, op: residual, in: [x, extra], out: f2}""" + TAIL.replace("FINAL", "f2"),
    # two repeat blocks, one after the other
    "two_repeat_blocks": """
graph:
  - {name: embed, op: embedding, in: [idx, wte, wpe], out: encoded}
  - repeat: L
    carry: {x: encoded}""" + LAYER.format(s="", x="x", skip="x") + """    next: {x: r}
  - {name: copy, op: residual, in: [x, x], out: extra}
  - repeat: L
    carry: {y: extra}""" + LAYER.format(s="2", x="y", skip="y") + """    next: {y: r2}""" + TAIL.replace("FINAL", "y"),
    # no repeat block at all
    "no_repeat": """
graph:
  - {name: embed, op: embedding, in: [idx, wte, wpe], out: encoded}
  - {name: twice, op: residual, in: [encoded, encoded], out: extra}""" + TAIL.replace("FINAL", "extra"),
}


def write_model(tmp_path, graph: str, head: str = HEAD):
    text = head.replace("  f: [B, T, C]", "  f: [B, T, C]\n  f2: [B, T, C]") + graph
    p = tmp_path / "edge.yaml"
    p.write_text(text)
    return p


def directional_check(model, idx, targets, rng):
    def loss():
        return float(model.forward(idx, targets))
    loss()
    model.zero_grad()
    model.backward()
    for name, p in model.params.items():
        d = rng.standard_normal(p.shape).astype(np.float32)
        analytic = float(np.sum(model.grads[name].astype(np.float64) * d))
        saved = p.copy()
        eps = 2e-3
        p[...] = saved + eps * d
        up = loss()
        p[...] = saved - eps * d
        down = loss()
        p[...] = saved
        numeric = (up - down) / (2 * eps)
        scale = max(abs(numeric), abs(analytic), 1e-3)
        assert abs(analytic - numeric) <= 1e-2 * scale, f"{name}: analytic {analytic:+.5f} vs finite difference {numeric:+.5f}"


@pytest.mark.parametrize("graph", list(GRAPHS))
def test_gradients_of_unusual_graphs(tmp_path, graph):
    model = gpt2gen.build(write_model(tmp_path, GRAPHS[graph]), seed=1)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 23, (2, 5)).astype(np.int32)
    targets = rng.integers(0, 23, (2, 5)).astype(np.int32)
    directional_check(model, idx, targets, rng)


def error_of(tmp_path, text: str, **overrides) -> str:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(S.SpecError) as info:
        spec = S.load(p)
        program = lower(spec, spec.resolve(overrides))
        render_program(program)
    return str(info.value)


BASE = HEAD + GRAPHS["skip_read_in_every_layer"]


@pytest.mark.parametrize("edit,message", [
    (("carry: {x: encoded}", "carry: {x: wf}"), "not an activation of the whole model"),
    (("{name: res, op: residual, in: [o, extra], out: r}", "{name: res, op: residual, in: [o, extra], out: x}"),
     "cannot write the carry `x`"),
    (("repeat: L", "repeat: B"), "not config names"),
    (("w1: {shape: [FF, C]", "w1: {shape: [FF * 1.0, C]"), "non-integer number"),
    (("op: gelu, in: [h], out: ga}", "op: gelu, in: [h], out: ga, foo: 1}"), "no attribute `foo`"),
    (("idx: {shape: [B, T], range: V}", "idx: {shape: [B, T]}"), "needs `range`"),
    (("idx: {shape: [B, T], range: V}", "idx: {shape: [B, T], range: Vp + 1}"), "indexes `Vt` = 32"),
    (("targets: {shape: [B, T], range: V,", "targets: {shape: [B, T], range: Vp,"), "indexes `V` = 23"),
    (("wte: {shape: [Vp, C], init: {normal: 0.3}}", "wte: {shape: [Vp, C], init: {normal: 0.3 * nope}}"),
     "unknown name(s) nope"),
    (("  extra: [B, T, C]", "  \"extra\\n\": [B, T, C]"), "identifier"),
])
def test_model_file_mistakes(tmp_path, edit, message):
    old, new = edit
    assert old in BASE, old
    assert message in error_of(tmp_path, BASE.replace(old, new))


@pytest.mark.parametrize("name, reason", [
    ("GG_MM_KBLOCK", "the prefix `GG_` is reserved by the generated C"),     # a macro of the matmul kernel
    ("matmul_forward", "a kernel function of op `matmul`"),
    ("mm_gemm", "a name of the generated C (templates/c/ops/matmul.c.j2)"),   # a helper of a kernel
    ("w2", None),                                                            # one of the model's own names
])
def test_a_kernel_name_is_refused_when_the_file_is_loaded(tmp_path, name, reason):
    """The names of the kernels a model is compiled with are reserved by validation, at the name's line, for
    every model (not only for those that use the op): the renderer does not check them a second time."""
    text = BASE.replace("config: {V: 23,", f"config: {{{name}: 8, V: 23,")
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    if reason is None:
        with pytest.raises(S.SpecError, match="declared twice"):
            S.load(p)
        return
    with pytest.raises(S.SpecError) as info:
        S.load(p)
    line = text[:text.index("config:")].count("\n") + 1
    assert str(info.value).startswith(f"{p}:{line}: config name `{name}` is reserved: {reason}"), str(info.value)


def test_infinite_attribute(tmp_path):
    text = BASE.replace("{name: loss, op: softmax_crossentropy", "{name: ln, op: layernorm, in: [f, wf, wf], "
                        "out: [f2, f2m, f2r], eps: 1e999}\n  - {name: loss, op: softmax_crossentropy")
    assert "finite" in error_of(tmp_path, text.replace("  f: [B, T, C]", "  f: [B, T, C]\n  f2: [B, T, C]\n"
                                                       "  f2m: [B, T]\n  f2r: [B, T]"))


def test_same_carry_name_in_two_blocks(tmp_path):
    text = HEAD.replace("  f: [B, T, C]", "  f: [B, T, C]\n  f2: [B, T, C]") + GRAPHS["two_repeat_blocks"]
    text = text.replace("carry: {y: extra}", "carry: {x: extra}").replace("next: {y: r2}", "next: {x: r2}")
    text = text.replace("in: [y, w1]", "in: [x, w1]").replace("in: [o2, y]", "in: [o2, x]")
    assert "another block's carry" in error_of(tmp_path, text)


def test_inputs_are_copied(tmp_path):
    """backward reads the inputs again: a caller reusing its buffer after forward must not change it."""
    model = gpt2gen.build(write_model(tmp_path, GRAPHS["no_repeat"]), seed=1)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 23, (2, 5)).astype(np.int32)
    targets = rng.integers(0, 23, (2, 5)).astype(np.int32)
    model.forward(idx, targets)
    model.zero_grad()
    model.backward()
    want = model.arenas["grads"].copy()
    model.forward(idx, targets)
    model.zero_grad()
    idx[...] = 10 ** 8            # would index far outside wte if the C code saw it
    targets[...] = 0
    model.backward()
    np.testing.assert_array_equal(model.arenas["grads"], want)


def test_model_file_name_cannot_break_out_of_a_comment(tmp_path):
    evil = tmp_path / "m\n#include <stdlib.h>\nstatic int x = system(0);\nint y.yaml"
    evil.write_text(HEAD.replace("  f: [B, T, C]", "  f: [B, T, C]\n  f2: [B, T, C]") + GRAPHS["no_repeat"])
    spec = S.load(evil)
    code = render_program(lower(spec, spec.resolve()))["model.c"]
    assert not any(line.startswith("static int x") for line in code.splitlines())
    assert "m??include??stdlib.h??static?int?x???system?0???int?y.yaml" in code   # one line, inert


def test_call_arguments_keep_their_parentheses():
    from gpt2gen import expr as E
    from gpt2gen.targets.cpu import c_arg
    names = {"a": "x", "b": "y", "c": "z"}
    assert c_arg(E.parse("(a + b) * c"), names) == "(x + y) * z"
    assert c_arg(E.parse("a - (b - c)"), names) == "x - (y - z)"
    assert c_arg(E.parse("B * T"), {"B": "B", "T": "T"}) == "B * T"


# ---- what the ops keep for their backward, and scratch ---------------------------------------------------

def _gpt2_text() -> str:
    from gpt2gen.resources import data_root
    return (data_root() / "model.yaml").read_text()


def test_saved_state_is_placed_by_the_lowering_under_the_node_name():
    """The model file declares no statistics: the target's kernels do, and the layout names their node."""
    from gpt2gen.resources import data_root
    spec = S.load(data_root() / "model.yaml")
    program = lower(spec, spec.resolve({"L": 2}))
    acts = {s.name: s for s in program.layout.acts.slots}
    for name, dims in [("ln_1_mean", (2, 4, 64)), ("ln_1_rstd", (2, 4, 64)), ("attn_lse", (2, 4, 12, 64)),
                       ("ln_f_rstd", (4, 64)), ("loss_lse", (4, 64))]:
        assert acts[name].dims == dims and "kept by" in acts[name].note, (name, acts[name])
        assert program.buffers[name].role == "saved" and program.buffers[name].dtype == "f32"
    assert "kept by 'attn' (attention)" in program.layout.table()


def test_a_node_that_still_lists_saved_statistics_is_told_what_to_drop(tmp_path):
    text = _gpt2_text().replace("out: ln1, eps: norm_eps}", "out: [ln1, ln1_mean, ln1_rstd], eps: norm_eps}")
    text = text.replace("  qkv:", "  ln1_mean:  {shape: [B, T], per_layer: true}\n"
                                  "  ln1_rstd:  {shape: [B, T], per_layer: true}\n  qkv:", 1)
    p = tmp_path / "old.yaml"
    p.write_text(text)
    spec = S.load(p)
    with pytest.raises(S.SpecError) as e:
        lower(spec, spec.resolve())
    msg = str(e.value)
    assert "op `layernorm` gives 1 output (out), got 3" in msg and "node 'ln_1'" in msg
    assert "keeps its mean, rstd for the backward by itself" in msg and "drop `ln1_mean`, `ln1_rstd`" in msg


def test_a_saved_buffer_whose_name_is_taken_is_refused_at_its_node(tmp_path):
    text = _gpt2_text().replace("  losses:    [B, T]", "  losses:    [B, T]\n  ln_f_rstd: [B, T]")
    p = tmp_path / "clash.yaml"
    p.write_text(text)
    spec = S.load(p)
    with pytest.raises(S.SpecError, match=r"node 'ln_f' keeps its `rstd` for the backward as `ln_f_rstd`, which is "
                                          r"already a tensor[\s\S]*hint: rename the node"):
        lower(spec, spec.resolve())


def test_activations_no_backward_reads_share_one_layer_of_scratch():
    """GPT-2's residual summands (attproj, fcproj) are read only by the forward's residual nodes: one
    (B,T,C) slot serves both in every layer instead of two (L,B,T,C) stacks; what a backward reads stays."""
    from gpt2gen.resources import data_root
    spec = S.load(data_root() / "model.yaml")
    program = lower(spec, spec.resolve({"L": 3}))
    acts = {s.name: s for s in program.layout.acts.slots}
    assert acts["attproj"].offset == acts["fcproj"].offset and acts["attproj"].dims == (4, 64, 768)
    assert acts["attproj"].alias and program.buffers["attproj"].role == "scratch"
    for kept in ("ln1", "qkv", "atty", "residual2", "fch", "fch_gelu", "residual3", "logits", "losses"):
        assert program.buffers[kept].role == "act" and not acts[kept].alias, kept
    code = render_program(program)["model.c"]
    assert "float* attproj = a->attproj;  // (B,T,C) gg_scratch0, every layer's" in code


# ---- fusions -----------------------------------------------------------------------------------------------

def test_the_fusions_replace_their_pairs_and_their_buffers():
    """GPT-2 fused: residual + layernorm inside the layer, matmul + gelu, the classifier. The classifier writes
    d_logits over the logits and matmul + gelu turns d_out into d_pre in place, so neither gradient has a
    buffer; fused and unfused lay out the same activations."""
    from gpt2gen.resources import data_root
    spec = S.load(data_root() / "model.yaml")
    fused = lower(spec, spec.resolve({"L": 2}))
    plain = lower(spec, spec.resolve({"L": 2}), fuse="none")
    assert fused.fused == ["attn_res+ln_2", "mlp_fc+mlp_gelu", "lm_head+loss"] and plain.fused == []
    notes = " ".join(s.note for s in fused.layout.dacts.slots)
    assert "d_logits" not in notes and "d_fch," not in notes + "," and "d_fch_gelu" in notes
    assert "d_logits" in " ".join(s.note for s in plain.layout.dacts.slots)
    assert fused.layout.dacts.nbytes < plain.layout.dacts.nbytes / 4
    assert [s.name for s in fused.layout.acts.slots if not s.note] == [s.name for s in plain.layout.acts.slots
                                                                       if not s.note]
    code = render_program(fused)["model.c"]
    assert "// lm_head+loss (model.yaml:" in code and "classifier_backward(" in code and "float* d_logits =" not in code
    only = lower(spec, spec.resolve({"L": 2}), fuse="classifier")
    assert only.fused == ["lm_head+loss"]


def test_a_fusion_the_target_lacks_or_that_does_not_exist_is_refused(capsys):
    from gpt2gen.cli import main
    from gpt2gen.resources import data_root
    spec = S.load(data_root() / "model.yaml")
    with pytest.raises(ValueError, match=r"unknown fusion matmul_relu; the fusions are matmul_gelu, classifier, "
                                         r"residual_layernorm \(or all, none\)"):
        lower(spec, spec.resolve(), fuse="matmul_relu")
    assert main(["layout", "--fuse", "matmul_relu"]) == 2
    assert "--fuse matmul_relu: unknown fusion matmul_relu" in capsys.readouterr().err


def test_an_intermediate_read_elsewhere_is_not_fused_away(tmp_path):
    """matmul + gelu fuses only where the pre-activation has no other reader: once a second gelu reads it too,
    the pair stays two nodes (and the gradients stay right)."""
    graph = """
graph:
  - {name: embed, op: embedding, in: [idx, wte, wpe], out: encoded}
  - repeat: L
    carry: {x: encoded}
    body:
      - {name: fc, op: matmul, in: [x, w1], out: h}
      - {name: act, op: gelu, in: [h], out: ga}
      - {name: proj, op: matmul, in: [ga, w2], out: o}
      - {name: mix, op: residual, in: [o, x], out: r}
    next: {x: r}""" + TAIL.replace("FINAL", "x")
    p = write_model(tmp_path, graph)
    spec = S.load(p)
    assert lower(spec, spec.resolve()).fused == ["fc+act", "head+loss"]
    text = p.read_text().replace("{name: mix, op: residual, in: [o, x], out: r}",
                                 "{name: mix, op: residual, in: [o, x], out: r}\n      "
                                 "- {name: again, op: gelu, in: [h], out: ga2}")
    p.write_text(text)
    spec = S.load(p)
    program = lower(spec, spec.resolve())
    assert "fc+act" not in program.fused
    model = gpt2gen.build(p, seed=0)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 23, (2, 5)).astype(np.int32)
    directional_check(model, idx, rng.integers(0, 23, (2, 5)).astype(np.int32), rng)


def test_a_per_layer_activation_of_one_block_read_in_another_is_refused(tmp_path):
    graph = """
graph:
  - {name: embed, op: embedding, in: [idx, wte, wpe], out: encoded}
  - repeat: L
    carry: {x: encoded}""" + LAYER.format(s="", x="x", skip="x") + """    next: {x: r}
  - {name: copy, op: residual, in: [x, x], out: extra}
  - repeat: L
    carry: {y: extra}
    body:
      - {name: fc2, op: matmul, in: [y, w1], out: h2}
      - {name: act2, op: gelu, in: [h], out: ga2}
      - {name: proj2, op: matmul, in: [ga2, w2], out: o2}
      - {name: res2, op: residual, in: [o2, y], out: r2}
    next: {y: r2}""" + TAIL.replace("FINAL", "y")
    spec = S.load(write_model(tmp_path, graph))
    with pytest.raises(S.SpecError, match=r"per-layer activation `h` is written in the repeat block at line \d+ and "
                                          r"read in another one[\s\S]*through a carry"):
        lower(spec, spec.resolve())
