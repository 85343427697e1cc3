"""Parity with HuggingFace transformers' GPT2LMHeadModel given the same weights.

The weights go from a randomly initialised GPT2LMHeadModel (built offline from a small config) into
the generated model by hand here, using the names and layouts of transformers' GPT-2 (Conv1D weights
are [in, out], so they are transposed); checked: logits and loss (rtol 1e-4) and every gradient
(atol 1e-4 x the tensor's largest |gradient|).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gpt2gen
from helpers import assert_close, scaled_atol

import transformers

CONV1D = {"qkvw": "attn.c_attn.weight", "attprojw": "attn.c_proj.weight", "fcw": "mlp.c_fc.weight",
          "fcprojw": "mlp.c_proj.weight"}
PLAIN = {"ln1w": "ln_1.weight", "ln1b": "ln_1.bias", "qkvb": "attn.c_attn.bias", "attprojb": "attn.c_proj.bias",
         "ln2w": "ln_2.weight", "ln2b": "ln_2.bias", "fcb": "mlp.c_fc.bias", "fcprojb": "mlp.c_proj.bias"}


def hf_tensor(sd, ours: str, layer: int | None = None):
    if ours in CONV1D:
        return sd[f"transformer.h.{layer}.{CONV1D[ours]}"].T
    if ours in PLAIN:
        return sd[f"transformer.h.{layer}.{PLAIN[ours]}"]
    return sd[{"wte": "transformer.wte.weight", "wpe": "transformer.wpe.weight", "lnfw": "transformer.ln_f.weight",
               "lnfb": "transformer.ln_f.bias"}[ours]]


@pytest.mark.parametrize("n_layer,n_head,n_embd,vocab", [(2, 4, 32, 211), (3, 3, 27, 128)])
def test_gpt2lmheadmodel_parity(n_layer, n_head, n_embd, vocab):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=16, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.config._attn_implementation = "eager"
    model = gpt2gen.build("model.yaml", V=vocab, maxT=16, L=n_layer, NH=n_head, C=n_embd, B=2, T=11)
    sd = {k: v.detach() for k, v in hf.state_dict().items()}
    for name, view in model.params.items():
        if name in CONV1D or name in PLAIN:
            view[...] = np.stack([hf_tensor(sd, name, l).numpy() for l in range(n_layer)])
        else:
            src = hf_tensor(sd, name).numpy()
            view[...] = 0.0
            view[:src.shape[0]] = src       # the padded vocabulary rows stay 0
    rng = np.random.default_rng(1)
    idx = rng.integers(0, vocab, (2, 11)).astype(np.int32)
    targets = np.roll(idx, -1, axis=1)
    targets[:, -1] = rng.integers(0, vocab, 2)
    out = hf(torch.from_numpy(idx).long())
    loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, vocab), torch.from_numpy(targets).long().reshape(-1))
    loss.backward()
    got = model.forward(idx, targets)
    assert_close("logits vs transformers", model.logits, out.logits.detach().numpy(), rtol=1e-4,
                 atol=scaled_atol(out.logits.detach().numpy(), 1e-5))
    assert_close("loss vs transformers", got, loss.item(), rtol=1e-5)
    model.zero_grad()
    model.backward()
    grads = {k: v.grad for k, v in hf.named_parameters()}
    for name in model.params:
        if name in CONV1D or name in PLAIN:
            want = np.stack([hf_tensor(grads, name, l).numpy() for l in range(n_layer)])
            got_g = model.grads[name]
        else:
            want = hf_tensor(grads, name).numpy()
            got_g = model.grads[name][:want.shape[0]]
        assert_close(f"grad {name} vs transformers", got_g, want, rtol=1e-3, atol=scaled_atol(want, 1e-4))


def test_from_hf_follows_layer_norm_epsilon_and_n_inner(tmp_path):
    """config.json values that change the computation reach it: a checkpoint with layer_norm_epsilon 0.1 and
    an MLP width other than 4 * n_embd imports through model.yaml's mapping alone and matches transformers
    (with eps 1e-5 its logits would differ by ~0.8 here). Same tolerance as the parity test above."""
    torch.manual_seed(3)
    cfg = transformers.GPT2Config(vocab_size=96, n_positions=16, n_layer=2, n_head=2, n_embd=16, n_inner=40,
                                  layer_norm_epsilon=0.1, bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():    # LayerNorm inputs of small variance, where eps matters
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("wte.weight") or name.endswith("wpe.weight"):
                p.mul_(10.0)
    hf.save_pretrained(tmp_path)
    model = gpt2gen.from_hf(tmp_path, B=2, T=9)
    assert model.config["norm_eps"] == 0.1 and model.config["FF"] == 40
    idx = np.random.default_rng(4).integers(0, 96, (2, 9)).astype(np.int32)
    model.forward(idx)
    with torch.no_grad():
        want = hf(torch.from_numpy(idx).long()).logits.numpy()
    assert_close("logits vs transformers (eps 0.1, n_inner 40)", model.logits, want, rtol=1e-4,
                 atol=scaled_atol(want, 1e-5))


def test_from_hf_keys_it_ignores_change_nothing(tmp_path):
    """A checkpoint whose config.json carries what older transformers wrote (transformers 4's full dict,
    gradient_checkpointing, output_past, GPT-2's n_special and predict_special_tokens) imports, and computes
    what transformers computes from the same directory: the keys the model file ignores change nothing."""
    import json

    from test_checkpoint import PRETRAINED_CONFIG_4
    torch.manual_seed(5)
    cfg = transformers.GPT2Config(vocab_size=96, n_positions=16, n_layer=2, n_head=2, n_embd=16, n_inner=40,
                                  layer_norm_epsilon=0.1, bos_token_id=0, eos_token_id=0)   # the build above
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    legacy = {k: v for k, v in PRETRAINED_CONFIG_4.items() if not k.startswith("_") and k not in saved}
    path.write_text(json.dumps({**legacy, **saved, "n_special": 0, "predict_special_tokens": True,
                                "use_cache": True, "architectures": ["GPT2LMHeadModel"]}))
    model = gpt2gen.from_hf(tmp_path, B=2, T=9)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = np.random.default_rng(6).integers(0, 96, (2, 9)).astype(np.int32)
    model.forward(idx)
    with torch.no_grad():
        want = hf(torch.from_numpy(idx).long()).logits.numpy()
    assert_close("logits vs transformers (legacy config keys)", model.logits, want, rtol=1e-4,
                 atol=scaled_atol(want, 1e-5))
