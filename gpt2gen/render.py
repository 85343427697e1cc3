"""Rendering: a lowered program placed into a target's Jinja templates, producing readable sources.

What differs between targets lives in one small ``Renderer`` per target (its template folder, the
file it writes, the helper kernels it needs); the statements themselves are target-neutral and the
templates place names and numbers that ``gpt2gen.lower`` and ``gpt2gen.layout`` computed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import jinja2

from . import __version__
from . import ops as O
from .cache import digest
from .lower import Assign, Call, Decl, Fill, Guard, Loop, Program, Zero
from .resources import model_label, templates_dir


@dataclass(frozen=True)
class Renderer:
    """The parts of code generation that differ by target."""
    target: str
    folder: str                 # templates/<folder>/
    main_template: str          # the whole-model template
    source_name: str            # the file it renders to
    helpers: tuple[str, ...]    # kernel templates every model includes before its ops
    optimizer: str              # the optimizer's kernel template


RENDERERS = {
    "cpu": Renderer("cpu", "c", "model.c.j2", "model.c", ("util.c.j2",), "optim/adamw.c.j2"),
}


def renderer_for(target: str) -> Renderer:
    if target not in RENDERERS:
        raise ValueError(f"unknown target `{target}`; known targets: {', '.join(RENDERERS)}")
    return RENDERERS[target]


def environment(r: Renderer) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir() / r.folder)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render_kernels(op_names: list[str], target: str = "cpu") -> list[str]:
    """The kernel sections for these ops (helpers first, optimizer last), rendered for ``target``."""
    r = renderer_for(target)
    env = environment(r)
    names = list(r.helpers)
    for name in op_names:
        t = O.OPS[name].template
        if "ops/" + t not in names:
            names.append("ops/" + t)
    names.append(r.optimizer)
    return [env.get_template(n).render(op=None).strip("\n") + "\n" for n in names]


def kernels_source(op_names: list[str], target: str = "cpu") -> str:
    """A standalone translation unit of kernels with exported symbols (the op tests call them)."""
    head = ("// kernels of gpt2gen ops, for testing them one by one (generated; do not edit)\n"
            "#include <math.h>\n#include <stddef.h>\n#include <stdlib.h>\n#include <string.h>\n"
            "#define GG_KERNEL\n\n")
    return head + "\n".join(render_kernels(op_names, target))


def _stmt(s) -> dict:
    kind = {Call: "call", Decl: "decl", Assign: "assign", Zero: "zero", Fill: "fill", Guard: "guard",
            Loop: "loop"}[type(s)]
    d = {k: v for k, v in dataclasses.asdict(s).items() if k != "body"}
    d["kind"] = kind
    if isinstance(s, (Guard, Loop)):
        d["body"] = [_stmt(x) for x in s.body]
    return d


def _table(slots) -> tuple[list[dict], int]:
    width = max([len(s.name) for s in slots] + [4])
    return [dict(name=s.name, shape=s.shape, offset=s.offset, numel=s.numel, decay=s.decay,
                 pad=width - len(s.name)) for s in slots], width


def signature(program: Program) -> str:
    return digest(program.spec.source, program.layout.table(), repr(sorted(program.config.items())))


def render_program(program: Program, target: str = "cpu", label: str | None = None) -> dict[str, str]:
    """Render ``program`` for ``target``; returns {file name: source text}."""
    r = renderer_for(target)
    spec, layout = program.spec, program.layout
    kernels = render_kernels(program.ops_used, target)   # no model name collides with theirs: spec.reserved_reason
    config = []
    for name, ex in spec.config.items():
        v = program.config[name]
        text = str(ex)
        shown = text if text != repr(v) else ""
        if isinstance(v, float) and not v.is_integer():
            decl = f"static const float {name} = {v!r}f;"
        elif abs(int(v)) < 2**31:
            decl = f"enum {{ {name} = {int(v)} }};"
        else:
            decl = f"static const long long {name} = {int(v)}LL;"
        config.append(dict(decl=decl, expr=shown))
    config.append(dict(decl=f"enum {{ B_MAX = {program.config['B']} }};", expr="batch B: the largest run-time B"))
    config.append(dict(decl=f"enum {{ T_MAX = {program.config['T']} }};", expr="batch T: the largest run-time T"))
    params, width = _table(layout.params.slots)
    acts, _ = _table(layout.acts.slots)
    inputs = [dict(name=t.name, shape="(" + ",".join(str(d) for d in t.shape) + ")", optional=t.optional)
              for t in program.inputs]
    loss = None
    if spec.loss:
        optional = sorted(t.name for t in program.inputs if t.optional)
        loss = dict(ptr=f"a->{spec.loss}", numel=program.loss_numel, cond=" && ".join(optional))
    ctx = dict(
        model=dict(name=spec.name, file=label or model_label(spec.path), version=__version__),
        config=config,
        kernels=kernels,
        params=params, acts=acts, name_width=width,
        dslots=[dict(offset=s.offset, numel=s.numel, note=s.note) for s in layout.dacts.slots],
        sizes=dict(params=layout.params.size, acts=layout.acts.size, dacts=layout.dacts.size),
        inputs=inputs,
        forward=[_stmt(s) for s in program.forward],
        backward=[_stmt(s) for s in program.backward],
        loss=loss,
        signature=signature(program),
    )
    text = environment(r).get_template(r.main_template).render(**ctx)
    return {r.source_name: text}


def write_sources(files: dict[str, str], out_dir: Path) -> list[Path]:
    """Write rendered files into ``out_dir`` (only those whose contents changed); returns those written."""
    from .cache import write_if_changed
    written = []
    for name, text in files.items():
        if write_if_changed(Path(out_dir) / name, text):
            written.append(Path(out_dir) / name)
    return written
