"""Multi-time embedding: sinusoidal features of K time inputs, each through its own Linear→SiLU→Linear MLP.

Reference path only in this file's `_ref`; the fused Triton path shares the signature.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t·f_i), sin(t·f_i)] with f_i = max_period^(-i/half), computed in fp32 (cos first; t used as given)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def time_embed_ref(times: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                   max_period: float = 10000.0) -> torch.Tensor:
    """times (G, K); w1 (K, D, F); b1 (K, D); w2 (K, D, D); b2 (K, D) -> (G, K, D).

    Embedder k maps times[:, k] through features(F) -> Linear(w1[k], b1[k]) -> SiLU -> Linear(w2[k], b2[k]).
    """
    feats = timestep_features(times, w1.shape[-1], max_period).to(w1.dtype)  # (G, K, F)
    h = F.silu(torch.einsum("gkf,kdf->gkd", feats, w1) + b1)  # (G, K, D)
    return torch.einsum("gkd,ked->gke", h, w2) + b2
