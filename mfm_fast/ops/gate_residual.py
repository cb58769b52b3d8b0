"""Gated residual x + gate·branch, optionally fused with the next LayerNorm→modulate (two outputs)."""
from __future__ import annotations

import torch

from .adaln import group_view, ln_modulate_ref


def gate_residual_ref(x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x, branch (R, L, D); gate (G, D) broadcast over the N = R/G rows of a group and over tokens."""
    g = gate.shape[0]
    out = group_view(x, g) + gate[:, None, None, :] * group_view(branch, g)
    return out.reshape(x.shape)


def gate_residual_ln_modulate_ref(x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                                  scale: torch.Tensor, eps: float = 1e-6):
    """Returns (x_new, y): x_new = x + gate·branch (next residual stream), y = LN(x_new)·(1+scale) + shift."""
    x_new = gate_residual_ref(x, branch, gate)
    return x_new, ln_modulate_ref(x_new, shift, scale, eps)
