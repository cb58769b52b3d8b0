"""MFMMLP: a Meta Flow Map for vector data (GMM experiments, tests).

v_{s,u}(x̄; t, x) = MLP([x̄, x, φ(s), φ(u), φ(t)]) with Fourier time features φ. Context rows may be shared by
particle groups (xbar has N·B rows for B context rows).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .._checks import as_time, check_state, n_per_group


def fourier_features(t: torch.Tensor, n_freq: int) -> torch.Tensor:
    """(B,) -> (B, 2·n_freq + 1): [t, sin(π 2^k t), cos(π 2^k t)] — frequencies suited to t ∈ [0, 1]."""
    freqs = math.pi * 2.0 ** torch.arange(n_freq, device=t.device, dtype=t.dtype)
    a = t[:, None] * freqs
    return torch.cat([t[:, None], torch.sin(a), torch.cos(a)], dim=-1)


class MFMMLP(nn.Module):
    supports_particle_groups = True

    def __init__(self, dim: int, hidden: int = 256, depth: int = 4, n_freq: int = 6):
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"dim, hidden and depth must be positive, got {dim}, {hidden}, {depth}")
        self.dim, self.hidden, self.depth, self.n_freq = dim, hidden, depth, n_freq
        tf = 2 * n_freq + 1
        self.inp = nn.Linear(2 * dim + 3 * tf, hidden)
        self.layers = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(depth - 1)])
        self.out = nn.Linear(hidden, dim)
        self.act = nn.SiLU()

    @property
    def event_shape(self) -> tuple:
        return (self.dim,)

    def forward(self, s, u, xbar, t, x, **cond):
        if cond:
            raise TypeError(f"MFMMLP takes no conditioning, got {sorted(cond)}")
        check_state("xbar", xbar, (self.dim,))
        check_state("x", x, (self.dim,))
        G = x.shape[0]
        N = n_per_group("xbar", xbar.shape[0], G)
        s, u, t = (as_time(n, v, G, x) for n, v in (("s", s), ("u", u), ("t", t)))
        ctx = torch.cat([x, fourier_features(s, self.n_freq), fourier_features(u, self.n_freq),
                         fourier_features(t, self.n_freq)], dim=-1)  # (G, ·)
        if N > 1:
            ctx = ctx.repeat_interleave(N, dim=0)
        h = self.act(self.inp(torch.cat([xbar, ctx], dim=-1)))
        for layer in self.layers:
            h = h + self.act(layer(h))  # residual: stable for deeper nets at small budgets
        return self.out(h)

    def config_dict(self) -> dict:
        return {"dim": self.dim, "hidden": self.hidden, "depth": self.depth, "n_freq": self.n_freq}
