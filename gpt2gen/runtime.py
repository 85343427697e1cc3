"""The runtime: a compiled model driven from Python over arenas that Python owns.

``Model`` allocates the flat arenas (64-byte aligned numpy arrays of each arena's element type) with the
sizes the layout computed, exposes every tensor as a zero-copy numpy view of its own dtype (``params``,
``grads``, ``acts``; in mixed precision ``master`` too: bf16 views use ``ml_dtypes.bfloat16``), and calls
the compiled forward, backward, zero-grad and AdamW update. Every input is checked here — dtype,
shape within the build-time maxima, token ids within range — so the C code never reads out of bounds.

The arenas are allocated lazily (numpy's zeros): memory is taken where they are written. Running a model
writes params and acts only; grads, m, v and dacts are written by training, which checks that they fit
where it starts (:func:`check_training_memory`).
"""
from __future__ import annotations

import ctypes
import functools
import mmap
from pathlib import Path

import numpy as np

from .builder import Built, check_available_memory, compile_model, describe_available, load_extension, memory_error
from . import targets
from .layout import Arena
from .precision import DTYPES
from .program import Invoke, signature, walk


# dynamic loss scaling (fp16's small range): powers of two, so scaling and unscaling are exact
LOSS_SCALE_INIT = 2.0 ** 16
LOSS_SCALE_MIN, LOSS_SCALE_MAX = 1.0, 2.0 ** 24
LOSS_SCALE_GROWTH = 2000


def _views(arena: Arena, base: np.ndarray) -> dict[str, np.ndarray]:
    """Each tensor of ``arena`` as a view of its own dtype into ``base`` (the arena's elements)."""
    raw = base.view(np.uint8)
    out = {}
    for s in arena.slots:
        start = s.offset * base.itemsize
        out[s.name] = raw[start:start + s.nbytes].view(DTYPES[s.dtype].numpy).reshape(s.dims)
    return out


@functools.lru_cache(maxsize=None)
def _mincore():
    """libc's mincore(2), which tells which pages of a range are in memory; None where there is none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).mincore
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


def _master_views(arena: Arena, base: np.ndarray) -> dict[str, np.ndarray]:
    """The fp32 master weights: the parameters' layout in elements over an fp32 arena."""
    return {s.name: base[s.offset:s.offset + s.numel].reshape(s.dims) for s in arena.slots}


def _resident_bytes(a: np.ndarray) -> int:
    """Bytes of ``a`` in memory now (the pages touched: written, or read, which maps them too); 0 when the
    system cannot say, so that a check counting on it errs towards needing more."""
    mincore = _mincore()
    if mincore is None or a.nbytes == 0:
        return 0
    page = mmap.PAGESIZE
    start = a.ctypes.data // page * page
    length = a.ctypes.data + a.nbytes - start
    vec = np.zeros((length + page - 1) // page, np.uint8)
    if mincore(start, length, vec.ctypes.data) != 0:
        return 0
    return min(int(np.count_nonzero(vec & 1)) * page, a.nbytes)


class Model:
    """A built model: its arenas, their named views, and the training-step calls."""

    def __init__(self, built: Built):
        self.built = built
        self.program = built.program
        self.spec = built.program.spec
        self.layout = built.program.layout
        self.config: dict[str, int | float] = dict(built.program.config)
        self.target = built.target
        self._ext = load_extension(built.extension)
        if self._ext.signature() != signature(self.program):
            raise RuntimeError(f"the extension {built.extension} does not match its model's layout; "
                               f"delete that directory and build again")
        lay = self.layout
        self.precision = self.program.precision.name
        self._arenas = self._allocate()
        self._fresh = True      # grads, m and v as allocated: zero, and untouched (see init_weights)
        a = self._arenas
        self._handle = self._new_handle()
        self.params = _views(lay.params, a["params"])
        self._grads = _views(lay.params, a["grads"])
        # mixed precision: the fp32 weights AdamW steps (the 16-bit params are their rounding)
        self.master = _master_views(lay.params, a["master"]) if "master" in a else None
        self.acts = _views(lay.acts, a["acts"])
        self.cache: dict[str, np.ndarray] = {}       # the decode program's keys and values, from the first decode
        self.decode_positions = int(self.program.decode_positions)
        self.inputs = self.program.inputs
        self.step = 0
        self._last: tuple[list, int, int] | None = None
        self._spent = False     # backward overwrote the last forward's logits (the fused classifier)
        # dynamic loss scaling (built with it): the backward's gradients are loss_scale times the true ones
        self.loss_scaling = self.program.loss_scaling
        self.loss_scale = LOSS_SCALE_INIT if self.loss_scaling else 1.0
        self.loss_scale_growth = LOSS_SCALE_GROWTH       # good steps before the scale doubles again
        self._good_steps = 0
        self._overwrites_logits = any(isinstance(st, Invoke) and st.op == "classifier"
                                      for st, _ in walk(self.program.backward))

    def _new_handle(self):
        a = self._arenas
        return self._ext.Arenas(a["params"], a["grads"], a.get("master"), a["m"], a["v"], a["acts"], a["dacts"],
                                a.get("cache"))

    def _allocate_cache(self) -> None:
        """The KV cache arena, allocated at the first decode: training never needs it."""
        nbytes = self.layout.arena_bytes()["cache"]
        try:
            self._arenas["cache"] = targets.get(self.target).allocator(self.built.extension)(nbytes, self.layout.cache.dtype)
        except MemoryError:
            raise memory_error(self.program, f"and allocating the {nbytes:,}-byte KV cache failed with "
                                             f"{describe_available()}") from None
        self.cache = _views(self.layout.cache, self._arenas["cache"])
        self._handle = self._new_handle()

    def _allocate(self) -> dict[str, np.ndarray]:
        """The arenas. The build refused what can never fit; numpy's zeros take memory only where they
        are written, so a refusal here (a system without overcommit) still gets the sizes, not a bare
        MemoryError."""
        lay = self.layout
        dtypes = lay.arena_dtypes()
        alloc = targets.get(self.target).allocator(self.built.extension)
        try:
            return {name: alloc(n, dtypes[name]) for name, n in lay.arena_bytes().items() if name != "cache"}
        except MemoryError:
            raise memory_error(self.program, f"and allocating them failed with {describe_available()}") from None

    # ---- properties --------------------------------------------------------------------------------------
    @property
    def arenas(self) -> dict[str, np.ndarray]:
        """The six flat arenas. Whoever holds them may write grads, m or v, so init_weights zeroes those again."""
        self._fresh = False
        return self._arenas

    @property
    def grads(self) -> dict[str, np.ndarray]:
        """The gradient views (zero-copy, into ``arenas["grads"]``)."""
        self._fresh = False
        return self._grads

    @property
    def max_batch(self) -> tuple[int, int]:
        return int(self.config["B"]), int(self.config["T"])

    @property
    def num_parameters(self) -> int:
        return sum(s.numel for s in self.layout.params.slots)

    @property
    def logits(self) -> np.ndarray:
        """The last forward's logits, (B, T, columns): a view, valid until the next forward."""
        if self.spec.logits is None:
            raise AttributeError(f"{self.spec.path} names no `outputs.logits`")
        if self._last is None:
            raise RuntimeError("no forward pass has run yet: call model.forward(idx) first")
        if self._spent:
            raise RuntimeError("backward wrote the logits' gradient over the logits (the fused classifier): read "
                               "model.logits before backward, or build with fuse='none'")
        _, B, T = self._last
        slot = self.layout.acts[self.spec.logits]
        width = slot.numel // (self.config["B"] * self.config["T"])
        full = self.acts[self.spec.logits].reshape(-1)[:B * T * width].reshape(B, T, width)
        if self.spec.logits_columns is not None:
            full = full[:, :, :int(self.spec.logits_columns.eval(self.config))]
        return full

    # ---- inputs ----------------------------------------------------------------------------------------------
    def _check_inputs(self, given: dict[str, object]) -> tuple[list, int, int]:
        Bmax, Tmax = self.max_batch
        arrays: list = []
        B = T = None
        for decl in self.inputs:
            x = given.get(decl.name)
            if x is None:
                if not decl.optional:
                    raise ValueError(f"input `{decl.name}` is required")
                arrays.append(None)
                continue
            arr = np.asarray(x)
            if arr.dtype.kind not in "iu":
                raise TypeError(f"`{decl.name}` must hold integer token ids, got dtype {arr.dtype}")
            if arr.ndim != 2:
                raise ValueError(f"`{decl.name}` must be 2-D (B, T), got shape {arr.shape}")
            b, t = arr.shape
            if B is None:
                B, T = b, t
            elif (b, t) != (B, T):
                raise ValueError(f"`{decl.name}` has shape {arr.shape} but `{self.inputs[0].name}` has {(B, T)}")
            if not (1 <= b <= Bmax and 1 <= t <= Tmax):
                raise ValueError(f"`{decl.name}` has shape {arr.shape}, outside the build-time maxima B <= {Bmax}, "
                                 f"T <= {Tmax}; build with larger maxima, e.g. gpt2gen.build(..., B={max(b, Bmax)}, "
                                 f"T={max(t, Tmax)})")
            if decl.range is not None and arr.size:
                hi = int(decl.range.eval(self.config))
                lo_v, hi_v = int(arr.min()), int(arr.max())
                if lo_v < 0 or hi_v >= hi:
                    bad = np.argwhere((arr < 0) | (arr >= hi))[0]
                    raise ValueError(f"`{decl.name}`[{bad[0]}, {bad[1]}] = {int(arr[tuple(bad)])} is out of range "
                                     f"[0, {hi})")
            # a private copy: the C code reads it again in backward, and the caller may reuse its buffer
            arrays.append(np.array(arr, dtype=np.int32, order="C", copy=True))
        if B is None:
            raise ValueError("no inputs given")
        return arrays, B, T

    # ---- the training step ----------------------------------------------------------------------------------
    def forward(self, idx, targets=None, **inputs) -> float | None:
        """Run the forward pass; returns the mean loss when targets are given, else None."""
        names = [d.name for d in self.inputs]
        given = dict(inputs)
        if names:
            given.setdefault(names[0], idx)
        if len(names) > 1 and targets is not None:
            given.setdefault(names[1], targets)
        for k in given:
            if k not in names:
                raise TypeError(f"unknown input `{k}`; this model takes {', '.join(names)}")
        arrays, B, T = self._check_inputs(given)
        loss = self._ext.forward(self._handle, arrays, B, T)
        self._last = (arrays, B, T)
        self._spent = False
        if any(a is None for a in arrays) or self.spec.loss is None:
            return None
        return float(loss)

    def decode(self, tokens, pos0: int) -> np.ndarray:
        """The decode program: ``tokens`` (1-D, up to the build's T of them) continue one sequence at positions
        ``pos0`` .., over the KV cache, which must hold that sequence's positions before ``pos0`` from earlier
        calls (``pos0 = 0`` starts a new sequence). Returns the logits of each new token, (len(tokens),
        columns), a new array; ``model.logits`` shows them too, as after a forward of that one row."""
        arr = np.asarray(tokens)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"decode takes a non-empty 1-D sequence of token ids, got shape {arr.shape}")
        if not self.inputs or any(not d.optional for d in self.inputs[1:]):
            raise ValueError("decode needs a model whose only required input is its token ids")
        pos0 = int(pos0)
        if pos0 < 0 or pos0 + arr.size > self.decode_positions:
            raise ValueError(f"decode positions {pos0}..{pos0 + arr.size - 1} are outside the KV cache's "
                             f"{self.decode_positions} positions (the model's maxT): start the sequence again from "
                             f"its last tokens")
        arrays, _, n = self._check_inputs({self.inputs[0].name: arr.reshape(1, -1)})
        if "cache" not in self._arenas:
            self._allocate_cache()
        self._ext.decode(self._handle, arrays, n, pos0)
        self._last = (arrays, 1, n)
        self._spent = False
        return np.array(self.logits[0], dtype=np.float32)

    def backward(self) -> None:
        """Backward of the last forward; accumulates into ``grads`` (call ``zero_grad`` between steps)."""
        if self._last is None:
            raise RuntimeError("backward needs a forward pass first: call model.forward(idx, targets)")
        arrays, B, T = self._last
        if any(a is None for a in arrays):
            raise RuntimeError("backward needs the last forward to have had targets")
        if self._spent:
            raise RuntimeError("backward already ran for this forward and, with the fused classifier, wrote the "
                               "logits' gradient over the logits: run forward again first (or build with fuse='none')")
        self._fresh = False
        self._ext.backward(self._handle, arrays, B, T, float(self.loss_scale))
        self._spent = self._overwrites_logits

    def zero_grad(self) -> None:
        self._fresh = False
        self._ext.zero_grad(self._handle)

    def update(self, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
               weight_decay: float = 0.0, step: int | None = None, grad_scale: float = 1.0) -> bool:
        """One AdamW step (bias-corrected by ``step``, counted from 1; by default the model's own counter) on
        ``grad_scale`` times the gradients. Returns whether it was taken: with dynamic loss scaling a step
        whose gradients overflowed is skipped (nothing changes, the step count stays), the scale halves, and
        it doubles again after ``loss_scale_growth`` good steps in a row."""
        step = self.step + 1 if step is None else int(step)
        if step < 1:
            raise ValueError(f"step must be >= 1, got {step}")
        self._fresh = False
        taken = self._ext.update(self._handle, float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
                                 step, float(grad_scale) / self.loss_scale)
        if not self.loss_scaling:
            self.step = step
            return True
        if not taken:
            self.loss_scale = max(self.loss_scale / 2, LOSS_SCALE_MIN)
            self._good_steps = 0
            return False
        self.step = step
        self._good_steps += 1
        if self._good_steps >= self.loss_scale_growth:
            self.loss_scale = min(self.loss_scale * 2, LOSS_SCALE_MAX)
            self._good_steps = 0
        return True

    @property
    def loss_scale_state(self) -> dict[str, float | int]:
        """What resuming needs of the loss scaler (a training state stores it)."""
        return {"scale": self.loss_scale, "good_steps": self._good_steps}

    @loss_scale_state.setter
    def loss_scale_state(self, state: dict) -> None:
        self.loss_scale, self._good_steps = float(state["scale"]), int(state["good_steps"])

    # ---- parameters --------------------------------------------------------------------------------------------
    @property
    def weights(self) -> dict[str, np.ndarray]:
        """The fp32 weights by name: the master weights in mixed precision (call ``sync_params`` after
        writing them), the parameters themselves in fp32."""
        return self.master if self.master is not None else self.params

    def sync_params(self) -> None:
        """Mixed precision: set the 16-bit parameters to the rounding of the master weights (what the update
        does after every step); nothing in fp32."""
        if self.master is not None:
            for name, w in self.master.items():
                self.params[name][...] = w.astype(self.params[name].dtype)

    def init_weights(self, seed: int = 0) -> None:
        """Initialise every parameter from its `init` in the model file, deterministically from ``seed``
        (the same fp32 values in every precision; 16-bit parameters are their rounding)."""
        rng = np.random.default_rng(seed)
        for t in self.spec.of_kind("param"):
            view = self.weights[t.name]
            init = t.init
            if init.kind == "zeros":
                view[...] = 0.0
            elif init.kind == "ones":
                view[...] = 1.0
            elif init.kind == "constant":
                view[...] = float(init.value.eval(self.config))
            else:
                std = float(init.value.eval(self.config))
                view[...] = rng.standard_normal(view.shape, dtype=np.float32) * np.float32(std)
        self.sync_params()
        if not self._fresh:     # writing zeros over fresh ones would take their memory for nothing
            for name in ("m", "v", "grads"):
                self._arenas[name][...] = 0
        self.step = 0

    def state_dict(self) -> dict[str, np.ndarray]:
        """The fp32 weights by name (copies)."""
        return {k: v.copy() for k, v in self.weights.items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Copy fp32 weights in by name, all or nothing: every entry's name, shape, dtype and values are
        checked (checkpoint.checked_state_dict) before any is written."""
        from .checkpoint import checked_state_dict
        for k, v in checked_state_dict(self.weights, state).items():
            self.weights[k][...] = v
        self.sync_params()

    def save_llmc(self, path: str | Path, dtype: str = "fp32") -> None:
        """Write the weights as an llm.c model file (fp32 or bf16)."""
        from .checkpoint import save_llmc
        save_llmc(self, path, dtype)

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v}" for k, v in self.config.items())
        emu = " (emulated)" if self.built.options.get("emulate") else ""
        return f"<gpt2gen Model {self.spec.name} target={self.target}{emu} {cfg}>"


def build(model: str | Path = "model.yaml", target: str = "cpu", *, seed: int | None = 0,
          out: str | Path | None = None, verbose: bool = False, precision: str = "fp32", fuse: str | None = "all",
          loss_scaling: bool | None = None, emulate: bool = False, archs: str | list[str] | None = None,
          **overrides) -> Model:
    """Generate, compile (cached) and load a model; parameters are initialised from ``seed`` (None: zeros).
    ``target``: ``cpu`` or ``cuda``; ``precision``: fp32, bf16 (16-bit parameters, activations and gradients;
    fp32 master weights) or fp16 (cuda; with dynamic loss scaling); ``fuse``: which fusions the build uses,
    ``all`` (default), ``none`` or names ``a,b`` (gpt2gen/fusion.py); ``loss_scaling``: dynamic loss scaling
    (default: where the precision needs it, fp16); ``emulate`` (cuda): run the CUDA kernels on the CPU under
    gpt2gen.cuda_emu, the same API, slowly; ``archs`` (cuda): the GPU architectures nvcc compiles for."""
    m = Model(compile_model(model, target, out=out, verbose=verbose, precision=precision, fuse=fuse,
                            loss_scaling=loss_scaling, emulate=emulate, archs=archs, **overrides))
    if seed is not None:
        m.init_weights(seed)
    return m


def check_training_memory(model: Model) -> None:
    """Refuse, where training starts, a model whose six arenas do not fit in the memory available now
    (:class:`gpt2gen.builder.MemoryLimitError`, with the size of each arena and a hint).

    Building and running a model write only params and acts, so only the training footprint can fail
    this; what the arenas already hold is counted as theirs (MemAvailable no longer includes it)."""
    # the arenas themselves, not the `arenas` property: asking which pages are in memory writes nothing, so
    # init_weights may still skip grads, m and v
    held = sum(_resident_bytes(a) for name, a in model._arenas.items() if name != "cache")
    check_available_memory(model.program, held)
