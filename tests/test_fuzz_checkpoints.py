"""Fuzzing the checkpoint loaders: seeded random damage to llm.c model files, training states and
HuggingFace checkpoints (config.json and safetensors headers).

Each case starts from a good file, applies one seeded mutation (a header field set to an extreme or
wrong-typed value, a byte flipped, the file cut short or extended, a key added or removed) and feeds
the result to the loader. The loader must either succeed with the result the file now describes, or
raise one of the errors the command line reports as a user's (``CheckpointError``, ``SpecError``,
``MemoryLimitError``) with a message -- never another exception (a plain ValueError is a bug there), a
crash, a hang or an allocation the file's size does not justify -- and a failed load must leave the
model exactly as it was. Nothing here compiles: the models are numpy stand-ins laid out like the real
one (tests/test_checkpoint.py's ``FakeGPT2``), and HF imports stop at ``check_hf``, which is everything
``from_hf`` checks before it builds.
"""
from __future__ import annotations

import json
import random
import struct

import numpy as np
import pytest

from gpt2gen import checkpoint as ck
from gpt2gen import spec as spec_mod
from gpt2gen.builder import MemoryLimitError
from test_checkpoint import FakeGPT2, _hf_state_for

CASES = 150      # per kind; every case is milliseconds
TINY = dict(maxT=16, V=64, L=1, NH=2, C=16, Vp=128)   # model.yaml pads V=64 to Vp=128

# config.json as GPT2LMHeadModel.save_pretrained writes it (transformers 5), for the TINY shape
CONFIG = {
    "activation_function": "gelu_new", "add_cross_attention": False, "architectures": ["GPT2LMHeadModel"],
    "attn_pdrop": 0.1, "bos_token_id": 0, "dtype": "float32", "embd_pdrop": 0.1, "eos_token_id": 0,
    "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_embd": 16, "n_head": 2,
    "n_inner": None, "n_layer": 1, "n_positions": 16, "pad_token_id": None, "reorder_and_upcast_attn": False,
    "resid_pdrop": 0.1, "scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True,
    "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
    "summary_type": "cls_index", "summary_use_proj": True, "tie_word_embeddings": True,
    "transformers_version": "5.24.0", "use_cache": True, "vocab_size": 64,
    "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},   # as the hub's gpt2
}
INTS = [0, 1, -1, 2, 3, 7, 16, 64, 127, 128, 2 ** 31 - 1, -2 ** 31, 2 ** 62, 10 ** 12]
VALUES = INTS + [0.5, 16.0, 32.5, -16.5, 1e12, 1e-300, float("nan"), float("inf"), "16", "", "gelu", None,
                 True, False, [], [16], {}, {"a": 1}, [[[[[]]]]]]


CLEAN_ERRORS = (ck.CheckpointError, spec_mod.SpecError, MemoryLimitError)   # what the CLI reports as the input's fault


def _expect_clean(fn, *args):
    """Run a loader: its result, or None after a clean error (one of CLEAN_ERRORS, with a message). A plain
    ValueError, a KeyError or a numpy error fails the test: the command line shows those as bugs."""
    try:
        return fn(*args)
    except CLEAN_ERRORS as e:
        assert str(e).strip(), f"{type(e).__name__} without a message"
        return None


def _unchanged(model, before: dict) -> bool:
    return all(np.array_equal(model.arenas[k], v, equal_nan=True) for k, v in before.items())


def _snapshot(model) -> dict:
    return {k: model.arenas[k].copy() for k in ("params", "m", "v")}


# ------------------------------------------------------------------------------ llm.c model files

def _mutate_llmc(raw: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:      # a header int set to an extreme or a near-miss value
        h = np.frombuffer(raw[:ck.HEADER_BYTES], "<i4").copy()
        i = rng.choice(range(8)) if rng.random() < 0.8 else rng.randrange(ck.HEADER_INTS)
        h[i] = rng.choice([v for v in INTS if -2 ** 31 <= v < 2 ** 31] + [int(h[i]) + 1, int(h[i]) - 1,
                                                                         int(h[i]) * 2])
        return h.tobytes() + raw[ck.HEADER_BYTES:]
    b = bytearray(raw)
    if kind == 1:      # bytes flipped in the header
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(ck.HEADER_BYTES)] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 2:      # bytes flipped in the weights (may make a NaN or an infinity)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(ck.HEADER_BYTES, len(b))] = rng.randrange(256)
        return bytes(b)
    if kind == 3:      # cut short
        return raw[:rng.randrange(len(raw))]
    return raw + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))    # trailing bytes


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fuzz_llmc(tmp_path, dtype):
    rng = random.Random(f"llmc-{dtype}")
    good = ck.save_llmc(FakeGPT2(**TINY, seed=1), tmp_path / "good.bin", dtype=dtype).read_bytes()
    path = tmp_path / "m.bin"
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(CASES):
        path.write_bytes(_mutate_llmc(good, rng))
        model = FakeGPT2(**TINY, seed=2)
        before = _snapshot(model)
        _expect_clean(ck.read_llmc_header, path)
        hdr = _expect_clean(ck.load_llmc, model, path)
        if hdr is None:
            assert _unchanged(model, before), "a refused llm.c file changed the model"
            outcomes["refused"] += 1
            continue
        _, tensors = ck.read_llmc(path)
        for name, t in tensors.items():
            assert np.array_equal(model.params[name], t), name
        outcomes["ok"] += 1
    assert outcomes["ok"] and outcomes["refused"], outcomes    # both paths were exercised


# ------------------------------------------------------------------------------ safetensors headers

def _split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _mutate_safetensors(raw: bytes, rng: random.Random, meta_keys: list[str]) -> bytes:
    header, data = _split(raw)
    names = [k for k in header if k != "__metadata__"]
    kind = rng.randrange(7)
    if kind == 0:      # a tensor's dtype
        header[rng.choice(names)]["dtype"] = rng.choice(["F32", "F64", "F16", "BF16", "I32", "I64", "U8", "BOOL",
                                                         "F8_E4M3", "XX", 3, None])
    elif kind == 1:    # a tensor's shape
        t = header[rng.choice(names)]
        t["shape"] = rng.choice([[], [0], [2 ** 40, 2 ** 40], [-1], t["shape"] + [1], t["shape"][::-1],
                                 [d * 2 for d in t["shape"]], [2 ** 64], "x"])
    elif kind == 2:    # a tensor's data offsets
        t = header[rng.choice(names)]
        a, b = t["data_offsets"]
        t["data_offsets"] = rng.choice([[b, a], [a, b + 4], [a + 4, b], [0, 2 ** 63], [-4, b], [a], "x"])
    elif kind == 3:    # a metadata entry (training states keep theirs as JSON strings)
        meta = header.setdefault("__metadata__", {})
        key = rng.choice(meta_keys + ["unknown"])
        value = rng.choice(["", "x", "-1", "1e3", "{", "[]", "{}", '{"C": "8"}', '{"C": 1e999}', "[" * 5000,
                            str(2 ** 70), 5, None])
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    elif kind == 4:    # a tensor renamed or removed
        name = rng.choice(names)
        t = header.pop(name)
        if rng.random() < 0.5:
            header[name + ".x"] = t
    elif kind == 5:    # raw bytes of the header or its length
        b = bytearray(_join(header, data))
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(8 + 64)] ^= 1 << rng.randrange(8)
        return bytes(b)
    else:              # cut short
        full = _join(header, data)
        return full[:rng.randrange(len(full))]
    return _join(header, data)


def test_fuzz_training_state(tmp_path):
    rng = random.Random("state")
    src = FakeGPT2(**TINY, seed=3)
    good = ck.save_state(tmp_path / "good.safetensors", src, step=5, data={"train": {"position": 3}}).read_bytes()
    meta_keys = ["format", "version", "config", "model", "step", "data", "rng", "extra", "sha256"]
    path = tmp_path / "s.safetensors"
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(CASES):
        path.write_bytes(_mutate_safetensors(good, rng, meta_keys))
        model = FakeGPT2(**TINY, seed=4)
        before = _snapshot(model)
        _expect_clean(ck.read_state_metadata, path)
        _expect_clean(ck.verify_state, path)
        meta = _expect_clean(ck.load_state, path, model)
        if meta is None:
            assert _unchanged(model, before), "a refused training state changed the model"
            outcomes["refused"] += 1
            continue
        assert _unchanged(model, _snapshot(src)), "a training state that loads must hold the saved arenas"
        assert isinstance(meta["step"], int) and isinstance(meta["data"], dict)
        outcomes["ok"] += 1
    assert outcomes["ok"] and outcomes["refused"], outcomes


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny GPT-2 checkpoint as transformers saves it (transformer.-prefixed tensors, the tied head)."""
    from safetensors.numpy import save_file
    d = tmp_path_factory.mktemp("hf")
    tensors = _hf_state_for(FakeGPT2(**TINY, seed=5), V=TINY["V"])
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(CONFIG, indent=2))
    return d


def test_fuzz_hf_safetensors(hf_dir, tmp_path):
    import shutil
    rng = random.Random("hf-safetensors")
    d = tmp_path / "ckpt"
    shutil.copytree(hf_dir, d)
    good = (hf_dir / "model.safetensors").read_bytes()
    mapping = spec_mod.load("model.yaml").huggingface
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(CASES):
        (d / "model.safetensors").write_bytes(_mutate_safetensors(good, rng, ["format"]))
        model = FakeGPT2(**TINY, seed=6)
        before = _snapshot(model)
        if _expect_clean(lambda: ck.load_hf_into(model, d, mapping) or True) is None:
            assert _unchanged(model, before), "a refused HF checkpoint changed the model"
            outcomes["refused"] += 1
            continue
        from safetensors.numpy import load_file     # what the file now holds, read independently
        ref = load_file(str(d / "model.safetensors"))
        assert np.array_equal(model.params["lnfw"], ref["transformer.ln_f.weight"].astype(np.float32))
        assert np.array_equal(model.params["qkvw"][0], ref["transformer.h.0.attn.c_attn.weight"].astype(np.float32).T)
        outcomes["ok"] += 1
    assert outcomes["ok"] and outcomes["refused"], outcomes


# ------------------------------------------------------------------------------ HF config.json

def _paths(cfg: dict, prefix: str = "") -> list[tuple[dict, str]]:
    """Every (object, key) in a nested config, for mutations to pick from."""
    out = []
    for k, v in cfg.items():
        out.append((cfg, k))
        if isinstance(v, dict):
            out.extend(_paths(v, prefix + k + "."))
    return out


def _mutate_config(rng: random.Random) -> bytes:
    cfg = json.loads(json.dumps(CONFIG))
    kind = rng.randrange(5)
    if kind <= 1:      # a value replaced (twice as often as the rest)
        obj, key = rng.choice(_paths(cfg))
        obj[key] = rng.choice(VALUES)
    elif kind == 2:    # a key removed, or an unknown one added
        if rng.random() < 0.5:
            obj, key = rng.choice(_paths(cfg))
            del obj[key]
        else:
            obj, _ = rng.choice(_paths(cfg))
            obj[rng.choice(["n_ctx2", "rotary", "_private", "factor", "mystery"])] = rng.choice(VALUES)
    text = json.dumps(cfg).encode()     # json writes NaN and Infinity, which json.loads reads back
    if kind == 3:      # bytes of the text
        b = bytearray(text)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if kind == 4:      # cut short
        return text[:rng.randrange(len(text))]
    return text


def test_fuzz_hf_config(hf_dir, tmp_path):
    import shutil
    rng = random.Random("hf-config")
    d = tmp_path / "ckpt"
    shutil.copytree(hf_dir, d)
    spec = spec_mod.load("model.yaml")
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(CASES):
        (d / "config.json").write_bytes(_mutate_config(rng))
        result = _expect_clean(lambda: ck.check_hf(d, spec, B=2, T=8))
        if result is None:
            outcomes["refused"] += 1
            continue
        build_cfg, _, plan = result
        cfg = json.loads((d / "config.json").read_text())
        for sym in spec.huggingface.config:     # what the import builds is what config.json says
            value = spec.huggingface.config_value(cfg, sym)
            assert build_cfg.get(sym) == value or (value is None and sym not in build_cfg), sym
        assert {p.ours for p in plan} == set(spec.huggingface.parameters)
        outcomes["ok"] += 1
    assert outcomes["ok"] and outcomes["refused"], outcomes
