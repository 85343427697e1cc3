"""Precision: which storage dtype each kind of buffer gets, as a build option.

A ``Policy`` maps every buffer role of a program (``gpt2gen.program.ROLES``) to a storage dtype. In
``fp32`` everything is float32. ``bf16`` and ``fp16`` follow llm.c's mixed-precision scheme: parameters,
activations and their gradients are stored in 16 bits, while the fp32 master weights, the AdamW moments,
what ops keep for their backward (normalisation statistics, log-sum-exps), the losses and every
reduction stay in fp32. Arithmetic is fp32 throughout; only storage narrows. fp16 also needs dynamic
loss scaling (its range is small), which a target that offers fp16 must implement.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    name: str            # "f32" | "bf16" | "f16" | "i32"
    itemsize: int
    code: int            # the ABI's tensor-table code (gpt2gen_abi.h)

    @property
    def numpy(self) -> np.dtype:
        if self.name == "bf16":
            import ml_dtypes
            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype({"f32": np.float32, "f16": np.float16, "i32": np.int32}[self.name])


DTYPES = {d.name: d for d in (DType("f32", 4, 0), DType("bf16", 2, 1), DType("f16", 2, 2), DType("i32", 4, 3))}


@dataclass(frozen=True)
class Policy:
    name: str                        # "fp32" | "bf16" | "fp16"
    storage: str                     # parameters, activations and their gradients
    master: bool                     # fp32 master weights beside 16-bit parameters
    loss_scaling: bool = False       # dynamic loss scaling (fp16)

    def dtype(self, role: str) -> str:
        """The storage dtype of a buffer of ``role``."""
        if role in ("param", "grad", "act", "scratch", "act_grad"):
            return self.storage
        if role == "input":
            return "i32"
        return "f32"                 # master, moment, saved, loss (and its gradient)


POLICIES = {p.name: p for p in (Policy("fp32", "f32", False), Policy("bf16", "bf16", True),
                                Policy("fp16", "f16", True, loss_scaling=True))}


def policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown precision `{name}`; the precisions are {', '.join(POLICIES)}")
    return POLICIES[name]
