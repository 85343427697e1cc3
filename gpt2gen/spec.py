"""The model file: load a YAML model description safely and check its structure.

A model file is untrusted input. It is read with a safe YAML loader that records line numbers; every
name must be a plain identifier that cannot collide with the generated C; every shape, config value and
init scale is parsed by ``gpt2gen.expr`` (never ``eval``). Errors are ``SpecError``s that name the file,
the line, the node and what to do. Op-level checks (arity, shapes) happen in ``gpt2gen.lower``.
See docs/model-format.md for the format, field by field.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from . import expr as E

IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Names the generated C uses for itself, and C keywords: a model may not name a tensor or a symbol so.
C_KEYWORDS = set("""auto break case char const continue default do double else enum extern float for goto if inline int
long register restrict return short signed sizeof static struct switch typedef union unsigned void volatile while
_Bool _Complex _Imaginary bool true false NULL size_t main""".split())
RESERVED = C_KEYWORDS | {
    "B", "T", "B_MAX", "T_MAX", "L_REPEAT", "l", "p", "g", "a", "da", "m", "v", "i", "n", "ar", "inputs", "loss",
    "step", "lr", "beta1", "beta2", "eps", "weight_decay", "grad_scale", "sqrtf", "expf",
}
# Prefixes the generated C reserves for gradients and arena offsets.
RESERVED_PREFIXES = ("d_", "gg_", "GG_", "OFF_", "DSLOT_")


class SpecError(ValueError):
    """A problem in a model file, located by file, line and (where there is one) graph node."""

    def __init__(self, message: str, file: str | Path | None = None, line: int | None = None,
                 node: str | None = None, hint: str | None = None):
        self.message, self.file, self.line, self.node, self.hint = message, file, line, node, hint
        where = str(file) if file else "<model>"
        if line:
            where += f":{line}"
        text = f"{where}: "
        if node:
            text += f"node '{node}': "
        text += message
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


class _Loader(yaml.SafeLoader):
    """SafeLoader that remembers where each mapping and sequence starts and rejects duplicate keys."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _LineDict:
    loader.flatten_mapping(node)
    out = _LineDict()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float)):
            raise SpecError(f"a mapping key must be a plain name, not {type(key).__name__}",
                            loader.name, key_node.start_mark.line + 1)
        if key in out:
            raise SpecError(f"duplicate key `{key}`", loader.name, key_node.start_mark.line + 1,
                            hint="each key may appear once in a mapping; remove or rename one of them")
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> _LineList:
    out = _LineList(loader.construct_object(n, deep=True) for n in node.value)
    out.line = node.start_mark.line + 1
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


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
    kind: str                      # "input" | "param" | "act"
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
            problems.append(f"{key} = {value!r} (this model file represents {' or '.join(map(repr, allowed))})")
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

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()[:16]

    def of_kind(self, kind: str) -> list[TensorDecl]:
        return [t for t in self.tensors.values() if t.kind == kind]

    def error(self, message: str, line: int | None = None, node: str | None = None, hint: str | None = None) -> SpecError:
        return SpecError(message, self.path, line, node, hint)

    def resolve(self, overrides: Mapping[str, int | float] | None = None) -> dict[str, int | float]:
        """Evaluate config and batch maxima in file order; ``overrides`` replace values by name."""
        overrides = dict(overrides or {})
        known = set(self.config) | set(self.batch)
        for k in overrides:
            if k not in known:
                raise SpecError(f"unknown config override `{k}`", self.path,
                                hint=f"known names: {', '.join(sorted(known))}")
        env: dict[str, int | float] = {}
        for section, entries in (("config", self.config), ("batch", self.batch)):
            for name, ex in entries.items():
                line = self.config_lines.get(name)
                if name in overrides:
                    v = overrides[name]
                    if isinstance(v, bool) or not isinstance(v, (int, float)):
                        raise SpecError(f"override {name}={v!r} is not a number", self.path, line)
                else:
                    try:
                        v = ex.eval(env)
                    except E.ExprError as err:
                        raise SpecError(f"{section} `{name}`: {err}", self.path, line,
                                        hint="a value may use only names defined above it") from None
                if isinstance(v, float) and v.is_integer() and section == "batch":
                    v = int(v)
                env[name] = v
        for name in ("B", "T"):
            v = env[name]
            if not isinstance(v, int) or v < 1:
                raise SpecError(f"batch `{name}` must be a positive whole number, got {v}", self.path,
                                self.config_lines.get(name))
        return env


def _ident(name: Any, path: Path, line: int, what: str, c_name: bool = True) -> str:
    """Check a name is a plain identifier; ``c_name``: it also becomes a C identifier, so not a reserved one."""
    if not isinstance(name, str) or not IDENT.fullmatch(name):
        raise SpecError(f"{what} {name!r} is not a plain identifier", path, line,
                        hint="use letters, digits and underscores, starting with a letter or underscore")
    if c_name and (name in RESERVED or name.startswith(RESERVED_PREFIXES)):
        raise SpecError(f"{what} `{name}` is reserved by the generated code", path, line,
                        hint="rename it (reserved: C keywords, B, T, loop and arena names, and the prefixes "
                             + ", ".join(RESERVED_PREFIXES) + ")")
    return name


def _expr(text: Any, path: Path, line: int, what: str) -> E.Expr:
    try:
        return E.parse(text)
    except E.ExprError as err:
        raise SpecError(f"{what}: {err}", path, line,
                        hint="expressions use numbers, config names, + - * / // %, parentheses and "
                             "sqrt/min/max/round_up") from None


def _mapping(obj: Any, path: Path, line: int, what: str) -> _LineDict:
    if not isinstance(obj, dict):
        raise SpecError(f"{what} must be a mapping, got {type(obj).__name__}", path, _line(obj, default=line))
    return obj


def _only_keys(obj: Mapping, allowed: set[str], path: Path, what: str, node: str | None = None) -> None:
    for k in obj:
        if k not in allowed:
            raise SpecError(f"unknown field `{k}` in {what}", path, _line(obj, k), node,
                            hint=f"allowed fields: {', '.join(sorted(allowed))}")


def load(path: str | Path) -> ModelSpec:
    """Load and structurally validate a model file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError("model file not found", path,
                        hint="pass --model PATH, or run from the directory holding model.yaml") from None
    return loads(text, path)


def loads(text: str, path: str | Path = "<string>") -> ModelSpec:
    path = Path(path)
    try:
        loader = _Loader(text)
        loader.name = str(path)
        try:
            doc = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark else None
        raise SpecError(f"YAML syntax error: {err.problem or err}", path, line,
                        hint="check indentation, brackets and quoting on that line") from None
    except yaml.YAMLError as err:
        raise SpecError(f"YAML error: {err}", path) from None
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
                          optional=bool(v.get("optional", False)), dtype="int"))

    for k, v in _mapping(doc["parameters"], path, _line(doc, "parameters"), "`parameters`").items():
        ln = _line(doc["parameters"], k)
        _ident(k, path, ln, "parameter name")
        v = _mapping(v, path, ln, f"parameter `{k}`")
        _only_keys(v, {"shape", "per_layer", "init", "decay"}, path, f"parameter `{k}`")
        init = _init(v.get("init", "zeros"), path, ln, k)
        if init.value is not None:
            _config_names(init.value, set(config), path, ln, f"init of `{k}`")
        add(k, TensorDecl(k, "param", shape_of(v.get("shape"), ln, k, False), bool(v.get("per_layer", False)), ln,
                          init=init, decay=bool(v.get("decay", True))))

    for k, v in _mapping(doc["activations"], path, _line(doc, "activations"), "`activations`").items():
        ln = _line(doc["activations"], k)
        _ident(k, path, ln, "activation name")
        if isinstance(v, list):
            v = {"shape": v}
        v = _mapping(v, path, ln, f"activation `{k}`")
        _only_keys(v, {"shape", "per_layer"}, path, f"activation `{k}`")
        add(k, TensorDecl(k, "act", shape_of(v.get("shape"), ln, k, True), bool(v.get("per_layer", False)), ln))

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
        if isinstance(lo, dict):
            logits = lo.get("tensor")
            cols = _expr(lo["columns"], path, _line(outputs, "logits"), "logits columns") if "columns" in lo else None
        else:
            logits = lo
    if "loss" in outputs:
        loss = outputs["loss"]
    for what, tname in (("logits", logits), ("loss", loss)):
        if tname is not None and (tname not in tensors or tensors[tname].kind != "act"):
            raise SpecError(f"outputs.{what} names `{tname}`, which is not an activation", path,
                            _line(outputs, what), hint="name an activation declared under `activations`")

    hf = _huggingface(doc.get("huggingface"), path, _line(doc, "huggingface"), tensors, config)
    return ModelSpec(path=path, name=name, source=text, config=config, config_lines=lines, batch=batch,
                     tensors=tensors, graph=graph, logits=logits, logits_columns=cols, loss=loss,
                     huggingface=hf, lines=lines)


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
    raise SpecError(f"init of `{tname}` must be zeros, ones, {{normal: STD}} or {{constant: VALUE}}, got {raw!r}",
                    path, line)


def _names(raw: Any, path: Path, line: int, node: str, what: str) -> list[str]:
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        raise SpecError(f"`{what}` must be a tensor name or a list of them", path, line, node)
    for n in items:
        if not isinstance(n, str) or not IDENT.fullmatch(n):
            raise SpecError(f"`{what}` entry {n!r} is not a tensor name", path, line, node,
                            hint="write the name of a declared input, parameter, activation or carry")
    return list(items)


def _node(raw: Any, path: Path, node_names: set[str], index: int) -> Node:
    line = _line(raw, default=0)
    if not isinstance(raw, dict):
        raise SpecError(f"a graph node must be a mapping with `op`, `in` and `out`, got {raw!r}", path, line)
    name = raw.get("name", f"{raw.get('op', 'node')}_{index}")
    _ident(name, path, line, "node name", c_name=False)
    if name in node_names:
        raise SpecError(f"two graph nodes are named `{name}`", path, line, name, hint="give each node its own name")
    node_names.add(name)
    if "op" not in raw or not isinstance(raw["op"], str) or not IDENT.fullmatch(raw["op"]):
        raise SpecError("a graph node needs `op: NAME`", path, line, name)
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
        if k in tensors or k in carry_names:
            raise SpecError(f"carry `{k}` has the name of a declared tensor or of another block's carry", path, ln,
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
    _only_keys(raw, {"config", "parameters", "require", "ignore"}, path, "`huggingface`")
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
            raise SpecError(f"huggingface.parameters `{k}`: empty tensor name in {raw_name!r}", path, ln)
        if tensors[k].per_layer and not all("{layer}" in n for n in names):
            raise SpecError(f"`{k}` is per-layer, so its HF name needs `{{layer}}`"
                            + (" in every alternative" if len(names) > 1 else ""), path, ln)
        out_params[k] = HFParam(names[0], transpose, pad_rows, tuple(names[1:]))
    return HFMapping(out_cfg, out_params, config_null, require, tuple(ignore))
