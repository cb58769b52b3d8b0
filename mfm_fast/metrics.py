"""Sample-based distances between point clouds (METHOD §6): sliced Wasserstein-2 and multi-bandwidth RBF MMD²."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ._checks import check_positive_int

# Default MMD bandwidths, as multiples of the median pairwise distance of the pooled samples.
MMD_BANDWIDTH_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


def _pair(x: torch.Tensor, y: torch.Tensor, min_rows: int = 1):
    for name, v in (("x", x), ("y", y)):
        if not torch.is_tensor(v) or not v.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor")
        if v.dim() < 2:
            raise ValueError(f"{name} must have shape (n, *event), got {tuple(v.shape)}")
        if v.shape[0] < min_rows:
            raise ValueError(f"{name} needs at least {min_rows} samples, got {v.shape[0]}")
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(f"x and y must share their event shape, got {tuple(x.shape[1:])} and {tuple(y.shape[1:])}")
    if x.device != y.device:
        raise ValueError(f"x is on {x.device} but y is on {y.device}")
    dtype = torch.promote_types(x.dtype, y.dtype)
    return x.flatten(1).to(dtype), y.flatten(1).to(dtype)


def _quantiles(sorted_vals: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of the empirical quantile function; sorted_vals (n, P), levels (M,) -> (M, P)."""
    n = sorted_vals.shape[0]
    pos = (levels * n - 0.5).clamp(0, n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    frac = (pos - lo.to(pos.dtype))[:, None]
    return sorted_vals[lo] * (1 - frac) + sorted_vals[hi] * frac


def sliced_w2(x: torch.Tensor, y: torch.Tensor, n_projections: int = 256,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sliced Wasserstein-2 distance (not squared): √(E_θ W2²(θᵀx, θᵀy)) over θ uniform on the unit sphere.

    Equal sample sizes pair sorted projections; otherwise both empirical quantile functions are interpolated at
    max(n, m) mid-point levels. x (n, *event), y (m, *event); returns a 0-dim tensor.
    """
    check_positive_int("n_projections", n_projections)
    x, y = _pair(x, y)
    theta = torch.randn((x.shape[1], n_projections), generator=generator, device=x.device, dtype=x.dtype)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = (x @ theta).sort(dim=0)
    py, _ = (y @ theta).sort(dim=0)
    if px.shape[0] != py.shape[0]:
        M = max(px.shape[0], py.shape[0])
        levels = (torch.arange(M, device=x.device, dtype=x.dtype) + 0.5) / M
        px, py = _quantiles(px, levels), _quantiles(py, levels)
    return (px - py).pow(2).mean().sqrt()


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise squared distances through one matmul (cdist is several times slower on CPU)."""
    return (a.pow(2).sum(-1)[:, None] + b.pow(2).sum(-1)[None] - 2 * a @ b.T).clamp_min(0)


def _median_distance(x: torch.Tensor, y: torch.Tensor, max_points: int = 1024) -> torch.Tensor:
    # a subsample of the pooled points is enough for the median and keeps this O(max_points²)
    pool = torch.cat([x[: max_points // 2], y[: max_points // 2]])
    d2 = _sq_dists(pool, pool)
    iu = torch.triu_indices(pool.shape[0], pool.shape[0], offset=1, device=pool.device)
    return d2[iu[0], iu[1]].median().sqrt()


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidths: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Unbiased MMD² with the kernel Σ_h exp(−‖a − b‖²/(2h²)) summed over bandwidths h.

    Default bandwidths: the median pairwise distance of the pooled samples (≤ 1024 of them) times
    MMD_BANDWIDTH_FACTORS = (0.25, 0.5, 1, 2, 4). The estimate is unbiased, so it can be negative when the two
    laws are equal. x (n, *event), y (m, *event) with n, m ≥ 2; returns a 0-dim tensor.
    """
    x, y = _pair(x, y, min_rows=2)
    if bandwidths is None:
        med = _median_distance(x, y).clamp_min(torch.finfo(x.dtype).eps)
        hs = [float(med) * f for f in MMD_BANDWIDTH_FACTORS]
    else:
        hs = [float(h) for h in bandwidths]
        if not hs or any(not h > 0 for h in hs):
            raise ValueError(f"bandwidths must be a non-empty list of positive numbers, got {bandwidths!r}")
    n, m = x.shape[0], y.shape[0]
    dxx, dyy, dxy = _sq_dists(x, x), _sq_dists(y, y), _sq_dists(x, y)
    total = x.new_zeros(())
    for h in hs:
        g = -0.5 / h ** 2
        kxx, kyy = (dxx * g).exp(), (dyy * g).exp()
        kxx = kxx.sum() - kxx.diagonal().sum()  # the unbiased estimate leaves out the pairs (a, a)
        kyy = kyy.sum() - kyy.diagonal().sum()
        kxy = (dxy * g).exp().sum()
        total = total + kxx / (n * (n - 1)) + kyy / (m * (m - 1)) - 2 * kxy / (n * m)
    return total


def noise_floor(sampler: Callable[[int], torch.Tensor], metric: Callable, n: int, repeats: int = 5) -> torch.Tensor:
    """(repeats,) values of metric(a, b) for two independent draws of n samples from `sampler(n)`: the level a
    metric reaches between two samples of the same law, against which a model's score is read."""
    check_positive_int("n", n)
    check_positive_int("repeats", repeats)
    return torch.stack([torch.as_tensor(metric(sampler(n), sampler(n))) for _ in range(repeats)])
