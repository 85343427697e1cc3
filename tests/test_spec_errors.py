"""Broken and hostile model files: each error names the file, the line and the node, and says what to do.

A model file is untrusted input: it is read with a safe YAML loader, names must be plain identifiers,
and expressions go through a small arithmetic parser, so no model file can run code in the Python
process or inject text into the generated C.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from gpt2gen import expr as E
from gpt2gen import spec as S
from gpt2gen.builder import generate
from gpt2gen.lower import lower
from gpt2gen.targets import c_names as CN

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
    text = GOOD.replace("op: attention, in: [qkv], out:", "op: attention, in: [qkv, out:")
    assert text != GOOD
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
    """Everything a model file contributes to the C is an identifier, a number or an operator: every
    preprocessor line of the generated C (#include, #define, #pragma) is one of its templates' own."""
    _, sources = generate(ROOT / "model.yaml", L=1)
    code = sources["model.c"]
    template_lines = {line.strip() for t in (ROOT / "templates").rglob("*.j2") for line in t.read_text().splitlines()}
    directives = {line.strip() for line in code.splitlines() if line.lstrip().startswith("#")}
    assert directives and directives <= template_lines, directives - template_lines
    assert "system" not in code


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


# ---- bounded loading: alias bombs, deep nesting, huge files (issue 12, item 4) -------------------------------


def _alias_bomb(levels: int = 9) -> str:
    """A flow list whose anchors expand 9**levels-fold: a few hundred bytes for 387 million values."""
    parts = ["&a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        parts.append(f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "[" + ", ".join(parts) + "]"


@pytest.mark.parametrize("where, old, new", [
    ("name", "name: gpt2", "name: {bomb}"),                                    # _ident formats the name
    ("init", "init: {normal: 0.02}}", "init: {bomb}}}"),                       # _init formats the init
    ("in", "in: [fch], out: fch_gelu", "in: {bomb}, out: fch_gelu"),           # _names formats an entry
    ("config", "  FF: 4 * C ", "  FF: {bomb} "),                               # _expr formats a value
])
def test_an_alias_bomb_is_refused_while_composing(tmp_path, where, old, new):
    text = GOOD.replace(old, new.format(bomb=_alias_bomb()), 1)
    assert len(text) < len(GOOD) + 500
    p = write(tmp_path, text)
    err = error_of(p)
    check(err, p, line_of(text, "&a0"), None, "more than 50,000 values", "YAML alias", "hint:", "&name")
    assert len(str(err)) < 400


def test_a_recursive_alias_is_refused(tmp_path):
    text = GOOD.replace("name: gpt2", "name: &self [1, *self]")
    p = write(tmp_path, text)
    check(error_of(p), p, line_of(text, "&self"), None, "refers to the block that contains it")


def test_messages_describe_large_values_briefly(tmp_path):
    """A value under the limits can still be large: errors show its start and size, not all of it."""
    big = "[" + ", ".join(["[1, 2, 3]"] * 2000) + "]"
    for old, new, needle in [("name: gpt2", f"name: {big}", "a list [[...], [...], [...], ...] of 2,000 items"),
                             ("name: gpt2", "name: '" + "x" * 100_000 + "'", "(100,000 characters)"),
                             ("init: {normal: 0.02}}", f"init: {big}}}", "of 2,000 items")]:
        text = GOOD.replace(old, new, 1)
        p = write(tmp_path, text)
        err = error_of(p)
        assert needle in str(err) and len(str(err)) < 400, str(err)[:500]


def test_deep_nesting_is_refused_at_its_line(tmp_path):
    text = GOOD.replace("name: gpt2", "name: gpt2\nextra: " + "[" * 400 + "]" * 400)
    p = write(tmp_path, text)
    check(error_of(p), p, line_of(text, "extra:"), None, "nested more than 32 levels", "hint:")


@pytest.mark.parametrize("expr, words", [
    ("(" * 40 + "C" + ")" * 40, "nested more than 32 levels"),      # the parser recurses once per level
    ("-" * 40 + "C", "nested more than 32 levels"),
    ("+".join(["C"] * 300), "tokens is too long"),                  # the evaluator recurses once per operator
    ("C" * 2000, "characters is too long"),
])
def test_expressions_are_bounded(tmp_path, expr, words):
    text = GOOD.replace("  FF: 4 * C ", f"  FF: {expr} ")
    p = write(tmp_path, text)
    check(error_of(p), p, line_of(text, "FF:"), None, "config `FF`", words, "hint:")


def test_a_huge_file_is_refused_before_parsing(tmp_path):
    p = tmp_path / "huge.yaml"
    p.write_text(GOOD + "\n# padding\n" * 120_000)       # 1.3 MB
    err = error_of(p)
    assert str(err).startswith(f"{p}: the file is too large for a model file: more than 1,048,576 bytes"), str(err)
    assert "hint:" in str(err)
    with pytest.raises(S.SpecError, match="more than 1,048,576 characters"):
        S.loads(p.read_text(), p)


@pytest.mark.parametrize("value, words", [
    ("9" * 5000, "cannot read '99999"),                                  # beyond Python's int digit limit
    ("2024-13-45", "as YAML '!!timestamp': month must be in 1..12"),     # the constructor's ValueError
    ("!!int x", "as YAML '!!int': invalid literal for int()"),
    ("!!seq 50257", "cannot read '50257' as YAML '!!seq': expected a sequence node, but found scalar"),
    ("!!seq {a: 1}", "cannot read this mapping as YAML '!!seq': expected a sequence node, but found mapping"),
    ("!!map [1, 2]", "cannot read this sequence as YAML '!!map': expected a mapping node, but found sequence"),
    ("!!map x", "expected a mapping node, but found scalar"),
    # text PyYAML's scalar constructors would crash on (IndexError, KeyError, AttributeError), refused first
    ("!!int ''", "cannot read '' as YAML '!!int': it is not a whole number"),
    ("!!int '-'", "cannot read '-' as YAML '!!int': it is not a whole number"),
    ("!!float ''", "cannot read '' as YAML '!!float': it is not a number"),
    ("!!bool 5", "cannot read '5' as YAML '!!bool': it is not true, false, yes, no, on or off"),
    ("!!timestamp x", "cannot read 'x' as YAML '!!timestamp': it is not a date"),
    ("!custom 5", "as YAML '!custom': it is not one of YAML's standard tags"),
])
def test_a_value_its_tag_cannot_construct_is_reported_at_its_line(tmp_path, value, words):
    text = GOOD.replace("  V: 50257 ", f"  V: {value} ")
    p = write(tmp_path, text)
    check(error_of(p), p, line_of(text, "  V: "), None, words, "hint: remove the tag")


def test_a_merge_key_that_merges_no_mapping_is_not_blamed_on_a_tag(tmp_path):
    text = GOOD.replace("  V: 50257 ", "  <<: 5\n  V: 50257 ")
    p = write(tmp_path, text)
    err = error_of(p)
    assert "YAML syntax error: expected a mapping or list of mappings for merging" in str(err)
    assert "tag" not in str(err), str(err)


def test_a_bug_in_the_loader_is_not_reported_as_a_bad_value(monkeypatch):
    """Only what the constructors refuse is the file's fault: an exception from a bug of the loader's own
    constructors keeps its traceback instead of becoming "cannot read ... at line N"."""
    def broken(loader, node):
        raise KeyError("a bug")
    monkeypatch.setitem(S._Loader.yaml_constructors, "tag:yaml.org,2002:int", broken)
    with pytest.raises(KeyError, match="a bug"):
        S.loads(GOOD, "model.yaml")
    def broken_value(loader, node):
        raise ValueError("a bug")
    monkeypatch.setitem(S._Loader.yaml_constructors, "tag:yaml.org,2002:map", broken_value)
    with pytest.raises(ValueError, match="a bug") as info:
        S.loads(GOOD, "model.yaml")
    assert not isinstance(info.value, S.SpecError)


# ---- reading the file: directories, missing files, bytes that are not UTF-8 (item 5) -------------------------


def test_a_directory_is_not_a_model_file(tmp_path):
    (tmp_path / "model.yaml").write_text(GOOD)
    err = error_of(tmp_path)
    assert str(err).startswith(f"{tmp_path}: this is a directory, not a model file"), str(err)
    assert f"hint: pass the model file itself, e.g. {tmp_path / 'model.yaml'}" in str(err)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_only_a_regular_file_is_read(tmp_path, kind):
    """Opening a named pipe blocks until something writes to it, and /dev/zero never ends: both are refused
    from the file's type, before it is opened. (The alarm only keeps a regression from hanging the suite.)"""
    if kind == "fifo":
        path = tmp_path / "model.yaml"
        os.mkfifo(path)
        words = "this is a named pipe (FIFO), not a model file"
    else:
        path = Path("/dev/zero")
        words = "this is a character device, not a model file"

    def blocked(*_):
        raise AssertionError("reading the model file blocked")
    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(20)
    try:
        err = error_of(path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert str(err).startswith(f"{path}: {words}"), str(err)
    assert "hint: save the model to a file" in str(err)


def test_a_missing_file(tmp_path):
    err = error_of(tmp_path / "nope.yaml")
    assert str(err).startswith(f"{tmp_path / 'nope.yaml'}: model file not found") and "--model" in str(err)


def test_a_file_that_is_not_utf8(tmp_path):
    data = GOOD.encode().replace(b"name: gpt2", b"name: gpt\xff2")
    p = tmp_path / "latin.yaml"
    p.write_bytes(data)
    err = error_of(p)
    offset = data.index(b"\xff")
    check(err, p, line_of(GOOD, "name: gpt2"), None, f"byte 0xff at byte offset {offset} is not valid UTF-8",
          "hint: save the model file as UTF-8")
    assert S.loads(GOOD.encode("utf-8-sig"), "bom.yaml").name == "gpt2"     # a byte-order mark is fine


def test_a_control_character_is_reported_at_its_line(tmp_path):
    text = GOOD.replace("  C: 768 ", "  C: 76\x008 ")
    p = write(tmp_path, text)
    check(error_of(p), p, line_of(text, "  C: 76"), None, "a character YAML does not allow", "U+0000")


# ---- names and values that would break the generated C (item 6) ---------------------------------------------

BREAKS_THE_C = {
    "exp": "<math.h>", "INFINITY": "<math.h>", "sqrtf": "<math.h>", "isnan": "<math.h>", "float_t": "<math.h>",
    "memcpy": "<string.h>", "malloc": "<stdlib.h>", "size_t": "<stdd", "offsetof": "<stddef.h>",
    "__LINE__": "underscore", "_mm256_add_ps": "underscore", "_Exit": "underscore",
    "layernorm_forward": "op `layernorm`", "Params": "model.c.j2", "PARAM_TABLE": "model.c.j2",
    "point_acts": "model.c.j2", "mm_gemm": "matmul.c.j2", "GG_MM_NR": "prefix `GG_`", "B_MAX": "batch",
    "omp_get_thread_num": "OpenMP", "while": "keyword", "nullptr": "keyword", "gpt2gen_abi": None,
}


@pytest.mark.parametrize("name", sorted(BREAKS_THE_C))
def test_a_config_name_that_breaks_the_c_is_refused(tmp_path, name):
    text = GOOD.replace("  FF: 4 * C ", f"  FF: 4 * C\n  {name}: 3 ")
    p = write(tmp_path, text)
    if BREAKS_THE_C[name] is None:                  # not a name of the C: accepted
        S.load(p)
        return
    check(error_of(p), p, line_of(text, f"  {name}: 3"), None, f"config name `{name}` is reserved",
          BREAKS_THE_C[name], "hint: rename it")


@pytest.mark.parametrize("section, old, new", [
    ("parameter", "  lnfb:     {shape: [C]", "  exp:     {shape: [C]"),
    ("activation", "  losses:    [B, T]", "  INFINITY:  [B, T]"),
    ("carry", "carry: {x: encoded}", "carry: {tanhf: encoded}"),
])
def test_a_tensor_name_that_breaks_the_c_is_refused(tmp_path, section, old, new):
    text = GOOD.replace(old, new)
    p = write(tmp_path, text)
    check(error_of(p), p, line_of(text, new.strip()), None, f"{section} name", "is reserved", "<math.h>")


def test_a_carry_may_not_shadow_a_config_name(tmp_path):
    """A carry is a local of gg_forward: named like a config constant, it would hide it from the kernel calls."""
    text = GOOD.replace("carry: {x: encoded}", "carry: {C: encoded}").replace("next: {x: residual3}",
                                                                          "next: {C: residual3}")
    p = write(tmp_path, text)
    check(error_of(p), p, line_of(text, "carry: {C"), None, "carry `C`", "config name")


def test_every_name_of_the_generated_c_is_reserved():
    """Derived, not hand-kept: every file-scope name in the generated C of each shipped model (its kernels,
    tables and entry points) is refused as a model name, except the model's own config constants."""
    for model in [ROOT / "model.yaml"] + sorted((ROOT / "models").glob("*.yaml")):
        program, sources = generate(model, L=1)
        own = set(program.spec.config)
        names = CN.c_names(sources["model.c"], file_scope_only=True) - own
        free = sorted(n for n in names if CN.reserved_reason(n) is None)
        assert not free, f"{model.name}: the generated C declares {free}, which a model file may still use"


def test_the_reserved_list_covers_this_machines_c_headers(tmp_path):
    """The C library's names are listed by hand (nothing in the repository declares them): check the list
    against what this machine's headers declare, under the flags the generated C is compiled with, for
    every header the templates include."""
    from gpt2gen.builder import _compiler, c_flags
    headers = sorted({m for t in (ROOT / "templates" / "c").rglob("*.j2")     # the C target's (CUDA's are C++)
                      for m in re.findall(r"^\s*#\s*include\s*<([^>]+)>", t.read_text(), re.M)})
    assert "math.h" in headers
    src = tmp_path / "headers.c"
    src.write_text("".join(f"#include <{h}>\n" for h in headers))
    cc = _compiler("CC", "gcc", "C")                 # the build's own compiler and flags
    flags = [f for f in c_flags() if f.startswith(("-std", "-march", "-f", "-D", "-U"))]
    declared = subprocess.run([*cc, *flags, "-E", "-P", str(src)], capture_output=True, text=True, check=True).stdout
    macros = subprocess.run([*cc, *flags, "-E", "-dM", str(src)], capture_output=True, text=True, check=True).stdout
    names = CN.c_names(declared, file_scope_only=True) | set(re.findall(r"^#define (\w+)", macros, re.M))
    free = sorted(n for n in names if CN.reserved_reason(n) is None)
    assert not free, f"these headers ({', '.join(headers)}) declare {free}: add them to C_LIBRARY in gpt2gen/targets/c_names.py"


@pytest.mark.parametrize("value, words", [
    ("1e999", "the number inf is not finite (YAML's .inf, .nan, or a literal beyond about 1e308), in expression "
              "`1e999`"),                                                     # was rendered as `inff`
    ("1.0e+999", "the number inf is not finite"),                           # a YAML float: inf
    (".nan", "the number nan is not finite"),
    ("99999999999999999999", "is too large"),
    ("1e300 * 1e300", "is inf: not a finite number"),                       # overflows while evaluating
    ("C * C * C * C * C * C * C", "too large: whole numbers must stay within +-2**63"),
    ("1e-50", "too small for a C float"),                                   # would be 0 as a C float
    ("1e30", "too large for the generated C"),                              # a whole number: a 64-bit constant
])
def test_a_config_value_the_c_cannot_hold_is_refused_at_its_line(tmp_path, value, words):
    text = GOOD.replace("  FF: 4 * C ", f"  FF: 4 * C\n  big: {value} ")
    p = write(tmp_path, text)
    check(error_of(p), p, line_of(text, "  big:"), None, "`big`", words)


@pytest.mark.parametrize("override, words", [(float("inf"), "not a finite number"), (float("nan"), "not a finite"),
                                             (2 ** 70, "too large"), (1e-300, "too small for a C float"),
                                             ("8", "is not a number")])
def test_an_override_the_c_cannot_hold_is_refused(override, words):
    spec = S.load(ROOT / "model.yaml")
    with pytest.raises(S.SpecError, match=re.escape(words)) as info:
        spec.resolve({"norm_eps": override})
    assert str(info.value).startswith(f"{ROOT / 'model.yaml'}:{line_of(GOOD, '  norm_eps:')}:")
    assert info.value.symbols == ("norm_eps",)


def test_init_and_attribute_values_must_be_c_floats(tmp_path):
    text = GOOD.replace("wte:      {shape: [Vp, C], init: {normal: 0.02}}", "wte:      {shape: [Vp, C], init: {normal: 1e39}}")
    p = write(tmp_path, text)
    check(error_of(p), p, line_of(text, "normal: 1e39"), None, "init of `wte`", "beyond the range of a C float")
    text = GOOD.replace("wte:      {shape: [Vp, C], init: {normal: 0.02}}", "wte:      {shape: [Vp, C], init: {normal: -0.02}}")
    p = write(tmp_path, text, "neg.yaml")
    check(error_of(p), p, line_of(text, "normal: -0.02"), None, "init of `wte`", "negative")
    text = re.sub(r"(name: ln_f, .*)eps: norm_eps\}$", r"\1eps: 1e39}", GOOD, flags=re.M)
    assert text != GOOD
    p = write(tmp_path, text, "attr.yaml")
    check(error_of(p), p, line_of(text, "name: ln_f,"), "ln_f", "attribute `eps`", "beyond the range of a C float")


# ---- structure: flags, outputs -------------------------------------------------------------------------------


def test_flags_must_be_true_or_false(tmp_path):
    text = GOOD.replace("ln1w:     {shape: [C], per_layer: true,", "ln1w:     {shape: [C], per_layer: \"false\",")
    p = write(tmp_path, text)
    check(error_of(p), p, line_of(text, "ln1w:"), None, "`per_layer` of parameter `ln1w` must be true or false",
          "'false'")


def test_outputs_must_name_activations(tmp_path):
    for old, new, words in [("logits: {tensor: logits, columns: V}", "logits: {columns: V}", "needs `tensor`"),
                            ("logits: {tensor: logits, columns: V}", "logits: {tensor: logits, columns: W}",
                             "unknown name(s) W"),
                            ("loss: losses  ", "loss: [losses]  ", "must name an activation, got a list")]:
        text = GOOD.replace(old, new)
        assert text != GOOD
        p = write(tmp_path, text)
        check(error_of(p), p, line_of(text, new), None, words)


# ---- an op check names the values and the fix (item 11) -------------------------------------------------------


def test_an_op_check_says_what_fails_and_what_to_set(tmp_path):
    text = GOOD.replace("  C: 768 ", "  C: 256 ")
    p = write(tmp_path, text)
    err = error_of(p)
    check(err, p, line_of(text, "name: attn,"), "attn",
          "`attention` requires C % NH == 0, which does not hold: C = 256, NH = 12 (C % NH = 4): channels must "
          "divide evenly into heads\n  hint: set NH to a divisor of 256 (e.g. --set NH=8 or --set NH=16), or set "
          "C to a multiple of 12 (e.g. --set C=264)")
    assert err.symbols == ("NH", "C") and "override" not in str(err)
    # the same check failing through an override names it, like every other error a value causes
    p = write(tmp_path, GOOD, "good.yaml")
    err = error_of(p, L=4, C=256)
    check(err, p, line_of(GOOD, "name: attn,"), "attn", "channels must divide evenly into heads; C = 256 is set by "
          "an override (--set C=256", "hint: give C another value, or drop the override to use the model file's "
          "`C: 768`; set NH to a divisor of 256 (e.g. --set NH=8 or --set NH=16)")
    assert err.symbols == ("NH", "C")


def test_an_op_check_on_the_run_time_T_names_its_override(tmp_path):
    text = GOOD.replace("wpe:      {shape: [maxT, C]", "wpe:      {shape: [512, C]")
    p = write(tmp_path, text)
    err = error_of(p, T=1000)
    check(err, p, line_of(text, "name: embed,"), "embed", "`embedding` requires T <= P, which does not hold: T = 1000, "
          "P = 512: the sequence length must fit the position table; T = 1000 is set by an override",
          "set T to at most 512, or make `512` at least 1000")
    assert err.symbols == ("T",)


def test_the_readme_build_example_is_a_valid_model():
    readme = (ROOT / "README.md").read_text()
    line = next(x for x in readme.splitlines() if x.startswith("gpt2gen build") and "--set" in x)
    overrides = dict(kv.split("=") for kv in re.findall(r"--set (\S+)", line))
    spec = S.load(ROOT / "model.yaml")
    lower(spec, spec.resolve({k: int(v) for k, v in overrides.items()}))


def test_values_that_wrap_around_in_a_c_int_are_refused(tmp_path):
    """Kernels take dimensions and int attributes as C `int`: 3e9 would wrap around to a negative size."""
    text = GOOD.replace("  C: 768 ", "  C: 3000000000 ")
    p = write(tmp_path, text)
    check(error_of(p), p, line_of(text, "  wte:"), None, "shape of `wte`", "dimension `C` = 3000000000",
          "beyond the range of the kernels' C int")
    p = write(tmp_path, GOOD, "good.yaml")                 # the example: it "built" 2e26 parameters
    check(error_of(p, C=1_200_000_000_000), p, line_of(GOOD, "  wte:"), None, "beyond the range of the kernels' C int")
    text = GOOD.replace("vocab: V}", "vocab: 4294967296}")
    p = write(tmp_path, text, "attr.yaml")
    check(error_of(p), p, line_of(text, "vocab: 4294967296"), "loss", "`vocab` = 4294967296",
          "beyond the range of the kernels' C int")


def test_input_ranges_and_logits_columns_are_checked_at_their_lines(tmp_path):
    text = GOOD.replace("idx: {shape: [B, T], range: V}", "idx: {shape: [B, T], range: V - V}")
    p = write(tmp_path, text)
    check(error_of(p), p, line_of(text, "range: V - V"), None, "range of `idx` = V - V = 0: it must be positive")
    text = GOOD.replace("columns: V}", "columns: 2 * Vp}")
    p = write(tmp_path, text, "cols.yaml")
    check(error_of(p), p, line_of(text, "columns: 2 * Vp"), None,
          "outputs.logits columns = 2 * Vp = 100608, but `logits` has 50304 columns", "hint: columns must be between 1")


# ---- an error caused by an override names it (the file itself may be fine) -------------------------------------


@pytest.mark.parametrize("overrides, at, words, symbols", [
    ({"NH": 0}, "  HS:", "config `HS`: division by zero in `(C / NH)`; NH = 0 is set by an override (--set NH=0, "
     "or the keyword argument NH=0)\n  hint: give NH another value, or drop the override to use the model file's "
     "`NH: 12`", ("NH", "C", "HS")),
    ({"C": 10 ** 12}, "  wte:", "shape of `wte`: dimension `C` = 1000000000000 is beyond the range of the kernels' C "
     "int (at most 2**31 - 1); C = 1000000000000 is set by an override", ("C",)),
    ({"V": 2 ** 40}, "  wte:", "dimension `Vp` = 1099511627776 is beyond the range of the kernels' C int (at most "
     "2**31 - 1); V = 1099511627776 is set by an override", ("Vp",)),              # through the names it feeds
    ({"V": 0}, "  idx:", "range of `idx` = V = 0: it must be positive (every value of `idx` must be >= 0 and < "
     "range); V = 0 is set by an override", ("V",)),
    ({"B": 0, "T": 0}, "  B:", "batch `B` must be a positive whole number, got 0; B = 0 is set by an override", ("B",)),
])
def test_an_error_an_override_causes_names_the_override(tmp_path, overrides, at, words, symbols):
    p = write(tmp_path, GOOD)
    err = error_of(p, **overrides)
    check(err, p, line_of(GOOD, at), None, words)
    assert err.symbols == symbols and "override" not in err.message


def test_an_attribute_an_override_breaks_names_the_override(tmp_path):
    text = GOOD.replace("vocab: V}", "vocab: V * 100000}")
    p = write(tmp_path, text)
    err = error_of(p, V=50000)
    check(err, p, line_of(text, "vocab: V * 100000"), "loss", "attribute `vocab`: `vocab` = 5000000000 is beyond",
          "; V = 50000 is set by an override (--set V=50000", "hint: give V another value, or drop the override to "
          "use the model file's `V: 50257`")
    assert err.symbols == ("V",)


def test_the_same_error_without_an_override_blames_only_the_file(tmp_path):
    """The file's own value fails the same way: the symbols are given, no override is named."""
    text = GOOD.replace("  NH: 12 ", "  NH: 0 ")
    p = write(tmp_path, text)
    err = error_of(p)
    check(err, p, line_of(text, "  HS:"), None, "config `HS`: division by zero in `(C / NH)`")
    assert "override" not in str(err) and err.symbols == ("NH", "C", "HS")
    err = error_of(p, L=2)                           # an override that feeds nothing here is not blamed
    assert "override" not in str(err), str(err)
    assert S.SpecError("text").symbols == ()         # errors about the text itself concern no config value


def test_a_config_value_may_use_only_names_defined_above_it(tmp_path):
    text = GOOD.replace("  FF: 4 * C ", "  FF: 4 * Q\n  Q: 3 ")
    p = write(tmp_path, text)
    check(error_of(p), p, line_of(text, "  FF:"), None, "config `FF`: unknown name `Q`\n"
          "  hint: a value may use only names defined above it")
    text = GOOD.replace("  NH: 12 ", "  NH: 0 ")          # another failure to evaluate: no such hint
    err = error_of(write(tmp_path, text, "zero.yaml"))
    assert "division by zero" in str(err) and "hint" not in str(err), str(err)


def test_resolve_remembers_its_overrides():
    spec = S.load(ROOT / "model.yaml")
    config = spec.resolve({"L": 2})
    assert config["L"] == 2 and config.overrides == {"L": 2} and spec.resolve().overrides == {}
    assert spec.depends_on({"HS"}, set()) == {"HS", "C", "NH"}
    assert spec.depends_on({"Vp"}, {"Vp"}) == {"Vp"}             # a given value's expression is not followed


def test_one_function_describes_a_value_briefly():
    """Every message shows a value through ``describe`` (spec re-exports expr's): strings and whole numbers by
    their start and size, containers by kind and first items, scalars as YAML and JSON write them."""
    assert S.describe is E.describe
    assert S.describe("x" * 100) == "'" + "x" * 55 + "...' (100 characters)"
    assert S.describe(10 ** 1000) == "1" + "0" * 55 + "... (1,001 digits)"
    assert S.describe(2 ** 50_000) == "a whole number of about 15,051 digits"      # str() of it is refused
    assert [S.describe(v) for v in (None, True, False, 3, 0.5)] == ["null", "true", "false", "3", "0.5"]
    with pytest.raises(E.ExprRangeError, match=re.escape("the number 11111111111111111111... (1,000 digits) is "
                                                         "too large")):
        E.parse("1" * 1000)
    with pytest.raises(E.ExprRangeError, match=re.escape("the number 10000000000000000000... (1,001 digits)")):
        E.parse(10 ** 1000)
    hf = S.load(ROOT / "model.yaml").huggingface                # config.json values: JSON's words
    assert hf.unsupported({"tie_word_embeddings": False, "activation_function": ["relu"] * 500}) == [
        "activation_function = a list ['relu', 'relu', 'relu', ...] of 500 items (this model file represents "
        "'gelu_new' or 'gelu_pytorch_tanh')", "tie_word_embeddings = false (this model file represents true)"]
