"""Broken and hostile model files: each error names the file, the line and the node, and says what to do.

A model file is untrusted input: it is read with a safe YAML loader, names must be plain identifiers,
and expressions go through a small arithmetic parser, so no model file can run code in the Python
process or inject text into the generated C.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from gpt2gen import expr as E
from gpt2gen import spec as S
from gpt2gen.builder import generate
from gpt2gen.lower import lower

ROOT = Path(__file__).resolve().parent.parent
GOOD = (ROOT / "model.yaml").read_text()


def write(tmp_path: Path, text: str, name: str = "broken.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def line_of(text: str, needle: str) -> int:
    for i, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return i
    raise AssertionError(needle)


def error_of(path: Path, **overrides) -> S.SpecError:
    with pytest.raises(S.SpecError) as info:
        spec = S.load(path)
        lower(spec, spec.resolve(overrides))
    return info.value


def check(err: S.SpecError, path: Path, line: int, node: str | None, *words: str) -> None:
    text = str(err)
    assert text.startswith(f"{path}:{line}:"), text
    if node:
        assert f"node '{node}'" in text, text
    for w in words:
        assert w in text, text


def test_the_shipped_model_is_valid():
    spec = S.load(ROOT / "model.yaml")
    lower(spec, spec.resolve())


def test_yaml_syntax_error(tmp_path):
    text = GOOD.replace("  - {name: attn,      op: attention, in: [qkv], out: [atty, att], heads: NH}",
                        "  - {name: attn,      op: attention, in: [qkv, out: [atty, att], heads: NH}")
    p = write(tmp_path, text)
    err = error_of(p)
    assert re.match(rf"{re.escape(str(p))}:\d+: YAML syntax error", str(err)), str(err)
    assert abs(err.line - line_of(text, "in: [qkv, out")) <= 1
    assert "hint:" in str(err)


def test_unknown_op(tmp_path):
    text = GOOD.replace("op: gelu,", "op: swish,")
    p = write(tmp_path, text)
    check(error_of(p), p, line_of(text, "op: swish"), "mlp_gelu", "unknown op `swish`", "known ops:", "gelu")


def test_undefined_buffer(tmp_path):
    text = GOOD.replace("in: [fch], out: fch_gelu", "in: [fhc], out: fch_gelu")
    p = write(tmp_path, text)
    check(error_of(p), p, line_of(text, "in: [fhc]"), "mlp_gelu", "`fhc` is not a declared tensor")


def test_mismatched_shapes(tmp_path):
    text = GOOD.replace("fcprojw:  {shape: [C, FF]", "fcprojw:  {shape: [C, C]")
    p = write(tmp_path, text)
    check(error_of(p), p, line_of(text, "name: mlp_proj"), "mlp_proj", "shape mismatch in `matmul`", "fcprojw")


def test_wrong_rank(tmp_path):
    text = GOOD.replace("ln1w:     {shape: [C],", "ln1w:     {shape: [C, 2],")
    p = write(tmp_path, text)
    check(error_of(p), p, line_of(text, "name: ln_1,"), "ln_1", "operand `weight` of `layernorm` must have shape (C)")


def test_cycle(tmp_path):
    text = GOOD.replace("in: [ln2, fcw, fcb], out: fch}", "in: [fcproj, fcw, fcb], out: fch}")
    p = write(tmp_path, text)
    err = error_of(p)
    check(err, p, line_of(text, "name: mlp_fc"), "mlp_fc", "cycle", "mlp_proj", "mlp_gelu")


def test_read_before_written(tmp_path):
    lines = GOOD.splitlines(keepends=True)
    fc, gelu = line_of(GOOD, "name: mlp_fc,") - 1, line_of(GOOD, "name: mlp_gelu,") - 1
    lines[fc], lines[gelu] = lines[gelu], lines[fc]          # gelu now comes before the matmul it reads
    text = "".join(lines)
    p = write(tmp_path, text)
    check(error_of(p), p, line_of(text, "name: mlp_gelu"), "mlp_gelu", "read before node 'mlp_fc'",
          "hint: move node 'mlp_gelu' after node 'mlp_fc'")


def test_written_twice(tmp_path):
    text = GOOD.replace("op: gelu,      in: [fch], out: fch_gelu", "op: gelu,      in: [fch], out: fch")
    p = write(tmp_path, text)
    check(error_of(p), p, line_of(text, "in: [fch], out: fch}"), "mlp_gelu", "`fch` is written by node 'mlp_fc'")


def test_wrong_arity_and_attribute(tmp_path):
    text = GOOD.replace("op: residual,  in: [x, attproj]", "op: residual,  in: [x]")
    p = write(tmp_path, text)
    check(error_of(p), p, line_of(text, "in: [x], out: residual2"), "attn_res", "takes 2 inputs")
    text = GOOD.replace("heads: NH}", "heads: NH, dropout: 1}")
    p = write(tmp_path, text, "attr.yaml")
    check(error_of(p), p, line_of(text, "dropout: 1"), "attn", "no attribute `dropout`")


def test_heads_must_divide_channels(tmp_path):
    p = write(tmp_path, GOOD)
    err = error_of(p, NH=5)
    assert "channels" in str(err)   # C / NH is checked where the config defines HS (exact division)


def test_batch_T_beyond_maxT(tmp_path):
    p = write(tmp_path, GOOD)
    err = error_of(p, T=2048)
    assert "exceeds maxT" in str(err) and "hint:" in str(err)


def test_unknown_override():
    spec = S.load(ROOT / "model.yaml")
    with pytest.raises(S.SpecError, match="unknown config override `layers`"):
        spec.resolve({"layers": 2})


def test_duplicate_key(tmp_path):
    text = GOOD.replace("  NH: 12 ", "  NH: 12\n  NH: 16 ")
    p = write(tmp_path, text)
    err = error_of(p)
    assert "duplicate key `NH`" in str(err) and f"{p}:" in str(err)


# ---- untrusted input -------------------------------------------------------------------------------------


def test_yaml_python_tags_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    text = GOOD.replace("name: gpt2", f"name: !!python/object/apply:os.system ['touch {marker}']")
    p = write(tmp_path, text)
    with pytest.raises(S.SpecError, match="YAML"):
        S.load(p)
    assert not marker.exists()


@pytest.mark.parametrize("expr", ["__import__('os').system('touch x')", "C; system(1)", "C */ int x; /*", "lambda: 1",
                                  "C.__class__", "open('f')", "1e400000000 ** 2", "C if 1 else 2"])
def test_expressions_cannot_run_code(tmp_path, expr):
    text = GOOD.replace("FF: 4 * C ", f"FF: \"{expr}\" ")
    p = write(tmp_path, text)
    with pytest.raises(S.SpecError) as info:
        spec = S.load(p)
        spec.resolve()
    assert str(info.value).startswith(f"{p}:{line_of(text, 'FF:')}:")


@pytest.mark.parametrize("bad_name", ["x */ system(\"id\"); /*", "a b", "int", "d_grad", "9lives", "x\ny"])
def test_names_must_be_plain_identifiers(tmp_path, bad_name):
    quoted = bad_name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    text = GOOD.replace("  lnfb:     {shape: [C], init: zeros, decay: false}",
                        f"  \"{quoted}\":     {{shape: [C], init: zeros, decay: false}}")
    p = write(tmp_path, text)
    with pytest.raises(S.SpecError, match="identifier|reserved"):
        S.load(p)


def test_generated_c_holds_only_checked_text(tmp_path):
    """Everything a model file contributes to the C is an identifier, a number or an operator."""
    _, sources = generate(ROOT / "model.yaml", L=1)
    code = sources["model.c"]
    assert "system" not in code and "#include" not in code.split("#include \"gpt2gen_abi.h\"")[1]


def test_expression_parser():
    env = {"C": 768, "NH": 12, "V": 50257}
    assert E.parse("C / NH").eval(env) == 64
    assert E.parse("round_up(V, 128)").eval(env) == 50304
    assert E.parse("0.02 / sqrt(2 * 12)").eval(env) == pytest.approx(0.02 / 24 ** 0.5)
    assert E.parse("-(C // 5) % 7").eval(env) == (-(768 // 5)) % 7
    with pytest.raises(E.ExprError):
        E.parse("C / 5").eval_int(env)
    for bad in ["", "C +", "(C", "C)", "foo(C)", "C ** 2", "'a'", "C[0]"]:
        with pytest.raises(E.ExprError):
            E.parse(bad)
