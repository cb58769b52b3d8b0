"""Meta-Flow-Map training losses (METHOD §2.1–2.3) on any model following the protocol
`model(s, u, xbar, t, x, **cond) -> v_{s,u}(xbar; t, x)`.

Every loss returns `(loss, logs)`: `loss` a differentiable scalar, `logs` a dict of detached 0-dim tensors (kept
on the device so that a training step needs no host sync; call `.item()` when logging).

All randomness (context time t, inner times, noises, label dropout) comes from a `Draws` record. Passing the
same `Draws` makes a loss deterministic, and slicing one `Draws` drawn for a global batch gives each data-parallel
rank its share of exactly the randomness a single process would use.

Coupled interpolants share the data point I1 (METHOD §2.1):
    x = I_t = (1-t)·I0 + t·I1   (context; x = 0 where t = 0, as at sampling time)
    x̄ = Ī_s = (1-s)·Ī0 + s·I1  (transported state),   I0, Ī0 ~ N(0, I) independent.
Targets are stop-gradient. Adaptive weighting: ℓ = sg(w)·‖Δ‖², w = (‖Δ‖² + c)^(-p), with ‖Δ‖² the per-sample MEAN
of squares over the event dimensions (so c means the same for every data size), or with reduce="sum" their SUM
(the release's `adaptive_loss`). An optional learned log-variance u per sample (`LossWeighting`, the release's
LossWeightingNetwork) turns a term into sg(w)·‖Δ‖²·e^(−u) + u.

Model guidance (the release's `loss.model_guidance`): `draw(guidance_ws=...)` gives every row a guidance weight w
(the `cfg` conditioning of a DiT, one of its guidance-table rows), 1 where the label was dropped. Targets from a
teacher then come from the teacher's classifier-free-guided drift at w; targets from data get the release's
correction (1 − 1/w)·(v_{s,s}(y, w) − v_{s,s}(∅, 1)) from the model itself (stop-gradient).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch.func import jvp

from ._checks import check_finite_scalar, check_positive_int, check_state
from .glass import glass_drift, glass_heun, warped_grid
from .interpolant import bcast, interpolate

CONSISTENCY = ("meanflow", "lsd", "esd", "semigroup", "none")
DIAGONAL = ("data", "distill")
REDUCE = ("mean", "sum")


@dataclass
class Times:
    """Per-sample times, each (B,): context t; diagonal s_diag; sorted consistency pair s ≤ u; γ and w = s+γ(u−s)."""

    t: torch.Tensor
    s_diag: torch.Tensor
    s: torch.Tensor
    u: torch.Tensor
    gamma: torch.Tensor

    @property
    def w(self) -> torch.Tensor:
        return self.s + self.gamma * (self.u - self.s)

    def __getitem__(self, idx) -> "Times":
        return Times(*(getattr(self, f.name)[idx] for f in fields(self)))


@dataclass
class Draws:
    """All the randomness of one loss evaluation for B samples; index it to take rows."""

    times: Times
    noise: torch.Tensor  # I0 (B, *event), context noise
    noise_bar: torch.Tensor  # Ī0 (B, *event), transported-state noise
    drop_label: torch.Tensor  # (B,) bool, label replaced by the null class
    # Ī0 of the consistency term when every row trains both terms (`mfm_loss(paired=True)`, the release's layout)
    noise_cons: Optional[torch.Tensor] = None
    cfg: Optional[torch.Tensor] = None  # (B,) model-guidance weight of the diagonal term (1: unguided)
    cfg_cons: Optional[torch.Tensor] = None  # (B,) ... of the consistency term (drawn separately, as the release)

    def __getitem__(self, idx) -> "Draws":
        return Draws(self.times[idx], self.noise[idx], self.noise_bar[idx], self.drop_label[idx],
                     *(None if a is None else a[idx] for a in (self.noise_cons, self.cfg, self.cfg_cons)))

    def __len__(self) -> int:
        return self.noise.shape[0]

    def to(self, device=None, dtype=None) -> "Draws":
        t = self.times
        mv = lambda a: None if a is None else a.to(device, dtype)  # noqa: E731
        return Draws(Times(*(getattr(t, f.name).to(device, dtype) for f in fields(t))),
                     self.noise.to(device, dtype), self.noise_bar.to(device, dtype), self.drop_label.to(device),
                     mv(self.noise_cons), mv(self.cfg), mv(self.cfg_cons))


def sample_times(batch: int, generator: Optional[torch.Generator] = None, device=None, dtype=torch.float32,
                 t_zero_prob: float = 0.1, gamma: Optional[float] = None, t_power: float = 2.0) -> Times:
    """Context t = U^t_power (default U², as the release; 1: uniform) with probability 1 − t_zero_prob, else exactly
    0 (the uninformative context); diagonal s ~ U[0, 1]; consistency pair (s, u) = sorted(U, U'); γ ~ U[0, 1], or
    the constant `gamma` (½ = shortcut)."""
    check_positive_int("batch", batch)
    check_finite_scalar("t_power", t_power)
    if t_power <= 0:
        raise ValueError(f"t_power must be positive, got {t_power}")
    if not 0.0 <= t_zero_prob <= 1.0:
        raise ValueError(f"t_zero_prob must lie in [0, 1], got {t_zero_prob}")
    if gamma is not None and not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1] or be None, got {gamma}")
    r = torch.rand((6, batch), generator=generator, device=device, dtype=dtype)
    t = torch.where(r[0] < t_zero_prob, torch.zeros_like(r[1]), r[1] ** t_power)
    s, u = torch.minimum(r[3], r[4]), torch.maximum(r[3], r[4])
    g = r[5] if gamma is None else torch.full_like(r[5], float(gamma))
    return Times(t=t, s_diag=r[2], s=s, u=u, gamma=g)


def guidance_weights(drop: torch.Tensor, ws: Sequence[float], base_prob: float = 0.0,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B,) model-guidance weights as the release draws them (`generate_cfg_values`): one of `ws` uniformly, 1 with
    probability base_prob (the unguided row keeps being trained), and 1 wherever the label was dropped."""
    if not 0.0 <= base_prob <= 1.0:
        raise ValueError(f"guidance_base_prob must lie in [0, 1], got {base_prob}")
    if not len(ws):
        raise ValueError("guidance weights: ws must hold at least one weight")
    B = drop.shape[0]
    idx = torch.randint(0, len(ws), (B,), generator=generator, device=drop.device)
    w = torch.tensor([float(v) for v in ws], dtype=torch.float32, device=drop.device)[idx]
    base = torch.rand((B,), generator=generator, device=drop.device) < base_prob
    return torch.where(base | drop, torch.ones_like(w), w)


def draw(batch: int, event_shape, generator: Optional[torch.Generator] = None, device=None, dtype=torch.float32,
         t_zero_prob: float = 0.1, gamma: Optional[float] = None, p_uncond: float = 0.0,
         t_power: float = 2.0, paired: bool = False, guidance_ws: Sequence[float] = (),
         guidance_base_prob: float = 0.0) -> Draws:
    """Draw the randomness of a loss on `batch` samples of shape `event_shape` (times, I0, Ī0, label dropout).

    paired: also Ī0 of the consistency term (`mfm_loss(paired=True)`). guidance_ws: model-guidance weights of the
    diagonal and of the consistency term (`guidance_weights`, twice). Both are drawn after everything else, so the
    other draws do not depend on them."""
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must lie in [0, 1], got {p_uncond}")
    times = sample_times(batch, generator, device, dtype, t_zero_prob, gamma, t_power)
    noise = torch.randn((2, batch, *event_shape), generator=generator, device=device, dtype=dtype)
    drop = torch.rand((batch,), generator=generator, device=device) < p_uncond
    noise_cons = torch.randn((batch, *event_shape), generator=generator, device=device, dtype=dtype) if paired \
        else None
    cfg = cfg_cons = None
    if guidance_ws:
        cfg = guidance_weights(drop, guidance_ws, guidance_base_prob, generator).to(dtype)
        cfg_cons = guidance_weights(drop, guidance_ws, guidance_base_prob, generator).to(dtype)
    return Draws(times, noise[0], noise[1], drop, noise_cons, cfg, cfg_cons)


# ---------------------------------------------------------------------------------------------- helpers
def _sq(delta: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    sq = delta.to(torch.promote_types(delta.dtype, torch.float32)).pow(2).flatten(1)
    return sq.mean(1) if reduce == "mean" else sq.sum(1)  # (B,)


def weighted_mse(delta: torch.Tensor, adaptive_p: Optional[float] = None, c: float = 0.01,
                 scale: Optional[torch.Tensor] = None, reduce: str = "mean",
                 log_weight: Optional[torch.Tensor] = None):
    """mean_b sg(w_b)·‖Δ_b‖², w_b = (‖Δ_b‖² + c)^(-p) (p = None: plain MSE). Returns (loss, unweighted MSE).

    ‖Δ_b‖²: the mean of squares over sample b's elements, or with reduce="sum" their sum (the release).
    scale (B,): measure Δ_b in units of scale_b (the model's output scale, see `mfm_loss(output_units=True)`).
    log_weight (B,): a learned log-variance u_b (`LossWeighting`): each term becomes ℓ_b·e^(−u_b) + u_b.
    The returned MSE is the plain per-element mean in absolute units, whatever the options."""
    if reduce not in REDUCE:
        raise ValueError(f"reduce must be one of {REDUCE}, got {reduce!r}")
    sq_abs = _sq(delta)
    sq = _sq(delta if scale is None else delta / bcast(scale.to(delta.dtype), delta), reduce)
    mse = sq_abs.mean()
    if adaptive_p is not None and adaptive_p != 0:
        sq = (sq.detach() + c).pow(-float(adaptive_p)) * sq
    if log_weight is not None:
        u = log_weight.to(sq.dtype).reshape(-1)
        if u.shape != sq.shape:
            raise ValueError(f"log_weight must have shape {tuple(sq.shape)}, got {tuple(log_weight.shape)}")
        sq = sq * torch.exp(-u) + u
    return sq.mean(), mse.detach()


class LossWeighting(nn.Module):
    """A learned per-sample log-variance u(s, t) of a loss term (the release's LossWeightingNetwork,
    `src/mfm/models/base_model.py`): s and t each pass a fixed random Fourier embedding (`channels` features,
    cos(2π·f·x + 2π·φ)·√2 with f ~ N(0, 1), φ ~ U[0, 1]) and a magnitude-preserving linear layer; the two are
    summed (/√2) and mapped to one number, clamped to [−clamp, clamp] (the release: ±10; None or 0: no clamp).
    Trained jointly with the model, it turns the term into ℓ·e^(−u) + u (uncertainty weighting: u tracks log ℓ)."""

    def __init__(self, channels: int = 128, clamp: Optional[float] = 10.0,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        check_positive_int("channels", channels)
        self.clamp = None if not clamp else float(clamp)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels, generator=generator))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels, generator=generator))
        self.w_s = nn.Parameter(torch.randn(channels, channels, generator=generator))
        self.w_t = nn.Parameter(torch.randn(channels, channels, generator=generator))
        self.w_out = nn.Parameter(torch.randn(1, channels, generator=generator))

    @staticmethod
    def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # each output row normalised to norm √fan_in (+1e-4), then scaled by 1/√fan_in: unit-gain rows
        w = w.float()
        fan_in = w.shape[1]
        w = w / (1e-4 + w.norm(dim=1, keepdim=True) / math.sqrt(fan_in)) / math.sqrt(fan_in)
        return x @ w.t().to(x.dtype)

    def _fourier(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.cos(x.float()[:, None] * self.freqs.float() + self.phases.float()) * math.sqrt(2)).to(x.dtype)

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B,) log-variances u(s, t)."""
        h = (self._linear(self._fourier(s), self.w_s) + self._linear(self._fourier(t), self.w_t)) / math.sqrt(2)
        u = self._linear(h, self.w_out)[:, 0]
        return u.clamp(-self.clamp, self.clamp) if self.clamp is not None else u


def _prepare(model, x1: torch.Tensor, draws: Optional[Draws], generator, cond: dict):
    check_state("x1", x1)
    if draws is None:
        draws = draw(x1.shape[0], x1.shape[1:], generator, x1.device, x1.dtype)
    if len(draws) != x1.shape[0]:
        raise ValueError(f"draws hold {len(draws)} samples but x1 has {x1.shape[0]}")
    if draws.noise.shape != x1.shape:
        raise ValueError(f"draws.noise has shape {tuple(draws.noise.shape)} but x1 has {tuple(x1.shape)}")
    return draws, _drop_labels(model, draws.drop_label, cond)


def _drop_labels(model, drop: torch.Tensor, cond: dict) -> dict:
    """Replace dropped class labels by the null class `model.config.num_classes` (classifier-free guidance)."""
    y = cond.get("y")
    if y is None:
        return cond
    num_classes = getattr(getattr(model, "config", None), "num_classes", None)
    if num_classes is None:
        if bool(drop.any()):
            raise ValueError("label dropout needs model.config.num_classes (the null class index)")
        return cond
    return {**cond, "y": torch.where(drop.to(y.device), torch.full_like(y, num_classes), y)}


def context(t: torch.Tensor, x1: torch.Tensor, noise: torch.Tensor, zero_context: bool = True) -> torch.Tensor:
    """x = I_t = (1−t)·I0 + t·I1, and x = 0 where t = 0 (the steering drift's uninformative context); with
    zero_context=False x stays I0 there (pure noise, the release's training and its samplers' first step)."""
    x = interpolate(t, noise, x1)
    if not zero_context:
        return x
    return torch.where(bcast(t, x) == 0, torch.zeros_like(x), x)


@torch.no_grad()
def guidance_correction(model, s: torch.Tensor, xbar: torch.Tensor, t: torch.Tensor, x: torch.Tensor,
                        cond: dict) -> Optional[torch.Tensor]:
    """The release's model-guidance term for targets from data (`model_guidance_target`), stop-gradient:
    (1 − 1/w)·(v_{s,s}(x̄; t, x, y, w) − v_{s,s}(x̄; t, x, ∅, 1)) with w = cond["cfg"] per row. Adding it to a
    diagonal target trains the guidance row w to the classifier-free-guided velocity. None without labels or w."""
    w, y = cond.get("cfg"), cond.get("y")
    if w is None or y is None:
        return None
    null = torch.full_like(y, model.config.num_classes)
    v_u = model(s, s, xbar, t, x, **{**cond, "y": null, "cfg": torch.ones_like(w)})
    v_g = model(s, s, xbar, t, x, **cond)
    return bcast(1 - 1 / w.to(v_g.dtype), v_g) * (v_g - v_u)


def _teacher(teacher_drift: Callable, cond: dict) -> Callable:
    if not callable(teacher_drift):
        raise TypeError(f"teacher_drift must be callable (t, x, **cond) -> b_t(x), got {type(teacher_drift).__name__}")
    return (lambda t, x: teacher_drift(t, x, **cond)) if cond else teacher_drift


@torch.no_grad()
def glass_target(teacher_drift: Callable, s: torch.Tensor, xbar: torch.Tensor, t: torch.Tensor, x: torch.Tensor,
                 **cond) -> torch.Tensor:
    """Zero-variance diagonal target b̄_s(x̄; t, x) from a teacher drift (METHOD §2.2), one teacher call."""
    return glass_drift(_teacher(teacher_drift, cond), s, xbar, t, x)


# ---------------------------------------------------------------------------------------------- diagonal
# Every loss below takes, besides its own arguments: c (the adaptive weight's offset), reduce ("mean" | "sum" over
# each sample's elements, see `weighted_mse`) and zero_context (x = 0 or pure noise where t = 0, see `context`).
def diagonal_loss(model, x1: torch.Tensor, draws: Optional[Draws] = None, generator=None,
                  adaptive_p: Optional[float] = None, error_scale=None, c: float = 0.01, reduce: str = "mean",
                  zero_context: bool = True, log_weight_fn: Optional[Callable] = None, guidance: bool = False,
                  **cond):
    """L_diag = E‖v_{s,s}(Ī_s; t, I_t) − (I1 − Ī0)‖² from data (coupled interpolants sharing I1).

    Minimised by the conditional drift E[I1 − Ī0 | Ī_s, I_t] (exactly so with adaptive_p = None).
    guidance: add the model-guidance term (`guidance_correction`) for rows with a cfg weight in cond.
    log_weight_fn(s, t) -> (B,): a learned log-variance per sample (`LossWeighting`)."""
    draws, cond = _prepare(model, x1, draws, generator, cond)
    tm = draws.times
    x = context(tm.t, x1, draws.noise, zero_context)
    xbar = interpolate(tm.s_diag, draws.noise_bar, x1)
    target = x1 - draws.noise_bar
    corr = guidance_correction(model, tm.s_diag, xbar, tm.t, x, cond) if guidance else None
    if corr is not None:
        target = target + corr
    v = model(tm.s_diag, tm.s_diag, xbar, tm.t, x, **cond)
    log_weight = None if log_weight_fn is None else log_weight_fn(tm.s_diag, tm.t)
    loss, mse = weighted_mse(v - target, adaptive_p, c, error_scale, reduce, log_weight)
    return loss, {"diag": mse}


def distill_diagonal_loss(model, teacher_drift: Callable, x1: torch.Tensor, draws: Optional[Draws] = None,
                          generator=None, adaptive_p: Optional[float] = None, error_scale=None, c: float = 0.01,
                          reduce: str = "mean", zero_context: bool = True,
                          log_weight_fn: Optional[Callable] = None, **cond):
    """Regress v_{s,s}(x̄; t, x) on the GLASS conditional drift of `teacher_drift(t, x, **cond) -> b_t(x)`.

    The states (x̄, x) are the coupled interpolants of the samples x1 (data, or teacher samples); the target is
    deterministic given them, so the loss vanishes at its minimiser. A cfg weight in cond reaches the teacher
    (`guided_drift` turns it into classifier-free guidance)."""
    draws, cond = _prepare(model, x1, draws, generator, cond)
    tm = draws.times
    x = context(tm.t, x1, draws.noise, zero_context)
    s = tm.s_diag
    xbar = interpolate(s, draws.noise_bar, x1)
    target = glass_target(teacher_drift, s, xbar, tm.t, x, **cond)
    v = model(s, s, xbar, tm.t, x, **cond)
    log_weight = None if log_weight_fn is None else log_weight_fn(s, tm.t)
    loss, mse = weighted_mse(v - target, adaptive_p, c, error_scale, reduce, log_weight)
    return loss, {"diag": mse}


# ---------------------------------------------------------------------------------------------- consistency
def _states(x1: torch.Tensor, draws: Draws, zero_context: bool = True):
    tm = draws.times
    return tm, context(tm.t, x1, draws.noise, zero_context), interpolate(tm.s, draws.noise_bar, x1)


def lsd_loss(model, x1: torch.Tensor, draws: Optional[Draws] = None, generator=None,
             adaptive_p: Optional[float] = None, target_model=None, error_scale=None, c: float = 0.01,
             reduce: str = "mean", zero_context: bool = True, **cond):
    """Lagrangian self-distillation: ∂_u X_{s,u}(x̄) = sg(v_{u,u}(X_{s,u}(x̄))), ∂_u by one jvp in u.

    target_model: the network evaluated for the stop-gradient target (default: `model`; e.g. its EMA copy)."""
    draws, cond = _prepare(model, x1, draws, generator, cond)
    tm, x, xbar = _states(x1, draws, zero_context)
    s, u, t = tm.s, tm.u, tm.t

    def flow(u_):
        return xbar + bcast(u_ - s, xbar) * model(s, u_, xbar, t, x, **cond)

    X, dX_du = jvp(flow, (u,), (torch.ones_like(u),))
    with torch.no_grad():
        target = (target_model or model)(u, u, X.detach(), t, x, **cond)
    loss, mse = weighted_mse(dX_du - target, adaptive_p, c, error_scale, reduce)
    return loss, {"cons": mse}


def _eulerian(model, vtilde, s, u, t, xbar, x, cond, adaptive_p, error_scale=None, c=0.01, reduce="mean",
              stop_grad=True):
    """v_{s,u}(x̄) against ṽ + (u−s)·(∂_s v + ∇_x̄ v·ṽ); the bracket is one jvp along (ds, dx̄) = (1, ṽ). The target
    is stop-gradient unless stop_grad=False (the release's `distill_teacher_stop_grad: false`: the gradient then
    also flows through the jvp)."""
    v, dv = jvp(lambda s_, xb_: model(s_, u, xb_, t, x, **cond), (s, xbar), (torch.ones_like(s), vtilde))
    target = vtilde + bcast(u - s, xbar) * dv
    if stop_grad:
        target = target.detach()
    return weighted_mse(v - target, adaptive_p, c, error_scale, reduce)


def meanflow_loss(model, x1: torch.Tensor, draws: Optional[Draws] = None, generator=None,
                  adaptive_p: Optional[float] = None, error_scale=None, c: float = 0.01, reduce: str = "mean",
                  zero_context: bool = True, guidance: bool = False, stop_grad: bool = True, **cond):
    """Eulerian (MeanFlow) loss from data: ṽ = I1 − Ī0, an unbiased estimate of the conditional drift at x̄ (the
    target is linear in ṽ). guidance: ṽ plus the model-guidance term at (s, s) (`guidance_correction`)."""
    draws, cond = _prepare(model, x1, draws, generator, cond)
    tm, x, xbar = _states(x1, draws, zero_context)
    vtilde = x1 - draws.noise_bar
    corr = guidance_correction(model, tm.s, xbar, tm.t, x, cond) if guidance else None
    if corr is not None:
        vtilde = vtilde + corr
    loss, mse = _eulerian(model, vtilde, tm.s, tm.u, tm.t, xbar, x, cond, adaptive_p, error_scale, c, reduce,
                          stop_grad)
    return loss, {"cons": mse}


def esd_teacher_loss(model, teacher_drift: Callable, x1: torch.Tensor, draws: Optional[Draws] = None,
                     generator=None, adaptive_p: Optional[float] = None, error_scale=None, c: float = 0.01,
                     reduce: str = "mean", zero_context: bool = True, stop_grad: bool = True, **cond):
    """Eulerian loss with ṽ = the GLASS conditional drift of the teacher at (s, x̄; t, x): zero-variance target."""
    draws, cond = _prepare(model, x1, draws, generator, cond)
    tm, x, xbar = _states(x1, draws, zero_context)
    vtilde = glass_target(teacher_drift, tm.s, xbar, tm.t, x, **cond)
    loss, mse = _eulerian(model, vtilde, tm.s, tm.u, tm.t, xbar, x, cond, adaptive_p, error_scale, c, reduce,
                          stop_grad)
    return loss, {"cons": mse}


def semigroup_loss(model, x1: torch.Tensor, draws: Optional[Draws] = None, generator=None,
                   adaptive_p: Optional[float] = None, target_model=None, error_scale=None, c: float = 0.01,
                   reduce: str = "mean", zero_context: bool = True, **cond):
    """Progressive self-distillation: v_{s,u}(x̄) = sg(γ·v_{s,w}(x̄) + (1−γ)·v_{w,u}(X_{s,w}(x̄))), w = s + γ(u−s)
    (γ drawn by `draw(..., gamma=None)` ~ U[0, 1]; γ = ½ is the shortcut model). target_model: the network of
    the stop-gradient target (default: `model`)."""
    draws, cond = _prepare(model, x1, draws, generator, cond)
    tm, x, xbar = _states(x1, draws, zero_context)
    s, u, t, g, w = tm.s, tm.u, tm.t, tm.gamma, tm.w
    with torch.no_grad():
        teacher = target_model or model
        v1 = teacher(s, w, xbar, t, x, **cond)
        mid = xbar + bcast(w - s, xbar) * v1
        v2 = teacher(w, u, mid, t, x, **cond)
        target = bcast(g, xbar) * v1 + bcast(1 - g, xbar) * v2
    v = model(s, u, xbar, t, x, **cond)
    loss, mse = weighted_mse(v - target, adaptive_p, c, error_scale, reduce)
    return loss, {"cons": mse}


# ---------------------------------------------------------------------------------------------- combined
def rollout_loss(model, rows: "RolloutRows", adaptive_p: Optional[float] = None, error_scale=None,
                 c: float = 0.01, reduce: str = "mean"):
    """Regress the flow map on teacher rollouts (`RolloutBank`): X_{s,u}(x̄_s; t, x) = x̄_s + (u−s)·v_{s,u} against
    the rollout's x̄_u, a zero-variance target for any jump, the one-step jump (0, 1) included. Residuals are in
    state units, the units of the samples the flow map draws."""
    v = model(rows.s, rows.u, rows.xs, rows.t, rows.x, **rows.cond)
    pred = rows.xs + bcast(rows.u - rows.s, v) * v
    loss, mse = weighted_mse(pred - rows.xu, adaptive_p, c, error_scale, reduce)
    return loss, {"roll": mse}


def mfm_loss(model, x1: torch.Tensor, consistency: str = "meanflow", teacher_drift: Optional[Callable] = None, *,
             diagonal: str = "data", consistency_fraction: float = 0.25, n_consistency: Optional[int] = None,
             consistency_weight: float = 1.0, adaptive: bool = True, diag_p: float = 0.5, cons_p: float = 1.0,
             t_zero_prob: float = 0.1, gamma: Optional[float] = None, p_uncond: float = 0.1,
             target_model=None, draws: Optional[Draws] = None, generator: Optional[torch.Generator] = None,
             output_units: bool = False, t_power: float = 2.0, rollout: Optional["RolloutRows"] = None,
             paired: bool = False, diag_c: float = 0.01, cons_c: float = 0.01, reduce: str = "mean",
             zero_context: bool = True, cons_stop_grad: bool = True, log_weight_fn: Optional[Callable] = None,
             guidance_ws: Sequence[float] = (), guidance_base_prob: float = 0.0, **cond):
    """L_MFM = L_diag + consistency_weight·L_cons (+ L_roll) (METHOD §2).

    The first B − n_c rows of the batch train the diagonal, the last n_c = round(consistency_fraction·B) rows
    (or `n_consistency`) the consistency loss; each term is a mean over its rows. paired=True: every row trains
    both terms with one context (t, x, label), the consistency term on its own transported state
    (draws.noise_cons), as the release does; consistency_fraction / n_consistency are then unused.
    x1: (B, d) vectors or (B, C, H, W) images. cond: extra model conditioning, e.g. `y` (B,) class labels, which
    are replaced by the null class `model.config.num_classes` with probability p_uncond.
    consistency: "meanflow" (Eulerian from data), "lsd" (Lagrangian), "esd" (Eulerian, GLASS target of
    `teacher_drift`), "semigroup" (γ ~ U[0,1], or `gamma=0.5` for the shortcut), "none".
    diagonal: "data" (coupled interpolants) or "distill" (GLASS target of `teacher_drift`).
    teacher_drift(t, x, **cond) -> b_t(x). adaptive: weights with p = diag_p / cons_p and offsets diag_c / cons_c
    (else plain MSE); reduce: each sample's squared residual is the "mean" or the "sum" (the release) over its
    elements. cons_stop_grad: stop-gradient Eulerian targets ("meanflow", "esd"; False lets the gradient through
    the jvp). log_weight_fn(s, t) -> (B,): a learned log-variance of the diagonal term (`LossWeighting`).
    guidance_ws: model guidance (with labels): every row draws a guidance weight w per term (`guidance_weights`),
    passed to the model as `cfg` and to the teacher; targets from data get `guidance_correction`.
    zero_context: x = 0 where t = 0 (default), or pure noise (False, the release) — see `context`.
    target_model: network of the bootstrapped targets of "lsd" / "semigroup" (default: `model`).
    `draws` fixes all randomness (see `draw`); otherwise it is drawn from `generator` (context t = U^t_power).
    output_units: measure every residual in units of `model.error_scale(t)` (B,), the scale of the network's own
    output at context time t (a preconditioned model's posterior spread), so that every t weighs alike, as
    EDM's loss weight 1/c_out² does; the logged MSEs stay in absolute units.
    rollout: extra rows regressed on teacher rollouts (`RolloutBank.rows`, `rollout_loss`), a mean over its rows
    added to the total; their conditioning travels with them.
    """
    check_state("x1", x1)
    if consistency not in CONSISTENCY:
        raise ValueError(f"consistency must be one of {CONSISTENCY}, got {consistency!r}")
    if diagonal not in DIAGONAL:
        raise ValueError(f"diagonal must be one of {DIAGONAL}, got {diagonal!r}")
    if reduce not in REDUCE:
        raise ValueError(f"reduce must be one of {REDUCE}, got {reduce!r}")
    needs_teacher = consistency == "esd" or diagonal == "distill"
    if needs_teacher and teacher_drift is None:
        raise ValueError(f"consistency={consistency!r} / diagonal={diagonal!r} needs teacher_drift(t, x) -> b_t(x)")
    check_finite_scalar("consistency_weight", consistency_weight)
    B = x1.shape[0]
    if paired:
        n_consistency = 0 if consistency == "none" else B
    elif n_consistency is None:
        if not 0.0 <= consistency_fraction <= 1.0:
            raise ValueError(f"consistency_fraction must lie in [0, 1], got {consistency_fraction}")
        n_consistency = int(round(consistency_fraction * B))
    if consistency == "none":
        n_consistency = 0
    if not 0 <= n_consistency <= B:
        raise ValueError(f"n_consistency must lie in [0, {B}], got {n_consistency}")
    if output_units and not callable(getattr(model, "error_scale", None)):
        raise ValueError(f"output_units=True needs model.error_scale(t); {type(model).__name__} has none "
                         "(MFMMLP has it when built with sigma_data)")
    labelled = cond.get("y") is not None
    if draws is None:
        draws = draw(B, x1.shape[1:], generator, x1.device, x1.dtype, t_zero_prob, gamma,
                     p_uncond if labelled else 0.0, t_power, paired=paired,
                     guidance_ws=guidance_ws if labelled else (), guidance_base_prob=guidance_base_prob)
    if paired and n_consistency and draws.noise_cons is None:
        raise ValueError("paired=True needs draws with noise_cons (draw(..., paired=True))")
    if draws.cfg is not None and not labelled:
        raise ValueError("model guidance (draws with cfg weights) needs class labels y")
    n_d = B if paired else B - n_consistency
    dp, cp = (diag_p, cons_p) if adaptive else (None, None)
    guided = draws.cfg is not None

    def rows(sl, cfg):
        out = {k: (v[sl] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == B else v) for k, v in cond.items()}
        if cfg is not None:
            out["cfg"] = cfg[sl]
        if output_units:
            out["error_scale"] = model.error_scale(draws.times.t[sl]).detach()
        return out

    form = dict(reduce=reduce, zero_context=zero_context)
    total = x1.new_zeros((), dtype=torch.float32)
    logs = {}
    if n_d:
        sl = slice(0, n_d)
        args = dict(adaptive_p=dp, c=diag_c, log_weight_fn=log_weight_fn, **form, **rows(sl, draws.cfg))
        if diagonal == "data":
            loss_d, ld = diagonal_loss(model, x1[sl], draws[sl], guidance=guided, **args)
        else:
            loss_d, ld = distill_diagonal_loss(model, teacher_drift, x1[sl], draws[sl], **args)
        total = total + loss_d
        logs.update(ld)
    if n_consistency:
        sl = slice(B - n_consistency, B)
        d = dataclasses.replace(draws, noise_bar=draws.noise_cons) if paired else draws
        args = dict(adaptive_p=cp, c=cons_c, **form, **rows(sl, draws.cfg_cons))
        if consistency == "meanflow":
            loss_c, lc = meanflow_loss(model, x1[sl], d[sl], guidance=guided, stop_grad=cons_stop_grad, **args)
        elif consistency == "lsd":
            loss_c, lc = lsd_loss(model, x1[sl], d[sl], target_model=target_model, **args)
        elif consistency == "esd":
            loss_c, lc = esd_teacher_loss(model, teacher_drift, x1[sl], d[sl], stop_grad=cons_stop_grad, **args)
        else:
            loss_c, lc = semigroup_loss(model, x1[sl], d[sl], target_model=target_model, **args)
        total = total + consistency_weight * loss_c
        logs.update(lc)
    if rollout is not None and len(rollout):
        scale = model.error_scale(rollout.t).detach() if output_units else None
        loss_r, lr_ = rollout_loss(model, rollout, adaptive_p=cp, error_scale=scale, c=cons_c, reduce=reduce)
        total = total + loss_r
        logs.update(lr_)
    logs["loss"] = total.detach()
    return total, logs


# ---------------------------------------------------------------------------------------------- teacher rollouts
@dataclass
class RolloutBank:
    """Teacher posterior trajectories, the zero-variance targets of `rollout_loss`.

    Row b holds a context (t_b, x_b) ~ the training distribution of contexts and the GLASS rollout x̄_τ of the
    teacher on the grid τ_0 = 0 < … < τ_R = 1 from x̄_0 = ε_b: x̄_{τ_j} = X_{τ_i, τ_j}(x̄_{τ_i}; t_b, x_b) for every pair
    i < j, up to the rollout's integration error. Build it with `build_rollout_bank`."""

    t: torch.Tensor  # (n,)
    x: torch.Tensor  # (n, *event)
    grid: torch.Tensor  # (R + 1,)
    traj: torch.Tensor  # (n, R + 1, *event)
    cond: dict = field(default_factory=dict)  # per-row conditioning, e.g. y (n,)

    def __len__(self) -> int:
        return self.t.shape[0]

    def draw_pairs(self, n: int, generator: Optional[torch.Generator] = None, full_prob: float = 0.25):
        """(rows, i, j): n bank rows and grid pairs i < j, each pair uniform over all pairs except that with
        probability full_prob it is (0, R), the one-step jump X_{0,1} that posterior sampling uses."""
        check_positive_int("n", n)
        R = self.grid.shape[0] - 1
        rows = torch.randint(0, len(self), (n,), generator=generator)
        a = torch.randint(0, R + 1, (n,), generator=generator)
        b = torch.randint(0, R, (n,), generator=generator)
        b = b + (b >= a).long()  # two distinct grid points, uniform over the pairs
        i, j = torch.minimum(a, b), torch.maximum(a, b)
        full = torch.rand((n,), generator=generator) < full_prob
        i = torch.where(full, torch.zeros_like(i), i)
        j = torch.where(full, torch.full_like(j, R), j)
        return rows, i, j

    def rows(self, rows: torch.Tensor, i: torch.Tensor, j: torch.Tensor, device=None, dtype=None) -> "RolloutRows":
        """The training rows of the given bank rows and grid pairs, on device in dtype."""
        def mv(a):
            return a.to(device, dtype) if a.is_floating_point() else a.to(device)
        cond = {k: mv(v[rows]) for k, v in self.cond.items()}
        return RolloutRows(mv(self.grid[i]), mv(self.grid[j]), mv(self.traj[rows, i]), mv(self.traj[rows, j]),
                           mv(self.t[rows]), mv(self.x[rows]), cond)


@dataclass
class RolloutRows:
    """A batch of flow-map targets: X_{s,u}(xs; t, x) should equal xu."""

    s: torch.Tensor
    u: torch.Tensor
    xs: torch.Tensor
    xu: torch.Tensor
    t: torch.Tensor
    x: torch.Tensor
    cond: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.t.shape[0]


@torch.no_grad()
def build_rollout_bank(teacher_drift: Callable, x1: torch.Tensor, steps: int = 32, warp: float = 2.0,
                       generator: Optional[torch.Generator] = None, t_power: float = 1.0, t_zero_prob: float = 0.1,
                       context_spread: float = 1.0, chunk: int = 8192, device=None, progress: bool = False,
                       **cond) -> RolloutBank:
    """Roll the teacher's GLASS posterior ODE for one context per data sample x1 (n, *event), from x̄_0 = ε to 1
    on `warped_grid(steps, warp)` (Heun: 2·steps teacher calls per row, in chunks of `chunk` rows on `device`),
    keeping every grid point.

    Contexts as in training (`sample_times`): t = U^t_power (0 with probability t_zero_prob),
    x = (1−t)·c·ε' + t·x1 with c ~ U[1, context_spread] per row, drawn from `generator`. The rollout is the
    teacher's posterior for whatever context it is given, so contexts need not follow p_t: spread > 1 widens them
    into p_t's tails, where steering goes and where a bank of typical contexts leaves the map untrained.
    teacher_drift(t, x, **cond) -> b_t(x); cond: per-row tensors (e.g. y (n,)) kept with the bank.
    The bank lives on the CPU in float32: n·(steps + 1)·numel(event)·4 bytes."""
    check_state("x1", x1)
    check_positive_int("chunk", chunk)
    if not check_finite_scalar("context_spread", context_spread) >= 1:
        raise ValueError(f"context_spread must be at least 1, got {context_spread}")
    if not callable(teacher_drift):
        raise TypeError(f"teacher_drift must be callable (t, x) -> b_t(x), got {type(teacher_drift).__name__}")
    n = x1.shape[0]
    x1 = x1.detach().float().cpu()
    for k, v in cond.items():
        if not torch.is_tensor(v) or v.dim() == 0 or v.shape[0] != n:
            raise ValueError(f"conditioning {k!r} must be a tensor with one row per sample ({n}), got "
                             f"{tuple(v.shape) if torch.is_tensor(v) else type(v).__name__}")
    cond = {k: v.cpu() for k, v in cond.items()}
    t = sample_times(n, generator, None, torch.float32, t_zero_prob, None, t_power).t
    spread = 1 + (context_spread - 1) * torch.rand((n,), generator=generator)
    x = context(t, x1, bcast(spread, x1) * torch.randn(x1.shape, generator=generator))
    z0 = torch.randn(x1.shape, generator=generator)
    grid = warped_grid(steps, warp)
    traj = torch.empty((n, steps + 1, *x1.shape[1:]))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc="teacher rollouts", dynamic_ncols=True)
    for lo in range(0, n, chunk):
        sl = slice(lo, min(n, lo + chunk))
        tc, xc, z = (a[sl].to(device) for a in (t, x, z0))
        cc = {k: v[sl].to(device) for k, v in cond.items()}
        times = [r.expand(z.shape[0]) for r in grid.to(z.device)]
        traj[sl, 0] = z.cpu()
        for j, zj in enumerate(glass_heun(_teacher(teacher_drift, cc), z, tc, xc, times), start=1):
            traj[sl, j] = zj.float().cpu()
        if bar is not None:
            bar.update(sl.stop - lo)
    if bar is not None:
        bar.close()
    if not bool(torch.isfinite(traj).all()):
        raise ValueError("the teacher's rollouts are not finite: check teacher_drift")
    return RolloutBank(t, x, grid, traj, cond)
