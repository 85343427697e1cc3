"""Checkpoints: llm.c model files, HuggingFace import, and exact-resume training state.

* llm.c model files (``gpt2_124M.bin`` and friends): a 256 x int32 header -- ``[0]`` magic
  20240326, ``[1]`` version (3 = fp32, 5 = bf16), ``[2]`` maxT, ``[3]`` V, ``[4]`` L, ``[5]`` NH,
  ``[6]`` C, ``[7]`` Vp (padded vocabulary) -- then every parameter tensor in llm.c's order
  (:data:`LLMC_ORDER`), little-endian. :func:`from_llmc` builds a model from one; :func:`save_llmc`
  writes one; :func:`load_llmc` fills an existing model.
* HuggingFace checkpoints (a directory with ``config.json`` and ``model.safetensors``,
  ``model.safetensors.index.json`` shards, or ``pytorch_model.bin``): :func:`from_hf` maps them
  through the ``huggingface`` section of the model YAML, so no per-model Python lives here.
* Training state (parameters, AdamW moments, step, data position, RNG): :func:`save_state` and
  :func:`load_state`, a safetensors file with a SHA-256 of its tensors in the metadata.

Every write is atomic (temporary file in the same directory, fsync, rename), so a crash or a full
disk never leaves a half-written file where a good one was. Nothing is unpickled: safetensors, or
``torch.load(..., weights_only=True)`` for ``pytorch_model.bin``.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .cache import atomic_path, atomic_write_bytes

LLMC_MAGIC = 20240326
LLMC_FP32 = 3
LLMC_BF16 = 5
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
LLMC_ORDER = ["wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
              "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb", "lnfw", "lnfb"]
LLMC_HEADER_KEYS = ["maxT", "V", "L", "NH", "C", "Vp"]  # header ints [2:8]

STATE_FORMAT = "gpt2gen-train-state"
STATE_VERSION = "1"
STATE_ARENAS = ("params", "m", "v")


class CheckpointError(ValueError):
    """A checkpoint file is truncated, corrupt, of the wrong kind, or does not fit the model."""


# --------------------------------------------------------------------------------------------
# bf16

def fp32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (round to nearest, ties to even); returns the uint16 bit patterns."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))))
               >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():  # keep NaNs NaN (rounding could carry a NaN's mantissa into infinity)
        rounded[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return rounded


def bf16_to_fp32(b: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32 exactly."""
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


# --------------------------------------------------------------------------------------------
# llm.c model files

def llmc_shapes(maxT: int, V: int, L: int, NH: int, C: int, Vp: int) -> dict[str, tuple[int, ...]]:
    """Shapes of llm.c's GPT-2 parameter tensors, in file order."""
    del V, NH
    return {
        "wte": (Vp, C), "wpe": (maxT, C),
        "ln1w": (L, C), "ln1b": (L, C),
        "qkvw": (L, 3 * C, C), "qkvb": (L, 3 * C),
        "attprojw": (L, C, C), "attprojb": (L, C),
        "ln2w": (L, C), "ln2b": (L, C),
        "fcw": (L, 4 * C, C), "fcb": (L, 4 * C),
        "fcprojw": (L, C, 4 * C), "fcprojb": (L, C),
        "lnfw": (C,), "lnfb": (C,),
    }


def read_llmc_header(path: str | os.PathLike) -> dict[str, int]:
    """Validate an llm.c model file's header and size; returns maxT, V, L, NH, C, Vp and version."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"llm.c model file not found: {path}")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise CheckpointError(f"{path}: {size} bytes is shorter than an llm.c model header "
                              f"({HEADER_BYTES} bytes); the file is truncated or not an llm.c model")
    h = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if h[0] != LLMC_MAGIC:
        hint = " (this is an llm.c token file, not a model file)" if h[0] == 20240520 else ""
        raise CheckpointError(f"{path}: bad magic {int(h[0])}, expected {LLMC_MAGIC} for an llm.c "
                              f"model file{hint}")
    version = int(h[1])
    if version not in (LLMC_FP32, LLMC_BF16):
        raise CheckpointError(f"{path}: unsupported llm.c model version {version} "
                              f"(known: {LLMC_FP32} = fp32, {LLMC_BF16} = bf16)")
    hdr = {k: int(v) for k, v in zip(LLMC_HEADER_KEYS, h[2:8])}
    if min(hdr.values()) <= 0 or hdr["C"] % hdr["NH"] or hdr["Vp"] < hdr["V"]:
        raise CheckpointError(f"{path}: implausible header {hdr}")
    hdr["version"] = version
    n = sum(int(np.prod(s)) for s in llmc_shapes(**{k: hdr[k] for k in LLMC_HEADER_KEYS}).values())
    expected = HEADER_BYTES + n * (4 if version == LLMC_FP32 else 2)
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise CheckpointError(f"{path}: file {what}: the header ({hdr}) implies {expected} bytes, "
                              f"the file has {size}")
    return hdr


def read_llmc(path: str | os.PathLike) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """Read an llm.c model file into float32 arrays (no model needed)."""
    hdr = read_llmc_header(path)
    shapes = llmc_shapes(**{k: hdr[k] for k in LLMC_HEADER_KEYS})
    dtype = "<f4" if hdr["version"] == LLMC_FP32 else "<u2"
    flat = np.fromfile(path, dtype=dtype, offset=HEADER_BYTES)
    if hdr["version"] == LLMC_BF16:
        flat = bf16_to_fp32(flat)
    out, off = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        out[name] = flat[off:off + n].reshape(shape)
        off += n
    return hdr, out


def _llmc_config(model) -> dict[str, int]:
    cfg = model.config
    missing = [k for k in LLMC_HEADER_KEYS if k not in cfg]
    if missing:
        raise CheckpointError(f"model config lacks {missing}: it is not a GPT-2 that llm.c's file "
                              "format can describe")
    return {k: int(cfg[k]) for k in LLMC_HEADER_KEYS}


def _check_llmc_params(model) -> dict[str, tuple[int, ...]]:
    shapes = llmc_shapes(**_llmc_config(model))
    for name, shape in shapes.items():
        if name not in model.params:
            raise CheckpointError(f"model has no parameter {name!r}; llm.c's format needs {LLMC_ORDER}")
        if tuple(model.params[name].shape) != shape:
            raise CheckpointError(f"model parameter {name} has shape {tuple(model.params[name].shape)}, "
                                  f"llm.c's layout needs {shape}")
    extra = sorted(set(model.params) - set(shapes))
    if extra:
        raise CheckpointError(f"model has parameters llm.c's format cannot hold: {extra}")
    return shapes


def check_llmc_compatible(model) -> None:
    """Raise :class:`CheckpointError` unless :func:`save_llmc` can write ``model`` (llm.c's GPT-2 tensors)."""
    _check_llmc_params(model)


def save_llmc(model, path: str | os.PathLike, dtype: str = "fp32") -> Path:
    """Write ``model``'s parameters as an llm.c model file (``dtype`` "fp32" or "bf16"), atomically."""
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be 'fp32' or 'bf16', got {dtype!r}")
    shapes = _check_llmc_params(model)
    cfg = _llmc_config(model)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0] = LLMC_MAGIC
    header[1] = LLMC_FP32 if dtype == "fp32" else LLMC_BF16
    header[2:8] = [cfg[k] for k in LLMC_HEADER_KEYS]

    def write(fh):
        fh.write(header.tobytes())
        for name in shapes:
            t = np.ascontiguousarray(model.params[name], dtype="<f4")
            fh.write((t if dtype == "fp32" else fp32_to_bf16(t)).tobytes())

    return atomic_write_bytes(path, write)


def load_llmc(model, path: str | os.PathLike) -> dict[str, int]:
    """Load an llm.c model file into an existing ``model`` (shapes must match); returns the header."""
    hdr = read_llmc_header(path)
    cfg = _llmc_config(model)
    diff = {k: (hdr[k], cfg[k]) for k in LLMC_HEADER_KEYS if hdr[k] != cfg[k]}
    if diff:
        detail = ", ".join(f"{k}={a} in the file but {b} in the model" for k, (a, b) in diff.items())
        raise CheckpointError(f"{path}: model shape mismatch: {detail}")
    _check_llmc_params(model)
    _, tensors = read_llmc(path)
    for name, t in tensors.items():
        model.params[name][...] = t
    return hdr


def from_llmc(path: str | os.PathLike, target: str = "cpu", model: str | os.PathLike = "model.yaml",
              **overrides):
    """Build a GPT-2 from an llm.c model file's header and load its weights; returns the Model.

    ``overrides`` may add build options (e.g. ``B=4, T=64``); they cannot change the file's shape.
    """
    from . import build

    hdr = read_llmc_header(path)
    shape = {k: hdr[k] for k in ("maxT", "V", "L", "NH", "C")}
    clash = {k: v for k, v in overrides.items() if k in shape and v != shape[k]}
    if clash:
        raise CheckpointError(f"{path}: overrides {clash} contradict the file's header {shape}")
    m = build(model=model, target=target, seed=None, **{**overrides, **shape})   # weights come from the file
    if int(m.config.get("Vp", -1)) != hdr["Vp"]:
        raise CheckpointError(f"{path}: padded vocabulary Vp={hdr['Vp']} in the file, but the model "
                              f"pads V={hdr['V']} to Vp={m.config.get('Vp')}")
    load_llmc(m, path)
    return m


# --------------------------------------------------------------------------------------------
# HuggingFace import

def _hf_weight_files(directory: Path) -> tuple[str, list[Path]]:
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    pt = directory / "pytorch_model.bin"
    if single.is_file():
        return "safetensors", [single]
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        return "safetensors", [directory / s for s in shards]
    if pt.is_file():
        return "torch", [pt]
    raise CheckpointError(f"{directory}: no model.safetensors, model.safetensors.index.json or "
                          "pytorch_model.bin found")


class _HFTensors:
    """Lazy access to the tensors of a HuggingFace checkpoint, as float32 numpy arrays."""

    def __init__(self, directory: Path):
        self.kind, self.files = _hf_weight_files(directory)
        self._where: dict[str, Path] = {}
        self._torch: dict[str, Any] = {}
        if self.kind == "safetensors":
            from safetensors import safe_open
            for f in self.files:
                try:
                    with safe_open(str(f), framework="pt" if _has_torch() else "np") as sf:
                        for k in sf.keys():
                            self._where[k] = f
                except Exception as e:
                    raise CheckpointError(f"{f}: cannot read safetensors file: {e}") from None
        else:
            import torch
            f = self.files[0]
            try:
                sd = torch.load(str(f), map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(f"{f}: cannot load with torch.load(weights_only=True): {e}") \
                    from None
            if not isinstance(sd, dict):
                raise CheckpointError(f"{f}: expected a state dict, found {type(sd).__name__}")
            self._torch = sd
            self._where = {k: f for k in sd}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def get(self, name: str) -> np.ndarray:
        if self.kind == "torch":
            return _torch_to_numpy(self._torch[name])
        from safetensors import safe_open
        if _has_torch():
            with safe_open(str(self._where[name]), framework="pt") as sf:
                return _torch_to_numpy(sf.get_tensor(name))
        with safe_open(str(self._where[name]), framework="np") as sf:
            return np.asarray(sf.get_tensor(name), dtype=np.float32)


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def _torch_to_numpy(t) -> np.ndarray:
    import torch
    return t.detach().to(torch.float32).cpu().numpy()


def from_hf(directory: str | os.PathLike, model: str | os.PathLike = "model.yaml",
            target: str = "cpu", **overrides):
    """Import a HuggingFace checkpoint directory through the model YAML's ``huggingface`` mapping.

    Reads ``config.json``, turns the mapped keys into build overrides (explicit ``overrides`` win),
    builds the model and copies every mapped tensor in (the first of its ``a | b`` alternative names
    that the checkpoint holds; transposed where the mapping says so). A tensor the mapping marks
    ``pad_rows`` (an unpadded vocabulary) may have fewer rows than ours: it fills the leading rows
    and the rest are zeroed; any other shape difference is an error naming the tensor, both shapes
    and the file. Unmapped HF tensors are ignored; a mapped one that is missing is an error.
    """
    from . import build

    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory}: no config.json (is this a HuggingFace model directory?)")
    try:
        hf_cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON: {e}") from None
    spec = _load_spec(model)  # the spec gives the mapping before anything is built
    mapping = getattr(spec, "huggingface", None)
    if mapping is None:
        raise CheckpointError(f"{getattr(spec, 'path', model)}: the model file has no huggingface "
                              "section, so HuggingFace checkpoints cannot be mapped onto it")
    build_cfg: dict[str, Any] = {}
    problems = mapping.unsupported(hf_cfg)
    if problems:
        raise CheckpointError(f"{cfg_path}: the checkpoint uses what {spec.path} cannot represent: "
                              + "; ".join(problems)
                              + ". Importing it would give a different model; write a model file that has it.")
    for sym in mapping.config:
        value = mapping.config_value(hf_cfg, sym)   # nested keys and alternatives; None: keep the file's value
        if value is None or sym in overrides:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CheckpointError(f"{cfg_path}: {mapping.config[sym]!r} is {value!r}, but config symbol {sym} "
                                  "needs a number")
        build_cfg[sym] = value
    build_cfg.update(overrides)
    m = build(model=model, target=target, seed=None, **build_cfg)   # weights come from the checkpoint
    load_hf_into(m, directory, mapping)
    return m


def _load_spec(model):
    from . import spec as spec_mod
    from .resources import find_model

    if not isinstance(model, (str, os.PathLike)):
        return model  # already a ModelSpec
    return spec_mod.load(find_model(model))


def load_hf_into(m, directory: str | os.PathLike, mapping=None) -> None:
    """Copy a HuggingFace checkpoint's tensors into an existing model ``m`` (see :func:`from_hf`)."""
    directory = Path(directory)
    mapping = mapping if mapping is not None else m.spec.huggingface
    tensors = _HFTensors(directory)
    unmapped = sorted(set(m.params) - set(mapping.parameters))
    if unmapped:
        raise CheckpointError(f"model parameters {unmapped} have no huggingface mapping in the "
                              "model file")
    used: set[str] = set()
    for ours, hp in mapping.parameters.items():
        dst = m.params[ours]
        per_layer = "{layer}" in hp.name
        layers = range(dst.shape[0]) if per_layer else [None]
        for layer in layers:
            view = dst[layer] if per_layer else dst
            candidates = hp.names(layer)
            hf_name = next((n for n in candidates if n in tensors), None)
            if hf_name is None:
                tried = " or ".join(repr(n) for n in candidates)
                raise CheckpointError(f"{directory}: tensor {tried} (for {ours}) is missing from "
                                      f"{', '.join(str(f.name) for f in tensors.files)}")
            used.add(hf_name)
            t = tensors.get(hf_name)
            where = tensors.file_of(hf_name)
            if hp.transpose:
                if t.ndim != 2:
                    raise CheckpointError(f"{where}: {hf_name} has shape "
                                          f"{t.shape}; only 2-D tensors can be transposed")
                t = t.T
            if t.shape == view.shape:
                view[...] = t
                continue
            fewer_rows = (t.ndim == view.ndim and t.ndim >= 1 and t.shape[0] < view.shape[0]
                          and t.shape[1:] == view.shape[1:])
            if fewer_rows and getattr(hp, "pad_rows", False):
                view[:t.shape[0]] = t
                view[t.shape[0]:] = 0.0
                continue
            hint = ""
            if fewer_rows:
                hint = (f" (it has fewer rows, and the model file does not mark {ours} `pad_rows: true`: "
                        "was a size such as maxT or V overridden larger than the checkpoint's?)")
            raise CheckpointError(f"{where}: tensor {hf_name} has shape "
                                  f"{tuple(t.shape)}{' after transposing' if hp.transpose else ''}"
                                  f", but {ours} needs {tuple(view.shape)}{hint}")


    left = sorted(n for n in tensors.names() if n not in used
                  and not any(fnmatch.fnmatchcase(n, pat) for pat in getattr(mapping, "ignore", ())))
    if left:
        more = f" and {len(left) - 5} more" if len(left) > 5 else ""
        raise CheckpointError(f"{directory}: the checkpoint has tensors the model file does not map: "
                              f"{', '.join(left[:5])}{more}. Importing without them would give a different "
                              f"model; map them in the model file (or list them under huggingface.ignore if "
                              f"they carry no weights)")


# --------------------------------------------------------------------------------------------
# training state

def _arena_digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(arrays[k]).view(np.uint8).data)
    return h.hexdigest()


def _plain_config(model) -> dict[str, int | float]:
    """The resolved config as JSON numbers (ints stay ints)."""
    return {k: int(v) if isinstance(v, (int, np.integer)) else float(v)
            for k, v in model.config.items()}


def _model_identity(model) -> dict[str, Any]:
    spec = getattr(model, "spec", None)
    return {"name": getattr(spec, "name", None), "path": str(getattr(spec, "path", "")) or None}


def save_state(path: str | os.PathLike, model, *, step: int, data: dict | None = None,
               rng: dict | None = None, extra: dict | None = None) -> Path:
    """Atomically save everything needed to resume training exactly.

    Tensors: the ``params``, ``m`` and ``v`` arenas. Metadata (JSON strings): format, version,
    model config and identity, ``step``, data loader state, RNG state, ``extra`` (e.g. the trainer's
    arguments) and a SHA-256 of the tensors, checked on load.
    """
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(model.arenas[k], dtype=np.float32) for k in STATE_ARENAS}
    meta = {
        "format": STATE_FORMAT, "version": STATE_VERSION,
        "config": json.dumps(_plain_config(model), sort_keys=True),
        "model": json.dumps(_model_identity(model)),
        "step": str(int(step)),
        "data": json.dumps(data or {}),
        "rng": json.dumps(rng or {}),
        "extra": json.dumps(extra or {}),
        "sha256": _arena_digest(arrays),
    }
    with atomic_path(path) as tmp:
        save_file(arrays, str(tmp), metadata=meta)
    return Path(path)


def read_state_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """A training state file's metadata (decoded), validating that it is one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training state not found: {path}")
    try:
        with safe_open(str(path), framework="np") as sf:
            meta = sf.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable training state (truncated or corrupt "
                              f"safetensors file): {e}") from None
    if meta.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a gpt2gen training state (format "
                              f"{meta.get('format')!r}, expected {STATE_FORMAT!r})")
    if meta.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path}: training state version {meta.get('version')!r} is not "
                              f"supported (expected {STATE_VERSION})")
    out: dict[str, Any] = {"step": int(meta["step"]), "sha256": meta["sha256"]}
    for k in ("config", "model", "data", "rng", "extra"):
        out[k] = json.loads(meta.get(k) or "{}")
    return out


def _read_state_arrays(path: Path, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as sf:
            arrays = {k: sf.get_tensor(k) for k in STATE_ARENAS}
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read tensors (truncated or corrupt): {e}") from None
    if _arena_digest(arrays) != meta["sha256"]:
        raise CheckpointError(f"{path}: checksum mismatch: the file is corrupt")
    return arrays


def verify_state(path: str | os.PathLike) -> dict[str, Any]:
    """Fully validate a training state file (format, metadata, tensors, checksum); returns its metadata.

    Needs no model: :func:`load_state` repeats the checks and also compares the model's shape.
    """
    path = Path(path)
    meta = read_state_metadata(path)
    _read_state_arrays(path, meta)
    return meta


def load_state(path: str | os.PathLike, model) -> dict[str, Any]:
    """Load a training state into ``model`` (params and AdamW moments); returns its metadata.

    The file is fully validated (format, checksum, config, sizes) before the model is touched.
    """
    path = Path(path)
    meta = read_state_metadata(path)
    cfg = _plain_config(model)
    diff = {k: (meta["config"].get(k), cfg.get(k)) for k in set(cfg) | set(meta["config"])
            if meta["config"].get(k) != cfg.get(k)}
    if diff:
        detail = ", ".join(f"{k}={a} in the file but {b} in the model"
                           for k, (a, b) in sorted(diff.items()))
        raise CheckpointError(f"{path}: model shape mismatch: {detail}")
    arrays = _read_state_arrays(path, meta)
    for k in STATE_ARENAS:
        if arrays[k].shape != model.arenas[k].shape:
            raise CheckpointError(f"{path}: arena {k} has {arrays[k].size} floats, the model "
                                  f"{model.arenas[k].size}")
    for k in STATE_ARENAS:
        model.arenas[k][...] = arrays[k]
    return meta
