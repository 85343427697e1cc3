"""Shape and config expressions: a small arithmetic language, parsed by hand and never ``eval``'d.

Grammar (all a model file can say in an expression)::

    expr   := term (("+" | "-") term)*
    term   := unary (("*" | "/" | "//" | "%") unary)*
    unary  := "-" unary | atom
    atom   := NUMBER | NAME | NAME "(" expr ("," expr)* ")" | "(" expr ")"

Functions: ``sqrt``, ``min``, ``max``, ``round_up(x, m)`` (smallest multiple of m >= x).
``/`` divides exactly: on integers it must leave no remainder where an integer is needed.
An expression evaluates to a Python int or float and renders to C over named constants.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Union

Number = Union[int, float]

FUNCTIONS = {"sqrt": 1, "min": 2, "max": 2, "round_up": 2}

_TOKEN = re.compile(r"\s*(?:(\d+\.\d*(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|\.\d+(?:[eE][-+]?\d+)?)|(\d+)|([A-Za-z_][A-Za-z0-9_]*)|(//|[-+*/%(),]))")


class ExprError(ValueError):
    """A malformed expression or one that cannot be evaluated (unknown name, inexact division, ...)."""


@dataclass(frozen=True)
class Expr:
    def eval(self, env: Mapping[str, Number]) -> Number:  # pragma: no cover - abstract
        raise NotImplementedError

    def names(self) -> set[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_c(self) -> str:  # pragma: no cover - abstract
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

    def eval(self, env):
        return self.value

    def names(self):
        return set()

    def to_c(self):
        return repr(self.value) if isinstance(self.value, int) else f"{self.value!r}f"

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

    def to_c(self):
        return self.id

    def __str__(self):
        return self.id


@dataclass(frozen=True)
class Neg(Expr):
    x: Expr

    def eval(self, env):
        return -self.x.eval(env)

    def names(self):
        return self.x.names()

    def to_c(self):
        return f"(-{self.x.to_c()})"

    def __str__(self):
        return f"-{self.x}"


@dataclass(frozen=True)
class BinOp(Expr):
    op: str
    left: Expr
    right: Expr

    def eval(self, env):
        a, b = self.left.eval(env), self.right.eval(env)
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

    def to_c(self):
        op = "/" if self.op == "//" else self.op
        return f"({self.left.to_c()} {op} {self.right.to_c()})"

    def __str__(self):
        return f"({self.left} {self.op} {self.right})"


@dataclass(frozen=True)
class Call(Expr):
    fn: str
    args: tuple[Expr, ...]

    def eval(self, env):
        v = [a.eval(env) for a in self.args]
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

    def to_c(self):
        a = [x.to_c() for x in self.args]
        if self.fn == "sqrt":
            return f"sqrtf({a[0]})"
        if self.fn in ("min", "max"):
            cmp = "<" if self.fn == "min" else ">"
            return f"(({a[0]}) {cmp} ({a[1]}) ? ({a[0]}) : ({a[1]}))"
        return f"((({a[0]}) + ({a[1]}) - 1) / ({a[1]}) * ({a[1]}))"

    def __str__(self):
        return f"{self.fn}({', '.join(map(str, self.args))})"


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.toks: list[tuple[str, str]] = []
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
        self.i = 0

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
            return Neg(self.unary())
        return self.atom()

    def atom(self) -> Expr:
        kind, val = self.take()
        if kind == "int":
            return Num(int(val))
        if kind == "num":
            return Num(float(val))
        if kind == "name":
            if (t := self.peek()) and t[1] == "(":
                if val not in FUNCTIONS:
                    raise ExprError(f"unknown function `{val}` in expression `{self.text}` (known: {', '.join(FUNCTIONS)})")
                self.take("(")
                args = [self.expr()]
                while (t := self.peek()) and t[1] == ",":
                    self.take()
                    args.append(self.expr())
                self.take(")")
                if len(args) != FUNCTIONS[val]:
                    raise ExprError(f"`{val}` takes {FUNCTIONS[val]} argument(s) in expression `{self.text}`")
                return Call(val, tuple(args))
            return Name(val)
        if val == "(":
            e = self.expr()
            self.take(")")
            return e
        raise ExprError(f"unexpected `{val}` in expression `{self.text}`")


def parse(text: str | int | float) -> Expr:
    """Parse an expression (a YAML number is accepted as is)."""
    if isinstance(text, bool):
        raise ExprError(f"expected a number or an expression, got {text!r}")
    if isinstance(text, (int, float)):
        return Num(text)
    if not isinstance(text, str):
        raise ExprError(f"expected a number or an expression, got {type(text).__name__}")
    return _Parser(text).parse()


def product_c(dims: list[Expr]) -> str:
    """C text for the product of ``dims`` computed in size_t (no int overflow)."""
    if not dims:
        return "1"
    parts = [d.to_c() for d in dims]
    return "(size_t)" + " * ".join(parts)
