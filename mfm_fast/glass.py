"""GLASS conditional drift from any teacher drift (METHOD §2.2) and the GLASS-rollout posterior sampler (baseline).

The conditional drift b̄_s(x̄; t, x) = E[I1 − Ī0 | Ī_s = x̄, I_t = x] of two noisy looks at the same I1 equals one
call of the unconditional teacher drift at a merged observation (t*, x*). Integrating it over s ∈ [0, 1] from
x̄ = ε gives posterior samples of p(x1 | x_t = x) at `steps` teacher calls each — the expensive baseline that a meta
flow map replaces with a single call.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ._checks import as_time, check_finite_scalar, check_positive_int, check_state, n_per_group
from .interpolant import bcast, time_grid


def glass_drift(teacher_drift: Callable, s, xbar: torch.Tensor, t, x: torch.Tensor) -> torch.Tensor:
    """b̄_s(x̄; t, x) in closed form from `teacher_drift(t, x) -> b_t(x)` (t a (B,) tensor).

    With D = t²(1−s)² + s²(1−t)², r = √D, q = (1−s)(1−t):
        t* = r/(r + q),   x* = [t(1−s)²·x + s(1−t)²·x̄]/(r(r + q)),
        b̄ = [x* − x̄ + (1−t*)·b_{t*}(x*)]/(1−s).
    The two terms are evaluated in forms that carry the factor (1 − s) explicitly, so the result is accurate up to
    s = 1 (where b̄ = b_1(x̄)) and at t = 1 (where b̄ = (x − x̄)/(1−s)); at t = 0 it is b_s(x̄) exactly.
    `s`, `t`: scalars or (B,); `xbar`, `x`: (B, *event) of one shape. Singular only at s = t = 1.
    """
    if not callable(teacher_drift):
        raise TypeError(f"teacher_drift must be callable (t, x) -> b_t(x), got {type(teacher_drift).__name__}")
    check_state("x", x)
    check_state("xbar", xbar, x.shape[1:], batch=x.shape[0])
    B = x.shape[0]
    s = as_time("s", s, B, x)
    t = as_time("t", t, B, x)
    tiny = torch.finfo(x.dtype).tiny
    # the context carries no information: t* = s, x* = x̄ (subnormal t too, whose O(t) effect is not representable)
    at0 = t < tiny
    one_m_s, one_m_t = 1 - s, 1 - t
    r = torch.hypot(t * one_m_s, s * one_m_t)  # √D without underflow for tiny s, t
    q = one_m_s * one_m_t
    rq = (r + q).clamp_min(tiny)
    den = torch.where(at0, torch.ones_like(r), (r * rq).clamp_min(tiny))
    t_star = torch.where(at0, s, r / rq)
    x_star = (bcast(t * one_m_s ** 2 / den, x) * x + bcast(s * one_m_t ** 2 / den, x) * xbar)
    x_star = torch.where(bcast(at0, x), xbar, x_star)
    b = teacher_drift(t_star, x_star)
    if not torch.is_tensor(b) or b.shape != x.shape:
        raise ValueError(f"teacher_drift must return a tensor of shape {tuple(x.shape)}, got "
                         f"{tuple(b.shape) if torch.is_tensor(b) else type(b).__name__}")
    # (x* − x̄)/(1−s) = t(1−s)·[x − t·x̄ − (1−t)·t·(1−s)·x̄/(r + s(1−t))]/(r(r + q)), and (1−t*)/(1−s) = (1−t)/(r + q)
    corr = t * one_m_s * one_m_t / (r + s * one_m_t).clamp_min(tiny)
    shift = bcast(t * one_m_s / den, x) * (x - bcast(t + corr, x) * xbar)
    out = shift + bcast(one_m_t / rq, x) * b
    return torch.where(bcast(at0, x), b, out)


def glass_posterior_sample(teacher_drift: Callable, t, x: torch.Tensor, n: int, steps: int = 32,
                           generator: Optional[torch.Generator] = None, noise: Optional[torch.Tensor] = None,
                           return_nfe: bool = False):
    """(B, n, *event) samples of p(x1 | x_t = x) by Euler-integrating dx̄/ds = b̄_s(x̄; t, x) from x̄ = ε at s = 0 to
    s = 1 in `steps` steps (one teacher call each on B·n rows). Differentiable in x.

    `noise` (B·n, *event) may be given instead of drawing ε. With return_nfe=True returns (samples, teacher calls).
    """
    check_state("x", x)
    check_positive_int("n", n)
    check_positive_int("steps", steps)
    B, event = x.shape[0], x.shape[1:]
    t = as_time("t", t, B, x)
    if noise is None:
        noise = torch.randn((B * n, *event), generator=generator, device=x.device, dtype=x.dtype)
    else:
        check_state("noise", noise, event, batch=B * n)
    tn, xn = t.repeat_interleave(n), x.repeat_interleave(n, dim=0)
    grid = time_grid(0.0, steps, x)
    xbar = noise
    for j in range(steps):
        xbar = xbar + (grid[j + 1] - grid[j]) * glass_drift(teacher_drift, grid[j], xbar, tn, xn)
    out = xbar.view(B, n, *event)
    return (out, steps) if return_nfe else out


def glass_value_and_grad(teacher_drift: Callable, reward: Callable, t, x: torch.Tensor, n_particles: int,
                         steps: int = 32, lam: float = 1.0, generator: Optional[torch.Generator] = None):
    """V̂_t(x) = logsumexp_i λ·r(x̂^i) − log N over N GLASS-rollout posterior samples, and ∇_x V̂ by autograd
    through the rollouts. Returns (V (B,), grad (B, *event)); `reward(x1) -> (B·N,)`."""
    check_state("x", x)
    N = check_positive_int("n_particles", n_particles)
    lam = check_finite_scalar("lam", lam)
    if not callable(reward):
        raise TypeError(f"reward must be callable x1 -> (n,), got {type(reward).__name__}")
    B = x.shape[0]
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        x1 = glass_posterior_sample(teacher_drift, t, xg, N, steps=steps, generator=generator)
        r = reward(x1.reshape(B * N, *x.shape[1:]))
        if not torch.is_tensor(r) or r.shape != (B * N,):
            raise ValueError(f"reward must return a tensor of shape ({B * N},), got "
                             f"{tuple(r.shape) if torch.is_tensor(r) else type(r).__name__}")
        if not bool(torch.isfinite(r).all()):
            raise ValueError("reward returned non-finite values")
        v = torch.logsumexp(lam * r.view(B, N).to(x.dtype), dim=1) - math.log(N)
        (grad,) = torch.autograd.grad(v.sum(), xg)
    return v.detach(), grad


class GlassFlowMap(torch.nn.Module):
    """A meta flow map by rollout, following the model protocol: X_{s,u}(x̄; t, x) integrates the GLASS conditional
    ODE dx̄/dr = b̄_r(x̄; t, x) of `teacher_drift` from r = s to r = u with `steps` Heun steps (2·steps teacher calls
    per row) on the grid `warped_grid(steps, warp)` of [s, u]. Pathwise and differentiable in x, so every estimator
    accepts it.

    With a Gaussian mixture's exact drift it is the exact meta flow map up to the integration error: the reference
    that separates an estimator's error from a learned model's. With a learned drift it is the model-exact
    posterior of that flow model, the target a learned MFM distils. On the diagonal (u = s) it returns b̄_s."""

    supports_particle_groups = True

    def __init__(self, teacher_drift: Callable, steps: int = 32, event_shape: Optional[tuple] = None,
                 warp: float = 2.0):
        super().__init__()
        if not callable(teacher_drift):
            raise TypeError(f"teacher_drift must be callable (t, x) -> b_t(x), got {type(teacher_drift).__name__}")
        self.teacher_drift = teacher_drift
        self.steps = check_positive_int("steps", steps)
        self.warp = _check_warp(warp)
        if event_shape is not None:
            self.event_shape = tuple(event_shape)

    def forward(self, s, u, xbar: torch.Tensor, t, x: torch.Tensor) -> torch.Tensor:
        check_state("x", x)
        check_state("xbar", xbar, x.shape[1:])
        G = x.shape[0]
        N = n_per_group("xbar", xbar.shape[0], G)
        s, u, t = (as_time(name, v, G, x).repeat_interleave(N) for name, v in (("s", s), ("u", u), ("t", t)))
        xr = x.repeat_interleave(N, dim=0) if N > 1 else x
        diag = u == s
        w = warped_grid(self.steps, self.warp, x)  # fractions of [s, u], finer towards u
        z = xbar
        for z in glass_heun(self.teacher_drift, xbar, t, xr, [s + wj * (u - s) for wj in w]):
            pass  # only the end point X_{s,u} is kept
        v = (z - xbar) / bcast(torch.where(diag, torch.ones_like(s), u - s), z)
        return torch.where(bcast(diag, z), glass_drift(self.teacher_drift, s, xbar, t, xr), v)


def glass_heun(teacher_drift: Callable, xbar: torch.Tensor, t: torch.Tensor, x: torch.Tensor, times):
    """Heun steps of the GLASS ODE dx̄/dr = b̄_r(x̄; t, x) from times[0] through times[1:] (each (B,)), yielding
    x̄ at every one of them (2 teacher calls per step)."""
    z = xbar
    for r0, r1 in zip(times[:-1], times[1:]):
        h = bcast(r1 - r0, z)
        k1 = glass_drift(teacher_drift, r0, z, t, x)
        k2 = glass_drift(teacher_drift, r1, z + h * k1, t, x)
        z = z + h / 2 * (k1 + k2)
        yield z


# ---------------------------------------------------------------------------------------------- rollout bank
def _check_warp(warp: float) -> float:
    warp = check_finite_scalar("warp", warp)
    if warp < 1:
        raise ValueError(f"warp must be at least 1, got {warp}")
    return warp


def warped_grid(steps: int, warp: float = 2.0, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """steps + 1 points 1 − (1 − k/steps)^warp of [0, 1] (warp = 1: uniform), in at least float32.

    The GLASS ODE stiffens as r → 1 when the context is informative: the posterior spread it contracts onto shrinks
    like (1−t)/t, so uniform steps that are ample at t = 0.5 leave a 4%-of-spread error at t = 0.95 (32 Heun steps).
    Quadratic warping spends the steps where the drift changes fastest; 32 warped steps reach 1% at t = 0.95 and
    0.2% at t = 0.05."""
    check_positive_int("steps", steps)
    _check_warp(warp)
    dtype = torch.float32 if like is None else torch.promote_types(like.dtype, torch.float32)
    device = None if like is None else like.device
    k = torch.linspace(0, 1, steps + 1, device=device, dtype=torch.float64)
    return (1 - (1 - k) ** warp).to(dtype)
