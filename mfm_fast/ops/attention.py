"""Attention for MFMDiT: softmax(q kᵀ/√d) v, no mask.

`attention_ref` is the explicit-softmax spec (supports every autograd transform, incl. torch.func.jvp).
"""
from __future__ import annotations

import math

import torch


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v (R, H, L, Dh) -> (R, H, L, Dh); statistics in fp32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = torch.einsum("rhld,rhmd->rhlm", q.float(), k.float()) * scale
    return torch.einsum("rhlm,rhmd->rhld", logits.softmax(-1), v.float()).to(q.dtype)
