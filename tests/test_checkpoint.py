"""llm.c model files, HuggingFace import and training state."""
from __future__ import annotations

import numpy as np
import pytest

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
    import gpt2gen
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


def test_from_hf_matches_transformers(tmp_path):
    import torch
    import transformers
    import gpt2gen
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
    import gpt2gen
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
