"""The CPU target: C11 + OpenMP over flat float arenas, compiled with the host C compiler.

Its kernels live in ``templates/c/`` (one template per op, plus helpers and AdamW); ``KERNELS`` says
which C function each op's forward and backward calls and with what arguments. ``render`` turns the
target-neutral statements of a ``Program`` into C text and places it in ``templates/c/model.c.j2``.
"""
from __future__ import annotations

import shlex
import time
from dataclasses import dataclass

import jinja2

from .. import __version__
from .. import expr as E
from .. import program as P
from ..cache import temp_path, write_if_changed
from ..precision import DTYPES
from ..resources import csrc_dir, model_label, templates_dir
from . import CompileJob, Kernel, KernelCall, Saved, Target


def _k(template: str, forward: str, backward: str, saved: dict[str, tuple[str, str]] | None = None,
       needs: tuple[str, ...] = (), decode: str | None = None, cache: dict[str, tuple[str, str]] | None = None) -> Kernel:
    """``saved``: name -> (shape pattern, what it is); ``needs``: templates whose kernels these call;
    ``decode``: the decode program's call where it is not the forward's; ``cache``: what it keeps across calls."""
    def bufs(d):
        return tuple(Saved(n, tuple(p.split(",")), doc) for n, (p, doc) in (d or {}).items())
    return Kernel(template, KernelCall.parse(forward), KernelCall.parse(backward), bufs(saved), needs,
                  KernelCall.parse(decode) if decode else None, bufs(cache))


# Each op's kernels on this target: arguments name the op's operands (``d_x``: x's gradient, NULL where
# none is needed), its dimension letters and attributes (gpt2gen/ops.py), ``numel(x)``, and what the
# forward saves for the backward (placed in the activations arena under the node's name).
_ROW_STATS = {"mean": ("B,T", "row means"), "rstd": ("B,T", "row 1/sqrt(var + eps)")}
KERNELS: dict[str, Kernel] = {
    "embedding": _k("embedding.c.j2",
                    "embedding_forward(out, idx, table, pos, B, T, C)",
                    "embedding_backward(d_table, d_pos, d_out, idx, B, T, C)",
                    decode="embedding_forward(out, idx, table, pos + t0 * C, B, T, C)"),
    "layernorm": _k("layernorm.c.j2",
                    "layernorm_forward(out, mean, rstd, inp, weight, bias, B * T, C, eps)",
                    "layernorm_backward(d_inp, d_weight, d_bias, d_out, inp, weight, mean, rstd, B * T, C)",
                    _ROW_STATS),
    "matmul": _k("matmul.c.j2",
                 "matmul_forward(out, inp, weight, bias, B * T, C, OC)",
                 "matmul_backward(d_inp, d_weight, d_bias, d_out, inp, weight, B * T, C, OC)"),
    "attention": _k("attention.c.j2",
                    "attention_forward(out, lse, qkv, B, T, C, NH)",
                    "attention_backward(d_qkv, d_out, qkv, out, lse, B, T, C, NH)",
                    {"lse": ("B,NH,T", "log-sum-exp of each query's scores, no T x T buffer")},
                    decode="attention_decode(out, qkv, k_cache, v_cache, T, C, NH, t0, S)",
                    cache={"k_cache": ("NH,S,C / NH", "keys of every position so far, per head"),
                           "v_cache": ("NH,S,C / NH", "values of every position so far, per head")}),
    "gelu": _k("gelu.c.j2",
               "gelu_forward(out, inp, numel(out))",
               "gelu_backward(d_inp, d_out, inp, numel(out))"),
    "residual": _k("residual.c.j2",
                   "residual_forward(out, a, b, numel(out))",
                   "residual_backward(d_a, d_b, d_out, numel(out))"),
    "softmax_crossentropy": _k("softmax_crossentropy.c.j2",
                               "softmax_crossentropy_forward(losses, lse, logits, targets, B * T, V, Vp)",
                               "softmax_crossentropy_backward(d_logits, d_losses, logits, lse, targets, B * T, V, Vp)",
                               {"lse": ("B,T", "row log-sum-exp; no probabilities are stored")}),
    "token_embedding": _k("token_embedding.c.j2",
                          "token_embedding_forward(out, idx, table, B, T, C, scale)",
                          "token_embedding_backward(d_table, d_out, idx, B, T, C, scale, padding_idx)"),
    "rmsnorm": _k("rmsnorm.c.j2",
                  "rmsnorm_forward(out, rstd, inp, weight, B * T, C, eps, weight_offset)",
                  "rmsnorm_backward(d_inp, d_weight, d_out, inp, weight, rstd, B * T, C, weight_offset)",
                  {"rstd": ("B,T", "row 1/sqrt(mean(x^2) + eps)")}),
    "rope": _k("rope.c.j2",
               "rope_forward(out, inp, B, T, H, D, theta)",
               "rope_backward(d_inp, d_out, B, T, H, D, theta)",
               decode="rope_forward_at(out, inp, B, T, H, D, theta, t0)"),
    "gqa_attention": _k("attention.c.j2",
                        "gqa_attention_forward(out, lse, q, k, v, B, T, H, K, D, window)",
                        "gqa_attention_backward(d_q, d_k, d_v, d_out, q, k, v, out, lse, B, T, H, K, D, window)",
                        {"lse": ("B,H,T", "log-sum-exp of each query's scores, no T x T buffer")},
                        decode="gqa_attention_decode(out, q, k, v, k_cache, v_cache, T, H, K, D, window, t0, S)",
                        cache={"k_cache": ("K,S,D", "keys of the last S positions, per kv head (a ring: position p "
                                                    "at row p % S)"),
                               "v_cache": ("K,S,D", "values of the last S positions, per kv head")}),
    "swiglu": _k("glu.c.j2",
                 "swiglu_forward(out, gate, up, numel(out))",
                 "swiglu_backward(d_gate, d_up, d_out, gate, up, numel(out))"),
    "geglu": _k("glu.c.j2",
                "geglu_forward(out, gate, up, numel(out))",
                "geglu_backward(d_gate, d_up, d_out, gate, up, numel(out))"),
    # ---- fused ops (gpt2gen/fusion.py) ------------------------------------------------------------------
    "matmul_gelu": _k("matmul_gelu.c.j2",
                      "matmul_gelu_forward(pre, out, inp, weight, bias, B * T, C, OC)",
                      "matmul_gelu_backward(d_inp, d_weight, d_bias, d_out, pre, inp, weight, B * T, C, OC)",
                      needs=("matmul.c.j2", "gelu.c.j2")),
    "classifier": _k("classifier.c.j2",
                     "classifier_forward(logits, losses, lse, inp, weight, targets, bias, B * T, C, OC, V)",
                     "classifier_backward(d_inp, d_weight, d_bias, logits, d_losses, inp, weight, lse, targets, "
                     "B * T, C, OC, V)",
                     {"lse": ("B,T", "row log-sum-exp; no probabilities are stored")},
                     needs=("matmul.c.j2", "softmax_crossentropy.c.j2")),
    "residual_layernorm": _k("residual_layernorm.c.j2",
                             "residual_layernorm_forward(r, out, mean, rstd, a, b, weight, bias, B * T, C, eps)",
                             "residual_layernorm_backward(d_a, d_b, d_weight, d_bias, d_r, d_out, r, weight, mean, "
                             "rstd, B * T, C)", _ROW_STATS, needs=("layernorm.c.j2",)),
}

@dataclass(frozen=True)
class Storage:
    """How the kernels store the model's float tensors (parameters, activations and their gradients); the
    kernel templates get it as ``st``. Arithmetic is fp32 in every precision: ``load`` and ``store`` are the C
    that widens a stored element to a float and rounds a float back (nothing for fp32), ``add`` the C of
    ``dst += e`` on a stored element. Saved statistics, losses and optimizer state stay float."""
    name: str                       # "fp32" | "bf16"
    ctype: str                      # the C element type: float | gg_bf16 (util.c.j2)

    def load(self, e: str) -> str:
        return e if self.name == "fp32" else f"gg_bf16_to_f32({e})"

    def store(self, e: str) -> str:
        return e if self.name == "fp32" else f"gg_f32_to_bf16({e})"

    def add(self, dst: str, e: str) -> str:
        return f"{dst} += {e}" if self.name == "fp32" else f"{dst} = gg_f32_to_bf16(gg_bf16_to_f32({dst}) + ({e}))"


STORAGE = {"fp32": Storage("fp32", "float"), "bf16": Storage("bf16", "gg_bf16")}

HELPERS = ("util.c.j2",)            # kernel templates every model includes before its ops
OPTIMIZER = "optim/adamw.c.j2"
ARENA_MEMBER = {"param": "p", "act": "a", "grad": "g", "cache": "c"}     # the struct pointer each arena's tensors hang off
ZERO = {"f32": "gg_zero", "bf16": "gg_zero16"}              # util.c.j2's zeroing of a buffer of each dtype


# ---- C expressions ---------------------------------------------------------------------------------------

def c_expr(e: E.Expr) -> str:
    """C for a model-file expression (ints stay ints; `//` is C's integer division)."""
    if isinstance(e, E.Num):
        return repr(e.value) if isinstance(e.value, int) else f"{e.value!r}f"
    if isinstance(e, E.Name):
        return e.id
    if isinstance(e, E.Neg):
        return f"(-{c_expr(e.x)})"
    if isinstance(e, E.BinOp):
        op = "/" if e.op == "//" else e.op
        return f"({c_expr(e.left)} {op} {c_expr(e.right)})"
    if isinstance(e, E.Call):
        a = [c_expr(x) for x in e.args]
        if e.fn == "sqrt":
            return f"sqrtf({a[0]})"
        if e.fn in ("min", "max"):
            cmp = "<" if e.fn == "min" else ">"
            return f"(({a[0]}) {cmp} ({a[1]}) ? ({a[0]}) : ({a[1]}))"
        return f"((({a[0]}) + ({a[1]}) - 1) / ({a[1]}) * ({a[1]}))"     # round_up
    raise TypeError(f"no C for {e!r}")


def c_product(dims: tuple[E.Expr, ...] | list[E.Expr]) -> str:
    """C for the product of ``dims``, computed in size_t (no int overflow)."""
    if not dims:
        return "1"
    return "(size_t)" + " * ".join(c_expr(d) for d in dims)


_MAXIMA = {"B": E.Name("B_MAX"), "T": E.Name("T_MAX")}   # the build-time maxima that size the arenas


def _at_maxima(e: E.Expr) -> E.Expr:
    return E.substitute(e, _MAXIMA)


def c_arg(e: E.Expr, names: dict[str, str]) -> str:
    """A kernel call's argument, each name replaced by its C; nested sums and products keep their parentheses."""
    if isinstance(e, E.Name):
        return names.get(e.id, e.id)
    if isinstance(e, E.Num):
        return c_expr(e)
    if isinstance(e, E.BinOp):
        op = "/" if e.op == "//" else e.op

        def side(x: E.Expr) -> str:
            return f"({c_arg(x, names)})" if isinstance(x, E.BinOp) else c_arg(x, names)
        return f"{side(e.left)} {op} {side(e.right)}"
    if isinstance(e, E.Neg):
        return f"-{c_arg(e.x, names)}"
    return c_expr(e)


def c_ref(r: P.Ref) -> str:
    if r is None:
        return "NULL"
    if isinstance(r, P.Local) or r.role == "input":
        return r.name
    return f"{ARENA_MEMBER[r.role]}->{r.name}"


# ---- statements -----------------------------------------------------------------------------------------

class CpuTarget(Target):
    name = "cpu"
    folder = "c"
    precisions = ("fp32", "bf16")
    fusions = ("matmul_gelu", "classifier", "residual_layernorm")
    kernels = KERNELS
    type_names = {"f32": "float", "bf16": "gg_bf16", "i32": "int"}
    main_template = "model.c.j2"
    source_name = "model.c"
    storage = STORAGE                # precision -> how the templates store float tensors (``st``)
    helpers = HELPERS
    optimizer = OPTIMIZER
    zero = ZERO

    @property
    def reserved_prefixes(self) -> tuple[str, ...]:
        from .c_names import RESERVED_PREFIXES
        return RESERVED_PREFIXES

    def reserved_reason(self, name: str) -> str | None:
        from .c_names import reserved_reason
        return reserved_reason(name)

    def environment(self) -> jinja2.Environment:
        return jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates_dir() / self.folder)),
                                  undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)

    def call(self, s: P.Invoke) -> dict:
        kc = self.kernels[s.op].call_of(s.phase)
        names = {"B": "B", "T": "T", "t0": "pos0"}     # pos0: gg_decode's first position
        for k, r in s.operands.items():
            names[k] = c_ref(r)
        for k, shape in s.shapes.items():
            names["numel__" + k] = c_product(shape)
        for letter, ex in s.dims.items():
            names[letter] = c_expr(ex)
        for k, v in s.attrs.items():
            names[k] = str(v) if isinstance(v, int) else repr(float(v)) + "f"
        return dict(kind="call", fn=kc.fn, args=[c_arg(a, names) for a in kc.args], node=s.node, line=s.line, op=s.op)

    def view_init(self, s: P.View, dacts_dtype: str = "f32") -> str:
        if s.kind == "slot":
            at = f"da + DSLOT_{s.slot}"
            return at if s.dtype == dacts_dtype else f"({self.type_names[s.dtype]}*)({at})"
        if s.kind == "scratch":
            return c_ref(s.of)
        stride = c_product([_at_maxima(d) for d in s.shape])
        if s.kind == "layer":
            return f"{c_ref(s.of)} + (size_t)l * {stride}"
        if s.kind == "carry":
            return f"(l == 0) ? {c_ref(s.start)} : {c_ref(s.of)} + (size_t)(l - 1) * {stride}"
        if s.kind == "last_layer":
            return f"{c_ref(s.of)} + (size_t)({c_expr(s.count)} - 1) * {stride}"
        raise ValueError(f"unknown view kind {s.kind!r}")

    def statement(self, s: P.Stmt, dacts_dtype: str = "f32") -> dict:
        """One statement as the template's dict of C text (``dacts_dtype``: the activation-gradient arena's
        element type, which slot views of another dtype are cast from)."""
        if isinstance(s, P.Invoke):
            return self.call(s)
        if isinstance(s, P.View):
            return dict(kind="decl", ctype=self.type_names[s.dtype] + "*", name=s.var,
                        init=self.view_init(s, dacts_dtype), comment=s.comment)
        if isinstance(s, P.Alias):
            return dict(kind="decl", ctype=self.type_names[s.dtype] + "*", name=s.var, init=s.of.name,
                        comment=s.comment)
        if isinstance(s, P.Assign):
            return dict(kind="assign", name=s.var, value=s.value.name, comment=s.comment)
        if isinstance(s, P.Zero):
            return dict(kind="zero", fn=self.zero[s.dtype], ptr=c_ref(s.ref), numel=c_product(s.shape), what=s.what)
        if isinstance(s, P.Seed):
            n = c_product(s.shape)
            return dict(kind="fill", ptr=c_ref(s.ref), numel=n, value=f"loss_scale / (float)({n})", what=s.what)
        if isinstance(s, P.Guard):
            return dict(kind="guard", cond=" && ".join(s.inputs), comment=s.comment,
                        body=[self.statement(x, dacts_dtype) for x in s.body])
        if isinstance(s, P.Loop):
            return dict(kind="loop", count=c_expr(s.count), reverse=s.reverse, comment=s.comment,
                        body=[self.statement(x, dacts_dtype) for x in s.body])
        raise TypeError(f"no C for statement {s!r}")

    # ---- files ------------------------------------------------------------------------------------------

    def kernel_sections(self, op_names: list[str], precision: str = "fp32") -> list[str]:
        """The kernel sections for these ops (helpers first, optimizer last), their float tensors stored in
        ``precision`` (STORAGE)."""
        if precision not in self.storage:
            raise ValueError(f"no {self.name} kernels store tensors in `{precision}`; they have "
                             f"{', '.join(self.storage)}")
        st = self.storage[precision]
        env = self.environment()
        names = list(self.helpers)
        for name in op_names:
            kernel = self.kernels[name]
            for t in ["ops/" + n for n in kernel.needs] + ["ops/" + kernel.template]:
                if t not in names:
                    names.append(t)
        names.append(self.optimizer)
        return [env.get_template(n).render(op=None, st=st).strip("\n") + "\n" for n in names]

    def kernels_source(self, op_names: list[str], precision: str = "fp32") -> str:
        head = ("// kernels of gpt2gen ops, for testing them one by one (generated; do not edit)\n"
                "#include <math.h>\n#include <stddef.h>\n#include <stdlib.h>\n#include <string.h>\n"
                "#define GG_KERNEL\n\n")
        return head + "\n".join(self.kernel_sections(op_names, precision))

    def render(self, program: P.Program, label: str | None = None) -> dict[str, str]:
        spec, layout = program.spec, program.layout
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
        params, width = self._table(layout.params)
        acts, _ = self._table(layout.acts)
        width = max(width, _)
        params, _ = self._table(layout.params, width)
        acts, _ = self._table(layout.acts, width)
        cache, _ = self._table(layout.cache, width)
        st = layout.params.dtype
        pol = program.precision
        arenas = {a.name: dict(ctype=self.type_names[a.dtype], size=a.size) for a in layout.arenas()}
        arenas["params"]["shared"] = "grads" + (", master (fp32)" if pol.master else "") + ", m and v (fp32)"
        inputs = [dict(name=t.name, shape="(" + ",".join(str(d) for d in t.shape) + ")", optional=t.optional)
                  for t in program.inputs]
        loss = None
        if program.loss:
            loss = dict(ptr=c_ref(P.Tensor(program.loss.tensor, "act")), numel=c_product(program.loss.shape),
                        cond=" && ".join(program.loss.needs))
        ctx = dict(
            model=dict(name=spec.name, file=label or model_label(spec.path), version=__version__),
            config=config,
            kernels=self.kernel_sections(program.ops_used, pol.name),   # no model name collides with theirs: c_names
            params=params, acts=acts, name_width=width,
            dslots=[dict(offset=s.offset, numel=s.numel, note=s.note) for s in layout.dacts.slots],
            arenas=arenas, master=pol.master, precision=pol.name, loss_scaling=program.loss_scaling,
            zero_grad=f"{self.zero[st]}(({self.type_names[st]}*)ar->grads, PARAMS_SIZE)",
            inputs=inputs,
            forward=[self.statement(s, layout.dacts.dtype) for s in program.forward],
            backward=[self.statement(s, layout.dacts.dtype) for s in program.backward],
            cache=cache, decode=[self.statement(s, layout.dacts.dtype) for s in program.decode],
            decode_positions=program.decode_positions,
            loss=loss,
            signature=P.signature(program),
        )
        return {self.source_name: self.environment().get_template(self.main_template).render(**ctx)}

    def _table(self, arena, width: int = 0) -> tuple[list[dict], int]:
        """The rows of an arena's tensor table and struct: C type, offset, and how a field points into the arena."""
        width = max([len(s.name) for s in arena.slots] + [4, width])
        rows = []
        for i, s in enumerate(arena.slots):
            table = {"params": "PARAM_TABLE", "cache": "CACHE_TABLE"}.get(arena.name, "ACT_TABLE")
            at = f"base + {table}[{i}].offset"
            rows.append(dict(name=s.name, shape=s.shape, offset=s.offset, numel=s.numel, decay=s.decay,
                             pad=width - len(s.name), ctype=self.type_names[s.dtype], code=DTYPES[s.dtype].code,
                             point=at if s.dtype == arena.dtype else f"({self.type_names[s.dtype]}*)({at})"))
        return rows, width

    # ---- compiling --------------------------------------------------------------------------------------

    def compile(self, job: CompileJob) -> None:
        """model.c and a two-line module init, linked with the shared pybind11 binding into ``job.out``."""
        t0 = time.perf_counter()
        src = job.directory / self.source_name
        shim = self.write_module_init(job)
        cc, cxx = shlex.split(job.toolchain["cc"]), shlex.split(job.toolchain["cxx"])
        objs = [temp_path(job.out, ".model.o"), temp_path(job.out, ".init.o")]
        try:
            libs = self.model_object(job, src, objs[0])
            job.run([*cc, "-fPIC", "-c", str(shim), "-o", str(objs[1])], "compiling the module init")
            job.run([*cxx, *job.link_flags, str(job.binding), *map(str, objs), *libs, "-o", str(job.out)],
                    "linking the model extension")
        finally:
            for o in objs:
                o.unlink(missing_ok=True)
        if job.verbose:
            print(f"compiled {src} in {time.perf_counter() - t0:.2f} s")

    def model_object(self, job: CompileJob, src, obj) -> list[str]:
        """Compile the generated source ``src`` into the object ``obj``; returns what the link needs besides."""
        cc = shlex.split(job.toolchain["cc"])
        job.run([*cc, *job.cflags, f"-I{csrc_dir()}", "-c", str(src), "-o", str(obj)],
                "compiling the generated model", src, job.hint)
        return []

    @staticmethod
    def write_module_init(job: CompileJob):
        """Python finds a module by the name in its file, and a process may load many models: each build gets
        its own module name, with a two-line init that forwards to the shared binding's."""
        shim = job.directory / "module_init.c"
        write_if_changed(shim, f"// generated: names this build's Python module `{job.module}`\n"
                               f"extern void* PyInit_{job.binding_module}(void);\n"
                               f"__attribute__((visibility(\"default\"))) void* PyInit_{job.module}(void) "
                               f"{{ return PyInit_{job.binding_module}(); }}\n")
        return shim




CPU = CpuTarget()
