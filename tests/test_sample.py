"""Sampling: the token choice (greedy, temperature, top-k, top-p, seeds), the Decoder behind it, and
``gpt2gen sample`` on every kind of checkpoint, streaming, --json, threads and its errors."""
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
from gpt2gen import sample as S
from gpt2gen import threads as TH

# GPT-2's vocabulary (so text works), everything else tiny
CFG = dict(V=50257, maxT=32, L=1, NH=2, C=16, B=1, T=16)


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample")
    m = gpt2gen.build("model.yaml", seed=11, **CFG)
    m.params["wte"][...] *= 20.0        # peaked logits: greedy and sampled runs differ visibly
    path = ck.save_state(d / "out" / "run" / "state_000002.safetensors", m, step=2)
    return m, path


def run_cli(capsys, *argv):
    code = cli.main(["sample", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------ choosing a token

def test_next_token_greedy_top_k_top_p():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([0.05, 0.5, 0.15, 0.3]))
    assert S.next_token(logits, rng, temperature=0) == 1
    assert S.next_token(logits, rng, temperature=1.0, top_k=1) == 1
    assert S.next_token(logits, rng, temperature=1.0, top_p=0.2) == 1       # the likeliest alone reaches 0.2
    draws = [S.next_token(logits, rng, temperature=1.0, top_p=0.75) for _ in range(4000)]
    assert set(draws) == {1, 3}                                              # 0.5 + 0.3 is the first mass >= 0.75
    assert abs(draws.count(1) / 4000 - 0.5 / 0.8) < 0.03
    draws = [S.next_token(logits, rng, temperature=1.0, top_k=3) for _ in range(4000)]
    assert set(draws) == {1, 2, 3} and abs(draws.count(2) / 4000 - 0.15 / 0.95) < 0.03
    draws = [S.next_token(logits, rng, temperature=1.0) for _ in range(8000)]
    freq = np.bincount(draws, minlength=4) / 8000
    np.testing.assert_allclose(freq, [0.05, 0.5, 0.15, 0.3], atol=0.02)
    hot = [S.next_token(logits, rng, temperature=100.0) for _ in range(4000)]   # nearly uniform
    assert min(np.bincount(hot, minlength=4)) > 800
    a = [S.next_token(logits, np.random.default_rng(5)) for _ in range(1)]
    b = [S.next_token(logits, np.random.default_rng(5)) for _ in range(1)]
    assert a == b


def test_decoder_runs_the_shortest_forward_over_the_window(state):
    m, _ = state
    dec = S.Decoder(m)
    assert dec.window == 16
    got = dec.next_logits([5, 6, 7])
    assert m._last[1:] == (1, 3)                         # B = 1, T = the tokens so far
    m.forward(np.array([[5, 6, 7]], np.int32))
    np.testing.assert_array_equal(got, m.logits[0, 2])
    long = list(range(100, 140))
    got = dec.next_logits(long)                          # the window slides: the last 16 tokens
    assert m._last[1:] == (1, 16)
    m.forward(np.array([long[-16:]], np.int32))
    np.testing.assert_array_equal(got, m.logits[0, -1])
    assert got.shape == (50257,)


def test_generate_is_seeded(state):
    m, _ = state
    run = lambda seed, **kw: list(S.generate(S.Decoder(m), [50256], 8, np.random.default_rng(seed), **kw))
    assert run(1) == run(1)
    assert run(1, temperature=0) == run(2, temperature=0)
    assert len(set(map(tuple, (run(s) for s in range(4))))) > 1


# ------------------------------------------------------------------------------ the command

def test_sample_json_from_a_state_and_its_directories(state, capsys, monkeypatch):
    _, path = state
    code, out, err = run_cli(capsys, "--checkpoint", str(path), "--tokens", "50256,464", "-n", "6", "--json",
                             "--temperature", "0")
    assert code == 0, err
    r = json.loads(out)
    assert r["prompt_tokens"] == [50256, 464] and len(r["tokens"]) == r["n_tokens"] == 6
    assert r["kind"] == "state" and r["tokens_per_s"] > 0 and r["decode"] == "kv-cache"
    from gpt2gen.tokenizer import get_tokenizer
    assert r["text"] == get_tokenizer().decode(r["tokens"])
    # the run's directory and the runs' directory (`out`) find the same state; greedy is reproducible
    for where in (path.parent, path.parent.parent):
        code, out2, err = run_cli(capsys, "--checkpoint", str(where), "--tokens", "50256,464", "-n", "6", "--json",
                                  "--temperature", "0")
        assert code == 0, err
        assert json.loads(out2)["tokens"] == r["tokens"] and json.loads(out2)["checkpoint"] == str(path)


def test_sample_streams_text_and_reports_speed(state, capsys, monkeypatch):
    _, path = state
    code, out, err = run_cli(capsys, "--checkpoint", str(path), "--prompt", "ROMEO:", "-n", "5", "--seed", "3",
                             "--top-k", "50", "--top-p", "0.9")
    assert code == 0, err
    assert out.startswith("ROMEO:") and out.endswith("\n")
    assert "tokens/s" in err and "5 tokens in" in err
    code, js, _ = run_cli(capsys, "--checkpoint", str(path), "--prompt", "ROMEO:", "-n", "5", "--seed", "3",
                          "--top-k", "50", "--top-p", "0.9", "--json")
    r = json.loads(js)
    assert out == "ROMEO:" + r["text"] + "\n"          # what was streamed is the JSON's text
    assert r["prompt_tokens"][0] == 50256               # --prompt comes after <|endoftext|>


def test_streaming_holds_back_partial_utf8(state, capsys, monkeypatch):
    """Tokens that split a character (GPT-2 spells the emoji as two byte tokens) print whole, in the prompt
    and in what is generated."""
    _, path = state
    writes = []

    class Out:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass
    # the prompt ends inside the second emoji; the generated tokens finish it, then " 日" in three tokens
    monkeypatch.setattr(S, "generate", lambda *a, **k: iter([25081, 10545, 245, 98]))
    args = S.argparse.Namespace(checkpoint=str(path), model=None, prompt=None, tokens="8582,25081,8582", n_tokens=4,
                                temperature=1.0, top_k=None, top_p=1.0, seed=0, context=None, threads=None, json=False)
    S.run_sample(args, out=Out())
    text = "".join(writes)
    assert text == "🙂🙂 日\n" and "\ufffd" not in text
    assert "" in writes               # a token holding part of a character prints nothing until it is complete


def test_sample_from_llmc_and_hf(state, tmp_path, capsys):
    m, _ = state
    ck.save_llmc(m, tmp_path / "m.bin")
    from gpt2gen.export import save_hf
    save_hf(m, tmp_path / "hf")
    results = []
    for src in (tmp_path / "m.bin", tmp_path / "hf"):
        code, out, err = run_cli(capsys, "--checkpoint", str(src), "--tokens", "50256,464,3290", "-n", "4", "--json",
                                 "--temperature", "0", "--context", "16")
        assert code == 0, err
        results.append(json.loads(out))
    assert results[0]["kind"] == "llmc" and results[1]["kind"] == "hf"
    want = list(S.generate(S.Decoder(m), [50256, 464, 3290], 4, np.random.default_rng(0), temperature=0))
    assert results[0]["tokens"] == results[1]["tokens"] == want


def test_prompt_longer_than_the_window(state, capsys):
    _, path = state
    ids = ",".join(str(i) for i in range(300, 340))
    code, out, err = run_cli(capsys, "--checkpoint", str(path), "--tokens", ids, "-n", "2", "--temperature", "0")
    assert code == 0, err
    assert "the prompt has 40 tokens, more than the window of 32: the model sees its last 32" in err   # maxT
    code, out, err = run_cli(capsys, "--checkpoint", str(path), "--tokens", ids, "-n", "2", "--context", "32",
                             "--json")                     # the KV cache's window is maxT whatever the build's T
    assert code == 0, err
    assert json.loads(out)["window"] == 32


@pytest.mark.parametrize("argv,needle", [
    (["--temperature", "-1"], "argument --temperature: must be a finite number >= 0, got -1"),
    (["--temperature", "nan"], "argument --temperature: must be a finite number"),
    (["--top-k", "0"], "argument --top-k: must be a whole number >= 1, got 0"),
    (["--top-p", "0"], "argument --top-p: must be a finite number in (0, 1], got 0"),
    (["--top-p", "1.5"], "argument --top-p: must be a finite number in (0, 1], got 1.5"),
    (["-n", "0"], "argument -n/--n-tokens: must be a whole number >= 1, got 0"),
    (["--threads", "0"], "argument --threads: must be a whole number >= 1, got 0"),
    (["--prompt", "a", "--tokens", "1"], "not allowed with argument --prompt"),
])
def test_sample_option_errors(state, capsys, argv, needle):
    _, path = state
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", "--checkpoint", str(path), *argv])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_sample_input_errors(state, tmp_path, capsys):
    _, path = state

    def err(*argv):
        code, _, text = run_cli(capsys, *argv)
        assert code == 2 and text.startswith("gpt2gen: error: ") and "Traceback" not in text, text
        return text
    assert "--tokens: 'x' is not a token id" in err("--checkpoint", str(path), "--tokens", "1,x")
    assert "id 50257 is out of range for this model's vocabulary of 50257" in err("--checkpoint", str(path),
                                                                               "--tokens", "50257")
    assert "--context 64: longer than the model's maxT = 32" in err("--checkpoint", str(path), "--context", "64")
    assert "no such file or directory" in err("--checkpoint", str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    assert "a directory with no config.json and no training states" in err("--checkpoint", str(tmp_path / "empty"))
    small = gpt2gen.build("model.yaml", V=101, maxT=16, L=1, NH=2, C=16, B=1, T=8)
    sp = ck.save_state(tmp_path / "small" / "state_000001.safetensors", small, step=1)
    text = err("--checkpoint", str(sp), "--prompt", "hi")
    assert "vocabulary has 101 tokens, not GPT-2's 50257" in text and "--tokens" in text
    code, out, e2 = run_cli(capsys, "--checkpoint", str(sp), "--tokens", "1,2", "-n", "3")
    assert code == 0 and len(out.split()) == 5, (out, e2)       # ids are streamed where there is no tokenizer


def test_threads_option_and_environment(state, tmp_path):
    _, path = state
    env = {**os.environ, "PYTHONPATH": str(Path(gpt2gen.__file__).parent.parent)}
    base = [sys.executable, "-m", "gpt2gen.cli", "sample", "--checkpoint", str(path), "--tokens", "1", "-n", "2",
            "--json"]
    for extra, env_threads, want in (([], "1", 1), (["--threads", "2"], "1", 2), ([], "", None)):
        proc = subprocess.run(base + extra, capture_output=True, text=True, timeout=120,
                              env={**env, "GPT2GEN_THREADS": env_threads, "OMP_NUM_THREADS": "2"})
        assert proc.returncode == 0, proc.stderr
        got = json.loads(proc.stdout)["threads"]
        assert got == (want if want is not None else 2), (extra, env_threads, got)
    proc = subprocess.run(base, capture_output=True, text=True, timeout=120, env={**env, "GPT2GEN_THREADS": "many"})
    assert proc.returncode == 2 and "GPT2GEN_THREADS='many' must be a whole number >= 1" in proc.stderr


def test_set_threads_in_process(state):
    m, _ = state
    m.forward(np.array([[1, 2]], np.int32))          # the OpenMP runtime is loaded
    assert TH.loaded_openmp_runtimes()
    before = TH.current_threads()
    try:
        TH.set_threads(1)
        assert TH.current_threads() == 1
        TH.set_threads(3)
        assert TH.current_threads() == 3
    finally:
        TH.set_threads(before)
    with pytest.raises(TH.UsageError, match="--threads must be a whole number >= 1"):
        TH.set_threads(0)


def test_a_mixed_precision_state_samples_and_exports_its_fp32_weights(tmp_path, capsys):
    """A bf16 run's state is rebuilt in bf16 (its master weights loaded, the bf16 parameters their rounding);
    an export writes the fp32 master weights."""
    m = gpt2gen.build("model.yaml", seed=4, precision="bf16", **CFG)
    path = ck.save_state(tmp_path / "bf" / "state_000001.safetensors", m, step=1)
    code, out, err = run_cli(capsys, "--checkpoint", str(path), "--tokens", "50256", "-n", "3", "--json")
    assert code == 0, err
    assert len(json.loads(out)["tokens"]) == 3
    from gpt2gen import export as EX
    from gpt2gen import weights as W
    opened = W.open_checkpoint(path)
    assert opened.model.precision == "bf16"
    np.testing.assert_array_equal(opened.model.weights["fcw"], m.weights["fcw"])
    np.testing.assert_array_equal(EX.hf_tensors(opened.model)["transformer.h.0.mlp.c_fc.weight"], m.weights["fcw"][0].T)
