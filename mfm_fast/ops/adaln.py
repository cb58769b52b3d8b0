"""LayerNorm (no affine, eps 1e-6) followed by adaLN modulation x·(1+scale) + shift.

Modulation rows are per *group*: x has R = G·N rows (N particles share one conditioning), shift/scale have G rows
and broadcast over the N particles and all tokens without materialised copies.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def group_view(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(R, L, D) -> (G, N, L, D) view."""
    return x.view(groups, x.shape[0] // groups, *x.shape[1:])


def ln_modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x (R, L, D); shift, scale (G, D) with R = G·N -> LN(x)·(1+scale) + shift, shape (R, L, D).

    Statistics in fp32 whatever x's dtype; the result has x's dtype.
    """
    g = shift.shape[0]
    xn = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    y = group_view(xn, g) * (1 + scale.float()[:, None, None, :]) + shift.float()[:, None, None, :]
    return y.reshape(x.shape).to(x.dtype)
