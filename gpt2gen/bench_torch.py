"""The PyTorch side of ``gpt2gen bench``: the same model as an ordinary ``nn.Module``.

These are the modules a PyTorch user writes (per-layer ``nn.Module`` blocks in a ``ModuleList``, as nanoGPT
and llm.c's ``train_gpt2.py`` do, ``F.scaled_dot_product_attention``, ``torch.optim.AdamW``), not the test
reference of ``tests/reference.py`` (which indexes stacked parameters). Two families cover the shipped
model files, and their details are read off the model file's graph, so a user's variant of either is
benchmarked as written:

- GPT-2: learned positions, LayerNorm, fused qkv with biases, tanh-GELU MLP, head tied to the embedding;
- Llama 2 / Mistral / Gemma: RMSNorm (Gemma's 1 + w), RoPE, grouped-query attention with an optional
  sliding window, SwiGLU or GeGLU, tied or untied head, an optional embedding scale.

Weights are loaded from gpt2gen's parameter arrays (``{name: array}``, per-layer ones stacked (L, ...)), so
both sides train from the same numbers.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import spec as _spec
from .bench import torch_traits as traits


# ---- GPT-2, as nanoGPT writes it ----------------------------------------------------------------------

class GPT2Attention(nn.Module):
    def __init__(self, C: int, NH: int):
        super().__init__()
        self.NH = NH
        self.c_attn = nn.Linear(C, 3 * C)
        self.c_proj = nn.Linear(C, C)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.NH, C // self.NH).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class GPT2Block(nn.Module):
    def __init__(self, C: int, NH: int, FF: int, eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(C, eps=eps)
        self.attn = GPT2Attention(C, NH)
        self.ln_2 = nn.LayerNorm(C, eps=eps)
        self.c_fc = nn.Linear(C, FF)
        self.c_proj = nn.Linear(FF, C)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2(nn.Module):
    def __init__(self, config: dict[str, Any], tr: dict[str, Any]):
        super().__init__()
        C, L, NH = int(config["C"]), int(config["L"]), int(config["NH"])
        FF = int(config.get("FF", 4 * C))
        self.V = int(config["V"])
        self.wte = nn.Embedding(int(config["Vp"]), C)
        self.wpe = nn.Embedding(int(config["maxT"]), C)
        self.h = nn.ModuleList(GPT2Block(C, NH, FF, tr["eps"]) for _ in range(L))
        self.ln_f = nn.LayerNorm(C, eps=tr["eps"])

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.h:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)[..., :self.V]
        return F.cross_entropy(logits.reshape(-1, self.V), targets.reshape(-1))

    def load(self, p: dict[str, np.ndarray]) -> dict[str, bool]:
        """Copy gpt2gen's parameters in; returns {torch parameter name: weight decay?}."""
        sources = {"wte.weight": p["wte"], "wpe.weight": p["wpe"], "ln_f.weight": p["lnfw"], "ln_f.bias": p["lnfb"]}
        per_layer = {"ln_1.weight": "ln1w", "ln_1.bias": "ln1b", "attn.c_attn.weight": "qkvw",
                     "attn.c_attn.bias": "qkvb", "attn.c_proj.weight": "attprojw", "attn.c_proj.bias": "attprojb",
                     "ln_2.weight": "ln2w", "ln_2.bias": "ln2b", "c_fc.weight": "fcw", "c_fc.bias": "fcb",
                     "c_proj.weight": "fcprojw", "c_proj.bias": "fcprojb"}
        for l in range(len(self.h)):
            for k, ours in per_layer.items():
                sources[f"h.{l}.{k}"] = p[ours][l]
        return _copy_in(self, sources)


# ---- Llama 2 / Mistral / Gemma ------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, C: int, eps: float, offset: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(C))
        self.eps, self.offset = eps, offset

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (self.weight + self.offset)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class LlamaAttention(nn.Module):
    def __init__(self, C: int, NH: int, NKV: int, HD: int):
        super().__init__()
        self.NH, self.NKV, self.HD = NH, NKV, HD
        self.q_proj = nn.Linear(C, NH * HD, bias=False)
        self.k_proj = nn.Linear(C, NKV * HD, bias=False)
        self.v_proj = nn.Linear(C, NKV * HD, bias=False)
        self.o_proj = nn.Linear(NH * HD, C, bias=False)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.NH, self.HD).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.NKV, self.HD).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.NKV, self.HD).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if self.NKV != self.NH:
            k = k.repeat_interleave(self.NH // self.NKV, dim=1)
            v = v.repeat_interleave(self.NH // self.NKV, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.NH * self.HD))


class LlamaBlock(nn.Module):
    def __init__(self, C: int, NH: int, NKV: int, HD: int, FF: int, tr: dict[str, Any]):
        super().__init__()
        self.input_layernorm = RMSNorm(C, tr["eps"], tr["offset"])
        self.self_attn = LlamaAttention(C, NH, NKV, HD)
        self.post_attention_layernorm = RMSNorm(C, tr["eps"], tr["offset"])
        self.gate_proj = nn.Linear(C, FF, bias=False)
        self.up_proj = nn.Linear(C, FF, bias=False)
        self.down_proj = nn.Linear(FF, C, bias=False)
        self.act = F.silu if tr["act"] == "silu" else (lambda t: F.gelu(t, approximate="tanh"))

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(self.act(self.gate_proj(h)) * self.up_proj(h))


class Llama(nn.Module):
    def __init__(self, config: dict[str, Any], tr: dict[str, Any]):
        super().__init__()
        C, L, NH = int(config["C"]), int(config["L"]), int(config["NH"])
        NKV, HD, FF = int(config.get("NKV", NH)), int(config.get("HD", C // NH)), int(config["FF"])
        self.V, self.tr, self.HD = int(config["V"]), tr, HD
        self.embed_tokens = nn.Embedding(int(config["Vp"]), C)
        self.layers = nn.ModuleList(LlamaBlock(C, NH, NKV, HD, FF, tr) for _ in range(L))
        self.norm = RMSNorm(C, tr["eps"], tr["offset"])
        self.lm_head = None if tr["head"] == "wte" else nn.Linear(C, int(config["Vp"]), bias=False)

    def forward(self, idx, targets):
        T = idx.shape[1]
        pos = torch.arange(T, dtype=torch.float32, device=idx.device)
        inv = self.tr["theta"] ** (-torch.arange(0, self.HD, 2, dtype=torch.float32) / self.HD)
        ang = torch.outer(pos, inv)
        cos, sin = torch.cat((ang.cos(), ang.cos()), -1), torch.cat((ang.sin(), ang.sin()), -1)
        mask = None
        if self.tr["window"] > 0 and self.tr["window"] < T:
            t = torch.arange(T)
            mask = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - self.tr["window"])
        x = self.embed_tokens(idx) * self.tr["scale"]
        for block in self.layers:
            x = block(x, cos, sin, mask)
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(self.norm(x), w)[..., :self.V]
        return F.cross_entropy(logits.reshape(-1, self.V), targets.reshape(-1))

    def load(self, p: dict[str, np.ndarray]) -> dict[str, bool]:
        sources = {"embed_tokens.weight": p["wte"], "norm.weight": p["lnfw"]}
        if self.lm_head is not None:
            sources["lm_head.weight"] = p[self.tr["head"]]
        per_layer = {"input_layernorm.weight": "ln1w", "self_attn.q_proj.weight": "qw",
                     "self_attn.k_proj.weight": "kw", "self_attn.v_proj.weight": "vw",
                     "self_attn.o_proj.weight": "attprojw", "post_attention_layernorm.weight": "ln2w",
                     "gate_proj.weight": "gatew", "up_proj.weight": "upw", "down_proj.weight": "downw"}
        for l in range(len(self.layers)):
            for k, ours in per_layer.items():
                sources[f"layers.{l}.{k}"] = p[ours][l]
        return _copy_in(self, sources)


def _copy_in(module: nn.Module, sources: dict[str, np.ndarray]) -> dict[str, bool]:
    named = dict(module.named_parameters())
    missing = set(named) ^ set(sources)
    if missing:
        raise ValueError(f"the PyTorch module and the model file's parameters differ: {sorted(missing)[:6]}")
    with torch.no_grad():
        for k, t in named.items():
            t.copy_(torch.from_numpy(np.ascontiguousarray(sources[k])))
    # matrices decay, norms and biases do not (as nanoGPT groups them; the choice does not change the timing)
    return {k: t.dim() >= 2 for k, t in named.items()}


def make_module(spec: _spec.ModelSpec, config: dict[str, Any]) -> nn.Module:
    tr = traits(spec, config)
    return GPT2(config, tr) if tr["family"] == "gpt2" else Llama(config, tr)


def adamw(module: nn.Module, decay: dict[str, bool], lr: float, wd: float, fused: bool) -> torch.optim.AdamW:
    named = dict(module.named_parameters())
    groups = [{"params": [named[k] for k in named if decay[k]], "weight_decay": wd},
              {"params": [named[k] for k in named if not decay[k]], "weight_decay": 0.0}]
    kw = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, **kw)


def flops_note() -> str:
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, " \
           f"CPU capability {torch.backends.cpu.get_cpu_capability()}"

