"""llm.c model files, HuggingFace import and training state."""
from __future__ import annotations

import json

import numpy as np
import pytest

import gpt2gen
from gpt2gen import checkpoint as ck


class FakeGPT2:
    """Just the attributes checkpoint code uses, over numpy arrays laid out like the real Model."""

    def __init__(self, maxT=16, V=100, L=2, NH=2, C=8, Vp=128, seed=0):
        self.config = {"V": V, "Vp": Vp, "maxT": maxT, "L": L, "NH": NH, "C": C,
                       "HS": C // NH, "FF": 4 * C, "B": 2, "T": 8}
        shapes = ck.llmc_shapes(maxT, V, L, NH, C, Vp)
        n = sum(int(np.prod(s)) for s in shapes.values())
        rng = np.random.default_rng(seed)
        self.arenas = {k: np.zeros(n, np.float32) for k in ("params", "grads", "m", "v")}
        self.arenas["params"][:] = rng.standard_normal(n).astype(np.float32)
        self.arenas["m"][:] = rng.standard_normal(n).astype(np.float32)
        self.arenas["v"][:] = rng.random(n).astype(np.float32)
        self.params, off = {}, 0
        for name, s in shapes.items():
            k = int(np.prod(s))
            self.params[name] = self.arenas["params"][off:off + k].reshape(s)
            off += k


class _FakeWithSpec(FakeGPT2):
    """A FakeGPT2 shaped like a real model (C, L, V from it) carrying its spec's HF mapping."""

    def __init__(self, real, **kw):
        cfg = {k: int(real.config[k]) for k in ("V", "Vp", "maxT", "L", "NH", "C")}
        super().__init__(**{**cfg, **kw})
        self.spec = real.spec


def _llmc_reference_writer(path, hdr, tensors, version=3):
    """An independent writer of llm.c's layout (header of 256 int32, tensors in order)."""
    with open(path, "wb") as fh:
        ints = [20240326, version, hdr["maxT"], hdr["V"], hdr["L"], hdr["NH"], hdr["C"], hdr["Vp"]]
        fh.write(np.array(ints + [0] * (256 - len(ints)), dtype="<i4").tobytes())
        for t in tensors:
            if version == 3:
                fh.write(np.asarray(t, dtype="<f4").tobytes())
            else:  # truncation is enough for values that are exactly representable in bf16
                fh.write((np.asarray(t, "<f4").view("<u4") >> 16).astype("<u2").tobytes())


def test_bf16_rounding_matches_torch():
    import torch
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-5, 5, 10000),
                        np.array([0.0, -0.0, 1.0, np.inf, -np.inf, 3.4e38, 1e-40,
                                  1.00390625, 1.01171875], np.float32)])  # includes exact ties
    ours = ck.fp32_to_bf16(x)
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, ref)
    assert np.isnan(ck.bf16_to_fp32(ck.fp32_to_bf16(np.array([np.nan], np.float32))))[0]
    back = ck.bf16_to_fp32(ours[:100])
    assert np.array_equal(ck.fp32_to_bf16(back), ours[:100])


def test_llmc_round_trip_fp32_bit_identical(tmp_path):
    m = FakeGPT2()
    p = ck.save_llmc(m, tmp_path / "m.bin")
    hdr = ck.read_llmc_header(p)
    assert hdr == {"maxT": 16, "V": 100, "L": 2, "NH": 2, "C": 8, "Vp": 128, "version": 3}
    raw = np.fromfile(p, dtype="<i4", count=256)
    assert list(raw[:8]) == [20240326, 3, 16, 100, 2, 2, 8, 128] and not raw[8:].any()
    # the payload is exactly the tensors in llm.c's order
    flat = np.concatenate([m.params[k].ravel() for k in ck.LLMC_ORDER])
    assert np.array_equal(np.fromfile(p, dtype="<f4", offset=1024), flat)
    m2 = FakeGPT2(seed=1)
    ck.load_llmc(m2, p)
    assert m2.arenas["params"].tobytes() == m.arenas["params"].tobytes()
    # save again: byte-identical file
    ck.save_llmc(m2, tmp_path / "m2.bin")
    assert (tmp_path / "m2.bin").read_bytes() == p.read_bytes()


def test_llmc_bf16(tmp_path):
    m = FakeGPT2()
    p = ck.save_llmc(m, tmp_path / "m16.bin", dtype="bf16")
    assert ck.read_llmc_header(p)["version"] == 5
    assert p.stat().st_size == 1024 + 2 * m.arenas["params"].size
    m2 = FakeGPT2(seed=1)
    ck.load_llmc(m2, p)
    expect = ck.bf16_to_fp32(ck.fp32_to_bf16(m.arenas["params"]))
    assert np.array_equal(m2.arenas["params"], expect)
    assert np.max(np.abs(m2.arenas["params"] - m.arenas["params"])) <= \
        np.max(np.abs(m.arenas["params"])) * 2 ** -8
    with pytest.raises(ValueError, match="dtype"):
        ck.save_llmc(m, tmp_path / "x.bin", dtype="fp16")


@pytest.mark.parametrize("version", [3, 5])
def test_llmc_reads_independent_writer(tmp_path, version):
    hdr = {"maxT": 16, "V": 100, "L": 2, "NH": 2, "C": 8, "Vp": 128}
    shapes = ck.llmc_shapes(**hdr)
    rng = np.random.default_rng(5)
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    if version == 5:  # bf16-representable values
        tensors = {k: ck.bf16_to_fp32(ck.fp32_to_bf16(t)).reshape(t.shape) for k, t in tensors.items()}
    p = tmp_path / "ref.bin"
    _llmc_reference_writer(p, hdr, [tensors[k] for k in ck.LLMC_ORDER], version)
    m = FakeGPT2(seed=3)
    ck.load_llmc(m, p)
    for k, t in tensors.items():
        assert np.array_equal(m.params[k], t), k
    h, arrays = ck.read_llmc(p)
    assert h["version"] == version and set(arrays) == set(ck.LLMC_ORDER)


def test_llmc_errors(tmp_path):
    m = FakeGPT2()
    good = ck.save_llmc(m, tmp_path / "good.bin")
    raw = good.read_bytes()
    bad = tmp_path / "bad.bin"
    bad.write_bytes(raw[:-10])
    with pytest.raises(ck.CheckpointError, match="truncated"):
        ck.load_llmc(m, bad)
    bad.write_bytes(raw + b"\0\0\0\0")
    with pytest.raises(ck.CheckpointError, match="trailing"):
        ck.load_llmc(m, bad)
    bad.write_bytes(raw[:500])
    with pytest.raises(ck.CheckpointError, match="shorter than"):
        ck.load_llmc(m, bad)
    h = np.frombuffer(raw[:1024], "<i4").copy()
    h[0] = 20240520
    bad.write_bytes(h.tobytes() + raw[1024:])
    with pytest.raises(ck.CheckpointError, match="token file"):
        ck.load_llmc(m, bad)
    h[0], h[1] = 20240326, 4
    bad.write_bytes(h.tobytes() + raw[1024:])
    with pytest.raises(ck.CheckpointError, match="version 4"):
        ck.load_llmc(m, bad)
    other = FakeGPT2(C=16, NH=4)
    with pytest.raises(ck.CheckpointError, match="C=8 in the file but 16 in the model"):
        ck.load_llmc(other, good)
    with pytest.raises(FileNotFoundError):
        ck.load_llmc(m, tmp_path / "missing.bin")


def test_atomic_write_keeps_previous_file(tmp_path, monkeypatch):
    m = FakeGPT2()
    p = ck.save_llmc(m, tmp_path / "m.bin")
    before = p.read_bytes()
    m.params["lnfb"][...] = 7.0
    real = ck.fp32_to_bf16

    def boom(x):
        raise OSError("disk full")
    monkeypatch.setattr(ck, "fp32_to_bf16", boom)
    with pytest.raises(OSError, match="disk full"):
        ck.save_llmc(m, p, dtype="bf16")
    monkeypatch.setattr(ck, "fp32_to_bf16", real)
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.bin"]  # no temp file left


def test_state_round_trip(tmp_path):
    m = FakeGPT2()
    rng = np.random.default_rng(3)
    rng.random(5)
    p = ck.save_state(tmp_path / "s.safetensors", m, step=17, data={"train": {"epoch": 1, "position": 4}},
                      rng={"sample": rng.bit_generator.state}, extra={"run_name": "r"})
    m2 = FakeGPT2(seed=9)
    meta = ck.load_state(p, m2)
    for k in ("params", "m", "v"):
        assert m2.arenas[k].tobytes() == m.arenas[k].tobytes()
    assert meta["step"] == 17 and meta["data"]["train"]["position"] == 4
    assert meta["extra"]["run_name"] == "r"
    rng2 = np.random.default_rng(0)
    rng2.bit_generator.state = meta["rng"]["sample"]
    assert rng2.random() == rng.random()


def test_state_errors(tmp_path):
    m = FakeGPT2()
    p = ck.save_state(tmp_path / "s.safetensors", m, step=1)
    raw = p.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(raw[: len(raw) // 2])
    m2 = FakeGPT2(seed=4)
    before = m2.arenas["params"].copy()
    with pytest.raises(ck.CheckpointError, match="truncated or corrupt"):
        ck.load_state(bad, m2)
    flipped = bytearray(raw)
    flipped[-100] ^= 0xFF
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ck.CheckpointError, match="checksum"):
        ck.load_state(bad, m2)
    assert np.array_equal(m2.arenas["params"], before)  # untouched after failed loads
    with pytest.raises(ck.CheckpointError, match="C=8 in the file but 16 in the model"):
        ck.load_state(p, FakeGPT2(C=16, NH=4))
    from safetensors.numpy import save_file
    save_file({"x": np.zeros(3, np.float32)}, str(bad), metadata={"format": "other"})
    with pytest.raises(ck.CheckpointError, match="not a gpt2gen training state"):
        ck.load_state(bad, m2)
    ck.save_llmc(m, bad)
    with pytest.raises(ck.CheckpointError):
        ck.load_state(bad, m2)


# ------------------------------------------------------------------------------ HuggingFace import

def _gpt2_mapping(prefix="transformer."):
    from types import SimpleNamespace

    from gpt2gen.spec import HFParam
    per_layer = {"ln1w": "ln_1.weight", "ln1b": "ln_1.bias", "qkvw": "attn.c_attn.weight",
                 "qkvb": "attn.c_attn.bias", "attprojw": "attn.c_proj.weight",
                 "attprojb": "attn.c_proj.bias", "ln2w": "ln_2.weight", "ln2b": "ln_2.bias",
                 "fcw": "mlp.c_fc.weight", "fcb": "mlp.c_fc.bias", "fcprojw": "mlp.c_proj.weight",
                 "fcprojb": "mlp.c_proj.bias"}
    params = {"wte": HFParam(prefix + "wte.weight", pad_rows=True), "wpe": HFParam(prefix + "wpe.weight"),
              "lnfw": HFParam(prefix + "ln_f.weight"), "lnfb": HFParam(prefix + "ln_f.bias")}
    for k, v in per_layer.items():
        params[k] = HFParam(prefix + "h.{layer}." + v, transpose=k.endswith("w") and "ln" not in k)
    return SimpleNamespace(config={"V": "vocab_size", "maxT": "n_positions", "L": "n_layer",
                                   "NH": "n_head", "C": "n_embd"}, parameters=params,
                           ignore=("lm_head.weight", "*.attn.bias", "*.attn.masked_bias"))


def _hf_state_for(m, V, prefix="transformer."):
    """HF-style tensors (Conv1D weights transposed, unpadded vocabulary) from a FakeGPT2."""
    mp = _gpt2_mapping(prefix)
    out = {}
    for ours, hp in mp.parameters.items():
        t = m.params[ours]
        if ours == "wte":
            t = t[:V]
        if "{layer}" in hp.name:
            for i in range(t.shape[0]):
                out[hp.name.format(layer=i)] = np.ascontiguousarray(t[i].T if hp.transpose else t[i])
        else:
            out[hp.name] = np.ascontiguousarray(t)
    out["lm_head.weight"] = out[prefix + "wte.weight"]  # ignored (tied)
    out[prefix + "h.0.attn.bias"] = np.ones((1, 1, 16, 16), np.float32)  # ignored buffer
    return out


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_load_hf_into_fake(tmp_path, fmt):
    src = FakeGPT2(seed=11)
    tensors = _hf_state_for(src, V=100)
    if fmt == "safetensors":
        from safetensors.numpy import save_file
        save_file({k: v.copy() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    else:
        import torch
        torch.save({k: torch.from_numpy(v.copy()) for k, v in tensors.items()},
                   tmp_path / "pytorch_model.bin")
    m = FakeGPT2(seed=12)
    m.params["wte"][100:] = 5.0
    ck.load_hf_into(m, tmp_path, _gpt2_mapping())
    for k in ck.LLMC_ORDER:
        if k == "wte":
            assert np.array_equal(m.params[k][:100], src.params[k][:100])
            assert not m.params[k][100:].any()  # padding rows zeroed
        else:
            assert np.array_equal(m.params[k], src.params[k]), k


def test_load_hf_errors(tmp_path):
    from safetensors.numpy import save_file
    src = FakeGPT2(seed=11)
    tensors = _hf_state_for(src, V=100)
    m = FakeGPT2()
    with pytest.raises(ck.CheckpointError, match="no model.safetensors"):
        ck.load_hf_into(m, tmp_path, _gpt2_mapping())
    bad = dict(tensors)
    bad["transformer.h.1.mlp.c_fc.weight"] = np.zeros((8, 33), np.float32)
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(ck.CheckpointError, match=r"transformer.h.1.mlp.c_fc.weight has shape "
                                                  r"\(33, 8\) after transposing, but fcw needs \(32, 8\)"):
        ck.load_hf_into(m, tmp_path, _gpt2_mapping())
    bad = dict(tensors)
    del bad["transformer.ln_f.bias"]
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(ck.CheckpointError, match="transformer.ln_f.bias.*missing"):
        ck.load_hf_into(m, tmp_path, _gpt2_mapping())
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ck.CheckpointError, match="cannot read safetensors"):
        ck.load_hf_into(m, tmp_path, _gpt2_mapping())


def _alt_mapping():
    """The GPT-2 mapping with "transformer.X | X" alternatives, as model.yaml writes it."""
    from gpt2gen.spec import HFParam
    mp = _gpt2_mapping()
    for k, hp in mp.parameters.items():
        short = hp.name[len("transformer."):]
        mp.parameters[k] = HFParam(f"{hp.name} | {short}", hp.transpose, hp.pad_rows)
    return mp


def test_load_hf_name_alternatives(tmp_path):
    """GPT2Model / hub-style names (no `transformer.` prefix) load through `a | b` alternatives."""
    from safetensors.numpy import save_file
    src = FakeGPT2(seed=11)
    save_file(_hf_state_for(src, V=100, prefix=""), str(tmp_path / "model.safetensors"))
    m = FakeGPT2(seed=12)
    ck.load_hf_into(m, tmp_path, _alt_mapping())
    for k in ck.LLMC_ORDER:
        n = 100 if k == "wte" else None
        assert np.array_equal(m.params[k][:n], src.params[k][:n]), k
    with pytest.raises(ck.CheckpointError, match="transformer.wte.weight.*missing"):   # no alternative
        ck.load_hf_into(FakeGPT2(), tmp_path, _gpt2_mapping())
    t = _hf_state_for(src, V=100, prefix="")
    del t["h.1.ln_2.bias"]
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(ck.CheckpointError, match=r"'transformer.h.1.ln_2.bias' or 'h.1.ln_2.bias' \(for ln2b\) "
                                                  r"is missing from model.safetensors"):
        ck.load_hf_into(FakeGPT2(), tmp_path, _alt_mapping())


def test_load_hf_pads_rows_only_where_the_mapping_says(tmp_path):
    from safetensors.numpy import save_file
    from gpt2gen.spec import HFParam
    src = FakeGPT2(seed=11, maxT=16)
    save_file(_hf_state_for(src, V=100), str(tmp_path / "model.safetensors"))
    # maxT overridden larger than the checkpoint's positions: wpe has too few rows -> an error, not zeros
    m = FakeGPT2(maxT=32, seed=3)
    before = m.params["wpe"].copy()
    with pytest.raises(ck.CheckpointError, match=r"model.safetensors: tensor transformer.wpe.weight has shape "
                                                  r"\(16, 8\), but wpe needs \(32, 8\).*pad_rows"):
        ck.load_hf_into(m, tmp_path, _gpt2_mapping())
    assert np.array_equal(m.params["wpe"], before)
    # the vocabulary without pad_rows is an error too
    mp = _gpt2_mapping()
    mp.parameters["wte"] = HFParam("transformer.wte.weight")
    with pytest.raises(ck.CheckpointError, match=r"transformer.wte.weight has shape \(100, 8\), but wte needs "
                                                  r"\(128, 8\)"):
        ck.load_hf_into(FakeGPT2(), tmp_path, mp)
    # more rows than ours is an error even with pad_rows
    with pytest.raises(ck.CheckpointError, match=r"transformer.wte.weight has shape \(100, 8\), but wte needs "
                                                  r"\(64, 8\)"):
        ck.load_hf_into(FakeGPT2(V=60, Vp=64), tmp_path, _gpt2_mapping())


def test_shipped_mappings_pad_only_vocabulary_tables():
    from gpt2gen import spec
    for f in ("model.yaml", "models/llama2.yaml", "models/mistral.yaml", "models/gemma.yaml"):
        hf = spec.load(f).huggingface
        padded = sorted(k for k, hp in hf.parameters.items() if hp.pad_rows)
        assert padded == (["lmheadw", "wte"] if "lmheadw" in hf.parameters else ["wte"]), f
    hf = spec.load("model.yaml").huggingface
    for k, hp in hf.parameters.items():   # every GPT-2 tensor has the prefixed and the hub's name
        names = hp.names(3 if "{layer}" in hp.name else None)
        assert len(names) == 2 and names[0] == "transformer." + names[1], k
        assert "{layer}" not in "".join(names)


def test_spec_parses_hf_alternatives_and_pad_rows():
    from gpt2gen import spec
    src = open(spec.__file__.replace("gpt2gen/spec.py", "model.yaml")).read()
    assert "pad_rows: true" in src
    s = spec.loads(src.replace('wpe: "transformer.wpe.weight | wpe.weight"',
                               'wpe: {name: " a.w |b.w ", pad_rows: true}'), "m.yaml")
    hp = s.huggingface.parameters["wpe"]
    assert (hp.name, hp.alternatives, hp.pad_rows, hp.transpose) == ("a.w", ("b.w",), True, False)
    assert hp.names() == ["a.w", "b.w"]
    for bad, match in [('wpe: {name: a, pad_rows: 1}', "`pad_rows` must be true or false"),
                       ('wpe: {name: a, pad: true}', "pad"),
                       ('wpe: "a | "', "empty tensor name"),
                       ('ln1w: "transformer.h.{layer}.ln_1.weight | ln_1.weight"', "every alternative")]:
        key = bad.split(":")[0]
        head, hf = src.split("\nhuggingface:", 1)
        line = next(ln for ln in hf.splitlines() if ln.strip().startswith(key + ":"))
        with pytest.raises(spec.SpecError, match=match):
            spec.loads(head + "\nhuggingface:" + hf.replace(line, "    " + bad), "m.yaml")


def test_verify_state_checks_the_checksum(tmp_path):
    p = ck.save_state(tmp_path / "s.safetensors", FakeGPT2(), step=3)
    assert ck.verify_state(p)["step"] == 3
    raw = bytearray(p.read_bytes())
    raw[-5] ^= 0xFF   # tensor bytes: the file still parses, only the checksum tells
    p.write_bytes(bytes(raw))
    assert ck.read_state_metadata(p)["step"] == 3
    with pytest.raises(ck.CheckpointError, match="checksum mismatch"):
        ck.verify_state(p)


# ------------------------------------------------------------------------------ with the real compiler

def test_llmc_round_trip_real_model(tmp_path):
    # the same shape as the trainer and HF tests, so one compiled extension serves all three
    m = gpt2gen.build(model="model.yaml", L=2, C=32, NH=2, maxT=16, B=2, T=16)
    m.init_weights(3)
    for dtype in ("fp32", "bf16"):
        p = ck.save_llmc(m, tmp_path / f"m_{dtype}.bin", dtype=dtype)
        m2 = gpt2gen.from_llmc(p, B=2, T=16)
        assert m2.config["Vp"] == m.config["Vp"] == 50304
        want = m.arenas["params"] if dtype == "fp32" else ck.bf16_to_fp32(ck.fp32_to_bf16(m.arenas["params"]))
        assert m2.arenas["params"].tobytes() == want.tobytes()
        ck.save_llmc(m2, tmp_path / "again.bin", dtype=dtype)
        assert (tmp_path / "again.bin").read_bytes() == p.read_bytes()
    with pytest.raises(ck.CheckpointError, match="contradict"):
        gpt2gen.from_llmc(tmp_path / "m_fp32.bin", C=64)


def test_model_load_state_dict_is_all_or_nothing():
    """Model.load_state_dict checks every entry (name, shape, dtype, values) before writing any."""
    m = gpt2gen.build(model="model.yaml", L=2, C=32, NH=2, maxT=16, B=2, T=16)   # the shape used above
    before = m.arenas["params"].copy()
    new = {k: v + 1.0 for k, v in m.state_dict().items()}
    for bad, exc, match in [({"zzz": new["wte"]}, KeyError, "unknown parameter `zzz`"),
                            ({"lnfb": new["lnfb"][:5]}, ck.CheckpointError, r"`lnfb` has shape \(32,\)"),
                            ({"lnfb": new["lnfb"].astype(object)}, ck.CheckpointError, "dtype object"),
                            ({"lnfb": np.where(np.arange(32) == 9, np.inf, 0.0)}, ck.CheckpointError,
                             r"parameter `lnfb`\[9\] is inf")]:
        with pytest.raises(exc, match=match):
            m.load_state_dict({**new, **bad})     # wte..fcprojb come first and are good
        assert m.arenas["params"].tobytes() == before.tobytes(), match
    m.load_state_dict(new)
    assert all(np.array_equal(m.params[k], v) for k, v in new.items())


def test_from_hf_matches_transformers(tmp_path):
    import torch
    import transformers
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # make biases and norms non-trivial
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    m = gpt2gen.from_hf(tmp_path, B=2, T=16)
    assert m.config["V"] == 50257 and m.config["Vp"] == 50304 and m.config["L"] == 2
    assert not m.params["wte"][50257:].any()  # HF has no padding rows: they are zeroed
    idx = np.random.default_rng(0).integers(0, 50257, (2, 16)).astype(np.int32)
    m.forward(idx)
    with torch.no_grad():
        ref = hf(torch.from_numpy(idx.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(m.logits, ref, rtol=1e-4, atol=2e-4)
    # the same weights as pytorch_model.bin (loaded with weights_only=True)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    d2 = tmp_path / "pt"
    d2.mkdir()
    torch.save(sd, d2 / "pytorch_model.bin")
    (d2 / "config.json").write_text((tmp_path / "config.json").read_text())
    m2 = gpt2gen.from_hf(d2, B=2, T=16)
    assert m2.arenas["params"].tobytes() == m.arenas["params"].tobytes()


def test_from_hf_gpt2model_unprefixed_names(tmp_path):
    """The hub's `gpt2` checkpoints (and GPT2Model.save_pretrained) store `wte.weight`, `h.0....`."""
    import torch
    import transformers
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    base = transformers.GPT2Model(cfg).eval()
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    base.save_pretrained(tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as sf:
        keys = set(sf.keys())
    assert "wte.weight" in keys and "h.0.attn.c_attn.weight" in keys
    assert not any(k.startswith("transformer.") for k in keys)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()   # transformers loads it too
    m = gpt2gen.from_hf(tmp_path, B=2, T=16)
    idx = np.random.default_rng(1).integers(0, 50257, (2, 16)).astype(np.int32)
    m.forward(idx)
    with torch.no_grad():
        ref = hf(torch.from_numpy(idx.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(m.logits, ref, rtol=1e-4, atol=2e-4)
    # maxT overridden past the checkpoint's 16 positions: wpe cannot be padded, so it is an error
    with pytest.raises(ck.CheckpointError, match=r"wpe.weight has shape \(16, 32\), but wpe needs \(32, 32\)"):
        ck.load_hf_into(_FakeWithSpec(m, maxT=32), tmp_path)


# ------------------------------------------------------------------------------ config.json, checked before building

TINY_GPT2 = dict(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    """A GPT2LMHeadModel.save_pretrained directory (config.json as transformers writes it)."""
    import torch
    import transformers
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_gpt2")
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY_GPT2)).save_pretrained(d)
    return d


def _edited(src, dst, **edits):
    """A copy of the checkpoint directory ``src`` with config.json keys set (``...``: deleted)."""
    import shutil
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in edits.items():
        if v is ...:
            del cfg[k]
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture
def no_build(monkeypatch):
    """Fail the test if anything is compiled or allocated: these errors must come before the build."""

    def refuse(*a, **k):
        raise AssertionError("from_hf built a model before refusing the checkpoint")
    monkeypatch.setattr(gpt2gen, "build", refuse)


def test_hf_config_maps_layer_norm_epsilon_and_n_inner(tiny_gpt2_dir, tmp_path):
    """Values that change the computation reach the build: eps of every LayerNorm, the MLP width."""
    d = _edited(tiny_gpt2_dir, tmp_path / "eps", layer_norm_epsilon=0.1)
    cfg, _, _ = ck.check_hf(d, "model.yaml", B=2, T=8)
    assert cfg["norm_eps"] == 0.1 and cfg["C"] == 16 and "FF" not in cfg   # n_inner null: the file's 4 * C
    assert ck.check_hf(tiny_gpt2_dir, "model.yaml", T=16)[0]["norm_eps"] == 1e-5
    from gpt2gen import spec
    s = spec.load("model.yaml")
    eps = {n.name: n.attrs["eps"].text() for g in s.graph for n in (g.body if hasattr(g, "body") else [g])
           if n.op == "layernorm"}
    assert eps == {"ln_1": "norm_eps", "ln_2": "norm_eps", "ln_f": "norm_eps"}
    d = _edited(tiny_gpt2_dir, tmp_path / "inner", n_inner=48)   # the weights have 64 rows: they disagree
    with pytest.raises(ck.CheckpointError, match=r"c_fc.weight has shape \(64, 16\) after transposing, but fcw "
                                                  r"needs \(48, 16\)(.|\n)*n_inner = 48 \(FF\)"):
        ck.check_hf(d, "model.yaml", T=16)


def test_every_shipped_config_key_is_accounted_for():
    """What transformers writes for each architecture (save_pretrained's diff, and the full dict) is
    mapped, required or ignored by the shipped model files, with nothing refused."""

    import transformers
    from gpt2gen import spec
    for f, cls in [("model.yaml", "GPT2Config"), ("models/llama2.yaml", "LlamaConfig"),
                   ("models/mistral.yaml", "MistralConfig"), ("models/gemma.yaml", "GemmaConfig")]:
        mapping = spec.load(f).huggingface
        cfg = getattr(transformers, cls)()
        for use_diff in (True, False):
            d = json.loads(cfg.to_json_string(use_diff=use_diff))
            assert ck._unaccounted_config(d, mapping) == [], (f, use_diff)
            assert mapping.unsupported(d) == [], (f, use_diff)


# config.json files as the hub serves them (the files themselves, keys and values as written; no weights
# needed: check_hf stops at the missing weights only after every config check has passed)
HUB_CONFIGS = {
    "openai-community/gpt2": ("model.yaml", """{
  "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
  "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
  "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
  "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1, "summary_activation": null,
  "summary_first_dropout": 0.1, "summary_proj_to_labels": true, "summary_type": "cls_index",
  "summary_use_proj": true, "task_specific_params": {"text-generation": {"do_sample": true, "max_length": 50}},
  "vocab_size": 50257}""", dict(C=768, L=12, maxT=1024)),
    "openai-community/gpt2-medium": ("model.yaml", """{
  "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
  "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
  "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 1024, "n_head": 16,
  "n_layer": 24, "n_positions": 1024, "n_special": 0, "predict_special_tokens": true, "resid_pdrop": 0.1,
  "summary_activation": null, "summary_first_dropout": 0.1, "summary_proj_to_labels": true,
  "summary_type": "cls_index", "summary_use_proj": true,
  "task_specific_params": {"text-generation": {"do_sample": true, "max_length": 50}}, "vocab_size": 50257}""",
                                     dict(C=1024, L=24, NH=16)),
    "gpt2-medium, as transformers 4.6 saved it": ("model.yaml", """{
  "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
  "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "gradient_checkpointing": false,
  "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 1024,
  "n_head": 16, "n_inner": null, "n_layer": 24, "n_positions": 1024, "n_special": 0,
  "predict_special_tokens": true, "resid_pdrop": 0.1, "scale_attn_weights": true, "summary_activation": null,
  "summary_first_dropout": 0.1, "summary_proj_to_labels": true, "summary_type": "cls_index",
  "summary_use_proj": true, "task_specific_params": {"text-generation": {"do_sample": true, "max_length": 50}},
  "transformers_version": "4.6.0.dev0", "use_cache": true, "vocab_size": 50257}""", dict(C=1024)),
    "distilbert/distilgpt2": ("model.yaml", """{
  "_num_labels": 1, "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
  "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "id2label": {"0": "LABEL_0"},
  "initializer_range": 0.02, "label2id": {"LABEL_0": 0}, "layer_norm_epsilon": 1e-05, "model_type": "gpt2",
  "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 6, "n_positions": 1024, "resid_pdrop": 0.1,
  "summary_activation": null, "summary_first_dropout": 0.1, "summary_proj_to_labels": true,
  "summary_type": "cls_index", "summary_use_proj": true,
  "task_specific_params": {"text-generation": {"do_sample": true, "max_length": 50}}, "vocab_size": 50257}""",
                              dict(L=6)),
    "meta-llama/Llama-2-7b-hf": ("models/llama2.yaml", """{
  "_name_or_path": "meta-llama/Llama-2-7b-hf", "architectures": ["LlamaForCausalLM"], "bos_token_id": 1,
  "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
  "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 32,
  "num_hidden_layers": 32, "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
  "rope_scaling": null, "tie_word_embeddings": false, "torch_dtype": "float16",
  "transformers_version": "4.31.0.dev0", "use_cache": true, "vocab_size": 32000}""", dict(FF=11008, NKV=32)),
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": ("models/llama2.yaml", """{
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "bos_token_id": 1, "eos_token_id": 2,
  "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 5632,
  "max_position_embeddings": 2048, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 22,
  "num_key_value_heads": 4, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": null,
  "rope_theta": 10000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.35.0", "use_cache": true, "vocab_size": 32000}""", dict(NKV=4, theta=10000.0)),
    "mistralai/Mistral-7B-v0.1": ("models/mistral.yaml", """{
  "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
  "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
  "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
  "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": false,
  "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": true, "vocab_size": 32000}""",
                                  dict(window=4096, NKV=8)),
    "mistralai/Mistral-7B-Instruct-v0.2": ("models/mistral.yaml", """{
  "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
  "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
  "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32,
  "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": null,
  "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.36.0", "use_cache": true,
  "vocab_size": 32000}""", dict(window=0, theta=1e6)),
    "google/gemma-2b": ("models/gemma.yaml", """{
  "architectures": ["GemmaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 2,
  "eos_token_id": 1, "head_dim": 256, "hidden_act": "gelu", "hidden_size": 2048, "initializer_range": 0.02,
  "intermediate_size": 16384, "max_position_embeddings": 8192, "model_type": "gemma", "num_attention_heads": 8,
  "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0, "rms_norm_eps": 1e-06,
  "rope_scaling": null, "rope_theta": 10000.0, "torch_dtype": "bfloat16", "transformers_version": "4.38.0.dev0",
  "use_cache": true, "vocab_size": 256000}""", dict(HD=256, NKV=1, pad_id=0)),
}

# What transformers 4's PretrainedConfig.to_dict() writes for every model besides its own keys (4.30 to 4.46,
# defaults), and what transformers 2 and 3 wrote too: saved with use_diff=False, or by code that dumps
# config.to_dict(). Every shipped model file accounts for all of them.
PRETRAINED_CONFIG_4 = {
    "return_dict": True, "output_hidden_states": False, "output_attentions": False, "torchscript": False,
    "torch_dtype": "float32", "use_bfloat16": False, "tf_legacy_loss": False, "pruned_heads": {},
    "chunk_size_feed_forward": 0, "is_encoder_decoder": False, "is_decoder": False,
    "cross_attention_hidden_size": None, "add_cross_attention": False, "tie_encoder_decoder": False,
    "max_length": 20, "min_length": 0, "do_sample": False, "early_stopping": False, "num_beams": 1,
    "num_beam_groups": 1, "diversity_penalty": 0.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "typical_p": 1.0,
    "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None, "num_return_sequences": 1, "output_scores": False, "return_dict_in_generate": False,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "remove_invalid_values": False,
    "exponential_decay_length_penalty": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "architectures": None, "finetuning_task": None, "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "tokenizer_class": None, "prefix": None, "bos_token_id": None,
    "pad_token_id": None, "eos_token_id": None, "sep_token_id": None, "decoder_start_token_id": None,
    "task_specific_params": None, "problem_type": None, "_name_or_path": "", "_attn_implementation_autoset": True,
    "transformers_version": "4.46.0",
    # transformers 2 and 3, and 4 before 4.11
    "output_past": True, "xla_device": None, "num_labels": 2, "_num_labels": 2, "gradient_checkpointing": False,
}


def _config_checks_pass(tmp_path, name: str, model: str, cfg: dict):
    """Run check_hf on a directory holding only ``cfg`` as config.json: it must get past every config check
    (and stop at the missing weights)."""
    d = tmp_path / name.replace("/", "--").replace(" ", "_").replace(",", "")
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ck.CheckpointError, match="no model.safetensors, model.safetensors.index.json or "
                                                 "pytorch_model.bin found"):
        ck.check_hf(d, model)


@pytest.mark.parametrize("name", list(HUB_CONFIGS))
def test_hub_config_json_files_import(tmp_path, name, no_build):
    """The config.json files of real hub checkpoints pass every config check of their model file, giving
    the sizes they describe; also with everything transformers 4's full dict adds."""
    from gpt2gen import spec
    model, text, expect = HUB_CONFIGS[name]
    cfg = json.loads(text)
    s = spec.load(model)
    assert s.huggingface.unsupported(cfg) == [] and ck._unaccounted_config(cfg, s.huggingface) == []
    values = {sym: v for sym, (_, v) in ck._hf_values(cfg, tmp_path / "config.json", s, s.huggingface, {}).items()}
    assert {k: values.get(k) for k in expect} == expect
    _config_checks_pass(tmp_path, name, model, cfg)
    _config_checks_pass(tmp_path, name + " full", model, {**PRETRAINED_CONFIG_4, **cfg})


def test_keys_that_change_the_computation_are_still_refused(tmp_path, no_build):
    """What the allowlist lets through changes nothing; pruned heads, quantization or an unknown key still stop
    the import, and an empty object (transformers 4's `"pruned_heads": {}`) sets nothing."""
    from gpt2gen import spec
    mapping = spec.load("model.yaml").huggingface
    base = json.loads(HUB_CONFIGS["openai-community/gpt2"][1])
    assert ck._unaccounted_config({**base, "pruned_heads": {}, "mystery": {}}, mapping) == []
    for key, value in [("pruned_heads", {"0": [1, 2]}), ("quantization_config", {"quant_method": "gptq"}),
                       ("use_sliding_window", True), ("attn_scale", 0.5)]:
        assert ck._unaccounted_config({**base, key: value}, mapping) == [(key, value)], key


def test_hf_unknown_config_keys_are_refused(tiny_gpt2_dir, tmp_path, no_build):
    d = _edited(tiny_gpt2_dir, tmp_path / "a", use_fancy_attention=True)
    with pytest.raises(ck.CheckpointError) as info:
        ck.from_hf(d, B=2, T=8)
    msg = str(info.value)
    assert str(d / "config.json") in msg and "use_fancy_attention = true" in msg
    assert "neither maps, requires nor ignores" in msg and "huggingface.ignore_config in model.yaml" in msg
    # a nested object is one entry, described (not printed); several keys are listed together
    d = _edited(tiny_gpt2_dir, tmp_path / "b", extra={"deep": [[[[1]]]]}, other=[1, 2])
    with pytest.raises(ck.CheckpointError, match=r"extra = a mapping \{'deep': \[...\]\} of 1 entries, other = a "
                                                  r"list \[1, 2\] of 2 items"):
        ck.from_hf(d)


def test_hf_nested_config_keys_are_checked_inside_known_objects(tmp_path, no_build):
    """rope_parameters: rope_theta is mapped and rope_type required, so anything else in it is refused."""

    import transformers
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    d = tmp_path / "llama"
    d.mkdir()
    raw = json.loads(cfg.to_json_string())
    assert raw["rope_parameters"]["rope_type"] == "default"
    raw["rope_parameters"]["factor"] = 8.0
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ck.CheckpointError, match=r"config.json: rope_parameters.factor = 8.0: "):
        ck.from_hf(d, model="models/llama2.yaml")


@pytest.mark.parametrize("edits,match", [
    (dict(n_layer=0), r"config.json: model.yaml refuses n_layer = 0 \(L\): "),
    (dict(n_layer=-2), r"config.json: model.yaml refuses n_layer = -2 \(L\): "),
    (dict(n_embd=32.5), r"config.json: n_embd = 32.5 is not a whole number \(it sets C"),
    (dict(n_embd=-16), r"config.json: model.yaml refuses n_embd = -16 \(C\): shape of `wte` has a dimension `C` = -16"),
    (dict(n_head=3), r"config.json: model.yaml refuses n_head = 3 \(NH\), n_embd = 16 \(C\): .*C % NH"),
    (dict(n_head="2"), r"config.json: n_head = '2' is not a number"),
    (dict(n_head=True), r"config.json: n_head = true is not a number"),
    # a whole number written as a float is that number: the model file's limits speak, as for 10 ** 12 below
    (dict(n_positions=1e12), r"config.json: model.yaml refuses n_positions = 1000000000000 \(maxT\): "),
    (dict(layer_norm_epsilon=float("nan")), r"config.json: layer_norm_epsilon = nan is not a finite number"),
    (dict(vocab_size=[64]), r"config.json: vocab_size = a list \[64\] of 1 items is not a number"),
    (dict(n_positions=10 ** 6), r"model.safetensors: tensor transformer.wpe.weight has shape \(16, 16\), but wpe "
                                r"needs \(1000000, 16\)(.|\n)*from config.json's n_positions = 1000000 \(maxT\)"),
    (dict(n_positions=10 ** 12), r"config.json: model.yaml refuses n_positions = 1000000000000 \(maxT\): "),
    (dict(n_layer=2), r"'transformer.h.1.ln_1.weight' or 'h.1.ln_1.weight' \(for ln1w\) is missing(.|\n)*"
                      r"layer count come from config.json's n_layer = 2 \(L\)"),
    (dict(n_layer=0.0), r"config.json: model.yaml refuses n_layer = 0 \(L\): "),
    (dict(n_layer=1.5), r"config.json: n_layer = 1.5 is not a whole number"),
])
def test_bad_hf_config_values_name_config_json(tiny_gpt2_dir, tmp_path, no_build, edits, match):
    """A bad value is reported against config.json and its key (never a model.yaml line), before anything
    is compiled or allocated."""
    d = _edited(tiny_gpt2_dir, tmp_path / "c", **edits)
    with pytest.raises(ck.CheckpointError, match=match) as info:
        ck.from_hf(d, B=2, T=8)
    assert str(d) in str(info.value) and "model.yaml:" not in str(info.value)


def test_hf_model_file_errors_are_blamed_on_the_symbols_they_carry(tiny_gpt2_dir, monkeypatch, no_build):
    """A model-file error that carries its symbols (SpecError.symbols) is blamed on the config.json keys
    those come from, through the file's expressions (FF = 4 * C: n_embd), whatever its words; one that
    carries none falls back to the names in its message, else to every value config.json gave."""
    from gpt2gen import lower, spec

    def refusing(message, symbols):
        def lower_(*args, **kwargs):
            e = spec.SpecError(message, "model.yaml")
            e.symbols = symbols
            raise e
        return lower_
    monkeypatch.setattr(lower, "lower", refusing("the MLP's tiles do not fit", ("FF",)))
    with pytest.raises(ck.CheckpointError, match=r"config.json: model.yaml refuses n_embd = 16 \(C\): the MLP's "
                                                  r"tiles do not fit\n  hint: fix config.json"):
        ck.check_hf(tiny_gpt2_dir, "model.yaml", T=16)
    monkeypatch.setattr(lower, "lower", refusing("`NH` does not divide the tiles", ()))
    with pytest.raises(ck.CheckpointError, match=r"refuses n_head = 2 \(NH\): `NH` does not"):
        ck.check_hf(tiny_gpt2_dir, "model.yaml", T=16)
    monkeypatch.setattr(lower, "lower", refusing("the tiles do not fit", ()))
    with pytest.raises(ck.CheckpointError, match=r"refuses vocab_size = 64 \(V\), n_positions = 16 \(maxT\), "
                                                  r"n_layer = 1 \(L\), n_head = 2 \(NH\), n_embd = 16 \(C\), "
                                                  r"layer_norm_epsilon = 1e-05 \(norm_eps\): the tiles"):
        ck.check_hf(tiny_gpt2_dir, "model.yaml", T=16)


def test_hf_checkpoint_with_more_layers_than_config_json(tmp_path, no_build):
    import torch
    import transformers
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**TINY_GPT2, "n_layer": 2})).save_pretrained(tmp_path)
    _edited(tmp_path, tmp_path / "one", n_layer=1)
    with pytest.raises(ck.CheckpointError, match=r"does not map: transformer.h.1.attn.c_attn.bias, (.|\n)*"
                                                  r"layer count come from config.json's n_layer = 1 \(L\)"):
        ck.from_hf(tmp_path / "one", B=2, T=8)


def test_hf_huge_vocabulary_reaches_the_memory_check(tiny_gpt2_dir, tmp_path, no_build, monkeypatch):
    """vocab_size 10**8 passes the shape checks (the vocabulary may be padded), and stops at the size check
    the build uses, before anything is compiled or allocated."""
    from gpt2gen.builder import MemoryLimitError
    monkeypatch.setenv("GPT2GEN_MAX_MEMORY", "1G")
    for i, vocab in enumerate([10 ** 8, 1e8]):     # a whole number written as a float is that number
        d = _edited(tiny_gpt2_dir, tmp_path / f"v{i}", vocab_size=vocab)
        with pytest.raises(MemoryLimitError, match=r"config.json: the model its values describe does not fit in "
                                                    r"memory(.|\n)*V=100000000,"):
            ck.from_hf(d, B=2, T=8)


def test_unreadable_config_json(tiny_gpt2_dir, tmp_path, no_build):
    import shutil
    d = tmp_path / "u"
    shutil.copytree(tiny_gpt2_dir, d)
    cases = [(b'{"n_embd": 16,,}', r"config.json:1:15: invalid JSON"),
             (b"\xff\xfe{}", r"config.json: not UTF-8 text \(byte offset 0\)"),
             (b"[1, 2]", r"config.json must hold a JSON object"),
             (b"[" * 100000 + b"]" * 100000, r"config.json: invalid JSON"),
             (b'{"n_embd": 1' + b"0" * 5000 + b"}", r"config.json: invalid JSON")]
    for text, match in cases:
        (d / "config.json").write_bytes(text)
        with pytest.raises(ck.CheckpointError, match=match):
            ck.from_hf(d)
    (d / "config.json").unlink()
    (d / "config.json").mkdir()
    with pytest.raises(ck.CheckpointError, match="no config.json"):
        ck.from_hf(d)
    with pytest.raises(ck.CheckpointError, match="not a directory"):
        ck.from_hf(d / "model.safetensors")


# ------------------------------------------------------------------------------ NaN weights, all-or-nothing loads

def test_llmc_nan_weights_are_refused_and_nothing_is_loaded(tmp_path):
    src = FakeGPT2(seed=1)
    src.params["fcw"][1, 5, 3] = np.nan
    p = ck.save_llmc(src, tmp_path / "nan.bin")
    m = FakeGPT2(seed=2)
    before = m.arenas["params"].copy()
    with pytest.raises(ck.CheckpointError, match=r"nan.bin: tensor fcw\[1, 5, 3\] is nan: 1 of 512 values of "
                                                  r"tensor fcw are NaN"):
        ck.load_llmc(m, p)
    assert np.array_equal(m.arenas["params"], before)   # wte..fcb came before fcw: none was written
    src.params["fcw"][1, 5, 3] = 0.0
    src.params["lnfb"][7] = -np.inf
    ck.save_llmc(src, p, dtype="bf16")
    with pytest.raises(ck.CheckpointError, match=r"tensor lnfb\[7\] is -inf"):
        ck.load_llmc(m, p)


def test_llmc_absurd_headers_are_refused_without_allocating(tmp_path):
    """Sizes whose products overflow int64, zero or negative ones: a clean error from the header alone."""
    good = ck.save_llmc(FakeGPT2(), tmp_path / "good.bin").read_bytes()
    bad = tmp_path / "bad.bin"
    for ints, match in [({2: 2 ** 31 - 1, 3: 2 ** 31 - 1, 6: 2 ** 31 - 1, 5: 1, 7: 2 ** 31 - 1}, "implies"),
                        ({6: 2 ** 30, 5: 1, 4: 2 ** 31 - 1}, "implies"),
                        ({4: 0}, r"L=0 \(header int \[4\]\)"),
                        ({6: -8}, r"C=-8 \(header int \[6\]\)"),
                        ({5: 3}, "C=8 is not a multiple of NH=3"),
                        ({7: 64}, "Vp=64 is smaller than V=100")]:
        h = np.frombuffer(good[:1024], "<i4").copy()
        for i, v in ints.items():
            h[i] = v
        bad.write_bytes(h.tobytes() + good[1024:])
        with pytest.raises(ck.CheckpointError, match=match):
            ck.read_llmc_header(bad)
    with pytest.raises(ck.CheckpointError, match="is a directory"):
        ck.read_llmc_header(tmp_path)


def test_from_llmc_padding_mismatch_is_refused_before_building(tmp_path, no_build):
    p = ck.save_llmc(FakeGPT2(V=100, Vp=256), tmp_path / "vp.bin")   # model.yaml pads 100 to 128
    with pytest.raises(ck.CheckpointError, match="Vp=256 in the file, but the model pads V=100 to Vp=128"):
        ck.from_llmc(p)


def test_check_finite_says_what_is_refused():
    """A refused tensor is named with its file, its first bad element (as ``locate`` names it) and how many
    values are bad; the load it stops has written nothing."""
    a = np.zeros((2, 3), np.float32)
    a[1, 2] = np.nan
    a[0, 1] = -np.inf
    with pytest.raises(ck.CheckpointError, match=r"^w.bin: tensor x\[0, 1\] is -inf: 2 of 6 values of tensor x are "
                                                  r"NaN or infinite, so nothing was loaded\n  hint: the checkpoint "
                                                  r"is corrupt"):
        ck.check_finite(a, "tensor x", "w.bin")
    with pytest.raises(ck.CheckpointError, match=r"^arena v\[0, 1\] \(element 1\) is -inf"):
        ck.check_finite(a, "arena v", locate=lambda at: f"element {at[0] * 3 + at[1]}")
    ck.check_finite(np.ones(3, np.float32), "fine")
    ck.check_finite(np.zeros(0, np.float32), "empty")


def test_pytorch_model_bin_is_memory_mapped(tmp_path, monkeypatch):
    """A zip-format pytorch_model.bin is opened memory-mapped (tensors are read when copied, after the shape
    and memory checks); a legacy one, which torch reads whole, is refused before reading when it is larger
    than the memory available."""
    import torch
    src = FakeGPT2(seed=11)
    tensors = {k: torch.from_numpy(v.copy()) for k, v in _hf_state_for(src, V=100).items()}
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real(*a, **k))
    for legacy in (False, True):
        d = tmp_path / f"legacy{legacy}"
        d.mkdir()
        torch.save(tensors, d / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
        m = FakeGPT2(seed=12)
        ck.load_hf_into(m, d, _gpt2_mapping())
        assert calls.pop() == dict(map_location="cpu", weights_only=True, mmap=not legacy)
        assert np.array_equal(m.params["fcw"], src.params["fcw"])
    from gpt2gen.builder import MemoryLimitError
    monkeypatch.setenv("GPT2GEN_MAX_MEMORY", "1K")
    with pytest.raises(MemoryLimitError, match=r"legacyTrue/pytorch_model.bin: this legacy-format .* more than "
                                                r"the 1.0 KiB available \(GPT2GEN_MAX_MEMORY=1K\)\n  hint: convert"):
        ck.load_hf_into(FakeGPT2(), tmp_path / "legacyTrue", _gpt2_mapping())
    assert calls == []      # refused before torch read anything
    ck.load_hf_into(FakeGPT2(), tmp_path / "legacyFalse", _gpt2_mapping())   # mapped: nothing read up front


def test_hf_nan_weights_are_refused_and_load_is_all_or_nothing(tmp_path):
    from safetensors.numpy import save_file
    src = FakeGPT2(seed=11)
    tensors = _hf_state_for(src, V=100)
    tensors["transformer.h.1.mlp.c_proj.weight"] = tensors["transformer.h.1.mlp.c_proj.weight"].copy()
    tensors["transformer.h.1.mlp.c_proj.weight"][4, 2] = np.inf
    save_file(tensors, str(tmp_path / "model.safetensors"))
    m = FakeGPT2(seed=12)
    before = m.arenas["params"].copy()
    with pytest.raises(ck.CheckpointError, match=r"model.safetensors: tensor transformer.h.1.mlp.c_proj.weight"
                                                  r"\[4, 2\] is inf"):
        ck.load_hf_into(m, tmp_path, _gpt2_mapping())
    assert np.array_equal(m.arenas["params"], before)


def test_state_nan_is_refused_naming_the_parameter(tmp_path):
    src = FakeGPT2(seed=5)
    src.params["attprojw"][1, 2, 3] = np.nan
    p = ck.save_state(tmp_path / "s.safetensors", src, step=4)
    with pytest.raises(ck.CheckpointError, match=r"s.safetensors: arena params\[\d+\] is nan"):
        ck.verify_state(p)
    m = FakeGPT2(seed=6)
    before = {k: m.arenas[k].copy() for k in ("params", "m", "v")}
    with pytest.raises(ck.CheckpointError, match=r"arena params\[\d+\] \(parameter attprojw\[1, 2, 3\]\) is nan"):
        ck.load_state(p, m)
    assert all(np.array_equal(m.arenas[k], before[k]) for k in before)
    src.params["attprojw"][1, 2, 3] = 0.0
    src.arenas["v"][17] = np.inf
    ck.save_state(p, src, step=4)
    with pytest.raises(ck.CheckpointError, match=r"arena v\[17\] \(parameter wte\[2, 1\]\) is inf"):
        ck.load_state(p, m)


def test_state_metadata_damage_is_a_checkpoint_error(tmp_path):
    from safetensors.numpy import save_file
    good = ck.save_state(tmp_path / "s.safetensors", FakeGPT2(), step=2)
    meta = ck.read_state_metadata(good)
    base = {"format": ck.STATE_FORMAT, "version": ck.STATE_VERSION, "step": "2", "sha256": meta["sha256"],
            "config": "{}"}
    arrays = {k: np.zeros(4, np.float32) for k in ck.STATE_ARENAS}
    bad = tmp_path / "bad.safetensors"
    for edit, match in [({"step": "two"}, r"metadata `step` = 'two' is not valid"),
                        ({"step": "-1"}, r"`step` = '-1' is not a non-negative integer"),
                        ({"sha256": None}, r"metadata lacks `sha256`"),
                        ({"config": "{not json"}, r"metadata `config` = '\{not json' is not valid"),
                        ({"config": "[1]"}, r"`config` = '\[1\]' is not a dict"),
                        ({"data": "[" * 100000}, r"metadata `data` = .* is not valid"),
                        ({"config": '{"C": "8"}'}, r"config has values that are not finite numbers: C = '8'")]:
        m = {k: v for k, v in {**base, **edit}.items() if v is not None}
        save_file(arrays, str(bad), metadata=m)
        with pytest.raises(ck.CheckpointError, match=match):
            ck.read_state_metadata(bad)
    save_file({"params": arrays["params"]}, str(bad), metadata=base)
    with pytest.raises(ck.CheckpointError, match=r"lacks the m, v arena"):
        ck.verify_state(bad)
    save_file({**arrays, "m": np.zeros(4, np.float64)}, str(bad), metadata=base)
    with pytest.raises(ck.CheckpointError, match=r"arena m is float64"):
        ck.verify_state(bad)


def test_checked_state_dict_is_all_or_nothing():
    m = FakeGPT2()
    good = {k: v.copy() + 1 for k, v in m.params.items()}
    for bad, exc, match in [({"nope": good["wte"]}, KeyError, "unknown parameter `nope`"),
                            ({"wte": good["wte"][:3]}, ck.CheckpointError, "`wte` has shape"),
                            ({"lnfb": good["lnfb"].astype(np.complex64)}, ck.CheckpointError, "dtype complex64"),
                            ({"lnfb": np.array(["a"] * 8)}, ck.CheckpointError, "dtype <U1"),
                            ({"lnfb": np.full(8, 1e39)}, ck.CheckpointError, r"`lnfb`\[0\] is inf"),
                            ({"lnfw": np.where(np.arange(8) == 6, np.nan, 1.0)}, ck.CheckpointError,
                             r"`lnfw`\[6\] is nan")]:
        with pytest.raises(exc, match=match):
            ck.checked_state_dict(m.params, {**good, **bad})   # the good entries come first
    out = ck.checked_state_dict(m.params, {"lnfb": np.arange(8)})
    assert out["lnfb"].dtype == np.float32 and list(out["lnfb"]) == list(range(8))


def test_a_state_from_before_a_config_symbol_existed_still_resumes(tmp_path):
    """model.yaml gained `norm_eps`; states saved before hold no such symbol. They load when the model has
    the value the file gives it (what the older file computed with), and are refused when it does not."""
    from safetensors import safe_open
    from safetensors.numpy import save_file
    cfg = dict(V=64, L=1, C=16, NH=2, maxT=8, B=1, T=4)
    m = gpt2gen.build("model.yaml", seed=1, **cfg)
    path = ck.save_state(tmp_path / "s.safetensors", m, step=3)
    with safe_open(str(path), "numpy") as f:
        meta, arrays = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    old = json.loads(meta["config"])
    del old["norm_eps"]
    meta["config"] = json.dumps(old, sort_keys=True)
    save_file(arrays, str(path), metadata=meta)
    fresh = gpt2gen.build("model.yaml", seed=None, **cfg)
    assert ck.load_state(path, fresh)["step"] == 3
    assert fresh.arenas["params"].tobytes() == m.arenas["params"].tobytes()
    other = gpt2gen.build("model.yaml", seed=None, norm_eps=0.1, **cfg)
    with pytest.raises(ck.CheckpointError, match="norm_eps"):
        ck.load_state(path, other)
