"""Input stage of MFMDiT: tokens = PE(x̄) + pos + (1+scale)·PE'(x) + shift after the two patch projections.

The context embedding PE'(x) and its modulation exist once per group (state) and broadcast over its particles.
"""
from __future__ import annotations

import torch

from .adaln import group_view


def input_stage_ref(h: torch.Tensor, pos: torch.Tensor, hc: torch.Tensor, shift: torch.Tensor,
                    scale: torch.Tensor) -> torch.Tensor:
    """h (R, L, D) embedded x̄; pos (L, D); hc (G, L, D) embedded context x; shift, scale (G, D) -> (R, L, D)."""
    g = hc.shape[0]
    ctx = hc * (1 + scale[:, None, :]) + shift[:, None, :]  # (G, L, D)
    out = group_view(h, g) + pos + ctx[:, None]
    return out.reshape(h.shape)
