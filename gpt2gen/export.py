"""Export trained weights: a HuggingFace directory or an llm.c model file.

    gpt2gen export --format hf   --checkpoint PATH OUT_DIR      # config.json + model.safetensors
    gpt2gen export --format llmc --checkpoint PATH OUT.bin [--dtype fp32|bf16]

The HuggingFace export is the import run backwards, through the same ``huggingface`` section of the
model file (no per-model Python beyond the class name in ``architectures``):

* **config.json**: every mapped config symbol under its config.json key (the first of ``a | b``
  alternatives; a dotted key is nested, ``rope_parameters.rope_theta``). A value the file reads from
  ``null`` (``if_null``) is written as null, and so is a negative token id (``pad_id: -1``: no padding
  token). Every ``require`` entry is written as its first value that is not null (``model_type: llama``,
  ``tie_word_embeddings: false``); one that allows only null is left out. ``architectures``, ``dtype`` and
  the tokenizer's ``bos_token_id``/``eos_token_id`` (GPT-2's ``<|endoftext|>`` when the model has GPT-2's
  vocabulary, else null) are added where the model file accounts for those keys. The result is checked
  against the model file's own import rules before anything is written.
* **model.safetensors** (fp32): every mapped parameter under its HF name (the first alternative);
  per-layer tensors are split into one tensor per layer (``{layer}``), ``transpose: true`` ones are
  transposed back (GPT-2's Conv1D stores [in, out]), and ``pad_rows: true`` tables lose the rows past
  the vocabulary (our ``Vp`` padding; the model's logits show only the first ``V`` columns).

The directory is written whole into a temporary directory beside ``OUT`` and renamed into place (an
existing export there is swapped out atomically), so a crash never leaves half an export. ``OUT`` may
not exist yet, be empty, or hold an earlier gpt2gen export (only its config.json and model.safetensors);
anything else is refused.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import fnmatch
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .checkpoint import CheckpointError

# config.json's `architectures` for the shipped model files' model_type (what AutoModelForCausalLM builds
# also follows from model_type alone; older transformers and other tools read `architectures`)
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "gemma": "GemmaForCausalLM"}
EXPORT_MARK = "gpt2gen"     # safetensors metadata `exported_by`: an earlier export may be replaced
HF_FILES = ("config.json", "model.safetensors")


# --------------------------------------------------------------------------------------------
# the mapping, backwards

def _mapping(model):
    spec = model.spec
    hf = getattr(spec, "huggingface", None)
    if hf is None:
        raise CheckpointError(f"{spec.path}: the model file has no huggingface section, so its weights have no "
                              f"HuggingFace names\n  hint: add one (docs/model-format.md), or export with "
                              f"--format llmc (GPT-2 only)")
    unmapped = sorted(set(model.params) - set(hf.parameters))
    if unmapped:
        raise CheckpointError(f"{spec.path}: parameters {unmapped} have no huggingface mapping, so an export "
                              f"would lose them")
    return hf


def _set_nested(cfg: dict, key: str, value: Any) -> None:
    parts = [p.strip() for p in key.split(".")]
    node = cfg
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise CheckpointError(f"config.json key {key!r} nests inside {p!r}, which is also a value")
    node.setdefault(parts[-1], value)


def _has_nested(cfg: dict, key: str) -> bool:
    from .spec import _ABSENT, _lookup
    return _lookup(cfg, key) is not _ABSENT


def _plain(v):
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v)
    return v


def vocab_rows(model) -> int | None:
    """The unpadded vocabulary: how many of a ``pad_rows`` table's rows HF gets (the model's logits
    columns), or None where the model file does not say."""
    cols = getattr(model.spec, "logits_columns", None)
    return int(cols.eval(model.config)) if cols is not None else None


def hf_config(model) -> dict[str, Any]:
    """config.json for ``model`` (see the module doc); checked against the model file's import rules."""
    from .checkpoint import _unaccounted_config
    from .tokenizer import EOT_TOKEN, N_VOCAB
    hf = _mapping(model)
    cfg: dict[str, Any] = {}
    for sym, keys in hf.config.items():
        if sym not in model.config:
            continue
        key = keys.split("|")[0].strip()
        value = _plain(model.config[sym])
        if sym in hf.config_null and value == hf.config_null[sym]:
            value = None                      # e.g. Mistral's window 0: "sliding_window": null
        elif key.split(".")[-1].endswith("token_id") and isinstance(value, (int, float)) and value < 0:
            value = None                      # pad_id -1: no padding token
        _set_nested(cfg, key, value)
    for key, allowed in hf.require.items():
        values = allowed if isinstance(allowed, list) else [allowed]
        value = next((v for v in values if v is not None), None)
        if value is not None and not _has_nested(cfg, key):
            _set_nested(cfg, key, value)
    known = [k.strip() for key in hf.config.values() for k in key.split("|")]
    known += list(hf.require) + list(hf.ignore_config)
    model_type = cfg.get("model_type")
    vocab = int(model.config.get("V", 0))
    eot = EOT_TOKEN if vocab == N_VOCAB else None
    extras = {"architectures": [ARCHITECTURES[model_type]] if model_type in ARCHITECTURES else None,
              "dtype": "float32", "bos_token_id": eot, "eos_token_id": eot}
    for key, value in extras.items():
        if key == "architectures" and value is None:
            continue
        if not _has_nested(cfg, key) and any(fnmatch.fnmatchcase(key, pat) for pat in known):
            cfg[key] = value
    problems = hf.unsupported(cfg)
    unknown = _unaccounted_config(cfg, hf)
    if problems or unknown:    # the export must import again through the same file
        raise CheckpointError(f"{model.spec.path}: the config.json an export would write does not import again "
                              f"through this file: {'; '.join(problems + [k for k, _ in unknown])}")
    return cfg


def hf_tensors(model) -> dict[str, np.ndarray]:
    """{HF tensor name: float32 array} for ``model``'s parameters (see the module doc)."""
    hf = _mapping(model)
    rows = vocab_rows(model)
    weights = getattr(model, "weights", model.params)     # fp32: the master weights of a mixed-precision model
    out: dict[str, np.ndarray] = {}
    for ours, hp in hf.parameters.items():
        if ours not in weights:
            continue
        arr = weights[ours]
        per_layer = "{layer}" in hp.name
        for layer in (range(arr.shape[0]) if per_layer else [None]):
            t = arr[layer] if layer is not None else arr
            if hp.transpose:
                if t.ndim != 2:
                    raise CheckpointError(f"{model.spec.path}: {ours} is marked transpose but is {t.ndim}-D")
                t = t.T
            if getattr(hp, "pad_rows", False) and rows is not None and t.shape[0] > rows:
                t = t[:rows]
            name = hp.names(layer)[0]
            if name in out:
                raise CheckpointError(f"{model.spec.path}: two parameters map to the HF tensor {name}")
            out[name] = np.ascontiguousarray(t, dtype=np.float32)
    return out


def check_hf_exportable(model) -> None:
    """Raise :class:`CheckpointError` unless :func:`save_hf` can write ``model`` (before a run trains)."""
    hf_config(model)
    _mapping(model)


# --------------------------------------------------------------------------------------------
# writing the directory atomically

def _is_earlier_export(directory: Path) -> bool:
    names = {p.name for p in directory.iterdir()}
    if not names <= set(HF_FILES) or "model.safetensors" not in names:
        return False
    try:
        from safetensors import safe_open
        with safe_open(str(directory / "model.safetensors"), framework="np") as sf:
            return (sf.metadata() or {}).get("exported_by") == EXPORT_MARK
    except Exception:
        return False


def export_dir_problem(out: Path) -> tuple[str, str] | None:
    """(what is wrong, the fix) with ``out`` as an export directory, or None."""
    if out.exists() and not out.is_dir():
        return f"{out}: is an existing file, not a directory", "give a directory path; it is created"
    if out.is_dir() and any(out.iterdir()) and not _is_earlier_export(out):
        held = ", ".join(sorted(p.name for p in out.iterdir())[:4])
        return (f"{out}: exists and holds other files ({held}); an export replaces the whole directory",
                "choose a new or empty directory (an earlier gpt2gen export there is replaced)")
    return None


def check_export_dir(out: Path, option: str = "OUT") -> None:
    from .checks import Output, UsageError, check_outputs
    check_outputs([Output(option, out, "dir", "the HuggingFace files")])
    problem = export_dir_problem(out)
    if problem:
        raise UsageError(f"{option} {problem[0]}", hint=problem[1])


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_stale_dirs(parent: Path) -> None:
    """Temporary export directories left by a killed process (same naming as gpt2gen.cache's files)."""
    from .cache import _alive, _judged_pid, _owner
    owner = _owner()
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            judged = _judged_pid(entry.name, owner, None)
            if judged and not judged[1] and entry.is_dir(follow_symlinks=False) and not _alive(judged[0]):
                shutil.rmtree(entry.path, ignore_errors=True)


def save_hf(model, out: str | os.PathLike) -> Path:
    """Write ``model`` as a HuggingFace checkpoint directory ``out`` (config.json + model.safetensors), atomically."""
    from safetensors.numpy import save_file

    from .cache import temp_path
    out = Path(out)
    cfg = hf_config(model)
    tensors = hf_tensors(model)
    problem = export_dir_problem(out)
    if problem:
        raise CheckpointError(problem[0] + f"\n  hint: {problem[1]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_dirs(out.parent)
    tmp = temp_path(out)
    tmp.mkdir()
    try:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=False) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"),
                  metadata={"format": "pt", "exported_by": EXPORT_MARK, "model": str(model.spec.name)})
        for name in HF_FILES:
            with open(tmp / name, "rb+") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if out.exists():
            if not _exchange(tmp, out):         # no atomic swap here: move the old one aside first
                old = temp_path(out)
                os.rename(out, old)
                os.rename(tmp, out)
                tmp = old
            shutil.rmtree(tmp, ignore_errors=True)   # the previous export, now at the temporary name
        else:
            os.rename(tmp, out)
        _fsync_dir(out.parent)
    finally:
        if tmp.exists() and tmp != out:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------
# the command

def run_export(args: argparse.Namespace, say=print) -> Path:
    from . import checkpoint as ckpt
    from . import weights
    from .checks import Output, check_outputs
    out = Path(args.out)
    src = Path(args.checkpoint)
    if args.format == "hf":
        check_export_dir(out)
        if src.exists() and (out.absolute() == src.absolute() or out.absolute() in src.absolute().parents
                             or (out.exists() and os.path.samefile(out, src))):
            from .checks import UsageError
            raise UsageError(f"OUT {out} is the --checkpoint input (or holds it): the export would replace it",
                             hint="choose another directory")
    else:
        check_outputs([Output("OUT", out, "file", "an llm.c model file",
                              np.array([ckpt.LLMC_MAGIC], dtype="<i4").tobytes(), "model.bin")],
                      [("--checkpoint", src)])
    opened = weights.open_checkpoint(src, model=args.model, warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    say(f"{opened.description}: {opened.model.spec.name} ({weights.describe_config(opened.model)})")
    if args.format == "hf":
        if args.dtype != "fp32":
            from .checks import UsageError
            raise UsageError("--dtype bf16 applies to --format llmc; a HuggingFace export is written in fp32",
                             hint="drop --dtype, or convert with transformers (model.to(torch.bfloat16))")
        save_hf(opened.model, out)
        say(f"wrote {out}/config.json and model.safetensors: "
            f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    else:
        try:
            ckpt.check_llmc_compatible(opened.model)
        except CheckpointError as e:
            raise CheckpointError(f"--format llmc: this model cannot be written as an llm.c model file: {e}"
                                  f"\n  hint: --format hf writes any model whose file has a huggingface "
                                  f"section") from None
        ckpt.save_llmc(opened.model, out, args.dtype)
        say(f"wrote {out} (llm.c model file, {args.dtype})")
    return out


def _cmd_export(args: argparse.Namespace) -> int:
    run_export(args)
    return 0


DESCRIPTION = ("Write a checkpoint's weights as a HuggingFace directory (config.json + model.safetensors, for "
               "transformers' from_pretrained) or an llm.c model file.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", required=True, choices=["hf", "llmc"], help="hf: a HuggingFace directory; llmc: an "
                                                                           "llm.c .bin (GPT-2)")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a training state (or run directory), an llm.c .bin or a HuggingFace directory")
    p.add_argument("out", metavar="OUT", help="the directory (hf) or file (llmc) to write")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="llm.c precision (default: fp32)")
    p.add_argument("--model", default=None, metavar="FILE", help="model file (default: the checkpoint's own)")


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help="write a checkpoint as a HuggingFace directory or llm.c file",
                              description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=_cmd_export)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import run_command
    p = argparse.ArgumentParser(prog="python -m gpt2gen.export", description=DESCRIPTION)
    add_arguments(p)
    return run_command(_cmd_export, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
