"""The decode program (a KV cache derived from the model file) against the full forward pass and transformers.

Every shipped architecture, tiny configs (tests/test_export.py's CASES: GPT-2's position table, Llama's RoPE and
grouped-query attention, Mistral's sliding window of 4 positions, so that its ring cache of 4 rows wraps many
times, Gemma's multi-query attention). A sequence of maxT tokens is decoded as a prompt chunk, single tokens,
another chunk and single tokens to the end; each call's logits must equal the full forward's at the same
positions, the reference being the same weights built with T = maxT (the decode chunks are at most the
build's T, which is smaller, so positions beyond one chunk are exercised).

Tolerance (fp32): the two paths differ only in summation order (attention over the cache instead of the whole
row; GEMMs over 1 or a few rows instead of T), so the bound of tests/test_export.py applies: S * gamma_K *
max|logit| (S = 2 + 4 L chained reductions of at most K terms each, gamma_K = K u / (1 - K u), u = 2^-24).
bf16: both paths round the same fp32 values to bf16 at the same points, but a different fp32 summation can put
a value on the other side of a rounding boundary: one bf16 ulp (2^-8 relative) at that element, which the rest
of the network carries on at most amplified by the layers' gains; the bound used is 2^-8 * S * max|logit|.
"""
from __future__ import annotations

import numpy as np
import pytest

import gpt2gen
from gpt2gen import export as EX
from gpt2gen import sample as S

from test_export import CASES, U, random_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _bound(m, want: np.ndarray, precision: str) -> float:
    cfg = m.config
    K = max(int(cfg["C"]), int(cfg.get("FF", 4 * cfg["C"])), int(cfg["maxT"]))
    chain = 2 + 4 * int(cfg["L"])
    rel = chain * (K * U / (1 - K * U)) if precision == "fp32" else chain * 2.0 ** -8
    return rel * float(np.abs(want).max())


def _schedule(n: int, chunk: int) -> list[tuple[int, int]]:
    """(start, length) of each decode call over n positions: a prompt chunk, 3 single tokens, a full chunk,
    then single tokens to the end."""
    out, p = [], 0
    for size in [min(5, chunk), 1, 1, 1, chunk]:
        if p < n:
            out.append((p, min(size, n - p)))
            p += out[-1][1]
    out += [(q, 1) for q in range(p, n)]
    return out


def _reference(arch: str, m, precision: str = "fp32"):
    """The same weights built for one sequence of maxT tokens (the full forward's reference)."""
    path, cfg = CASES[arch]
    full = gpt2gen.build(path, seed=None, precision=precision, **(cfg | dict(B=1, T=int(m.config["maxT"]))))
    for name, view in m.params.items():
        full.params[name][...] = view
    return full


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", list(CASES))
def test_decode_logits_equal_the_full_forward_at_every_position(arch, precision):
    m = random_model(arch)
    if precision != "fp32":
        path, cfg = CASES[arch]
        w = m.params
        m = gpt2gen.build(path, seed=None, precision=precision, **cfg)
        for name, view in w.items():
            m.params[name][...] = view
    n = int(m.config["maxT"])
    assert m.decode_positions == n and n > m.max_batch[1]
    idx = np.random.default_rng(3).integers(0, int(m.config["V"]), (1, n)).astype(np.int32)
    full = _reference(arch, m, precision)
    full.forward(idx)
    want = np.array(full.logits[0], dtype=np.float64)
    atol = _bound(m, want, precision)
    worst = (0.0, None)
    for start, length in _schedule(n, m.max_batch[1]):
        got = m.decode(idx[0, start:start + length], start).astype(np.float64)
        assert got.shape == (length, want.shape[1])
        err = np.abs(got - want[start:start + length])
        at = np.unravel_index(int(np.argmax(err)), err.shape)
        if err[at] > worst[0]:
            worst = (float(err[at]), (start + int(at[0]), int(at[1])), float(got[at]), float(want[start + at[0], at[1]]))
    print(f"{arch} {precision}: worst |decode - forward| {worst[0]:.3g} at (position, column) {worst[1]} "
          f"(decode {worst[2] if worst[1] else 0:.6g}, forward {worst[3] if worst[1] else 0:.6g}); tolerance {atol:.3g}")
    assert worst[0] <= atol, f"{arch} {precision}: decode differs from the forward by {worst[0]:.3g} > {atol:.3g}"


def test_the_cache_holds_what_the_kernels_keep_and_only_that():
    m = random_model("mistral")          # window 4: the cache is a ring of 4 positions per kv head
    _, cfg = CASES["mistral"]
    assert {k: v.shape for k, v in m.cache.items()} == {}      # allocated at the first decode
    m.decode(np.array([1, 2, 3], np.int32), 0)
    L, K, D = cfg["L"], cfg["NKV"], cfg["C"] // cfg["NH"]
    shapes = {k: v.shape for k, v in m.cache.items()}
    assert shapes == {"attn_k_cache": (L, K, cfg["window"], D), "attn_v_cache": (L, K, cfg["window"], D)}, shapes
    g = random_model("gpt2")
    g.decode(np.array([1], np.int32), 0)
    _, gcfg = CASES["gpt2"]
    assert g.cache["attn_k_cache"].shape == (gcfg["L"], gcfg["NH"], gcfg["maxT"], gcfg["C"] // gcfg["NH"])


def test_decode_refuses_what_it_cannot_do():
    m = random_model("gpt2")
    n = m.decode_positions
    with pytest.raises(ValueError, match="outside the KV cache"):
        m.decode(np.array([1, 2], np.int32), n - 1)
    with pytest.raises(ValueError, match="1-D"):
        m.decode(np.array([[1, 2]], np.int32), 0)
    with pytest.raises(ValueError, match="out of range"):
        m.decode(np.array([10**6], np.int32), 0)
    with pytest.raises(ValueError, match="outside the build-time maxima"):
        m.decode(np.zeros(m.max_batch[1] + 1, np.int32), 0)
    with pytest.raises(RuntimeError, match="targets"):
        m.backward()                     # the decode had no targets: nothing to differentiate


@pytest.mark.parametrize("arch", list(CASES))
def test_greedy_decoding_equals_transformers_generate(arch, tmp_path):
    m = random_model(arch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(EX.save_hf(m, tmp_path / "hf"),
                                                           attn_implementation="eager").eval()
    V, n = int(m.config["V"]), int(m.config["maxT"])
    prompt = [int(t) for t in np.random.default_rng(11).integers(0, V, 4)]
    new = n - len(prompt)                 # to the end of the cache: Mistral's ring wraps
    dec = S.make_decoder(m)
    assert isinstance(dec, S.CachedDecoder) and dec.window == n
    ours = list(S.generate(dec, prompt, new, np.random.default_rng(0), temperature=0))
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          pad_token_id=0)
    theirs = out[0, len(prompt):].tolist()
    assert dec.positions == n - 1         # the prompt once, then one position per token (the last is not run)
    assert ours == theirs, f"{arch}: first difference at new token {next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)}"


def test_cached_decoder_follows_any_sequence_and_restarts_when_full():
    m = random_model("gpt2")
    dec = S.CachedDecoder(m)
    full = S.Decoder(_reference("gpt2", m))
    n = dec.window
    seq = [int(t) for t in np.random.default_rng(5).integers(0, int(m.config["V"]), n + 6)]
    for k in (3, 4, 5, 2, 3, n, n + 1, n + 6):    # continuations, a step back (starts over), past the window
        got = dec.next_logits(seq[:k])
        ctx = seq[:k][dec.start:]                  # what the cache holds
        want = full.next_logits(ctx)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    assert dec.start == n + 1 - n // 2          # restarted at k = n + 1 from the last half window
