"""Targets: what differs between backends, one object each.

A ``Target`` owns everything that depends on where the model runs: its kernel table (each op's forward
and backward kernel call for that target), its type names, the precisions and fusions it supports, its
template folder, how a lowered ``Program`` becomes source files, how those compile, and which names it
reserves in the model files. Lowering (``gpt2gen.lower``) knows none of this; adding a backend means
adding one ``Target`` here and one folder under ``templates/``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .. import expr as E

if TYPE_CHECKING:
    import numpy as np

    from ..program import Program


class OptionError(ValueError):
    """A build option (a precision, a fusion) the target cannot honour; the message says what it can."""


@dataclass(frozen=True)
class KernelCall:
    """A kernel function and its arguments: expressions over operand names, ``d_<operand>`` (that
    operand's gradient), dimension letters, attributes and ``numel(<operand>)``."""
    fn: str
    args: tuple[E.Expr, ...]

    @classmethod
    def parse(cls, call: str) -> "KernelCall":
        """``f(a, d_b, B * T, numel(out))`` -> KernelCall("f", (a, d_b, B * T, numel__out))."""
        fn, _, rest = call.partition("(")
        args = rest.rsplit(")", 1)[0]
        return cls(fn.strip(), tuple(E.parse(re.sub(r"numel\((\w+)\)", r"numel__\1", a)) for a in args.split(",")))


    def names(self) -> set[str]:
        out: set[str] = set()
        for a in self.args:
            out |= a.names()
        return out


@dataclass(frozen=True)
class Saved:
    """A buffer the op's forward writes for its backward on this target: a name its calls use and a shape
    pattern over the op's letters (``B,NH,T``). Statistics are kept in fp32 whatever the precision."""
    name: str
    shape: tuple[str, ...]
    doc: str = ""


@dataclass(frozen=True)
class Kernel:
    """One op on one target: the template file that defines its kernels, their calls, and what the
    forward keeps for the backward.

    ``decode``: the call of the decode program (one sequence, a chunk of T new tokens at positions t0 ..
    t0+T-1, over a KV cache), where it differs from the forward: ops that depend on positions (a position
    table, rotary angles) and ops that look across positions (attention, which reads and extends its
    ``cache``). Besides the forward's names it may use ``t0`` and the cache's capacity ``S`` (positions it
    holds: the model's maxT, or the op's ``window`` where that is smaller)."""
    template: str
    forward: KernelCall
    backward: KernelCall
    saved: tuple[Saved, ...] = ()
    needs: tuple[str, ...] = ()      # templates whose kernels this one calls (included before it)
    decode: KernelCall | None = None
    cache: tuple[Saved, ...] = ()    # what the decode kernel keeps across calls: shape patterns over the letters and S

    def reads(self, phase: str) -> set[str]:
        """The operands (and ``d_<operand>`` gradients) the kernel of ``phase`` is given."""
        return self.call_of(phase).names()

    def call_of(self, phase: str) -> KernelCall:
        """The call of ``phase`` (``decode``: the forward's where the op has no decode kernel of its own)."""
        if phase == "decode":
            return self.decode or self.forward
        return getattr(self, phase)


@dataclass
class CompileJob:
    """What the builder hands a target to compile one model: the rendered sources written in ``directory``,
    the product to write (``out``, a temporary the builder renames into place), the Python module name it
    must export, the host toolchain and its flags, the shared pybind11 binding (an object file whose module
    init is ``PyInit_<binding_module>``), and ``run(cmd, what, source=None, hint=None)`` to run a compiler."""
    directory: Path
    sources: dict[str, str]
    out: Path
    module: str
    toolchain: dict[str, str]
    cflags: list[str]
    link_flags: list[str]
    binding: Path
    binding_module: str
    run: Callable[..., None]
    hint: str | None = None
    verbose: bool = False
    options: dict = field(default_factory=dict)    # target options: cuda's emulate (bool) and archs


class Target:
    """The interface every backend implements (see ``gpt2gen.targets.cpu``)."""
    name: str
    folder: str                                  # templates/<folder>/
    precisions: tuple[str, ...] = ("fp32",)
    fusions: tuple[str, ...] = ()
    kernels: dict[str, Kernel]
    type_names: dict[str, str]                   # storage dtype -> the target's type

    def render(self, program: "Program", label: str | None = None) -> dict[str, str]:
        """The program's source files: {file name: text}."""
        raise NotImplementedError

    def kernels_source(self, op_names: list[str]) -> str:
        """A standalone source of these ops' kernels with exported symbols (the op tests call them)."""
        raise NotImplementedError

    def compile(self, job: CompileJob) -> None:
        raise NotImplementedError

    def build_options(self, emulate: bool = False, archs: str | list[str] | None = None) -> dict:
        """The target's build options, checked (an OptionError says what it takes instead)."""
        if emulate or archs:
            raise OptionError(f"target `{self.name}` takes no --emulate or --arch (they are the cuda target's)")
        return {}

    def build_key(self, options: dict) -> str:
        """What else the product depends on under these options (tool versions), for the build cache."""
        return ""

    def allocator(self, extension: Path) -> Callable[[int, str], "np.ndarray"]:
        """How the runtime gets the arenas of a model built into ``extension``: a function of (bytes, dtype)
        returning a zeroed 1-D numpy array of that dtype over memory the compiled code can use, 64-byte aligned.
        The default is host memory (``host_arena``)."""
        return host_arena

    def reserved_reason(self, name: str) -> str | None:
        """Why ``name`` cannot name a config value, tensor or carry of a model on this target, or None."""
        return None

    reserved_prefixes: tuple[str, ...] = ()

    def check_precision(self, precision: str) -> None:
        if precision not in self.precisions:
            raise OptionError(f"target `{self.name}` has no precision `{precision}`; it has "
                              f"{', '.join(self.precisions)} (--precision {self.precisions[0]})")


def host_arena(nbytes: int, dtype: str) -> "np.ndarray":
    """A zeroed 1-D array of ``dtype`` filling ``nbytes`` of host memory, starting on a 64-byte boundary. numpy's
    zeros are lazy: pages are taken where they are written."""
    import numpy as np

    from ..layout import ALIGN_BYTES
    from ..precision import DTYPES
    raw = np.zeros(nbytes + ALIGN_BYTES, dtype=np.uint8)
    shift = -raw.ctypes.data % ALIGN_BYTES
    return raw[shift:shift + nbytes].view(DTYPES[dtype].numpy)


def _targets() -> dict[str, Target]:
    from .cpu import CPU
    from .cuda import CUDA
    return {CPU.name: CPU, CUDA.name: CUDA}


def names() -> list[str]:
    return list(_targets())


def get(name: str) -> Target:
    """The target called ``name``; an unknown name is a ValueError listing the known ones."""
    targets = _targets()
    if name not in targets:
        raise ValueError(f"unknown target `{name}`; known targets: {', '.join(targets)}")
    return targets[name]


def reserved_reason(name: str) -> str | None:
    """Why ``name`` cannot be a model's name on some target (a model file is meant for all of them)."""
    for t in _targets().values():
        reason = t.reserved_reason(name)
        if reason:
            return reason
    return None


def reserved_prefixes() -> tuple[str, ...]:
    return tuple(p for t in _targets().values() for p in t.reserved_prefixes)
