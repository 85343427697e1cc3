"""A plain PyTorch GPT-2 over llm.c-named parameters, the reference the generated model must match."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def params_to_torch(params: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(np.array(v), dtype=torch.float32, requires_grad=True) for k, v in params.items()}


def gpt2_forward(p: dict[str, torch.Tensor], idx: np.ndarray, config: dict, targets: np.ndarray | None = None):
    """Returns (logits (B,T,Vp), mean loss or None); the loss is over the first V columns."""
    B, T = idx.shape
    C, NH, L, V = config["C"], config["NH"], config["L"], config["V"]
    idx_t = torch.from_numpy(np.asarray(idx)).long()
    x = p["wte"][idx_t] + p["wpe"][:T]
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    for l in range(L):
        h = F.layer_norm(x, (C,), p["ln1w"][l], p["ln1b"][l], 1e-5)
        qkv = h @ p["qkvw"][l].T + p["qkvb"][l]
        q, k, v = (t.reshape(B, T, NH, C // NH).transpose(1, 2) for t in qkv.split(C, dim=2))
        att = ((q @ k.transpose(-2, -1)) / np.sqrt(C // NH)).masked_fill(mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + y @ p["attprojw"][l].T + p["attprojb"][l]
        h = F.layer_norm(x, (C,), p["ln2w"][l], p["ln2b"][l], 1e-5)
        h = F.gelu(h @ p["fcw"][l].T + p["fcb"][l], approximate="tanh")
        x = x + h @ p["fcprojw"][l].T + p["fcprojb"][l]
    x = F.layer_norm(x, (C,), p["lnfw"], p["lnfb"], 1e-5)
    logits = x @ p["wte"].T
    loss = None
    if targets is not None:
        loss = F.cross_entropy(logits[..., :V].reshape(-1, V), torch.from_numpy(np.asarray(targets)).long().reshape(-1))
    return logits, loss


def adamw(p: dict[str, torch.Tensor], decay: dict[str, bool], lr, betas, eps, weight_decay) -> torch.optim.AdamW:
    groups = [{"params": [t for k, t in p.items() if decay[k]], "weight_decay": weight_decay},
              {"params": [t for k, t in p.items() if not decay[k]], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
