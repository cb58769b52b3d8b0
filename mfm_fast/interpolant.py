"""Linear interpolant I_t = (1-t)·I0 + t·I1 (t = 0 noise, t = 1 data) and the drift ↔ denoiser ↔ score maps."""
from __future__ import annotations

import torch


def bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) matching like's rank; rows of like may be a multiple of B (particle groups)."""
    t = t.reshape(t.shape[0], *([1] * (like.dim() - 1)))
    if like.shape[0] != t.shape[0]:
        t = t.repeat_interleave(like.shape[0] // t.shape[0], dim=0)
    return t


def interpolate(t: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """I_t = (1 - t)·x0 + t·x1."""
    t = bcast(t, x1)
    return (1 - t) * x0 + t * x1


def target_velocity(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """d/dt I_t = x1 - x0, the flow-matching regression target."""
    return x1 - x0


def denoiser_from_drift(t: torch.Tensor, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Tweedie: E[I1 | I_t = x] = x + (1 - t)·b_t(x)."""
    return x + (1 - bcast(t, x)) * b


def drift_from_denoiser(t: torch.Tensor, x: torch.Tensor, x1_hat: torch.Tensor) -> torch.Tensor:
    """b_t(x) = (E[I1|x] - x)/(1 - t)  (undefined at t = 1)."""
    return (x1_hat - x) / (1 - bcast(t, x))


def score_from_drift(t: torch.Tensor, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """∇log p_t(x) = (t·b_t(x) - x)/(1 - t)."""
    tb = bcast(t, x)
    return (tb * b - x) / (1 - tb)


def drift_from_score(t: torch.Tensor, x: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Inverse of score_from_drift: b = ((1 - t)·score + x)/t  (undefined at t = 0)."""
    tb = bcast(t, x)
    return ((1 - tb) * score + x) / tb


def noise_from_drift(t: torch.Tensor, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """E[I0 | I_t = x] = x - t·b_t(x)."""
    return x - bcast(t, x) * b


def time_grid(t_start: float, steps: int, like: torch.Tensor) -> torch.Tensor:
    """linspace(t_start, 1, steps + 1) on like's device, in at least float32: in bf16, 251 points of [0.01, 1] hold
    only 229 distinct values (zero and doubled steps), so the grid keeps fp32 whatever the state's dtype."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    return torch.linspace(t_start, 1, steps + 1, device=like.device, dtype=dtype)


def merged_observation(s: torch.Tensor, xbar: torch.Tensor, t: torch.Tensor, x: torch.Tensor):
    """(t*, x*): the single interpolant observation I_{t*} = x* of I1 that carries what Ī_s = x̄ and I_t = x carry
    together (two looks at one I1 with independent noises; METHOD §2.2). Precisions add,
    t*/(1−t*) = √(s²/(1−s)² + t²/(1−t)²), computed as t* = r/(r + q) with r = √(t²(1−s)² + s²(1−t)²),
    q = (1−s)(1−t), and x* = [t(1−s)²·x + s(1−t)²·x̄]/(r(r + q)). s, t: (B,); x̄ may hold N·B rows (particle
    groups). t = 0 gives (s, x̄) (also at s = 0, the limit s → 0); s = 0 < t gives (t, x)."""
    tiny = torch.finfo(x.dtype).tiny
    one_m_s, one_m_t = 1 - s, 1 - t
    # √(a² + b² + tiny) rather than hypot: hypot's derivative is NaN at (0, 0), and the ESD loss differentiates
    # through s (jvp) where s = t = 0 can occur; the tiny term shifts r only when both s, t < 1e-19
    r = ((t * one_m_s) ** 2 + (s * one_m_t) ** 2 + tiny).sqrt()
    rq = r + one_m_s * one_m_t
    t_star = r / rq.clamp_min(tiny)
    den = (r * rq).clamp_min(tiny)
    if xbar.shape[0] != x.shape[0]:
        x = x.repeat_interleave(xbar.shape[0] // x.shape[0], dim=0)
    x_star = bcast(t * one_m_s ** 2 / den, xbar) * x + bcast(s * one_m_t ** 2 / den, xbar) * xbar
    at0 = t < tiny  # the context carries nothing: exactly (s, x̄), with the derivatives of that (no 0/0 at s = 0)
    return torch.where(at0, s, t_star), torch.where(bcast(at0, xbar), xbar, x_star)
