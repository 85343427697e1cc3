"""Llama 2, Mistral and Gemma from their YAML files against HuggingFace transformers.

Each case builds a ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``GemmaForCausalLM`` offline from a
small random config (eager attention), saves it with ``save_pretrained`` and imports it with
``gpt2gen.from_hf(directory, model="models/<arch>.yaml")``: the config symbols and weights come through
the YAML's ``huggingface`` mapping only. Cases cover multi-head, grouped-query and multi-query
attention, odd head counts, ``head_dim`` != hidden_size / heads (and a config.json without ``head_dim``),
sequences longer than Mistral's sliding window, and a padding token in the batch.

Checked: logits and loss (rtol 1e-4 / 1e-5), every parameter gradient (atol 1e-4 x the tensor's largest
|gradient|, rtol 1e-3: sums over B*T positions in another order), and the losses, gradients and weights over
5 AdamW steps against transformers in float64 (loss rtol 1e-4; weights within the error the gradient
tolerance propagates to through AdamW), as tests/test_model.py.
Last, each model trains from its YAML file's own init (the loss falls) and a second run repeats the
losses and weights bit for bit.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import gpt2gen
from gpt2gen.checkpoint import CheckpointError
from helpers import AdamWErrorBound, assert_close, scaled_atol

import transformers

ARCHS = {
    "llama2": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
}

# (arch, case): HF config fields, batch (B, T), and whether to drop head_dim from config.json
CASES = {
    ("llama2", "mha"): dict(hf=dict(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=4), B=2, T=11, drop_head_dim=True),
    ("llama2", "mqa-odd-heads"): dict(hf=dict(vocab_size=211, hidden_size=30, intermediate_size=44, num_hidden_layers=3,
                                              num_attention_heads=3, num_key_value_heads=1, pad_token_id=5,
                                              rope_theta=500.0), B=3, T=9),
    ("llama2", "gqa-head-dim"): dict(hf=dict(vocab_size=64, hidden_size=24, intermediate_size=36, num_hidden_layers=1,
                                             num_attention_heads=6, num_key_value_heads=2, head_dim=6,
                                             rms_norm_eps=1e-5), B=2, T=16),
    ("mistral", "window-4"): dict(hf=dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, sliding_window=4),
                                  B=2, T=13),
    ("mistral", "window-5-odd-heads"): dict(hf=dict(vocab_size=150, hidden_size=30, intermediate_size=40,
                                                    num_hidden_layers=3, num_attention_heads=5, num_key_value_heads=1,
                                                    head_dim=8, sliding_window=5, rope_theta=1e6), B=1, T=16),
    ("mistral", "window-longer-than-T"): dict(hf=dict(vocab_size=61, hidden_size=16, intermediate_size=24,
                                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                      sliding_window=16), B=3, T=9),
    ("gemma", "mqa-head-dim"): dict(hf=dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=1, head_dim=16), B=2, T=11),
    ("gemma", "mha-odd-heads"): dict(hf=dict(vocab_size=150, hidden_size=30, intermediate_size=40, num_hidden_layers=3,
                                             num_attention_heads=5, num_key_value_heads=5, head_dim=6), B=2, T=7),
    ("gemma", "gqa"): dict(hf=dict(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=6, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                                   rope_theta=100.0), B=2, T=12),
}
IDS = [f"{a}-{c}" for a, c in CASES]


def hf_and_ours(arch: str, case: str, directory, fuse: str = "all"):
    """A random HF model for the case, saved to ``directory`` and imported through the YAML mapping."""
    spec = CASES[(arch, case)]
    cfg_cls, model_cls = (getattr(transformers, n) for n in ARCHS[arch])
    torch.manual_seed(len(case))
    kw = dict(max_position_embeddings=32, initializer_range=0.1) | spec["hf"]
    hf = model_cls(cfg_cls(**kw, attn_implementation="eager")).eval()
    with torch.no_grad():     # non-trivial norm weights (HF starts them at 1, Gemma's at 0)
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (0.0 if arch == "gemma" else 1.0))
    hf.save_pretrained(directory)
    if spec.get("drop_head_dim"):     # older config.json files have no head_dim: the YAML's C / NH applies
        path = directory / "config.json"
        cfg = json.loads(path.read_text())
        del cfg["head_dim"]
        path.write_text(json.dumps(cfg))
    ours = gpt2gen.from_hf(directory, model=f"models/{arch}.yaml", target="cpu", fuse=fuse, B=spec["B"], T=spec["T"])
    return hf, ours


def batch(hf, ours, seed=0):
    B, T = ours.max_batch
    V = hf.config.vocab_size
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, V, (B, T)).astype(np.int32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    if hf.config.pad_token_id is not None:    # the padding token's embedding row gets no gradient from lookups
        idx[0, 1] = idx[-1, -2] = hf.config.pad_token_id
    return idx, targets


def hf_loss(hf, idx, targets):
    logits = hf(torch.from_numpy(idx).long()).logits
    V = logits.shape[-1]
    return logits, torch.nn.functional.cross_entropy(logits.reshape(-1, V), torch.from_numpy(targets).long().reshape(-1))


def hf_view(ours, tensors: dict, name: str) -> np.ndarray:
    """HF's tensor for our parameter ``name`` (per-layer ones stacked over layers), in our orientation."""
    hp = ours.spec.huggingface.parameters[name]
    if "{layer}" in hp.name:
        want = np.stack([tensors[hp.name.format(layer=l)] for l in range(int(ours.config["L"]))])
    else:
        want = tensors[hp.name]
    return np.swapaxes(want, -1, -2) if hp.transpose else want


def unpadded(got: np.ndarray, want: np.ndarray, what: str) -> np.ndarray:
    """Our tensor cut to HF's shape; rows past HF's vocabulary (our padding) must be exactly 0."""
    if got.shape == want.shape:
        return got
    assert got.shape[1:] == want.shape[1:] and got.shape[0] > want.shape[0], (what, got.shape, want.shape)
    assert not got[want.shape[0]:].any(), f"{what}: the padded vocabulary rows must stay 0"
    return got[:want.shape[0]]


UNFUSED = [next(k for k in CASES if k[0] == a) for a in ARCHS]     # one case of each architecture, unfused


@pytest.mark.parametrize("arch,case,fuse", [k + ("all",) for k in CASES] + [k + ("none",) for k in UNFUSED],
                         ids=IDS + [f"{a}-{c}-unfused" for a, c in UNFUSED])
def test_logits_loss_and_gradients_match_transformers(arch, case, fuse, tmp_path):
    """Fused builds (the classifier) for every case, unfused ones for one case of each architecture."""
    hf, ours = hf_and_ours(arch, case, tmp_path, fuse)
    assert bool(ours.program.fused) == (fuse == "all")
    cfg = hf.config
    assert (ours.config["V"], ours.config["C"], ours.config["L"]) == (cfg.vocab_size, cfg.hidden_size,
                                                                      cfg.num_hidden_layers)
    assert (ours.config["NH"], ours.config["NKV"], ours.config["HD"]) == (cfg.num_attention_heads,
                                                                          cfg.num_key_value_heads, cfg.head_dim)
    assert ours.config["theta"] == cfg.rope_parameters["rope_theta"] and ours.config["norm_eps"] == cfg.rms_norm_eps
    idx, targets = batch(hf, ours)
    logits, loss = hf_loss(hf, idx, targets)
    loss.backward()
    got = ours.forward(idx, targets)
    want = logits.detach().numpy()
    assert_close("logits vs transformers", ours.logits, want, rtol=1e-4, atol=scaled_atol(want, 1e-5))
    assert_close("loss vs transformers", got, loss.item(), rtol=1e-5)
    ours.zero_grad()
    ours.backward()
    grads = {k: v.grad.numpy() for k, v in hf.named_parameters()}
    for name in ours.params:
        want = hf_view(ours, grads, name)
        got_g = unpadded(ours.grads[name], want, f"grad {name}")
        assert_close(f"grad {name} vs transformers", got_g, want, rtol=1e-3, atol=scaled_atol(want, 1e-4))
    # flash-style attention: what is kept for the backward is one log-sum-exp per query, no T x T buffer
    Tm = int(ours.config["T"])
    assert ours.acts["attn_lse"].shape[-1] == Tm      # kept by the node `attn` (the target's kernel declares it)
    assert not [n for n, a in ours.acts.items() if a.ndim >= 2 and a.shape[-2:] == (Tm, Tm)]


@pytest.mark.parametrize("arch,case", [("llama2", "mqa-odd-heads"), ("mistral", "window-4"), ("gemma", "mqa-head-dim")],
                         ids=["llama2", "mistral", "gemma"])
def test_adamw_steps_match_transformers(arch, case, tmp_path):
    """5 AdamW steps against transformers in float64 (the exact trajectory), checked as in tests/test_model.py:
    losses rtol 1e-4, every step's gradients within 1e-4 x the largest |gradient|, weights within the bound
    that this gradient error propagates to through AdamW (helpers.AdamWErrorBound)."""
    hf, ours = hf_and_ours(arch, case, tmp_path)
    hf = hf.double()
    idx, targets = batch(hf, ours, seed=3)
    lr, betas, eps, wd, steps = 1e-2, (0.9, 0.95), 1e-8, 0.1, 5
    # one AdamW group per decay setting, as the YAML marks each parameter
    decay_of = {}
    for name, hp in ours.spec.huggingface.parameters.items():
        for l in range(int(ours.config["L"])) if "{layer}" in hp.name else [None]:
            decay_of[hp.name.format(layer=l) if l is not None else hp.name] = ours.spec.tensors[name].decay
    named = dict(hf.named_parameters())
    assert set(named) == set(decay_of), "every HF parameter is mapped, and nothing else"
    opt = torch.optim.AdamW([{"params": [p for n, p in named.items() if decay_of[n]], "weight_decay": wd},
                             {"params": [p for n, p in named.items() if not decay_of[n]], "weight_decay": 0.0}],
                            lr=lr, betas=betas, eps=eps)
    bound = AdamWErrorBound(lr, betas, eps, gamma=1e-4)

    def ours_view(values: dict) -> dict:
        """{our parameter: HF's tensor in our orientation} (padding rows of ours are checked to stay 0)."""
        return {name: hf_view(ours, values, name) for name in ours.params}

    ours_losses, hf_losses = [], []
    for step in range(1, steps + 1):
        ours_losses.append(ours.forward(idx, targets))
        ours.zero_grad()
        ours.backward()
        opt.zero_grad()
        _, loss = hf_loss(hf, idx, targets)
        loss.backward()
        hf_losses.append(loss.item())
        for name, want in ours_view({k: v.grad.numpy() for k, v in named.items()}).items():
            bound.check_grad(name, unpadded(ours.grads[name], want, f"grad {name}"), want)
        ours.update(lr, betas[0], betas[1], eps, wd, step)
        opt.step()
        bound.add_step(ours_view({k: opt.state[v]["exp_avg_sq"].numpy() for k, v in named.items()}))
    print(f"{arch} losses (gpt2gen):              ", np.round(ours_losses, 5))
    print(f"{arch} losses (transformers float64): ", np.round(hf_losses, 5))
    assert ours_losses[-1] < ours_losses[0] - 0.1, "training on one batch should drive the loss down"
    assert_close("loss curve vs transformers", ours_losses, hf_losses, rtol=1e-4)
    for name, want in ours_view({k: v.detach().numpy() for k, v in named.items()}).items():
        bound.check_weight(name, unpadded(ours.params[name], want, f"weight {name}"), want)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_trains_from_its_yaml_and_repeats_exactly(arch):
    """From the file's own init: the loss falls over AdamW steps, and a second run repeats it bit for bit."""
    cfg = dict(V=120, L=2, C=32, NH=4, NKV=2, maxT=16, B=2, T=16) | ({"window": 5} if arch == "mistral" else {})
    rng = np.random.default_rng(7)
    idx = rng.integers(0, cfg["V"], (2, 16)).astype(np.int32)
    targets = np.roll(idx, -1, axis=1)
    runs = []
    for _ in range(2):
        model = gpt2gen.build(f"models/{arch}.yaml", seed=1, **cfg)
        losses = []
        for step in range(1, 16):
            losses.append(model.forward(idx, targets))
            model.zero_grad()
            model.backward()
            model.update(3e-3, 0.9, 0.95, 1e-8, 0.1, step)
        runs.append((losses, model.arenas["params"].copy()))
    print(f"{arch} losses:", np.round(runs[0][0], 4))
    assert runs[0][0][-1] < runs[0][0][0] - 0.5
    assert runs[0][0] == runs[1][0] and np.array_equal(runs[0][1], runs[1][1]), "training must be deterministic"


# ---- what a model file cannot represent is refused, not imported as a different model ---------------------

SMALL = dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1)


def save_hf(arch: str, directory, **fields):
    cfg_cls, model_cls = (getattr(transformers, n) for n in ARCHS[arch])
    torch.manual_seed(0)
    getattr(transformers, model_cls.__name__)(cfg_cls(**{**SMALL, **fields})).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("arch,fields,word", [
    ("llama2", dict(attention_bias=True), "attention_bias = true"),
    ("llama2", dict(mlp_bias=True), "mlp_bias = true"),
    ("llama2", dict(hidden_act="gelu"), "hidden_act = 'gelu'"),
    ("llama2", dict(tie_word_embeddings=True), "tie_word_embeddings = true"),
    ("llama2", dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
     "rope_parameters.rope_type = 'linear'"),
    ("gemma", dict(tie_word_embeddings=False), "tie_word_embeddings = false"),
])
def test_unrepresentable_configs_are_refused(arch, fields, word, tmp_path):
    save_hf(arch, tmp_path, **fields)
    with pytest.raises(CheckpointError, match="cannot represent") as info:
        gpt2gen.from_hf(tmp_path, model=f"models/{arch}.yaml")
    assert word in str(info.value)


def test_unmapped_checkpoint_tensors_are_refused(tmp_path):
    from safetensors.numpy import load_file, save_file
    save_hf("llama2", tmp_path)
    path = next(tmp_path.glob("*.safetensors"))
    tensors = load_file(str(path))
    tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones(8, np.float32)   # a weight we have no place for
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="does not map: model.layers.0.self_attn.q_norm"):
        gpt2gen.from_hf(tmp_path, model="models/llama2.yaml")


def test_mistral_without_a_sliding_window(tmp_path):
    """config.json's `"sliding_window": null` means full causal attention (window 0), as transformers runs it."""
    save_hf("mistral", tmp_path, sliding_window=None)
    assert json.loads((tmp_path / "config.json").read_text())["sliding_window"] is None
    ours = gpt2gen.from_hf(tmp_path, model="models/mistral.yaml", B=1, T=12)
    assert ours.config["window"] == 0
    hf = transformers.MistralForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    idx = np.random.default_rng(0).integers(0, 50, (1, 12)).astype(np.int32)
    ours.forward(idx)
    want = hf(torch.from_numpy(idx).long()).logits.detach().numpy()
    assert_close("logits (no window)", ours.logits, want, rtol=1e-4, atol=scaled_atol(want, 1e-5))
