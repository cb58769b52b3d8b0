"""MFMMLP: a Meta Flow Map for vector data (GMM experiments, tests).

Plain (sigma_data=None): v_{s,u}(x̄; t, x) = MLP([x̄, x, φ(s), φ(u), φ(t)]) with Fourier time features φ.

Preconditioned (sigma_data=σ): v = v_gauss + κ(t)·MLP(normalised inputs), where v_gauss is the exact average
velocity of the meta flow map for data N(0, σ²I) and κ(t) that data's posterior std. It plays the part of EDM's
c_skip/c_out: the posterior p(x1 | x_t) shrinks to a point as t → 1, with spread ≈ (1−t)/t, so a network that
outputs x1 in absolute units would need ever finer precision. Here the network only learns the departure from the
Gaussian answer, in units of the posterior spread, from inputs of unit scale at every (s, t) (soft-clipped, so
that far outside the data the model is the Gaussian one):
    μ(t, x) = tσ²x / c(t),  κ(t)² = σ²(1−t)² / c(t),  c(t) = t²σ² + (1−t)²     (Gaussian posterior N(μ, κ²I))
    γ_s² = (1−s)² + s²κ²                                (inner marginal N(sμ, γ_s²I) of x̄_s)
    X^gauss_{s,u}(x̄) = uμ + (γ_u/γ_s)(x̄ − sμ),  v_gauss = μ + [(γ_u − γ_s)/(u−s)]·(x̄ − sμ)/γ_s,
with (γ_u − γ_s)/(u − s) = [(u+s−2) + (u+s)κ²]/(γ_u + γ_s): exact on the diagonal u = s, no cancellation.
At t = 0 (x = 0) it is the flow map of N(0, σ²I) itself. Context rows may be shared by particle groups (xbar has
N·B rows for B context rows).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from .._checks import as_time, check_dtype, check_state, n_per_group
from ..interpolant import merged_observation


def fourier_features(t: torch.Tensor, n_freq: int) -> torch.Tensor:
    """(B,) -> (B, 2·n_freq + 1): [t, sin(π 2^k t), cos(π 2^k t)] — frequencies suited to t ∈ [0, 1]."""
    freqs = math.pi * 2.0 ** torch.arange(n_freq, device=t.device, dtype=t.dtype)
    a = t[:, None] * freqs
    return torch.cat([t[:, None], torch.sin(a), torch.cos(a)], dim=-1)


INPUT_BOUND = 4.0  # preconditioned inputs are soft-clipped to about ±4 standard deviations


def soft_clip(v: torch.Tensor, bound: float = INPUT_BOUND) -> torch.Tensor:
    """v/√(1 + (v/bound)²): the identity near 0, saturating at ±bound. Far outside the data (steering can throw a
    state there) the network's term then stops growing and its input-gradient vanishes, so the model falls back
    on the Gaussian base instead of extrapolating a slope that feeds back into the value gradient."""
    return v * torch.rsqrt(1 + (v / bound) ** 2)


def marginal_var(sigma: float, t: torch.Tensor) -> torch.Tensor:
    """c(t) = t²σ² + (1−t)²: the per-coordinate variance of I_t for N(0, σ²I) data (the unit-scale divisor)."""
    return t * t * sigma * sigma + (1 - t) ** 2


def gaussian_meta_flow(sigma: float, s: torch.Tensor, u: torch.Tensor, t: torch.Tensor, x: torch.Tensor):
    """Terms of the exact meta flow map of N(0, σ²I) data, per context row (G,).

    Returns (μ (G, d), κ (G,), γ_s (G,), dγ (G,)) with dγ = (γ_u − γ_s)/(u − s), so that
    v_gauss = μ + dγ·(x̄ − sμ)/γ_s."""
    var = sigma * sigma
    c = marginal_var(sigma, t)
    mu = (t * var / c)[:, None] * x
    kappa2 = var * (1 - t) ** 2 / c
    tiny = torch.finfo(x.dtype).tiny  # γ vanishes only for a point-mass posterior (t = 1) at s = 1
    g_s = ((1 - s) ** 2 + s * s * kappa2).sqrt().clamp_min(tiny)
    g_u = ((1 - u) ** 2 + u * u * kappa2).sqrt()
    dg = ((u + s - 2) + (u + s) * kappa2) / (g_u + g_s)
    return mu, kappa2.sqrt(), g_s, dg


class MFMMLP(nn.Module):
    supports_particle_groups = True

    def __init__(self, dim: int, hidden: int = 256, depth: int = 4, n_freq: int = 6,
                 sigma_data: Optional[float] = None, glass_features: bool = False):
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"dim, hidden and depth must be positive, got {dim}, {hidden}, {depth}")
        if n_freq < 0:
            raise ValueError(f"n_freq must be non-negative, got {n_freq}")
        if sigma_data is not None and not (math.isfinite(sigma_data) and sigma_data > 0):
            raise ValueError(f"sigma_data must be a positive finite number or None, got {sigma_data}")
        self.dim, self.hidden, self.depth, self.n_freq = dim, hidden, depth, n_freq
        self.sigma_data = None if sigma_data is None else float(sigma_data)
        self.glass_features = bool(glass_features)
        tf = 2 * n_freq + 1
        self.inp = nn.Linear(2 * dim + 3 * tf + (dim + tf if glass_features else 0), hidden)
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
        weights = self.out.weight.dtype  # the Linear layers would fail with torch's "mat1 and mat2" dtype error
        check_dtype("xbar", xbar, weights)
        check_dtype("x", x, weights)
        G = x.shape[0]
        N = n_per_group("xbar", xbar.shape[0], G)
        s, u, t = (as_time(n, v, G, x) for n, v in (("s", s), ("u", u), ("t", t)))

        def rows(a):  # per-context quantity -> one row per particle
            return a.repeat_interleave(N, dim=0) if N > 1 else a

        if self.sigma_data is None:
            x_in, xbar_in = x, xbar
        else:
            mu, kappa, g_s, dg = gaussian_meta_flow(self.sigma_data, s, u, t, x)
            z = (xbar - rows(s[:, None] * mu)) / rows(g_s[:, None])  # x̄ − sμ in units of its Gaussian std
            x_in = soft_clip(x / marginal_var(self.sigma_data, t).sqrt()[:, None])  # x_t at unit scale
            xbar_in = soft_clip(z)
        ctx = torch.cat([x_in, fourier_features(s, self.n_freq), fourier_features(u, self.n_freq),
                         fourier_features(t, self.n_freq)], dim=-1)  # (G, ·)
        feats = [xbar_in, rows(ctx)]
        if self.glass_features:
            feats += self._glass_features(rows(s), xbar, rows(t), x)
        h = self.act(self.inp(torch.cat(feats, dim=-1)))
        for layer in self.layers:
            h = h + self.act(layer(h))  # residual: stable for deeper nets at small budgets
        out = self.out(h)
        if self.sigma_data is None:
            return out
        return rows(mu) + rows(dg[:, None]) * z + rows(kappa[:, None]) * out

    def error_scale(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) the scale κ(t) of the network's output term (the posterior std of N(0, σ²I) data), floored at
        1e-2·σ so that t → 1 keeps finite loss weights; for `mfm_loss(output_units=True)`."""
        if self.sigma_data is None:
            raise ValueError("error_scale needs a preconditioned MFMMLP (sigma_data)")
        kappa = self.sigma_data * (1 - t) / marginal_var(self.sigma_data, t).sqrt()  # κ of gaussian_meta_flow
        return kappa.clamp_min(1e-2 * self.sigma_data)

    def _glass_features(self, s, xbar, t, x) -> list:
        # (s, x̄) and (t, x) observe the same I1: their merged observation (t*, x*) is what the conditional drift
        # b̄_s(x̄; t, x) depends on through the unconditional drift, b̄ = [x* − x̄ + (1−t*)·b_{t*}(x*)]/(1−s).
        # s, t: one row per particle (as xbar)
        t_star, x_star = merged_observation(s, xbar, t, x)
        sigma = 1.0 if self.sigma_data is None else self.sigma_data
        x_star = x_star / marginal_var(sigma, t_star).sqrt()[:, None]
        if self.sigma_data is not None:
            x_star = soft_clip(x_star)
        return [x_star, fourier_features(t_star, self.n_freq)]

    def config_dict(self) -> dict:
        cfg = {"dim": self.dim, "hidden": self.hidden, "depth": self.depth, "n_freq": self.n_freq}
        if self.sigma_data is not None:
            cfg["sigma_data"] = self.sigma_data
        if self.glass_features:
            cfg["glass_features"] = True
        return cfg
