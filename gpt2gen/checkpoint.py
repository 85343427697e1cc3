"""Checkpoints: llm.c model files, HuggingFace import, and exact-resume training state.

* llm.c model files (``gpt2_124M.bin`` and friends): a 256 x int32 header -- ``[0]`` magic
  20240326, ``[1]`` version (3 = fp32, 5 = bf16), ``[2]`` maxT, ``[3]`` V, ``[4]`` L, ``[5]`` NH,
  ``[6]`` C, ``[7]`` Vp (padded vocabulary) -- then every parameter tensor in llm.c's order
  (:data:`LLMC_ORDER`), little-endian. :func:`from_llmc` builds a model from one; :func:`save_llmc`
  writes one; :func:`load_llmc` fills an existing model.
* HuggingFace checkpoints (a directory with ``config.json`` and ``model.safetensors``,
  ``model.safetensors.index.json`` shards, or ``pytorch_model.bin``): :func:`from_hf` maps them
  through the ``huggingface`` section of the model YAML, so no per-model Python lives here. Every
  config.json key must be mapped, required or ignored by that section, and config.json and the
  tensor headers are checked against the model's layout before anything is compiled or allocated
  (:func:`check_hf`); errors about config.json values name config.json and the key.
* Training state (parameters, AdamW moments, step, data position, RNG): :func:`save_state` and
  :func:`load_state`, a safetensors file with a SHA-256 of its tensors in the metadata.

Every write is atomic (temporary file in the same directory, fsync, rename), so a crash or a full
disk never leaves a half-written file where a good one was. Every load is all or nothing: names,
shapes and values (NaN or infinity is refused, naming the tensor and the first bad index) are
checked before a model is written. Nothing is unpickled: safetensors, or
``torch.load(..., weights_only=True, mmap=True)`` for ``pytorch_model.bin`` (memory-mapped, so its
tensors are read only after the memory check, as safetensors are).
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .cache import atomic_path, atomic_write_bytes
from .spec import SpecError, describe

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


def _nonfinite_at(a: np.ndarray) -> tuple[int, ...] | None:
    """The index of the first NaN or infinity in ``a`` (C order), or None when every value is finite.

    The common case costs one float64 sum and no temporary array: a sum of float32 values cannot
    overflow float64, so it is finite exactly when every element is; only a suspect tensor gets a mask."""
    with np.errstate(over="ignore", invalid="ignore"):   # inf - inf in the sum is the signal, not a warning
        if a.size == 0 or np.isfinite(np.sum(a, dtype=np.float64)):
            return None
    bad = ~np.isfinite(a)
    if not bad.any():     # float64 input whose sum overflowed: every value is finite
        return None
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), a.shape))


def check_finite(a: np.ndarray, what: str, where: str | os.PathLike | None = None,
                 locate: Callable[[tuple[int, ...]], str] | None = None) -> None:
    """Refuse NaN or infinite weights where they are loaded, naming the file (``where``), the tensor
    (``what``, e.g. "tensor fcw") and the first bad index (``locate`` names that element better where
    it can, e.g. the parameter at an arena offset): loaded silently they would surface steps later as
    a NaN loss, far from their cause. Every loader checks all it reads before the caller's model holds
    any of it, so the message says that nothing was loaded."""
    at = _nonfinite_at(a)
    if at is None:
        return
    count = int(np.count_nonzero(~np.isfinite(a)))
    element = f"{what}[{', '.join(map(str, at))}]" + (f" ({locate(at)})" if locate else "")
    prefix = f"{where}: " if where else ""
    raise CheckpointError(f"{prefix}{element} is {a[at]}: {count} of {a.size} values of {what} are NaN or "
                          f"infinite, so nothing was loaded\n  hint: the checkpoint is corrupt or was saved "
                          f"from a run that diverged; use an earlier checkpoint")


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
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not an llm.c model file (a HuggingFace checkpoint "
                              f"directory is imported with from_hf)")
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
    bad = [f"{k}={v} (header int [{i}])" for i, (k, v) in enumerate(hdr.items(), start=2) if v <= 0]
    if not bad and hdr["C"] % hdr["NH"]:
        bad.append(f"C={hdr['C']} is not a multiple of NH={hdr['NH']}")
    if not bad and hdr["Vp"] < hdr["V"]:
        bad.append(f"the padded vocabulary Vp={hdr['Vp']} is smaller than V={hdr['V']}")
    if bad:
        raise CheckpointError(f"{path}: implausible llm.c header {hdr}: {'; '.join(bad)}; the file is "
                              f"corrupt or not an llm.c model file")
    hdr["version"] = version
    # Python integers: a corrupt header's sizes overflow int64, and must compare unequal to the file size
    n = sum(math.prod(s) for s in llmc_shapes(**{k: hdr[k] for k in LLMC_HEADER_KEYS}).values())
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
        n = math.prod(shape)
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
            t = np.ascontiguousarray(_weights(model)[name], dtype="<f4")
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
    for name, t in tensors.items():   # every tensor is checked before any is written
        check_finite(t, f"tensor {name}", path)
    for name, t in tensors.items():
        _weights(model)[name][...] = t
    _sync(model)
    return hdr


def from_llmc(path: str | os.PathLike, target: str = "cpu", model: str | os.PathLike = "model.yaml",
              *, precision: str = "fp32", fuse: str | None = "all", target_options: dict | None = None, **overrides):
    """Build a GPT-2 from an llm.c model file's header and load its weights; returns the Model.

    ``overrides`` may add build options (e.g. ``B=4, T=64``); they cannot change the file's shape.
    ``precision``, ``fuse`` and ``target_options`` (``emulate``, ``archs``) are build options (gpt2gen.build).
    """
    from . import build

    hdr = read_llmc_header(path)
    shape = {k: hdr[k] for k in ("maxT", "V", "L", "NH", "C")}
    clash = {k: v for k, v in overrides.items() if k in shape and v != shape[k]}
    if clash:
        raise CheckpointError(f"{path}: overrides {clash} contradict the file's header {shape}")
    # the padding is the model file's rule, not the header's: compare it once, before compiling anything
    # (the build resolves the same config, so it pads the same; load_llmc compares every header field)
    try:
        vp = _load_spec(model).resolve({**overrides, **shape}).get("Vp")
    except SpecError:
        vp = None   # the build below reports it
    if vp is not None and vp != hdr["Vp"]:
        raise CheckpointError(f"{path}: padded vocabulary Vp={hdr['Vp']} in the file, but the model "
                              f"pads V={hdr['V']} to Vp={vp}")
    m = build(model=model, target=target, seed=None, precision=precision, fuse=fuse,   # weights: the file's
              **(target_options or {}), **{**overrides, **shape})
    load_llmc(m, path)
    return m


# --------------------------------------------------------------------------------------------
# HuggingFace import

HF_CONFIG_MAX_BYTES = 16 << 20   # real config.json files are a few KB; this bounds what is read


def _hf_weight_files(directory: Path) -> tuple[str, list[Path]]:
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    pt = directory / "pytorch_model.bin"
    if single.is_file():
        return "safetensors", [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
            if not all(isinstance(x, str) and x and Path(x).name == x for x in shards):
                raise ValueError("weight_map values must be file names in the same directory")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OSError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        return "safetensors", [directory / s for s in shards]
    if pt.is_file():
        return "torch", [pt]
    raise CheckpointError(f"{directory}: no model.safetensors, model.safetensors.index.json or "
                          "pytorch_model.bin found")


class _HFTensors:
    """Lazy access to the tensors of a HuggingFace checkpoint, as float32 numpy arrays.

    Names and shapes come from the safetensors headers alone, so a checkpoint can be checked against
    the model's layout before anything is compiled or allocated."""

    def __init__(self, directory: Path):
        self.kind, self.files = _hf_weight_files(directory)
        self._where: dict[str, Path] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._torch: dict[str, Any] = {}
        if self.kind == "safetensors":
            from safetensors import safe_open
            for f in self.files:
                try:
                    with safe_open(str(f), framework="pt" if _has_torch() else "np") as sf:
                        for k in sf.keys():
                            self._where[k] = f
                            self._shape[k] = tuple(int(d) for d in sf.get_slice(k).get_shape())
                except Exception as e:
                    raise CheckpointError(f"{f}: cannot read safetensors file: {e}") from None
        else:
            import torch
            f = self.files[0]
            sd = _torch_load(f)
            if not isinstance(sd, dict):
                raise CheckpointError(f"{f}: expected a state dict, found {type(sd).__name__}")
            self._torch = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
            self._where = {k: f for k in self._torch}
            self._shape = {k: tuple(v.shape) for k, v in self._torch.items()}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]

    def get(self, name: str) -> np.ndarray:
        try:
            if self.kind == "torch":
                return _torch_to_numpy(self._torch[name])
            from safetensors import safe_open
            if _has_torch():
                with safe_open(str(self._where[name]), framework="pt") as sf:
                    return _torch_to_numpy(sf.get_tensor(name))
            with safe_open(str(self._where[name]), framework="np") as sf:
                return np.asarray(sf.get_tensor(name), dtype=np.float32)
        except Exception as e:   # a shard changed or broke since it was opened, an unreadable dtype
            raise CheckpointError(f"{self._where[name]}: cannot read tensor {name}: {e}") from None


def _torch_load(f: Path) -> Any:
    """A ``pytorch_model.bin``'s state dict, unpickling nothing but tensors (``weights_only``).

    The zip format (every torch.save since PyTorch 1.6) is memory-mapped: its tensors are read when
    they are copied, after check_hf has compared their shapes with the model and checked that the model
    fits in memory. The legacy format cannot be mapped, and loading it reads every tensor: that is
    refused when the file alone is larger than the memory available."""
    import zipfile

    import torch
    mapped = zipfile.is_zipfile(f)
    if not mapped:
        from .builder import MemoryLimitError, _human, available_memory
        available, source = available_memory()
        size = f.stat().st_size
        if available is not None and size > available:
            raise MemoryLimitError(
                f"{f}: this legacy-format (pre-zip) torch file is read whole to be loaded, and its {_human(size)} "
                f"are more than the {_human(available)} available ({source})\n  hint: convert it to "
                f"model.safetensors (or torch.save it again) on a larger machine; both are read tensor by tensor")
    try:
        return torch.load(str(f), map_location="cpu", weights_only=True, mmap=mapped)
    except Exception as e:
        raise CheckpointError(f"{f}: cannot load with torch.load(weights_only=True): {e}") from None


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def _torch_to_numpy(t) -> np.ndarray:
    import torch
    return t.detach().to(torch.float32).cpu().numpy()


def read_hf_config(directory: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """A checkpoint's ``config.json`` as a dict, and its path; every way it can be unreadable is a
    :class:`CheckpointError` naming the file (and the line and column of a JSON error)."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory; a HuggingFace checkpoint is a directory "
                              f"holding config.json and the weights")
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory}: no config.json (is this a HuggingFace model directory?)")
    try:
        size = cfg_path.stat().st_size
        if size > HF_CONFIG_MAX_BYTES:
            raise CheckpointError(f"{cfg_path}: {size} bytes is too large for a model config (limit "
                                  f"{HF_CONFIG_MAX_BYTES}); is it the right file?")
        raw = cfg_path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{cfg_path}: cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not UTF-8 text (byte offset {e.start}); config.json is JSON "
                              f"text") from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except (ValueError, RecursionError) as e:   # a number too long to convert, nesting too deep
        raise CheckpointError(f"{cfg_path}: invalid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: config.json must hold a JSON object ({{\"key\": value, ...}}), "
                              f"not {describe(cfg)}")
    return cfg, cfg_path


def _known_config_keys(mapping) -> list[str]:
    """Every config.json key (or fnmatch pattern) the model file accounts for: mapped, required or ignored."""
    keys = [k.strip() for key in mapping.config.values() for k in key.split("|")]
    return keys + list(getattr(mapping, "require", {})) + list(getattr(mapping, "ignore_config", ()))


def _unaccounted_config(hf_cfg: dict[str, Any], mapping) -> list[tuple[str, Any]]:
    """config.json entries (dotted keys, values) that the model file neither maps, requires nor ignores.

    A nested object is entered only where the model file names keys inside it (``rope_parameters``:
    its ``rope_theta`` is mapped and ``rope_type`` required, so a ``factor`` there is caught); any
    other object counts as one entry. An empty object sets nothing, so it needs no entry: transformers
    4's full dicts write ``"pruned_heads": {}``, while a checkpoint with pruned heads (which computes
    something else) is still refused. Walked without recursion: config.json may nest deeply."""
    known = _known_config_keys(mapping)
    out: list[tuple[str, Any]] = []
    todo: list[tuple[str, dict]] = [("", hf_cfg)]
    while todo:
        prefix, node = todo.pop()
        for k, v in node.items():
            key = f"{prefix}{k}"
            if v == {} or any(fnmatch.fnmatchcase(key, pat) for pat in known):
                continue
            if isinstance(v, dict) and any(pat.startswith(key + ".") for pat in known):
                todo.append((key + ".", v))
                continue
            out.append((key, v))
    return sorted(out, key=lambda kv: kv[0])


def _source_key(mapping, hf_cfg: dict[str, Any], symbol: str) -> str:
    """The config.json key that gave ``symbol`` its value: the first of its alternatives that holds a
    value, else the first explicit null (the model file's ``if_null`` applied)."""
    from .spec import _ABSENT, _lookup
    keys = [k.strip() for k in mapping.config[symbol].split("|")]
    found = [_lookup(hf_cfg, k) for k in keys]
    return next((k for k, v in zip(keys, found) if v is not None and v is not _ABSENT),
                next((k for k, v in zip(keys, found) if v is None), keys[0]))


def _hf_values(hf_cfg: dict[str, Any], cfg_path: Path, spec, mapping,
               overrides: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """{our symbol: (config.json key, value)} for every mapped value that applies, each checked: a
    number, finite, and a whole number where the model file's own value is one (a size or a count).

    A whole number written as a float (``"n_positions": 1e12``, ``2048.0``) is that whole number: JSON
    has one number type, and the size it gives is for the model file and the memory check to judge."""
    try:
        defaults = spec.resolve({})
    except SpecError:
        defaults = {}
    out: dict[str, tuple[str, Any]] = {}
    problems = []
    for sym in mapping.config:
        if sym in overrides:
            continue
        value = mapping.config_value(hf_cfg, sym)   # nested keys and alternatives; None: keep the file's value
        if value is None:
            continue
        key = _source_key(mapping, hf_cfg, sym)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key} = {describe(value)} is not a number")
        elif not math.isfinite(value):
            problems.append(f"{key} = {value} is not a finite number")
        elif isinstance(defaults.get(sym), int) and not isinstance(value, int) and not value.is_integer():
            problems.append(f"{key} = {value!r} is not a whole number (it sets {sym}, a size or a count: "
                            f"{defaults[sym]} in {spec.path})")
        else:
            out[sym] = (key, int(value) if isinstance(defaults.get(sym), int) else value)
    if problems:
        raise CheckpointError(f"{cfg_path}: " + "; ".join(problems)
                              + "\n  hint: fix config.json, or pass the value as an override (from_hf(..., "
                                "SYMBOL=value), --set SYMBOL=value)")
    return out


def _origin(spec, names: set[str], hf_values: dict, overrides: dict, prefix: str = "config.json's ") -> str:
    """Where the values of ``names`` come from: "config.json's n_layer = 0 (L) and the override T = 99"."""
    used = spec.depends_on(names, set(hf_values) | set(overrides))
    order = list(spec.config) + list(spec.batch)
    parts = [f"{hf_values[s][0]} = {hf_values[s][1]!r} ({s})" for s in order if s in used and s in hf_values]
    ov = [f"{s} = {overrides[s]!r}" for s in order if s in used and s in overrides]
    return " and ".join(filter(None, [(prefix + ", ".join(parts)) if parts else "",
                                      ("the override " + ", ".join(ov)) if ov else ""]))


def _named_symbols(spec, e: SpecError) -> set[str]:
    """The config symbols a model-file error is about: those it carries (``SpecError.symbols``, set
    where the error is raised); for an error that carries none, those its message names (inside
    `...`, or as "NAME = value", not words such as "C int") and the one defined at its line."""
    symbols = set(spec.config) | set(spec.batch)
    carried = set(getattr(e, "symbols", None) or ())
    if carried:
        return carried & symbols
    import re
    words = [w for span in re.findall(r"`([^`]*)`", e.message) for w in re.findall(r"[A-Za-z_]\w*", span)]
    words += re.findall(r"\b([A-Za-z_]\w*) =", e.message)
    named = {w for w in words if w in symbols}
    return named | {s for s, ln in spec.config_lines.items() if e.line and ln == e.line}


def _hf_program(spec, build_cfg: dict, hf_values: dict, overrides: dict, cfg_path: Path):
    """Lower the model with config.json's values (no compiling, nothing allocated); a value the model
    file refuses is reported against config.json and its key, not against a model-file line."""
    from . import lower as lower_mod
    spec.resolve(overrides)   # an override the model file refuses by itself is the caller's: its own message
    try:
        return lower_mod.lower(spec, spec.resolve(build_cfg))
    except SpecError as e:
        named = _named_symbols(spec, e)
        used = spec.depends_on(named, set(hf_values) | set(overrides))
        blamed = used & set(hf_values)
        if not blamed and used & set(overrides):
            raise   # the overrides alone are at fault: the model file's own message says it best
        if not blamed:
            blamed = set(hf_values)   # nothing more specific: every value config.json gave
        if not blamed:
            raise
        where = f" (node '{e.node}')" if e.node else ""
        origin = _origin(spec, named | blamed, hf_values, overrides, prefix="")
        raise CheckpointError(f"{cfg_path}: {spec.path} refuses {origin}: {e.message}{where}\n  hint: fix "
                              f"config.json, or override the value (from_hf(..., SYMBOL=value), --set "
                              f"SYMBOL=value)") from None


@dataclass
class _Placement:
    """Where one HF tensor goes: our parameter, its layer (None: not per-layer), and how."""
    ours: str
    layer: int | None
    hf_name: str
    transpose: bool
    pad: bool           # fewer rows than ours (pad_rows): the rest are zeroed


def _plan_hf(directory: Path, tensors: _HFTensors, mapping, shapes: dict[str, tuple[int, ...]],
             explain: Callable[[str, bool], str] | None = None) -> list[_Placement]:
    """Match every parameter (its full shape in ``shapes``) to checkpoint tensors by name and header
    shape, and refuse tensors the mapping does not account for -- all before any tensor is read, so
    a mismatch costs nothing and changes nothing. ``explain(ours, missing)`` adds where our shape (or,
    for a missing tensor, also our layer count) came from."""
    unmapped = sorted(set(shapes) - set(mapping.parameters))
    if unmapped:
        raise CheckpointError(f"model parameters {unmapped} have no huggingface mapping in the "
                              "model file")
    plan: list[_Placement] = []
    used: set[str] = set()
    for ours, hp in mapping.parameters.items():
        if ours not in shapes:
            continue
        full = shapes[ours]
        per_layer = "{layer}" in hp.name
        for layer in (range(full[0]) if per_layer else [None]):
            want = full[1:] if per_layer else full
            candidates = hp.names(layer)
            hf_name = next((n for n in candidates if n in tensors), None)
            if hf_name is None:
                tried = " or ".join(repr(n) for n in candidates)
                raise CheckpointError(f"{directory}: tensor {tried} (for {ours}) is missing from "
                                      f"{', '.join(str(f.name) for f in tensors.files)}"
                                      + (explain(ours, True) if explain else ""))
            used.add(hf_name)
            shape = tensors.shape(hf_name)
            where = tensors.file_of(hf_name)
            if hp.transpose:
                if len(shape) != 2:
                    raise CheckpointError(f"{where}: {hf_name} has shape "
                                          f"{shape}; only 2-D tensors can be transposed")
                shape = shape[::-1]
            fewer_rows = (len(shape) == len(want) and len(shape) >= 1 and shape[0] < want[0]
                          and shape[1:] == want[1:])
            if shape == want or (fewer_rows and getattr(hp, "pad_rows", False)):
                plan.append(_Placement(ours, layer, hf_name, hp.transpose, shape != want))
                continue
            hint = ""
            if fewer_rows:
                hint = (f" (it has fewer rows, and the model file does not mark {ours} `pad_rows: true`: "
                        "was a size such as maxT or V overridden larger than the checkpoint's?)")
            raise CheckpointError(f"{where}: tensor {hf_name} has shape "
                                  f"{shape}{' after transposing' if hp.transpose else ''}"
                                  f", but {ours} needs {want}{hint}" + (explain(ours, False) if explain else ""))
    left = sorted(n for n in tensors.names() if n not in used
                  and not any(fnmatch.fnmatchcase(n, pat) for pat in getattr(mapping, "ignore", ())))
    if left:
        more = f" and {len(left) - 5} more" if len(left) > 5 else ""
        layered = [ours for ours, hp in mapping.parameters.items() if "{layer}" in hp.name and ours in shapes
                   and any(_layer_pattern(n).fullmatch(x) for n in hp.names() for x in left)]
        raise CheckpointError(f"{directory}: the checkpoint has tensors the model file does not map: "
                              f"{', '.join(left[:5])}{more}. Importing without them would give a different "
                              f"model; map them in the model file (or list them under huggingface.ignore if "
                              f"they carry no weights)"
                              + (explain(layered[0], True) if explain and layered else ""))
    return plan


def _layer_pattern(name: str):
    """A regular expression for a per-layer HF tensor name, any layer ("h.{layer}.w" matches "h.12.w")."""
    import re
    return re.compile(r"\d+".join(re.escape(part) for part in name.split("{layer}")))


def _copy_hf(params: dict[str, np.ndarray], tensors: _HFTensors, plan: list[_Placement],
             staged: bool) -> None:
    """Read and copy the planned tensors, refusing NaN or infinite values. ``staged``: read everything
    into new arrays first and write the model only when all of it is good (an existing model is never
    left half-loaded); a model built for this import is written directly (half the peak memory)."""
    out: dict[str, np.ndarray] = {}
    for p in plan:
        dst = out.get(p.ours)
        if dst is None:
            dst = out[p.ours] = np.empty(params[p.ours].shape, np.float32) if staged else params[p.ours]
        view = dst[p.layer] if p.layer is not None else dst
        t = tensors.get(p.hf_name)
        where = tensors.file_of(p.hf_name)
        if tuple(t.shape) != tensors.shape(p.hf_name):   # the data disagrees with its own header
            raise CheckpointError(f"{where}: tensor {p.hf_name} has shape {tuple(t.shape)}, not the "
                                  f"{tensors.shape(p.hf_name)} its header gives")
        check_finite(t, f"tensor {p.hf_name}", where)
        if p.transpose:
            t = t.T
        rows = t.shape[0]            # the plan checked it: all of ours, or fewer where padding is allowed
        view[:rows] = t
        view[rows:] = 0.0
    if staged:
        for name, arr in out.items():
            params[name][...] = arr


def check_hf(directory: str | os.PathLike, model: str | os.PathLike = "model.yaml", **overrides):
    """Everything :func:`from_hf` checks before it compiles or allocates anything; returns
    ``(build config, tensors, plan)``. config.json must account for every key (mapped, required or
    ignored by the model file), its values must make a valid model, and its weights must have the
    shapes that model needs."""
    directory = Path(directory)
    hf_cfg, cfg_path = read_hf_config(directory)
    spec = _load_spec(model)  # the spec gives the mapping before anything is built
    mapping = getattr(spec, "huggingface", None)
    if mapping is None:
        raise CheckpointError(f"{getattr(spec, 'path', model)}: the model file has no huggingface "
                              "section, so HuggingFace checkpoints cannot be mapped onto it")
    problems = mapping.unsupported(hf_cfg)
    if problems:
        raise CheckpointError(f"{cfg_path}: the checkpoint uses what {spec.path} cannot represent: "
                              + "; ".join(problems)
                              + ". Importing it would give a different model; write a model file that has it.")
    unknown = _unaccounted_config(hf_cfg, mapping)
    if unknown:
        listed = ", ".join(f"{k} = {describe(v)}" for k, v in unknown[:8])
        more = f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
        raise CheckpointError(
            f"{cfg_path}: {listed}{more}: {spec.path} neither maps, requires nor ignores "
            f"{'this key' if len(unknown) == 1 else 'these keys'}, so it cannot tell whether the checkpoint "
            f"computes what it does\n  hint: if a key changes the computation, map it (huggingface.config) "
            f"or require its value (huggingface.require); if it does not (tokenizer ids, training-only or "
            f"bookkeeping settings), list it under huggingface.ignore_config in {spec.path}")
    hf_values = _hf_values(hf_cfg, cfg_path, spec, mapping, overrides)
    build_cfg = {**{s: v for s, (_, v) in hf_values.items()}, **overrides}
    program = _hf_program(spec, build_cfg, hf_values, overrides, cfg_path)
    shapes = {s.name: tuple(s.dims) for s in program.layout.params.slots}
    tensors = _HFTensors(directory)

    layer_counts = set().union(*(g.count.names() for g in spec.graph if hasattr(g, "count")))

    def explain(ours: str, missing: bool) -> str:
        t = spec.tensors[ours]
        names = set().union(*(d.names() for d in t.shape))
        names |= layer_counts if missing and t.per_layer else set()
        origin = _origin(spec, names, hf_values, overrides)
        what = f"{ours}'s shape {t.shape_str()}" + (" and layer count" if missing and t.per_layer else "")
        return (f"\n  hint: {what} come{'s' * (not missing or not t.per_layer)} from {origin}; "
                f"config.json and the weights disagree, or an override does not fit this checkpoint"
                ) if origin else ""
    plan = _plan_hf(directory, tensors, mapping, shapes, explain)
    from .builder import MemoryLimitError, check_memory
    try:
        check_memory(program)    # a vocabulary of 10**8 passes the shape checks (it may be padded), not this
    except MemoryLimitError as e:
        raise MemoryLimitError(f"{cfg_path}: the model its values describe does not fit in memory: {e}") from None
    return build_cfg, tensors, plan


def from_hf(directory: str | os.PathLike, model: str | os.PathLike = "model.yaml",
            target: str = "cpu", *, precision: str = "fp32", fuse: str | None = "all",
            target_options: dict | None = None, **overrides):
    """Import a HuggingFace checkpoint directory through the model YAML's ``huggingface`` mapping.

    Reads ``config.json``, turns the mapped keys into build overrides (explicit ``overrides`` win),
    and checks, before compiling or allocating anything (:func:`check_hf`): that every config.json
    key is mapped, required or ignored by the model file, that the values make a valid model, and
    that every mapped tensor is present with the shape that model needs. Then it builds the model
    and copies every mapped tensor in (the first of its ``a | b`` alternative names that the
    checkpoint holds; transposed where the mapping says so), refusing NaN or infinite weights. A
    tensor the mapping marks ``pad_rows`` (an unpadded vocabulary) may have fewer rows than ours: it
    fills the leading rows and the rest are zeroed; any other shape difference is an error naming
    the tensor, both shapes and the file. Checkpoint tensors the mapping neither maps nor ignores
    are an error. ``precision`` and ``fuse`` are build options (gpt2gen.build).
    """
    from . import build

    build_cfg, tensors, plan = check_hf(directory, model, **overrides)
    m = build(model=model, target=target, seed=None, precision=precision, fuse=fuse,  # weights: the checkpoint's
              **(target_options or {}), **build_cfg)
    _copy_hf(_weights(m), tensors, plan, staged=False)
    _sync(m)
    return m


def _load_spec(model):
    from . import spec as spec_mod
    from .resources import find_model

    if not isinstance(model, (str, os.PathLike)):
        return model  # already a ModelSpec
    return spec_mod.load(find_model(model))


def load_hf_into(m, directory: str | os.PathLike, mapping=None) -> None:
    """Copy a HuggingFace checkpoint's tensors into an existing model ``m`` (see :func:`from_hf`).

    All or nothing: every name, shape and value is checked before the model is written."""
    directory = Path(directory)
    mapping = mapping if mapping is not None else m.spec.huggingface
    tensors = _HFTensors(directory)
    plan = _plan_hf(directory, tensors, mapping, {k: tuple(v.shape) for k, v in m.params.items()})
    _copy_hf(_weights(m), tensors, plan, staged=True)
    _sync(m)


# --------------------------------------------------------------------------------------------
# training state

def _arena_digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(arrays[k]).view(np.uint8).data)
    return h.hexdigest()


def _plain(config: Mapping[str, Any]) -> dict[str, int | float]:
    """A resolved config as JSON numbers (ints stay ints)."""
    return {k: int(v) if isinstance(v, (int, np.integer)) else float(v) for k, v in config.items()}


def _predated_symbols(model, saved: dict[str, Any]) -> dict[str, Any]:
    """Config symbols a state predates (its model file had no such symbol yet, e.g. GPT-2's ``norm_eps``):
    the value the model file gives them from the state's own config, which is what that older file
    computed with. A state whose config the current file cannot resolve gets no such defaults."""
    spec = getattr(model, "spec", None)
    missing = [k for k in model.config if k not in saved]
    if spec is None or not missing:
        return {}
    try:
        known = set(spec.config) | set(spec.batch)
        resolved = spec.resolve({k: v for k, v in saved.items() if k in known})
    except (ValueError, TypeError):
        return {}
    return _plain({k: resolved[k] for k in missing if k in resolved})


def _weights(model) -> dict[str, np.ndarray]:
    """The fp32 weights a checkpoint reads or writes: the master weights of a mixed-precision model, else
    its parameters (after writing them, ``_sync`` rounds the 16-bit parameters from them)."""
    return getattr(model, "weights", model.params)


def _sync(model) -> None:
    if hasattr(model, "sync_params"):
        model.sync_params()


def _model_identity(model) -> dict[str, Any]:
    spec = getattr(model, "spec", None)
    out = {"name": getattr(spec, "name", None), "path": str(getattr(spec, "path", "")) or None,
           "precision": getattr(model, "precision", "fp32")}
    if getattr(model, "loss_scaling", False):
        out["loss_scale"] = model.loss_scale_state
    return out


def _state_arenas(model) -> dict[str, np.ndarray]:
    """What a state holds: the fp32 weights (the master weights in mixed precision) and AdamW's moments,
    each flat over the parameters' layout in elements."""
    arenas = model.arenas
    return {"params": arenas.get("master", arenas["params"]), "m": arenas["m"], "v": arenas["v"]}


def save_state(path: str | os.PathLike, model, *, step: int, data: dict | None = None,
               rng: dict | None = None, extra: dict | None = None) -> Path:
    """Atomically save everything needed to resume training exactly.

    Tensors: the ``params``, ``m`` and ``v`` arenas. Metadata (JSON strings): format, version,
    model config and identity, ``step``, data loader state, RNG state, ``extra`` (e.g. the trainer's
    arguments) and a SHA-256 of the tensors, checked on load.
    """
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(a, dtype=np.float32) for k, a in _state_arenas(model).items()}
    meta = {
        "format": STATE_FORMAT, "version": STATE_VERSION,
        "config": json.dumps(_plain(model.config), sort_keys=True),
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


def _meta_field(path: Path, meta: dict[str, str], key: str, kind: type, default: str | None = None) -> Any:
    """One metadata entry of a training state, decoded and of the expected kind (``default``: the
    text an absent or empty entry stands for): a damaged or hand-edited header is a CheckpointError
    naming the entry, not a KeyError or a JSON traceback."""
    raw = meta.get(key) or default
    if raw is None:
        raise CheckpointError(f"{path}: training state metadata lacks `{key}`; the file is damaged")
    try:
        value = int(raw) if kind is int else raw if kind is str else json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: training state metadata `{key}` = {describe(raw)} is not valid "
                              f"({e}); the file is damaged") from None
    if not isinstance(value, kind) or (kind is int and value < 0):
        raise CheckpointError(f"{path}: training state metadata `{key}` = {describe(raw)} is not "
                              f"{'a non-negative integer' if kind is int else 'a ' + kind.__name__}; the "
                              f"file is damaged")
    return value


def read_state_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """A training state file's metadata (decoded), validating that it is one."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a training state file")
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
                              f"{describe(meta.get('format'))}, expected {STATE_FORMAT!r})")
    if meta.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path}: training state version {describe(meta.get('version'))} is not "
                              f"supported (expected {STATE_VERSION})")
    out: dict[str, Any] = {"step": _meta_field(path, meta, "step", int),
                           "sha256": _meta_field(path, meta, "sha256", str)}
    for k in ("config", "model", "data", "rng", "extra"):
        out[k] = _meta_field(path, meta, k, dict, default="{}")
    bad = {k: v for k, v in out["config"].items()
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)}
    if bad:
        raise CheckpointError(f"{path}: training state config has values that are not finite numbers: "
                              f"{', '.join(f'{k} = {describe(v)}' for k, v in sorted(bad.items()))}; the file "
                              f"is damaged")
    return out


def _read_state_arrays(path: Path, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as sf:
            names = set(sf.keys())
            missing = [k for k in STATE_ARENAS if k not in names]
            if missing:
                raise CheckpointError(f"{path}: training state lacks the {', '.join(missing)} arena(s); "
                                      f"the file is damaged")
            arrays = {k: sf.get_tensor(k) for k in STATE_ARENAS}
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read tensors (truncated or corrupt): {e}") from None
    for k, a in arrays.items():
        if a.dtype != np.float32 or a.ndim != 1:
            raise CheckpointError(f"{path}: arena {k} is {a.dtype} with shape {a.shape}; a training state "
                                  f"holds flat float32 arenas (the file is damaged)")
    if _arena_digest(arrays) != meta["sha256"]:
        raise CheckpointError(f"{path}: checksum mismatch: the file is corrupt")
    return arrays


def _param_at(model, offset: int) -> str:
    """Which parameter element of ``model`` lives at a float offset of its parameter arena ('wte[3, 5]')."""
    base = model.arenas["params"]
    start = base.__array_interface__["data"][0]
    for name, view in model.params.items():
        first = (view.__array_interface__["data"][0] - start) // base.itemsize
        if first <= offset < first + view.size:
            return f"parameter {name}[{', '.join(map(str, np.unravel_index(offset - first, view.shape)))}]"
    return "alignment padding between parameters"


def _check_state_finite(path: Path, arrays: dict[str, np.ndarray], model=None) -> None:
    """A state whose weights or moments hold NaN or infinity would resume into a NaN loss: refuse it,
    naming the arena, the offset and (given the model) the parameter there."""
    locate = (lambda at: _param_at(model, at[0])) if model is not None else None
    for k in STATE_ARENAS:
        check_finite(arrays[k], f"arena {k}", path, locate)


def verify_state(path: str | os.PathLike) -> dict[str, Any]:
    """Fully validate a training state file (format, metadata, tensors, checksum, finite values);
    returns its metadata.

    Needs no model: :func:`load_state` repeats the checks and also compares the model's shape.
    """
    path = Path(path)
    meta = read_state_metadata(path)
    _check_state_finite(path, _read_state_arrays(path, meta))
    return meta


def load_state(path: str | os.PathLike, model) -> dict[str, Any]:
    """Load a training state into ``model`` (params and AdamW moments); returns its metadata.

    The file is fully validated (format, checksum, config, sizes, finite values) before the model is
    touched.
    """
    path = Path(path)
    meta = read_state_metadata(path)
    cfg = _plain(model.config)
    saved = {**meta["config"], **_predated_symbols(model, meta["config"])}
    diff = {k: (saved.get(k), cfg.get(k)) for k in set(cfg) | set(saved) if saved.get(k) != cfg.get(k)}
    if diff:
        detail = ", ".join(f"{k}={a} in the file but {b} in the model"
                           for k, (a, b) in sorted(diff.items()))
        raise CheckpointError(f"{path}: model shape mismatch: {detail}")
    saved_precision = (meta.get("model") or {}).get("precision", "fp32")
    ours = getattr(model, "precision", "fp32")
    if saved_precision != ours:
        raise CheckpointError(f"{path}: the state was trained in {saved_precision}, the model is built in {ours}\n"
                              f"  hint: resume with the precision it was trained in (--precision {saved_precision})")
    arrays = _read_state_arrays(path, meta)
    target = _state_arenas(model)
    for k in STATE_ARENAS:
        if arrays[k].shape != target[k].shape:
            raise CheckpointError(f"{path}: arena {k} has {arrays[k].size} floats, the model "
                                  f"{target[k].size}")
    _check_state_finite(path, arrays, model)
    for k in STATE_ARENAS:
        target[k][...] = arrays[k]
    if hasattr(model, "sync_params"):
        model.sync_params()
    if getattr(model, "loss_scaling", False) and "loss_scale" in meta["model"]:
        model.loss_scale_state = meta["model"]["loss_scale"]
    return meta


# --------------------------------------------------------------------------------------------
# parameters by name

def checked_state_dict(params: dict[str, np.ndarray], state) -> dict[str, np.ndarray]:
    """Validate a {name: array} of parameters against ``params`` (a model's views) and return it as
    float32 arrays, so that :meth:`Model.load_state_dict` can be all or nothing: an unknown name is a
    KeyError, a wrong shape, a non-numeric dtype or a NaN/infinite value (also one that float32
    cannot hold) a CheckpointError, each naming the entry -- raised before anything is written."""
    if not hasattr(state, "items"):
        raise TypeError(f"load_state_dict takes a {{name: array}} mapping, got {type(state).__name__}")
    out: dict[str, np.ndarray] = {}
    for k, v in state.items():
        if k not in params:
            raise KeyError(f"unknown parameter `{k}`; this model has {', '.join(params)}")
        arr = np.asarray(v)
        if arr.dtype.kind not in "fiu":
            raise CheckpointError(f"parameter `{k}` has dtype {arr.dtype}; it needs real numbers (float32, "
                                  f"or a type that converts to it)")
        if params[k].shape != arr.shape:
            raise CheckpointError(f"parameter `{k}` has shape {params[k].shape}, got {arr.shape}")
        with np.errstate(over="ignore"):    # float64 beyond float32's range becomes inf: caught below
            arr = arr.astype(np.float32, copy=False)
        check_finite(arr, f"parameter `{k}`")
        out[k] = arr
    return out
