"""Shape and config expressions: a small arithmetic language, parsed by hand and never ``eval``'d.

Grammar (all a model file can say in an expression)::

    expr   := term (("+" | "-") term)*
    term   := unary (("*" | "/" | "//" | "%") unary)*
    unary  := "-" unary | atom
    atom   := NUMBER | NAME | NAME "(" expr ("," expr)* ")" | "(" expr ")"

Functions: ``sqrt``, ``min``, ``max``, ``round_up(x, m)`` (smallest multiple of m >= x).
``/`` divides exactly: on integers it must leave no remainder where an integer is needed.
An expression evaluates to a Python int or float; a target renders it in its own language (gpt2gen.targets).

Every value an expression can produce is one the generated C can hold: literals and every
intermediate result are finite, and whole numbers stay within C's 64-bit range (a result outside it
is an ``ExprError``, never an ``inf`` that would render as ``inff``). Expressions are bounded in
length and nesting, so a hostile model file cannot exhaust the parser's recursion.
"""
from __future__ import annotations

import itertools
import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Mapping, Union

Number = Union[int, float]

FUNCTIONS = {"sqrt": 1, "min": 2, "max": 2, "round_up": 2}

# Bounds on one expression: far beyond any real shape or scale (the shipped models' longest is ~70
# characters and 3 levels deep), and far below what the recursive parser and evaluator can take.
MAX_CHARS = 1000
MAX_TOKENS = 256
MAX_NESTING = 32
INT_LIMIT = 2 ** 63            # whole numbers must fit C's long long (config constants render as one)
FLT_MAX = 3.4028234663852886e38          # the largest finite C float
FLT_MIN = 1.1754943508222875e-38         # the smallest normal C float

_TOKEN = re.compile(r"\s*(?:(\d+\.\d*(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|\.\d+(?:[eE][-+]?\d+)?)|(\d+)|([A-Za-z_][A-Za-z0-9_]*)|(//|[-+*/%(),]))")


def describe(value: Any, limit: int = 60) -> str:
    """A short, bounded description of a value read from a file, for error messages (``spec`` re-exports it).

    Error messages never format a whole value: YAML aliases let a few hundred bytes stand for a structure
    far too large to print (an alias bomb), and ``repr`` would expand all of it; a whole number of
    thousands of digits is slow to print, beyond 4,300 refused. This shows the start of a string or
    number, and the type, length and first few items of a list or mapping. Scalars are written as YAML
    and JSON write them (``null``, ``true``), since model files and config.json are where they come from."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _clipped(repr(value), limit, f"{len(value):,} characters", quoted=True)
    if isinstance(value, numbers.Integral):           # also numpy's integers, which are no ints
        value = int(value)
        if value.bit_length() > 14_000:           # past ~4,200 digits, where str() of an int is refused
            return f"a whole number of about {int(value.bit_length() * 0.30103):,} digits"
        text = repr(value)
        return _clipped(text, limit, f"{len(text.lstrip('-')):,} digits")
    if isinstance(value, numbers.Real):               # numpy 2 writes np.float64(0.5)
        return repr(float(value))
    if isinstance(value, Mapping):
        items = [f"{_item(k)}: {_item(v)}" for k, v in itertools.islice(value.items(), 3)]
        more = ", ..." if len(value) > 3 else ""
        return f"a mapping {{{', '.join(items)}{more}}} of {len(value):,} entries"
    if isinstance(value, (list, tuple)):
        items = [_item(v) for v in value[:3]]
        more = ", ..." if len(value) > 3 else ""
        return f"a list [{', '.join(items)}{more}] of {len(value):,} items"
    return f"a {type(value).__name__}"


def _clipped(text: str, limit: int, size: str, quoted: bool = False) -> str:
    """``text`` if it fits in ``limit`` characters, else its start and its size (the quote kept closed)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit - 4]}...{text[0] if quoted else ''} ({size})"


def _item(value: Any) -> str:
    """One item inside ``describe``: a short scalar, or just the kind of a nested container."""
    if isinstance(value, Mapping):
        return "{...}"
    if isinstance(value, (list, tuple)):
        return "[...]"
    return describe(value, 24)


class ExprError(ValueError):
    """A malformed expression or one that cannot be evaluated (unknown name, inexact division, ...)."""


class ExprRangeError(ExprError):
    """A number or a result the generated C cannot hold (infinite, NaN, beyond 64 bits), or an expression
    too long or too deeply nested to parse."""


def checked(value: Number, where: "Expr | str") -> Number:
    """``value`` if the generated C can hold it: finite, and a whole number within 64 bits.

    Every literal and every intermediate result passes through here, so an overflow is reported at the
    operation that caused it instead of surfacing later as ``inf``/``nan`` in the C source."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ExprRangeError(f"`{where}` is {value}: not a finite number (a value must stay within about 1e308)")
    if isinstance(value, int) and not -INT_LIMIT < value < INT_LIMIT:
        raise ExprRangeError(f"`{where}` is too large: whole numbers must stay within +-2**63 (C's long long)")
    return value


C_INT_MAX = 2 ** 31 - 1        # kernels take dimensions and int attributes as C `int`


def c_int(value: int, what: str) -> int:
    """``value`` if a kernel's C ``int`` parameter can take it; beyond that it would silently wrap around."""
    if not -C_INT_MAX - 1 <= value <= C_INT_MAX:
        raise ExprRangeError(f"{what} = {value} is beyond the range of the kernels' C int (at most 2**31 - 1)")
    return value


def c_float_problem(value: float) -> str | None:
    """Why ``value`` cannot be a C ``float`` constant, or None: beyond FLT_MAX it would be infinite, and
    a non-zero value below FLT_MIN would be flushed to zero or lose its precision."""
    if not math.isfinite(value):
        return f"{value} is not a finite number"
    if abs(value) > FLT_MAX:
        return f"{value!r} is beyond the range of a C float (at most about 3.4e38)"
    if value != 0 and abs(value) < FLT_MIN:
        return f"{value!r} is too small for a C float (it would become 0 or lose precision; at least about 1.2e-38)"
    return None


@dataclass(frozen=True)
class Expr:
    def eval(self, env: Mapping[str, Number]) -> Number:  # pragma: no cover - abstract
        raise NotImplementedError

    def names(self) -> set[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def text(self) -> str:
        """The expression as a person writes it (no outer parentheses)."""
        s = str(self)
        if isinstance(self, BinOp) and s.startswith("(") and s.endswith(")"):
            s = s[1:-1]
        return s

    def eval_int(self, env: Mapping[str, Number], what: str = "value") -> int:
        v = self.eval(env)
        if isinstance(v, float):
            if not v.is_integer():
                raise ExprError(f"{what} `{self}` evaluates to {v}, which is not a whole number")
            v = int(v)
        return v


@dataclass(frozen=True)
class Num(Expr):
    value: Number

    def __post_init__(self):
        v = self.value
        if isinstance(v, float) and not math.isfinite(v):
            raise ExprRangeError(f"the number {v} is not finite (YAML's .inf, .nan, or a literal beyond about 1e308)")
        if isinstance(v, int) and not -INT_LIMIT < v < INT_LIMIT:
            raise ExprRangeError(f"the number {describe(v, 24)} is too large (whole numbers must stay within +-2**63)")

    def eval(self, env):
        return self.value

    def names(self):
        return set()

    def __str__(self):
        return repr(self.value)


@dataclass(frozen=True)
class Name(Expr):
    id: str

    def eval(self, env):
        if self.id not in env:
            raise ExprError(f"unknown name `{self.id}`")
        return env[self.id]

    def names(self):
        return {self.id}

    def __str__(self):
        return self.id


@dataclass(frozen=True)
class Neg(Expr):
    x: Expr

    def eval(self, env):
        return checked(-self.x.eval(env), self)

    def names(self):
        return self.x.names()

    def __str__(self):
        return f"-{self.x}"


@dataclass(frozen=True)
class BinOp(Expr):
    op: str
    left: Expr
    right: Expr

    def eval(self, env):
        return checked(self._apply(self.left.eval(env), self.right.eval(env)), self)

    def _apply(self, a: Number, b: Number) -> Number:
        if self.op == "+":
            return a + b
        if self.op == "-":
            return a - b
        if self.op == "*":
            return a * b
        if b == 0:
            raise ExprError(f"division by zero in `{self}`")
        if self.op == "//":
            return a // b
        if self.op == "%":
            return a % b
        if isinstance(a, int) and isinstance(b, int) and a % b == 0:
            return a // b
        return a / b

    def names(self):
        return self.left.names() | self.right.names()

    def __str__(self):
        return f"({self.left} {self.op} {self.right})"


@dataclass(frozen=True)
class Call(Expr):
    fn: str
    args: tuple[Expr, ...]

    def eval(self, env):
        return checked(self._apply([a.eval(env) for a in self.args]), self)

    def _apply(self, v: list[Number]) -> Number:
        if self.fn == "sqrt":
            if v[0] < 0:
                raise ExprError(f"sqrt of a negative number in `{self}`")
            return math.sqrt(v[0])
        if self.fn == "min":
            return min(v)
        if self.fn == "max":
            return max(v)
        x, m = v
        if not (isinstance(x, int) and isinstance(m, int)) or m <= 0:
            raise ExprError(f"round_up needs positive whole numbers in `{self}`")
        return -(-x // m) * m

    def names(self):
        out: set[str] = set()
        for a in self.args:
            out |= a.names()
        return out

    def __str__(self):
        return f"{self.fn}({', '.join(map(str, self.args))})"


class _Parser:
    def __init__(self, text: str):
        if len(text) > MAX_CHARS:
            raise ExprRangeError(f"an expression of {len(text)} characters is too long (at most {MAX_CHARS})")
        self.text = text
        self.toks: list[tuple[str, str]] = []
        self.depth = 0
        pos = 0
        stripped = text.rstrip()
        while pos < len(stripped):
            m = _TOKEN.match(stripped, pos)
            if not m or m.end() == pos:
                raise ExprError(f"unexpected character {stripped[pos:].lstrip()[:1]!r} in expression `{text}`")
            flt, integer, name, op = m.groups()
            if flt is not None:
                self.toks.append(("num", flt))
            elif integer is not None:
                self.toks.append(("int", integer))
            elif name is not None:
                self.toks.append(("name", name))
            else:
                self.toks.append(("op", op))
            pos = m.end()
        if len(self.toks) > MAX_TOKENS:
            raise ExprRangeError(f"an expression of {len(self.toks)} tokens is too long (at most {MAX_TOKENS})")
        self.i = 0

    def nested(self) -> None:
        """Enter one level of parentheses, unary minus or call (the parser recurses once per level)."""
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise ExprRangeError(f"expression `{self.text}` is nested more than {MAX_NESTING} levels deep")

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise ExprError(f"expression `{self.text}` ends too early")
        if value is not None and tok[1] != value:
            raise ExprError(f"expected `{value}` but found `{tok[1]}` in expression `{self.text}`")
        self.i += 1
        return tok

    def parse(self) -> Expr:
        if not self.toks:
            raise ExprError("empty expression")
        e = self.expr()
        if self.peek() is not None:
            raise ExprError(f"unexpected `{self.peek()[1]}` in expression `{self.text}`")
        return e

    def expr(self) -> Expr:
        e = self.term()
        while (t := self.peek()) and t[1] in ("+", "-"):
            self.take()
            e = BinOp(t[1], e, self.term())
        return e

    def term(self) -> Expr:
        e = self.unary()
        while (t := self.peek()) and t[1] in ("*", "/", "//", "%"):
            self.take()
            e = BinOp(t[1], e, self.unary())
        return e

    def unary(self) -> Expr:
        t = self.peek()
        if t and t[1] == "-":
            self.take()
            self.nested()
            e = Neg(self.unary())
            self.depth -= 1
            return e
        return self.atom()

    def atom(self) -> Expr:
        kind, val = self.take()
        if kind in ("int", "num"):
            return self.number(kind, val)
        if kind == "name":
            if (t := self.peek()) and t[1] == "(":
                if val not in FUNCTIONS:
                    raise ExprError(f"unknown function `{val}` in expression `{self.text}` (known: {', '.join(FUNCTIONS)})")
                self.take("(")
                self.nested()
                args = [self.expr()]
                while (t := self.peek()) and t[1] == ",":
                    self.take()
                    args.append(self.expr())
                self.take(")")
                self.depth -= 1
                if len(args) != FUNCTIONS[val]:
                    raise ExprError(f"`{val}` takes {FUNCTIONS[val]} argument(s) in expression `{self.text}`")
                return Call(val, tuple(args))
            return Name(val)
        if val == "(":
            self.nested()
            e = self.expr()
            self.take(")")
            self.depth -= 1
            return e
        raise ExprError(f"unexpected `{val}` in expression `{self.text}`")

    def number(self, kind: str, val: str) -> Num:
        """A literal, refused when C could not hold it (``1e999`` would otherwise render as ``inff``).

        ``Num`` says what is wrong with the value; this adds the expression it is written in. A literal
        has at most MAX_CHARS digits, so ``int()`` of it is quick."""
        try:
            return Num(int(val) if kind == "int" else float(val))
        except ExprRangeError as err:
            raise ExprRangeError(f"{err}, in expression `{self.text}`") from None


def substitute(e: Expr, names: Mapping[str, Expr]) -> Expr:
    """``e`` with each name in ``names`` replaced by its expression."""
    if isinstance(e, Name):
        return names.get(e.id, e)
    if isinstance(e, BinOp):
        return BinOp(e.op, substitute(e.left, names), substitute(e.right, names))
    if isinstance(e, Neg):
        return Neg(substitute(e.x, names))
    if isinstance(e, Call):
        return Call(e.fn, tuple(substitute(a, names) for a in e.args))
    return e


def parse(text: str | int | float) -> Expr:
    """Parse an expression (a YAML number is accepted as is)."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ExprError(f"expected a number or an expression, got {describe(text)}")
    if not isinstance(text, str):
        return Num(text)        # a YAML number: checked like a literal (`.inf`, `.nan` and 1e999 are refused)
    return _Parser(text).parse()
