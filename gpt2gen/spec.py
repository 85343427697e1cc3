"""The model file: load a YAML model description safely and check its structure.

A model file is untrusted input. It is read with a safe YAML loader that records line numbers and bounds
what a small file can make it build (size, nesting, values after alias expansion); every name must be a
plain identifier that cannot collide with the generated C or the headers it includes; every shape,
config value and init scale is parsed by ``gpt2gen.expr`` (never ``eval``) and must be a number the C
can hold. Errors are ``SpecError``s that name the file, the line, the node and what to do, and show a
bad value only briefly (``describe``). Op-level checks (arity, shapes) happen in ``gpt2gen.lower``.
See docs/model-format.md for the format, field by field.
"""
from __future__ import annotations

import hashlib
import math
import numbers
import os
import re
import stat
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from . import expr as E
from . import targets
from .expr import describe  # noqa: F401 - the one way to show a value in a message (checkpoint uses it too)

IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_NAME_CHARS = 63             # C guarantees 63 significant characters in an identifier

# Bounds on what a model file may make the loader build (the shipped ones are ~7 KB, ~740 values, 6 levels
# deep): a small file must not be able to exhaust memory, the stack or minutes of parsing.
MAX_FILE_BYTES = 1 << 20
MAX_YAML_VALUES = 50_000        # counting each alias as the values it repeats
MAX_YAML_DEPTH = 32

class SpecError(ValueError):
    """A problem in a model file, located by file, line and (where there is one) graph node.

    ``symbols``: the config names whose values the problem concerns (the name being defined and those its
    expression uses; the names in a failing shape, attribute, range or init), empty for a problem of
    the text itself. A caller that supplied some of those values (the HF importer, from config.json)
    can blame its own source from them without parsing the message. ``cause``: which overrides set
    them, shown after the message; ``message`` stays the model file's own words."""

    def __init__(self, message: str, file: str | Path | None = None, line: int | None = None,
                 node: str | None = None, hint: str | None = None, symbols: tuple[str, ...] = (),
                 cause: str | None = None):
        self.message, self.file, self.line, self.node, self.hint = message, file, line, node, hint
        self.symbols, self.cause = tuple(symbols), cause
        where = str(file) if file else "<model>"
        if line:
            where += f":{line}"
        text = f"{where}: "
        if node:
            text += f"node '{node}': "
        text += message
        if cause:
            text += f"; {cause}"
        if hint:
            text += f"\n  hint: {hint}"
        super().__init__(text)


# ---------------------------------------------------------------------------------------------------
# YAML with line numbers


class _LineDict(dict):
    line: int = 0
    key_lines: dict


class _LineList(list):
    line: int = 0


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


class _Loader(yaml.SafeLoader):
    """SafeLoader that remembers where each mapping and sequence starts and rejects duplicate keys.

    It also bounds what a small file can make it build, while composing and before anything is
    constructed: the nesting depth (the composer and constructor recurse once per level), and the number
    of values with every alias counted as the values it repeats (nine lines of anchors can otherwise
    stand for a billion values)."""

    def __init__(self, stream: str, name: str):
        super().__init__(stream)
        self.name = name
        self._depth = 0
        self._values = 0
        self._weights: dict[int, int] = {}    # id(node) -> values it stands for, once composed

    def _count(self, n: int, mark: yaml.Mark) -> None:
        self._values += n
        if self._values > MAX_YAML_VALUES:
            raise SpecError(f"the file holds more than {MAX_YAML_VALUES:,} values, counting each YAML alias as the "
                            f"values it repeats", self.name, mark.line + 1,
                            hint="a model file needs a few thousand at most; remove the anchors and aliases "
                                 "(&name, *name) that repeat large blocks")

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        mark = self.peek_event().start_mark
        if self.check_event(yaml.AliasEvent):
            node = super().compose_node(parent, index)
            weight = self._weights.get(id(node))
            if weight is None:
                raise SpecError("a YAML alias refers to the block that contains it (a structure that contains "
                                "itself)", self.name, mark.line + 1, hint="an alias may repeat only a finished block")
            self._count(weight, mark)
            return node
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise SpecError(f"the YAML is nested more than {MAX_YAML_DEPTH} levels deep", self.name, mark.line + 1,
                            hint="a model file nests about 6 levels; look for unclosed or repeated brackets")
        self._count(1, mark)
        node = super().compose_node(parent, index)
        self._depth -= 1
        self._weights[id(node)] = 1 + sum(self._weights[id(c)] for c in _children(node))
        return node

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """What the constructors refuse becomes a SpecError at the value's line: a ConstructorError (an unknown
        tag, a tag on the wrong kind of node, ``!!bool x``) or, from a scalar's constructor, a ValueError or
        OverflowError (an int beyond Python's digit limit, a date like 2024-13-45). Anything else is a bug
        of this loader, not of the file, and keeps its traceback."""
        try:
            return super().construct_object(node, deep)
        except yaml.constructor.ConstructorError as err:
            if isinstance(node, yaml.MappingNode) and node.tag == yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG:
                raise _syntax_error(err, self.name) from None    # a merge key (<<) that merges no mapping
            raise self._unreadable(node, err.problem) from None
        except (ValueError, OverflowError) as err:
            if isinstance(err, SpecError) or not isinstance(node, yaml.ScalarNode):
                raise
            raise self._unreadable(node, str(err).split(":")[0]) from None

    def _unreadable(self, node: yaml.Node, why: str) -> SpecError:
        """The SpecError for a value its tag cannot construct; the value and the tag are shown briefly."""
        what = describe(node.value) if isinstance(node, yaml.ScalarNode) else f"this {node.id}"
        tag = "!!" + node.tag[len(_YAML_TAG):] if node.tag.startswith(_YAML_TAG) else node.tag
        if node.tag not in self.yaml_constructors:      # PyYAML's problem text repeats the whole tag
            why = ("it is not one of YAML's standard tags, the only ones a model file may use (!!str, !!int, "
                   "!!float, !!bool, !!null, !!seq, !!map, ...)")
        return SpecError(f"cannot read {what} as YAML {describe(tag)}: {why}", self.name, node.start_mark.line + 1,
                         hint="remove the tag (!!...), or quote the value to make it a string")


_YAML_TAG = "tag:yaml.org,2002:"


def _needs_node(node: yaml.Node, kind: type[yaml.Node]) -> None:
    """A ConstructorError, as PyYAML's own constructors raise, when a tag is on the wrong kind of node
    (``!!seq 5``, ``!!map [1, 2]``): our constructors would otherwise iterate a string or a list."""
    if not isinstance(node, kind):
        raise yaml.constructor.ConstructorError(None, None, f"expected a {kind.id} node, but found {node.id}",
                                                node.start_mark)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _LineDict:
    _needs_node(node, yaml.MappingNode)
    loader.flatten_mapping(node)
    out = _LineDict()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float)):
            raise SpecError(f"a mapping key must be a plain name, not {describe(key)}",
                            loader.name, key_node.start_mark.line + 1)
        if key in out:
            raise SpecError(f"duplicate key `{key}`", loader.name, key_node.start_mark.line + 1,
                            hint="each key may appear once in a mapping; remove or rename one of them")
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> _LineList:
    _needs_node(node, yaml.SequenceNode)
    out = _LineList(loader.construct_object(n, deep=True) for n in node.value)
    out.line = node.start_mark.line + 1
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)

# What PyYAML's scalar constructors take for granted about their text: they index it, look it up or use a
# pattern's match unchecked, so other text fails inside them with an IndexError, KeyError or AttributeError
# (``!!int ''``, ``!!bool x``, ``!!timestamp x``) that cannot be told from a bug. Such text is refused as
# a ConstructorError before they run; what they refuse themselves is a ValueError (``!!int x``).
_SCALAR_FORMS = {
    "bool": (lambda text: text.lower() in yaml.constructor.SafeConstructor.bool_values,
             "true, false, yes, no, on or off"),
    "int": (lambda text: re.fullmatch(r"[-+]?", text.replace("_", "")) is None, "a whole number"),
    "float": (lambda text: text.replace("_", "") != "", "a number"),
    "timestamp": (lambda text: yaml.constructor.SafeConstructor.timestamp_regexp.match(text) is not None,
                  "a date (YYYY-MM-DD, optionally with a time)"),
}


def _scalar_constructor(tag: str, fits, wanted: str):
    """PyYAML's constructor for ``tag``, called only on text it can take (``fits``)."""
    original = yaml.SafeLoader.yaml_constructors[tag]

    def construct(loader: _Loader, node: yaml.Node) -> Any:
        if isinstance(node, yaml.ScalarNode) and not fits(node.value):
            raise yaml.constructor.ConstructorError(None, None, f"it is not {wanted}", node.start_mark)
        return original(loader, node)
    return construct


for _kind, (_fits, _wanted) in _SCALAR_FORMS.items():
    _Loader.add_constructor(_YAML_TAG + _kind, _scalar_constructor(_YAML_TAG + _kind, _fits, _wanted))


def _line(obj: Any, key: str | None = None, default: int = 0) -> int:
    if key is not None and isinstance(obj, _LineDict) and key in obj.key_lines:
        return obj.key_lines[key]
    return getattr(obj, "line", default) or default


# ---------------------------------------------------------------------------------------------------
# The spec


@dataclass(frozen=True)
class Init:
    """How a parameter starts: ``normal`` (mean 0, ``std``), ``zeros``, ``ones`` or ``constant``."""
    kind: str
    value: E.Expr | None = None


@dataclass
class TensorDecl:
    name: str
    kind: str                      # "input" | "param" | "act" (lowering adds "cache": the decode KV cache)
    shape: tuple[E.Expr, ...]      # per-layer tensors: the shape of one layer's slice
    per_layer: bool
    line: int
    init: Init | None = None       # parameters
    decay: bool = True             # parameters: AdamW weight decay applies
    range: E.Expr | None = None    # integer inputs: values must be < range
    optional: bool = False         # inputs: may be absent at forward (nodes reading it are skipped)
    dtype: str = "float"           # inputs are "int"

    def shape_str(self) -> str:
        return "(" + ", ".join(str(d) for d in self.shape) + ")"


@dataclass
class Node:
    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    line: int


@dataclass
class Repeat:
    count: E.Expr
    carry: dict[str, str]          # carry name -> tensor it starts as
    next: dict[str, str]           # carry name -> per-layer tensor it becomes for the next layer
    body: list[Node]
    line: int


@dataclass
class HFParam:
    name: str                      # HF tensor name ({layer} = layer index); "a | b" also lists alternatives
    transpose: bool = False        # HF stores it [in, out] (Conv1D): transpose on import
    pad_rows: bool = False         # HF may have fewer rows (an unpadded vocabulary): the rest are zeroed
    alternatives: tuple[str, ...] = ()   # further names, tried in order after `name`

    def names(self, layer: int | None = None) -> list[str]:
        """The candidate HF tensor names, in the order they are tried (``{layer}`` filled in)."""
        out = [n.strip() for n in self.name.split("|") if n.strip()] + [a.strip() for a in self.alternatives]
        return [n.format(layer=layer) if layer is not None else n for n in out]


_ABSENT = object()


def _lookup(hf_config: Mapping[str, Any], key: str) -> Any:
    """config.json's value at a dotted key: the value, None for an explicit null, or _ABSENT."""
    node: Any = hf_config
    for part in key.strip().split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    return node


@dataclass
class HFMapping:
    config: dict[str, str]          # our symbol -> config.json key: "a.b" reads a nested key, "x | y" tries x then y
    parameters: dict[str, HFParam]
    config_null: dict[str, Any] = field(default_factory=dict)   # symbol -> its value when config.json says null
    require: dict[str, list] = field(default_factory=dict)      # config.json key -> the values this file represents
    ignore: tuple[str, ...] = ()    # checkpoint tensors that carry no weights of ours (fnmatch patterns)
    ignore_config: tuple[str, ...] = ()   # config.json keys that change nothing we compute (fnmatch, dotted)

    def config_value(self, hf_config: Mapping[str, Any], symbol: str) -> Any:
        """The value config.json gives for our ``symbol``; None when it gives none (keep the file's value).

        An explicit null counts as a value where the file says what null means (``{key: ..., if_null: 0}``)."""
        explicit_null = False
        for key in self.config[symbol].split("|"):
            value = _lookup(hf_config, key)
            if value is None:
                explicit_null = True
            elif value is not _ABSENT:
                return value
        if explicit_null and symbol in self.config_null:
            return self.config_null[symbol]
        return None

    def unsupported(self, hf_config: Mapping[str, Any]) -> list[str]:
        """What config.json asks for that this model file cannot represent (its `require` entries)."""
        problems = []
        for key, allowed in self.require.items():
            value = _lookup(hf_config, key)
            if value is _ABSENT or value in allowed:
                continue
            problems.append(f"{key} = {describe(value)} (this model file represents "
                            f"{' or '.join(describe(a) for a in allowed)})")
        return problems


@dataclass
class ModelSpec:
    path: Path
    name: str
    source: str
    config: dict[str, E.Expr]
    config_lines: dict[str, int]
    batch: dict[str, E.Expr]
    tensors: dict[str, TensorDecl]             # inputs, parameters and activations, in file order
    graph: list[Node | Repeat]
    logits: str | None
    logits_columns: E.Expr | None
    loss: str | None
    huggingface: HFMapping | None = None
    lines: dict[str, int] = field(default_factory=dict)
    output_lines: dict[str, int] = field(default_factory=dict)   # `outputs` entry -> its line

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()[:16]

    def of_kind(self, kind: str) -> list[TensorDecl]:
        return [t for t in self.tensors.values() if t.kind == kind]

    def error(self, message: str, line: int | None = None, node: str | None = None, hint: str | None = None,
              symbols: Iterable[str] = (), config: Mapping[str, Any] | None = None) -> SpecError:
        """A SpecError about this file; ``symbols``: the config names whose values it concerns.

        Where ``config`` is what ``resolve`` returned and an override set one of those values, directly or
        through the names it feeds (``--set NH=0`` makes ``HS: C / NH`` fail), the error names the
        override and the hint says to change it: the file itself may be fine."""
        order = {n: i for i, n in enumerate([*self.config, *self.batch])}
        symbols = tuple(sorted(set(symbols) & set(order), key=order.get))
        overrides = getattr(config, "overrides", None) or {}
        fed = sorted(self.depends_on(symbols, set(overrides)) & set(overrides), key=order.get)
        cause = None
        if fed:
            values = " and ".join(f"{n} = {describe(overrides[n])}" for n in fed)
            sets = " ".join(f"--set {n}={describe(overrides[n])}" for n in fed)
            args = ", ".join(f"{n}={describe(overrides[n])}" for n in fed)
            cause = (f"{values} {'is' if len(fed) == 1 else 'are'} set by an override ({sets}, or the keyword "
                     f"argument{'s' * (len(fed) > 1)} {args})")
            own = ", ".join(f"`{n}: {(self.config.get(n) or self.batch[n]).text()}`" for n in fed)
            hint = (f"give {' and '.join(fed)} another value, or drop the override to use the model file's {own}"
                    + (f"; {hint}" if hint else ""))
        return SpecError(message, self.path, line, node, hint, symbols=symbols, cause=cause)

    def depends_on(self, names: Iterable[str], given: set[str]) -> set[str]:
        """``names`` and every config name their model-file expressions use, transitively, except that a
        ``given`` name (an override, a config.json value) is taken as it is: its expression is not followed."""
        seen: set[str] = set()
        todo = list(names)
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            ex = self.config.get(n) or self.batch.get(n)
            if n not in given and ex is not None:
                todo.extend(ex.names())
        return seen

    def resolve(self, overrides: Mapping[str, int | float] | None = None) -> "Resolved":
        """Evaluate config and batch maxima in file order; ``overrides`` replace values by name.

        The result remembers the overrides, so that an error found later (a shape in lowering) can say
        which override made it fail."""
        overrides = dict(overrides or {})
        known = set(self.config) | set(self.batch)
        for k in overrides:
            if k not in known:
                raise SpecError(f"unknown config override `{k}`", self.path,
                                hint=f"known names: {', '.join(sorted(known))}")
        env = Resolved()
        env.overrides = overrides
        for section, entries in (("config", self.config), ("batch", self.batch)):
            for name, ex in entries.items():
                line = self.config_lines.get(name)
                if name in overrides:
                    v = overrides[name]
                    if isinstance(v, bool) or not isinstance(v, numbers.Real):
                        raise self.error(f"override {name}={describe(v)} is not a number", line, symbols=[name])
                    v = int(v) if isinstance(v, numbers.Integral) else float(v)
                    problem = _c_constant_problem(v)
                    if problem:
                        raise self.error(f"override {name}={describe(v)}: {problem}", line, hint=_RANGE_HINT,
                                         symbols=[name])
                else:
                    uses = [name, *ex.names()]
                    try:
                        v = ex.eval(env)
                    except E.ExprError as err:
                        raise self.error(f"{section} `{name}`: {err}", line,
                                         hint=_RANGE_HINT if isinstance(err, E.ExprRangeError) else
                                         "a value may use only names defined above it"
                                         if ex.names() - env.keys() else None,
                                         symbols=uses, config=env) from None
                    problem = _c_constant_problem(v)
                    if problem:
                        raise self.error(f"{section} `{name}` = {ex.text()}: {problem}", line, hint=_RANGE_HINT,
                                         symbols=uses, config=env)
                if isinstance(v, float) and v.is_integer() and section == "batch":
                    v = int(v)
                env[name] = v
        for name in ("B", "T"):
            v = env[name]
            if not isinstance(v, int) or v < 1:
                raise self.error(f"batch `{name}` must be a positive whole number, got {describe(v)}",
                                 self.config_lines.get(name), symbols=[name], config=env)
        self._check_values(env)
        return env

    def _check_values(self, env: "Resolved") -> None:
        """The other values that depend on the config, at their lines: every init value must be a float the
        parameters can hold (a std of 1e39 would fill them with inf), every input range a positive whole
        number, and the logits' columns a whole number no wider than the logits."""
        for t in self.of_kind("input"):
            if t.range is None:
                continue
            uses = t.range.names()
            try:
                v = t.range.eval_int(env, f"range of `{t.name}`")
            except E.ExprError as err:
                raise self.error(f"range of `{t.name}`: {err}", t.line, symbols=uses, config=env) from None
            if v < 1:
                raise self.error(f"range of `{t.name}` = {_shown(t.range, v)}: it must be positive (every value "
                                 f"of `{t.name}` must be >= 0 and < range)", t.line, symbols=uses, config=env)
        if self.logits_columns is not None and self.logits in self.tensors:
            line = self.output_lines.get("logits")
            uses = self.logits_columns.names() | self.tensors[self.logits].shape[-1].names()
            try:
                cols = self.logits_columns.eval_int(env, "logits columns")
                width = self.tensors[self.logits].shape[-1].eval_int(env)
            except E.ExprError as err:
                raise self.error(f"outputs.logits: {err}", line, symbols=uses, config=env) from None
            if not 1 <= cols <= width:
                raise self.error(f"outputs.logits columns = {_shown(self.logits_columns, cols)}, but `{self.logits}` "
                                 f"has {width} columns", line,
                                 hint=f"columns must be between 1 and {width} (the last dimension of `{self.logits}`)",
                                 symbols=uses, config=env)
        for t in self.of_kind("param"):
            if t.init is None or t.init.value is None:
                continue
            uses = t.init.value.names()
            try:
                v = t.init.value.eval(env)
            except E.ExprError as err:
                raise self.error(f"init of `{t.name}`: {err}", t.line, symbols=uses, config=env) from None
            problem = E.c_float_problem(float(v))
            if problem is None and t.init.kind == "normal" and v < 0:
                problem = f"a standard deviation of {v} is negative"
            if problem:
                raise self.error(f"init of `{t.name}` = {t.init.value.text()}: {problem}", t.line, symbols=uses,
                                 config=env)


class Resolved(dict):
    """Config name -> value, as ``ModelSpec.resolve`` computed them; ``overrides``: those the caller set
    (a copy such as ``dict(config)`` forgets them, and errors then name no override)."""
    overrides: Mapping[str, int | float] = types.MappingProxyType({})


def _shown(e: E.Expr, value: int | float) -> str:
    """``4 * C = 3072``, or just ``7`` where the expression is the number."""
    return str(value) if e.text() == str(value) else f"{e.text()} = {value}"


_RANGE_HINT = ("a value must be one the generated C can hold: finite, whole numbers within 64 bits, other numbers "
               "C floats (about 1.2e-38 to 3.4e38); expressions short and at most 32 levels deep")


def _c_constant_problem(v: int | float) -> str | None:
    """Why a config value cannot be the C constant the CPU target writes for it, or None.

    Whole numbers (ints, and floats such as 1e3) become integer constants, so they must fit in 64 bits;
    other floats become ``float`` constants, so they must be finite and within float's range."""
    if isinstance(v, float) and not math.isfinite(v):
        return f"{v} is not a finite number"
    if isinstance(v, int) or v.is_integer():
        if not -E.INT_LIMIT < int(v) < E.INT_LIMIT:
            return "too large for the generated C (whole numbers become 64-bit integer constants: at most 2**63 - 1)"
        return None
    return E.c_float_problem(v)


def _plain_name(name: Any) -> bool:
    return isinstance(name, str) and len(name) <= MAX_NAME_CHARS and bool(IDENT.fullmatch(name))


def _ident(name: Any, path: Path, line: int, what: str, c_name: bool = True) -> str:
    """Check a name is a plain identifier; ``c_name``: it also becomes a C identifier, so not a reserved one."""
    if not _plain_name(name):
        too_long = isinstance(name, str) and IDENT.fullmatch(name)
        raise SpecError(f"{what} {describe(name)} is " + (f"longer than {MAX_NAME_CHARS} characters" if too_long
                                                         else "not a plain identifier"), path, line,
                        hint="use letters, digits and underscores, starting with a letter or underscore")
    reason = targets.reserved_reason(name) if c_name else None
    if reason:
        raise SpecError(f"{what} `{name}` is reserved: {reason}", path, line,
                        hint="rename it: this name becomes a C identifier in the generated model.c, so it may not "
                             "be a C keyword, a name of the C headers it includes or of the generated code itself, "
                             "or start with " + ", ".join(targets.reserved_prefixes()) + " (docs/model-format.md)")
    return name


def _expr(text: Any, path: Path, line: int, what: str) -> E.Expr:
    try:
        return E.parse(text)
    except E.ExprRangeError as err:
        raise SpecError(f"{what}: {err}", path, line, hint=_RANGE_HINT) from None
    except E.ExprError as err:
        raise SpecError(f"{what}: {err}", path, line,
                        hint="expressions use numbers, config names, + - * / // %, parentheses and "
                             "sqrt/min/max/round_up") from None


def _mapping(obj: Any, path: Path, line: int, what: str) -> _LineDict:
    if not isinstance(obj, dict):
        raise SpecError(f"{what} must be a mapping, got {describe(obj)}", path, _line(obj, default=line))
    return obj


def _only_keys(obj: Mapping, allowed: set[str], path: Path, what: str, node: str | None = None) -> None:
    for k in obj:
        if k not in allowed:
            raise SpecError(f"unknown field `{k}` in {what}", path, _line(obj, k), node,
                            hint=f"allowed fields: {', '.join(sorted(allowed))}")


def load(path: str | Path) -> ModelSpec:
    """Load and structurally validate a model file."""
    path = Path(path)
    return loads(_read(path), path)


def _read(path: Path) -> bytes:
    """The file's bytes, at most MAX_FILE_BYTES + 1 of them (so a huge file cannot hang it); every OS error
    becomes a SpecError that says what to pass instead.

    Only a regular file is read: opening a named pipe blocks until something writes to it, and a device
    (``/dev/zero``) or a socket is no model file either. The open does not block, so a path replaced by
    a pipe after the check cannot hang it."""
    try:
        kind = _file_kind(os.stat(path).st_mode)
        if kind == "a directory":
            inside = path / "model.yaml"
            raise SpecError("this is a directory, not a model file", path,
                            hint=f"pass the model file itself, e.g. {inside}" if inside.is_file()
                            else "pass the path of a .yaml model file")
        if kind:
            raise SpecError(f"this is {kind}, not a model file (only a regular file is read)", path,
                            hint="save the model to a file and pass that file's path")
        with open(path, "rb", opener=lambda p, flags: os.open(p, flags | getattr(os, "O_NONBLOCK", 0))) as f:
            return f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise SpecError("model file not found", path,
                        hint="pass --model PATH, or run from the directory holding model.yaml") from None
    except PermissionError:
        raise SpecError("the model file cannot be read: permission denied", path,
                        hint="check the file's permissions (it needs to be readable)") from None
    except OSError as err:
        raise SpecError(f"the model file cannot be read: {err.strerror or err}", path) from None


def _file_kind(mode: int) -> str | None:
    """None for a regular file, else what the path is, in words."""
    if stat.S_ISREG(mode):
        return None
    for test, words in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return words
    return "something other than a regular file"


def _check_size(size: int, unit: str, path: Path) -> None:
    if size > MAX_FILE_BYTES:
        raise SpecError(f"the file is too large for a model file: more than {MAX_FILE_BYTES:,} {unit}", path,
                        hint="the shipped model files are under 8 KB (a model describes its layers once, in a "
                             "`repeat` block): is this the right file?")


def _decode(data: bytes, path: Path) -> str:
    """UTF-8 text (a leading byte-order mark is dropped), or a SpecError naming the first bad byte."""
    _check_size(len(data), "bytes", path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise SpecError(f"the file is not UTF-8 text: byte 0x{data[err.start]:02x} at byte offset {err.start} "
                        f"is not valid UTF-8", path, line,
                        hint="save the model file as UTF-8 (is this a model file, not a checkpoint or "
                             "token file?)") from None


def _syntax_error(err: yaml.MarkedYAMLError, path: str | Path) -> SpecError:
    """PyYAML's error at the line it marks (its problem text may quote a token of the file: cut it short)."""
    mark = err.problem_mark or err.context_mark
    problem = err.problem or str(err)
    if len(problem) > 200:
        problem = problem[:200] + "..."
    return SpecError(f"YAML syntax error: {problem}", path, mark.line + 1 if mark else None,
                     hint="check indentation, brackets and quoting on that line")


def loads(text: str | bytes, path: str | Path = "<string>") -> ModelSpec:
    """Validate a model file's contents (``bytes`` are decoded as UTF-8); ``path`` names it in errors."""
    path = Path(path)
    if isinstance(text, (bytes, bytearray)):
        text = _decode(bytes(text), path)
    _check_size(len(text), "characters", path)
    try:
        loader = _Loader(text, str(path))
        try:
            doc = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.reader.ReaderError as err:
        line = text[:err.position].count("\n") + 1
        raise SpecError(f"the file holds a character YAML does not allow: {describe(chr(err.character))} "
                        f"(U+{err.character:04X})", path, line,
                        hint="remove control characters; a model file is plain text") from None
    except yaml.MarkedYAMLError as err:
        raise _syntax_error(err, path) from None
    except yaml.YAMLError as err:
        raise SpecError(f"YAML error: {describe(str(err), 200)}", path) from None
    doc = _mapping(doc, path, 1, "the model file")
    _only_keys(doc, {"name", "config", "batch", "inputs", "parameters", "activations", "graph", "outputs",
                     "huggingface"}, path, "the model file")
    for required in ("name", "config", "batch", "parameters", "activations", "graph"):
        if required not in doc:
            raise SpecError(f"missing top-level section `{required}`", path, 1,
                            hint="see docs/model-format.md for the sections a model file has")
    name = _ident(doc["name"], path, _line(doc, "name"), "model name", c_name=False)

    # config and batch maxima -------------------------------------------------------------------------
    config: dict[str, E.Expr] = {}
    lines: dict[str, int] = {}
    cfg = _mapping(doc["config"], path, _line(doc, "config"), "`config`")
    for k, v in cfg.items():
        ln = _line(cfg, k)
        config[_ident(k, path, ln, "config name")] = _expr(v, path, ln, f"config `{k}`")
        lines[k] = ln
    batch: dict[str, E.Expr] = {}
    bt = _mapping(doc["batch"], path, _line(doc, "batch"), "`batch`")
    _only_keys(bt, {"B", "T"}, path, "`batch`")
    for k in ("B", "T"):
        if k not in bt:
            raise SpecError(f"`batch` needs `{k}` (the build-time maximum)", path, _line(doc, "batch"))
        batch[k] = _expr(bt[k], path, _line(bt, k), f"batch `{k}`")
        lines[k] = _line(bt, k)
    symbols = set(config) | {"B", "T"}

    # tensors -------------------------------------------------------------------------------------------
    tensors: dict[str, TensorDecl] = {}

    def shape_of(raw: Any, ln: int, tname: str, allow_bt: bool) -> tuple[E.Expr, ...]:
        if not isinstance(raw, list) or not raw:
            raise SpecError(f"shape of `{tname}` must be a non-empty list of dimensions", path, ln,
                            hint="e.g. shape: [B, T, C]")
        dims = tuple(_expr(d, path, ln, f"shape of `{tname}`") for d in raw)
        for d in dims:
            if _has_float(d):
                raise SpecError(f"shape of `{tname}` has a non-integer number in `{d.text()}`", path, ln,
                                hint="dimensions are whole numbers: use integers and config names")
            unknown = d.names() - symbols
            if unknown:
                raise SpecError(f"shape of `{tname}` uses unknown name(s) {', '.join(sorted(unknown))}", path, ln,
                                hint="a dimension may use config names, and B and T for activations")
            if not allow_bt and d.names() & {"B", "T"}:
                raise SpecError(f"parameter `{tname}` cannot depend on the run-time B or T", path, ln)
        return dims

    def add(tname: str, decl: TensorDecl) -> None:
        if tname in tensors or tname in config:
            raise SpecError(f"`{tname}` is declared twice", path, decl.line,
                            hint="inputs, parameters, activations and config names share one namespace")
        tensors[tname] = decl

    for k, v in _mapping(doc.get("inputs") or _LineDict(), path, _line(doc, "inputs"), "`inputs`").items():
        ln = _line(doc["inputs"], k)
        _ident(k, path, ln, "input name")
        v = _mapping(v, path, ln, f"input `{k}`")
        _only_keys(v, {"shape", "range", "optional"}, path, f"input `{k}`")
        if "range" not in v:
            raise SpecError(f"input `{k}` needs `range` (its values must be < range)", path, ln,
                            hint="e.g. range: V for token ids; the runtime checks every value before the C runs")
        rng = _config_names(_expr(v["range"], path, ln, f"range of `{k}`"), set(config), path, ln, f"range of `{k}`")
        add(k, TensorDecl(k, "input", shape_of(v.get("shape"), ln, k, True), False, ln, range=rng,
                          optional=_flag(v, "optional", False, path, ln, f"input `{k}`"), dtype="int"))

    for k, v in _mapping(doc["parameters"], path, _line(doc, "parameters"), "`parameters`").items():
        ln = _line(doc["parameters"], k)
        _ident(k, path, ln, "parameter name")
        v = _mapping(v, path, ln, f"parameter `{k}`")
        _only_keys(v, {"shape", "per_layer", "init", "decay"}, path, f"parameter `{k}`")
        init = _init(v.get("init", "zeros"), path, ln, k)
        if init.value is not None:
            _config_names(init.value, set(config), path, ln, f"init of `{k}`")
        add(k, TensorDecl(k, "param", shape_of(v.get("shape"), ln, k, False),
                          _flag(v, "per_layer", False, path, ln, f"parameter `{k}`"), ln,
                          init=init, decay=_flag(v, "decay", True, path, ln, f"parameter `{k}`")))

    for k, v in _mapping(doc["activations"], path, _line(doc, "activations"), "`activations`").items():
        ln = _line(doc["activations"], k)
        _ident(k, path, ln, "activation name")
        if isinstance(v, list):
            v = {"shape": v}
        v = _mapping(v, path, ln, f"activation `{k}`")
        _only_keys(v, {"shape", "per_layer"}, path, f"activation `{k}`")
        add(k, TensorDecl(k, "act", shape_of(v.get("shape"), ln, k, True),
                          _flag(v, "per_layer", False, path, ln, f"activation `{k}`"), ln))

    # graph -----------------------------------------------------------------------------------------------
    graph_raw = doc["graph"]
    if not isinstance(graph_raw, list) or not graph_raw:
        raise SpecError("`graph` must be a non-empty list of nodes", path, _line(doc, "graph"))
    node_names: set[str] = set()
    carry_names: set[str] = set()
    graph: list[Node | Repeat] = []
    for item in graph_raw:
        if isinstance(item, dict) and "repeat" in item:
            graph.append(_repeat(item, path, tensors, symbols, node_names, carry_names))
        else:
            graph.append(_node(item, path, node_names, len(node_names)))

    # outputs -----------------------------------------------------------------------------------------------
    outputs = _mapping(doc.get("outputs") or _LineDict(), path, _line(doc, "outputs"), "`outputs`")
    _only_keys(outputs, {"logits", "loss"}, path, "`outputs`")
    logits = cols = loss = None
    if "logits" in outputs:
        lo = outputs["logits"]
        ln = _line(outputs, "logits")
        if isinstance(lo, dict):
            _only_keys(lo, {"tensor", "columns"}, path, "`outputs.logits`")
            if "tensor" not in lo:
                raise SpecError("outputs.logits needs `tensor`", path, ln, hint="e.g. logits: {tensor: logits, columns: V}")
            logits = lo["tensor"]
            if "columns" in lo:
                cols = _config_names(_expr(lo["columns"], path, ln, "logits columns"), set(config), path, ln,
                                     "logits columns")
        else:
            logits = lo
    if "loss" in outputs:
        loss = outputs["loss"]
    for what, tname in (("logits", logits), ("loss", loss)):
        if tname is not None and not _plain_name(tname):
            raise SpecError(f"outputs.{what} must name an activation, got {describe(tname)}", path,
                            _line(outputs, what), hint="name an activation declared under `activations`")
        if tname is not None and (tname not in tensors or tensors[tname].kind != "act"):
            raise SpecError(f"outputs.{what} names `{tname}`, which is not an activation", path,
                            _line(outputs, what), hint="name an activation declared under `activations`")

    hf = _huggingface(doc.get("huggingface"), path, _line(doc, "huggingface"), tensors, config)
    return ModelSpec(path=path, name=name, source=text, config=config, config_lines=lines, batch=batch,
                     tensors=tensors, graph=graph, logits=logits, logits_columns=cols, loss=loss,
                     huggingface=hf, lines=lines,
                     output_lines={k: _line(outputs, k) for k in ("logits", "loss") if k in outputs})


def _flag(obj: Mapping, key: str, default: bool, path: Path, line: int, what: str) -> bool:
    """A true/false field; anything else is an error (``bool("false")`` would silently be True)."""
    value = obj.get(key, default)
    if not isinstance(value, bool):
        raise SpecError(f"`{key}` of {what} must be true or false, got {describe(value)}", path, _line(obj, key, line))
    return value


def _has_float(e: E.Expr) -> bool:
    if isinstance(e, E.Num):
        return isinstance(e.value, float)
    if isinstance(e, E.BinOp):
        return _has_float(e.left) or _has_float(e.right)
    if isinstance(e, E.Neg):
        return _has_float(e.x)
    if isinstance(e, E.Call):
        return e.fn == "sqrt" or any(_has_float(a) for a in e.args)
    return False


def _config_names(e: E.Expr, symbols: set[str], path: Path, line: int, what: str) -> E.Expr:
    unknown = e.names() - symbols
    if unknown:
        raise SpecError(f"{what} uses unknown name(s) {', '.join(sorted(unknown))}", path, line,
                        hint="it may use config names only")
    return e


def _init(raw: Any, path: Path, line: int, tname: str) -> Init:
    if raw in ("zeros", "ones"):
        return Init(raw)
    if isinstance(raw, dict) and len(raw) == 1:
        (kind, value), = raw.items()
        if kind in ("normal", "constant"):
            return Init(kind, _expr(value, path, line, f"init of `{tname}`"))
    raise SpecError(f"init of `{tname}` must be zeros, ones, {{normal: STD}} or {{constant: VALUE}}, "
                    f"got {describe(raw)}", path, line)


def _names(raw: Any, path: Path, line: int, node: str, what: str) -> list[str]:
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        raise SpecError(f"`{what}` must be a tensor name or a list of them", path, line, node)
    for n in items:
        if not _plain_name(n):
            raise SpecError(f"`{what}` entry {describe(n)} is not a tensor name", path, line, node,
                            hint="write the name of a declared input, parameter, activation or carry")
    return list(items)


def _node(raw: Any, path: Path, node_names: set[str], index: int) -> Node:
    line = _line(raw, default=0)
    if not isinstance(raw, dict):
        raise SpecError(f"a graph node must be a mapping with `op`, `in` and `out`, got {describe(raw)}", path, line)
    op = raw.get("op")
    name = raw.get("name", f"{op if _plain_name(op) else 'node'}_{index}")
    _ident(name, path, line, "node name", c_name=False)
    if name in node_names:
        raise SpecError(f"two graph nodes are named `{name}`", path, line, name, hint="give each node its own name")
    node_names.add(name)
    if not _plain_name(op):
        raise SpecError("a graph node needs `op: NAME`" + (f", got {describe(op)}" if "op" in raw else ""),
                        path, line, name)
    for req in ("in", "out"):
        if req not in raw:
            raise SpecError(f"a graph node needs `{req}`", path, line, name)
    attrs = {}
    for k, v in raw.items():
        if k in ("name", "op", "in", "out"):
            continue
        _ident(k, path, _line(raw, k), "attribute name", c_name=False)
        if not isinstance(v, (int, float, str)) or isinstance(v, bool):
            raise SpecError(f"attribute `{k}` must be a number or an expression", path, _line(raw, k), name)
        attrs[k] = _expr(v, path, _line(raw, k), f"attribute `{k}`")
    return Node(name, raw["op"], _names(raw["in"], path, line, name, "in"),
                _names(raw["out"], path, line, name, "out"), attrs, line)


def _repeat(raw: dict, path: Path, tensors: dict[str, TensorDecl], symbols: set[str], node_names: set[str],
            carry_names: set[str]) -> Repeat:
    line = _line(raw)
    _only_keys(raw, {"repeat", "carry", "body", "next"}, path, "a repeat block")
    count = _expr(raw["repeat"], path, line, "repeat count")
    unknown = count.names() - (symbols - {"B", "T"})
    if unknown:
        raise SpecError(f"repeat count uses name(s) {', '.join(sorted(unknown))} that are not config names", path, line,
                        hint="the number of layers is fixed at build time: use a config name such as L")
    carry_raw = _mapping(raw.get("carry") or _LineDict(), path, line, "`carry`")
    next_raw = _mapping(raw.get("next") or _LineDict(), path, line, "`next`")
    carry: dict[str, str] = {}
    for k, v in carry_raw.items():
        ln = _line(carry_raw, k)
        _ident(k, path, ln, "carry name")
        if k in tensors or k in carry_names or k in symbols:
            raise SpecError(f"carry `{k}` has the name of a declared tensor, a config name or another block's carry",
                            path, ln,
                            hint="choose another name")
        carry_names.add(k)
        carry[k] = _ident(v, path, ln, "carry start")
    if set(next_raw) != set(carry):
        raise SpecError("`next` must give every carry its next value (and only those)", path, _line(raw, "next") or line,
                        hint=f"carries: {', '.join(carry) or 'none'}")
    nxt = {k: _ident(v, path, _line(next_raw, k), "carry next") for k, v in next_raw.items()}
    body_raw = raw.get("body")
    if not isinstance(body_raw, list) or not body_raw:
        raise SpecError("a repeat block needs a non-empty `body` list", path, line)
    body = []
    for item in body_raw:
        if isinstance(item, dict) and "repeat" in item:
            raise SpecError("repeat blocks cannot be nested", path, _line(item))
        body.append(_node(item, path, node_names, len(node_names)))
    return Repeat(count, carry, nxt, body, line)


def _huggingface(raw: Any, path: Path, line: int, tensors: dict[str, TensorDecl], config: dict) -> HFMapping | None:
    if raw is None:
        return None
    raw = _mapping(raw, path, line, "`huggingface`")
    _only_keys(raw, {"config", "parameters", "require", "ignore", "ignore_config"}, path, "`huggingface`")
    cfg = _mapping(raw.get("config") or _LineDict(), path, line, "`huggingface.config`")
    out_cfg: dict[str, str] = {}
    config_null: dict[str, Any] = {}
    for k, v in cfg.items():
        if k not in config:
            raise SpecError(f"huggingface.config maps `{k}`, which is not a config name", path, _line(cfg, k))
        if isinstance(v, dict) and isinstance(v.get("key"), str) and "if_null" in v:
            _only_keys(v, {"key", "if_null"}, path, f"huggingface.config `{k}`")
            if isinstance(v["if_null"], bool) or not isinstance(v["if_null"], (int, float)):
                raise SpecError(f"huggingface.config `{k}`: `if_null` must be a number", path, _line(cfg, k))
            config_null[k] = v["if_null"]
            v = v["key"]
        if not isinstance(v, str):
            raise SpecError(f"huggingface.config `{k}` must name a config.json key, or be "
                            f"{{key: KEY, if_null: VALUE}}", path, _line(cfg, k))
        out_cfg[k] = v
    require: dict[str, list] = {}
    req = _mapping(raw.get("require") or _LineDict(), path, line, "`huggingface.require`")
    for k, v in req.items():
        values = list(v) if isinstance(v, list) else [v]
        if not all(x is None or isinstance(x, (str, int, float, bool)) for x in values):
            raise SpecError(f"huggingface.require `{k}` must be a value or a list of values", path, _line(req, k))
        require[str(k)] = values
    ignore = raw.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
        raise SpecError("huggingface.ignore must be a list of tensor-name patterns", path, _line(raw, "ignore"))
    ignore_config = raw.get("ignore_config") or []
    if not isinstance(ignore_config, list) or not all(isinstance(x, str) and x.strip() for x in ignore_config):
        raise SpecError("huggingface.ignore_config must be a list of config.json keys", path,
                        _line(raw, "ignore_config"), hint="e.g. ignore_config: [architectures, dtype, bos_token_id]")
    params = _mapping(raw.get("parameters") or _LineDict(), path, line, "`huggingface.parameters`")
    out_params: dict[str, HFParam] = {}
    for k, v in params.items():
        ln = _line(params, k)
        if k not in tensors or tensors[k].kind != "param":
            raise SpecError(f"huggingface.parameters maps `{k}`, which is not a parameter", path, ln)
        if isinstance(v, str):
            raw_name, transpose, pad_rows = v, False, False
        elif isinstance(v, dict) and isinstance(v.get("name"), str):
            _only_keys(v, {"name", "transpose", "pad_rows"}, path, f"huggingface.parameters `{k}`")
            for flag in ("transpose", "pad_rows"):
                if not isinstance(v.get(flag, False), bool):
                    raise SpecError(f"huggingface.parameters `{k}`: `{flag}` must be true or false", path, ln)
            raw_name, transpose, pad_rows = v["name"], v.get("transpose", False), v.get("pad_rows", False)
        else:
            raise SpecError(f"huggingface.parameters `{k}` must be a tensor name or "
                            f"{{name, transpose, pad_rows}}", path, ln)
        names = [n.strip() for n in raw_name.split("|")]
        if not all(names):
            raise SpecError(f"huggingface.parameters `{k}`: empty tensor name in {describe(raw_name)}", path, ln)
        if tensors[k].per_layer and not all("{layer}" in n for n in names):
            raise SpecError(f"`{k}` is per-layer, so its HF name needs `{{layer}}`"
                            + (" in every alternative" if len(names) > 1 else ""), path, ln)
        out_params[k] = HFParam(names[0], transpose, pad_rows, tuple(names[1:]))
    return HFMapping(out_cfg, out_params, config_null, require, tuple(ignore),
                     tuple(x.strip() for x in ignore_config))
