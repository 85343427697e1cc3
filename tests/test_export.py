"""Export: gpt2gen weights -> a HuggingFace directory (config.json + model.safetensors) that transformers'
``AutoModelForCausalLM.from_pretrained`` loads, and -> llm.c model files; ``gpt2gen export`` on the command line.

The round trip starts from a gpt2gen model with random weights (every tensor non-trivial: norm weights and
biases too), exports it through the model file's ``huggingface`` mapping, loads the directory with transformers
and compares logits with gpt2gen's forward on the same tokens.

Tolerance (fp32). A logit is the end of a chain of S = 2 + 4 L reductions (embedding and final norm + head; per
layer a norm, the attention, and two matmuls), each a dot product of at most K terms (K = max(C, FF, T)).
A float32 dot product of length K is off by at most gamma_K = K u / (1 - K u) relative to the sum of its
|terms| (u = 2^-24, Higham), and the residual stream adds the errors of the stages, so with weights that keep
activations of order one (random init, norm layers) the logits agree to atol = S * gamma_K * max|logit|;
the worst element is printed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpt2gen
from gpt2gen import checkpoint as ck
from gpt2gen import cli
from gpt2gen import export as EX

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

U = 2.0 ** -24

# model file, tiny config (B, T are the build maxima)
CASES = {
    "gpt2": ("model.yaml", dict(V=211, maxT=16, L=2, NH=4, C=32, B=2, T=11)),
    "llama2": ("models/llama2.yaml", dict(V=97, maxT=32, L=2, NH=4, NKV=2, C=32, FF=48, theta=500.0, B=2, T=12)),
    "mistral": ("models/mistral.yaml", dict(V=97, maxT=32, L=2, NH=4, NKV=2, C=32, FF=48, window=4, B=2, T=13)),
    "gemma": ("models/gemma.yaml", dict(V=97, maxT=32, L=2, NH=4, NKV=1, C=32, HD=16, FF=48, pad_id=-1,
                                        B=2, T=11)),
}


def random_model(arch: str, seed: int = 0):
    path, cfg = CASES[arch]
    m = gpt2gen.build(path, seed=seed, **cfg)
    rng = np.random.default_rng(seed + 1)
    for name, view in m.params.items():
        base = 0.0 if (arch == "gemma" or not name.startswith("ln")) else 1.0
        if name.startswith("ln"):     # norm weights (and GPT-2's norm biases) around their identity value
            view[...] = base + rng.normal(0, 0.2, view.shape)
        elif view.ndim - (1 if m.spec.tensors[name].per_layer else 0) >= 2:
            view[...] = rng.normal(0, 0.1, view.shape)
        else:                          # biases
            view[...] = rng.normal(0, 0.05, view.shape)
    return m


def tolerance(m, logits: np.ndarray) -> float:
    cfg = m.config
    K = max(int(cfg["C"]), int(cfg.get("FF", 4 * cfg["C"])), int(cfg["T"]))
    S = 2 + 4 * int(cfg["L"])
    return S * (K * U / (1 - K * U)) * float(np.abs(logits).max())


def hf_logits(directory: Path, idx: np.ndarray) -> np.ndarray:
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(torch.from_numpy(idx).long()).logits.numpy()


@pytest.mark.parametrize("arch", list(CASES))
def test_export_hf_round_trip_through_transformers(arch, tmp_path):
    m = random_model(arch)
    out = EX.save_hf(m, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary was left behind"
    cfg = json.loads((out / "config.json").read_text())
    B, T = m.max_batch
    V = int(m.config["V"])
    idx = np.random.default_rng(7).integers(0, V, (B, T)).astype(np.int32)
    m.forward(idx)
    ours = np.array(m.logits, dtype=np.float64)
    want = hf_logits(out, idx).astype(np.float64)
    assert want.shape == ours.shape
    atol = tolerance(m, want)
    err = np.abs(ours - want)
    worst = np.unravel_index(int(np.argmax(err)), err.shape)
    print(f"{arch}: worst |diff| {err[worst]:.3g} at {tuple(int(i) for i in worst)} (ours {ours[worst]:.6g}, "
          f"transformers {want[worst]:.6g}); tolerance {atol:.3g} = S*gamma_K*max|logit|")
    assert err[worst] <= atol, f"{arch}: logits differ by {err[worst]:.3g} > {atol:.3g} at {worst}"
    # the same mapping imports it again: every weight comes back (the padded vocabulary rows are dropped)
    again = gpt2gen.from_hf(out, model=CASES[arch][0], B=B, T=T)
    for name, view in m.params.items():
        got = again.params[name]
        rows = min(got.shape[0], EX.vocab_rows(m)) if m.spec.huggingface.parameters[name].pad_rows else got.shape[0]
        np.testing.assert_array_equal(got[:rows], view[:rows], err_msg=name)
    assert again.config["V"] == m.config["V"] and cfg["vocab_size"] == V


def test_export_config_follows_the_mapping(tmp_path):
    """config.json is the import mapping run backwards: nested keys, nulls the file reads (Mistral's window 0,
    no padding token), the required values, the class name and GPT-2's <|endoftext|> as bos/eos."""
    m = gpt2gen.build("models/mistral.yaml", V=50257, maxT=16, L=1, NH=2, NKV=1, C=16, FF=24, window=0, B=1, T=8)
    cfg = EX.hf_config(m)
    assert cfg["rope_parameters"] == {"rope_theta": 10000.0, "rope_type": "default"}
    assert cfg["sliding_window"] is None and cfg["pad_token_id"] is None
    assert cfg["model_type"] == "mistral" and cfg["architectures"] == ["MistralForCausalLM"]
    assert cfg["tie_word_embeddings"] is False and "rope_scaling" not in cfg
    assert cfg["bos_token_id"] == cfg["eos_token_id"] == 50256
    assert cfg["head_dim"] == 8 and cfg["num_key_value_heads"] == 1
    tensors = EX.hf_tensors(m)
    assert tensors["model.embed_tokens.weight"].shape == (50257, 16)     # Vp = 50304 rows, HF gets V
    assert tensors["lm_head.weight"].shape == (50257, 16)
    assert "model.layers.0.self_attn.q_proj.weight" in tensors
    g = gpt2gen.build("model.yaml", V=101, maxT=8, L=1, NH=2, C=16, B=1, T=8)
    gt = EX.hf_tensors(g)
    np.testing.assert_array_equal(gt["transformer.h.0.attn.c_attn.weight"], g.params["qkvw"][0].T)   # Conv1D
    assert EX.hf_config(g)["bos_token_id"] is None     # not GPT-2's vocabulary: no <|endoftext|> id


def test_export_directory_is_atomic_and_refuses_other_files(tmp_path):
    m = gpt2gen.build("model.yaml", V=101, maxT=8, L=1, NH=2, C=16, B=1, T=8, seed=3)
    out = tmp_path / "hf"
    EX.save_hf(m, out)
    first = (out / "model.safetensors").read_bytes()
    m.params["wte"][...] += 1.0
    EX.save_hf(m, out)                       # an earlier export is replaced whole
    assert (out / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ck.CheckpointError, match="holds other files"):
        EX.save_hf(m, out)
    assert (out / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ck.CheckpointError, match="is an existing file"):
        EX.save_hf(m, tmp_path / "file")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    import safetensors.numpy
    real = safetensors.numpy.save_file
    safetensors.numpy.save_file = boom
    try:
        with pytest.raises(OSError):
            EX.save_hf(m, tmp_path / "new")
    finally:
        safetensors.numpy.save_file = real
    assert not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary was left behind"


def _state(tmp_path, model="model.yaml", **cfg):
    m = gpt2gen.build(model, seed=5, **cfg)
    path = ck.save_state(tmp_path / "run" / "state_000003.safetensors", m, step=3)
    return m, path


def test_export_command_hf_and_llmc(tmp_path, capsys):
    m, state = _state(tmp_path, V=101, maxT=16, L=1, NH=2, C=16, B=2, T=8)
    assert cli.main(["export", "--format", "hf", "--checkpoint", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert "from_pretrained" in capsys.readouterr().out
    back = gpt2gen.from_hf(tmp_path / "hf", B=2, T=8)
    np.testing.assert_array_equal(back.params["qkvw"], m.params["qkvw"])
    assert cli.main(["export", "--format", "llmc", "--checkpoint", str(state), str(tmp_path / "m.bin"),
                     "--dtype", "fp32"]) == 0
    again = gpt2gen.from_llmc(tmp_path / "m.bin", B=2, T=8)
    for k in m.params:
        np.testing.assert_array_equal(again.params[k], m.params[k], err_msg=k)
    # from the llm.c file and from the HF directory to the other format
    assert cli.main(["export", "--format", "hf", "--checkpoint", str(tmp_path / "m.bin"), str(tmp_path / "hf2")]) == 0
    assert cli.main(["export", "--format", "llmc", "--checkpoint", str(tmp_path / "hf"), str(tmp_path / "m2.bin")]) == 0
    assert (tmp_path / "m2.bin").read_bytes()[1024:1024 + 101 * 16 * 4] == (tmp_path / "m.bin").read_bytes()[1024:1024 + 101 * 16 * 4]


def test_export_command_errors(tmp_path, capsys):
    _, state = _state(tmp_path, V=101, maxT=16, L=1, NH=2, C=16, B=2, T=8)

    def err(argv, *needles):
        assert cli.main(argv) == 2
        text = capsys.readouterr().err
        assert text.startswith("gpt2gen: error: ") and "Traceback" not in text, text
        for n in needles:
            assert n in text, text

    err(["export", "--format", "hf", "--checkpoint", str(tmp_path / "nope"), str(tmp_path / "o")],
        "nope: no such file or directory", "expected a training state")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world, not a checkpoint")
    err(["export", "--format", "hf", "--checkpoint", str(junk), str(tmp_path / "o")], "is not a checkpoint gpt2gen knows")
    toks = tmp_path / "toks.bin"
    from gpt2gen.data import write_tokens
    write_tokens(toks, [1, 2, 3])
    err(["export", "--format", "hf", "--checkpoint", str(toks), str(tmp_path / "o")], "is an llm.c token file")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    err(["export", "--format", "hf", "--checkpoint", str(state), str(tmp_path / "full")], "holds other files")
    err(["export", "--format", "llmc", "--checkpoint", str(state), str(state)], "is also the --checkpoint input")
    err(["export", "--format", "hf", "--checkpoint", str(state), str(tmp_path / "run")], "holds other files")
    EX.save_hf(gpt2gen.build("model.yaml", V=101, maxT=16, L=1, NH=2, C=16, B=1, T=8), tmp_path / "hfsrc")
    err(["export", "--format", "hf", "--checkpoint", str(tmp_path / "hfsrc"), str(tmp_path / "hfsrc")],
        "is the --checkpoint input (or holds it)")
    err(["export", "--format", "hf", "--checkpoint", str(state), str(tmp_path / "o"), "--dtype", "bf16"],
        "--dtype bf16 applies to --format llmc")
    ll, lstate = _state(tmp_path / "l", model="models/llama2.yaml", V=97, maxT=16, L=1, NH=2, C=16, FF=24, B=1, T=8)
    err(["export", "--format", "llmc", "--checkpoint", str(lstate), str(tmp_path / "l.bin")],
        "cannot be written as an llm.c model file")
    assert not (tmp_path / "o").exists() and not (tmp_path / "l.bin").exists()


def test_trainer_export_hf(tmp_path):
    """--export-hf writes the trained weights at the end; a bad directory is refused before training."""
    from gpt2gen import data as D
    from gpt2gen import train as TR
    seq = np.tile(np.arange(40, 72), 60)
    train = D.write_tokens(tmp_path / "train.bin", seq)
    val = D.write_tokens(tmp_path / "val.bin", seq[:400])
    base = ["--train-data", str(train), "--val-data", str(val), "--log", str(tmp_path / "log.jsonl"), "--no-progress",
            "--set", "V=101", "--set", "L=1", "--set", "C=16", "--set", "NH=2", "--set", "maxT=16", "-b", "2", "-t", "8",
            "--steps", "2", "--sample-tokens", "0", "--val-every", "0"]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "a").write_text("a")
    assert TR.main([*base, "--export-hf", str(tmp_path / "busy")]) == 2
    assert TR.main([*base, "--export-hf", str(tmp_path / "hf")]) == 0
    m = gpt2gen.from_hf(tmp_path / "hf", B=2, T=8)
    assert m.config["L"] == 1 and m.config["V"] == 101


@pytest.mark.parametrize("module,argv", [
    ("gpt2gen.sample", ["--checkpoint", "{dir}"]),
    ("gpt2gen.evaluate", ["--checkpoint", "{dir}", "--data", "x.bin"]),
    ("gpt2gen.export", ["--format", "hf", "--checkpoint", "{dir}", "{dir}/hf"]),
])
def test_python_m_entry_points(tmp_path, module, argv):
    """The new commands' own entry points, in a fresh interpreter: status 2 and one message, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(Path(gpt2gen.__file__).parent.parent)}
    proc = subprocess.run([sys.executable, "-m", module, *[a.format(dir=tmp_path) for a in argv]], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("gpt2gen: error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert "a directory with no config.json and no training states" in proc.stderr, proc.stderr
