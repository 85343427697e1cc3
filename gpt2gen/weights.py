"""Open any checkpoint the project writes or reads, for ``gpt2gen sample``, ``eval`` and ``export``.

``--checkpoint PATH`` may name:

* a **training state** (``state_STEP.safetensors``, written by the trainer): the model is rebuilt from the
  model file and the config the state records, and its weights loaded;
* a **directory of training states** (``out/RUN``): the newest fully valid one; or a directory of runs
  (``out``): the most recently written state in its subdirectories;
* an **llm.c model file** (``gpt2_124M.bin``, ``--export-llmc``'s output): GPT-2 from ``model.yaml``;
* a **HuggingFace directory** (``config.json`` + safetensors or ``pytorch_model.bin``): mapped through the
  ``huggingface`` section of the model file whose ``require: model_type`` matches config.json's (or
  ``--model``).

Anything else is a :class:`~gpt2gen.checkpoint.CheckpointError` that names the path, says what it is
and lists what was expected.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import checkpoint as ckpt
from .checkpoint import CheckpointError

TOKEN_FILE_MAGIC = 20240520
EXPECTED = ("expected a training state written by the trainer (state_STEP.safetensors, or a directory of them), "
            "an llm.c model file (.bin) or a HuggingFace directory (config.json and model.safetensors)")
IMPORTED_CONTEXT = 256   # the default window of an llm.c or HuggingFace checkpoint (at most its maxT)


@dataclass
class Opened:
    """A loaded checkpoint: the model and where it came from."""
    model: Any
    kind: str                     # "state", "llmc" or "hf"
    path: Path                    # the file (or HF directory) loaded
    description: str              # for messages: "training state out/x/state_000400.safetensors (step 400)"
    meta: dict = field(default_factory=dict)   # a training state's metadata

    @property
    def vocab_size(self) -> int:
        return int(self.model.config["V"])


# --------------------------------------------------------------------------------------------
# what a path is

def _state_step(path: Path) -> int:
    try:
        return int(path.stem.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def _newest_state(directory: Path, option: str, warn: Callable[[str], None]) -> tuple[Path, dict]:
    cands = sorted(directory.glob("state_*.safetensors"), key=lambda c: (_state_step(c), c.name), reverse=True)
    for cand in cands:
        try:
            return cand, ckpt.verify_state(cand)
        except (CheckpointError, OSError) as e:
            warn(f"skipping training state {cand}: {e}; trying an older one")
    raise CheckpointError(f"{option} {directory}: none of the {len(cands)} training states in it is usable")


def _runs_states(directory: Path) -> list[Path]:
    """The training states one level down (``out/RUN/state_*.safetensors``), newest written first."""
    found = []
    try:
        subdirs = [d for d in directory.iterdir() if d.is_dir()]
    except OSError:
        return []
    for d in subdirs:
        found += [p for p in d.glob("state_*.safetensors") if p.is_file()]
    return sorted(found, key=lambda p: (p.stat().st_mtime, _state_step(p)), reverse=True)


def _file_kind(path: Path) -> str:
    """"llmc", "state" or "safetensors" (another safetensors file) from a file's first bytes; anything
    else is an error saying what the file looks like."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if len(head) >= 4:
        magic = int(np.frombuffer(head[:4], "<i4")[0])
        if magic == ckpt.LLMC_MAGIC:
            return "llmc"
        if magic == TOKEN_FILE_MAGIC:
            raise CheckpointError(f"{path}: is an llm.c token file (data), not a checkpoint; {EXPECTED}"
                                  f"\n  hint: token files are what `gpt2gen eval --data` and the trainer read")
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    what = "is empty" if not head else "is not a checkpoint gpt2gen knows (no llm.c magic, no safetensors header)"
    raise CheckpointError(f"{path}: {what}; {EXPECTED}")


def resolve(path: str | os.PathLike, option: str = "--checkpoint",
            warn: Callable[[str], None] = lambda msg: None) -> tuple[str, Path, dict]:
    """(kind, the file or directory to load, a training state's metadata) for a ``--checkpoint`` path."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{option} {path}: no such file or directory ({EXPECTED})")
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf", path, {}
        if any(path.glob("state_*.safetensors")):
            state, meta = _newest_state(path, option, warn)
            return "state", state, meta
        runs = _runs_states(path)
        for state in runs:
            try:
                return "state", state, ckpt.verify_state(state)
            except (CheckpointError, OSError) as e:
                warn(f"skipping training state {state}: {e}; trying an older one")
        if runs:
            raise CheckpointError(f"{option} {path}: none of the {len(runs)} training states under it is usable")
        weights = [p.name for p in sorted(path.iterdir())[:50]
                   if p.suffix in (".safetensors", ".bin") and p.is_file()][:3]
        holds = f" (it holds {', '.join(weights)}: pass one of them)" if weights else ""
        raise CheckpointError(f"{option} {path}: a directory with no config.json and no training states"
                              f"{holds}; {EXPECTED}")
    if not path.is_file():
        raise CheckpointError(f"{option} {path}: not a regular file; {EXPECTED}")
    kind = _file_kind(path)
    if kind == "llmc":
        return "llmc", path, {}
    try:
        meta = ckpt.read_state_metadata(path)
    except CheckpointError as e:
        if "not a gpt2gen training state" not in str(e):
            raise
        hf_dir = path.parent if (path.parent / "config.json").is_file() else None
        hint = (f"\n  hint: it belongs to the HuggingFace checkpoint {hf_dir}: pass that directory" if hf_dir else
                "\n  hint: a HuggingFace checkpoint is loaded from its directory (config.json beside the weights)")
        raise CheckpointError(f"{option} {path}: a safetensors file, but not a gpt2gen training state; "
                              f"{EXPECTED}{hint}") from None
    return "state", path, meta


# --------------------------------------------------------------------------------------------
# which model file

def hf_model_file(directory: Path) -> Path:
    """The shipped model file for a HuggingFace directory: the one whose ``huggingface.require``
    accepts config.json's ``model_type``."""
    from .cli import shipped_models
    from .spec import load as load_spec
    cfg, cfg_path = ckpt.read_hf_config(directory)
    model_type = cfg.get("model_type")
    known = []
    for f in shipped_models():
        hf = load_spec(f).huggingface
        allowed = (hf.require.get("model_type") if hf else None) or []
        allowed = allowed if isinstance(allowed, list) else [allowed]
        known += [(a, f) for a in allowed]
        if model_type in allowed:
            return f
    listed = ", ".join(f"{a} ({f.name})" for a, f in known)
    raise CheckpointError(f"{cfg_path}: model_type {model_type!r} matches no shipped model file (known: {listed})"
                          f"\n  hint: pass --model FILE, a model file whose huggingface section maps this checkpoint")


def _state_model_file(path: Path, meta: dict, model: str | None) -> str:
    """The model file a training state was built from: ``model`` when given, else the recorded path (found
    from here, or shipped with the package), else the run's --model setting."""
    from .resources import find_model
    if model:
        return model
    ident = meta.get("model") or {}
    hparams = (meta.get("extra") or {}).get("hparams") or {}
    tried = []
    for cand in (ident.get("path"), hparams.get("model")):
        if cand:
            found = find_model(cand)
            if found.is_file():
                return str(found)
            tried.append(str(cand))
    if not tried:
        return "model.yaml"
    raise CheckpointError(f"{path}: the model file this state was trained with ({', '.join(tried)}) is not found "
                          f"from {Path.cwd()}\n  hint: run from the directory the run was started in, or pass "
                          f"--model FILE")


def load_state_weights(path: Path, meta: dict, model) -> None:
    """A training state's parameters (not its AdamW moments) into ``model``, which may have other run-time
    maxima B and T than the run had (they do not change the parameters); everything else in the config
    must match. The file is checked as :func:`gpt2gen.checkpoint.load_state` checks it (checksum, finite
    values) before the model is written."""
    cfg = ckpt._plain(model.config)
    saved = {**meta["config"], **ckpt._predated_symbols(model, meta["config"])}
    diff = sorted(k for k in set(cfg) | set(saved) if k not in ("B", "T") and saved.get(k) != cfg.get(k))
    if diff:
        detail = ", ".join(f"{k}={saved.get(k)} in the file but {cfg.get(k)} in the model" for k in diff)
        raise CheckpointError(f"{path}: model shape mismatch: {detail}")
    arrays = ckpt._read_state_arrays(path, meta)
    arenas = model.arenas
    params = arenas.get("master", arenas["params"])     # the fp32 weights (the master copy in mixed precision)
    if arrays["params"].shape != params.shape:
        raise CheckpointError(f"{path}: arena params has {arrays['params'].size} floats, the model {params.size} "
                              f"(was the model file edited since the run?)")
    ckpt.check_finite(arrays["params"], "arena params", path, lambda at: ckpt._param_at(model, at[0]))
    params[...] = arrays["params"]
    if hasattr(model, "sync_params"):
        model.sync_params()


def _window(option: str, value: int, max_t: int | None) -> int:
    if max_t is not None and value > max_t:
        from .checks import UsageError
        raise UsageError(f"{option} {value}: longer than the model's maxT = {max_t} (the longest sequence it "
                         f"has positions for)", hint=f"use {option} {max_t} or less")
    return value


def _hf_max_t(directory: Path, model_file: str) -> int | None:
    """The maxT a HuggingFace checkpoint gives (through the model file's mapping), to choose the window
    before the import checks everything (a bad value is reported there); None when it says nothing."""
    from .resources import find_model
    from .spec import SpecError
    from .spec import load as load_spec
    spec = load_spec(find_model(model_file))
    hf = spec.huggingface
    hf_cfg, _ = ckpt.read_hf_config(directory)
    value = hf.config_value(hf_cfg, "maxT") if hf is not None and "maxT" in hf.config else None
    if value is None:
        try:
            value = spec.resolve({}).get("maxT")
        except SpecError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 1:
        return None
    return int(min(value, 2 ** 31))


# --------------------------------------------------------------------------------------------
# opening

def open_checkpoint(path: str | os.PathLike, *, model: str | None = None, B: int | None = None,
                    T: int | None = None, target: str = "cpu", option: str = "--checkpoint",
                    t_option: str = "--context", warn: Callable[[str], None] = lambda msg: None) -> Opened:
    """Load the checkpoint at ``path`` (see the module doc) into a new model built with run-time maxima
    ``B`` x ``T``. None keeps a training state's own (its cached build is reused) and gives an imported
    checkpoint B = 1 and T = min(maxT, 256). ``model`` names the model file (default: the one the state
    records, ``model.yaml`` for llm.c, the matching shipped file for HuggingFace)."""
    from . import build
    kind, where, meta = resolve(path, option, warn)
    if kind == "state":
        cfg = dict(meta["config"])
        model_file = _state_model_file(where, meta, model)
        max_t = int(cfg["maxT"]) if "maxT" in cfg else None
        if T is not None:
            cfg["T"] = _window(t_option, T, max_t)
        if B is not None:
            cfg["B"] = B
        precision = (meta.get("model") or {}).get("precision", "fp32")   # as the run was built
        extra = {"precision": precision} if precision != "fp32" else {}
        m = build(model=model_file, target=target, seed=None, **extra, **cfg)   # the state holds the weights
        load_state_weights(where, meta, m)
        return Opened(m, kind, where, f"training state {where} (step {meta['step']})", meta)
    if kind == "llmc":
        hdr = ckpt.read_llmc_header(where)
        t = _window(t_option, T, hdr["maxT"]) if T is not None else min(hdr["maxT"], IMPORTED_CONTEXT)
        m = ckpt.from_llmc(where, target=target, model=model or "model.yaml", B=B or 1, T=t)
        return Opened(m, kind, where, f"llm.c model file {where} ({'fp32' if hdr['version'] == 3 else 'bf16'})")
    model_file = model or str(hf_model_file(where))
    max_t = _hf_max_t(where, model_file)
    t = _window(t_option, T, max_t) if T is not None else min(max_t or IMPORTED_CONTEXT, IMPORTED_CONTEXT)
    m = ckpt.from_hf(where, model=model_file, target=target, B=B or 1, T=t)
    return Opened(m, kind, where, f"HuggingFace checkpoint {where} (mapped by {Path(model_file).name})")


def describe_config(model) -> str:
    keys = ("L", "NH", "NKV", "C", "V", "maxT")
    return ", ".join(f"{k}={model.config[k]}" for k in keys if k in model.config)
