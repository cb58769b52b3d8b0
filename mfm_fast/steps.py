"""The steering step and what `steer` and `graphs` share: the Doob/DPS drift, one Euler(-Maruyama) step as a
function of tensors (`make_step`), the argument checks, the paper's NFE accounting and the result type.

The formulas are described in `mfm_fast.steer`; `mfm_fast.graphs` captures `make_step`'s step in a CUDA graph. Both
build on this module, which imports neither.
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from ._checks import check_finite_scalar, check_input, check_positive_int, host_checks_allowed
from .interpolant import time_grid
from .rewards import reward_name
from .value import Cost, check_chunk_size, check_jackknife, estimate, mfmgf_release_ratio

METHODS = ("none", "mfm-g", "mfm-gf", "dps", "search", "smc")
RENORMS = (None, "rescale", "clip")


@dataclass
class SteerResult:
    samples: torch.Tensor  # (B, *event)
    cost: Cost  # work counted while sampling (the diagnostic `rewards` below are not included)
    rewards: torch.Tensor  # (B,) reward of each returned sample
    particles: Optional[torch.Tensor] = None  # SMC: the weighted particles before the final resampling
    log_weights: Optional[torch.Tensor] = None  # SMC: their normalised log weights (per population), float64
    log_normalizer: Optional[torch.Tensor] = None  # SMC: log Ẑ per population, Ẑ unbiased for E_base[exp(λ·r)]; float64
    # (both scale with λ: `value.log_weights`)
    n_resamples: int = 0  # SMC: resampling events (summed over populations), the final one excluded
    # SMC diagnostics, per step k = 1..K (after step k's reweighting, before its resampling) and population (G):
    ess: Optional[torch.Tensor] = None  # (K, G) effective sample size of the weights
    log_weight_var: Optional[torch.Tensor] = None  # (K, G) variance of the log weights within the population
    resampled: Optional[torch.Tensor] = None  # (K, G) bool: resampled after step k (the final resampling excluded)
    lambdas: Optional[torch.Tensor] = None  # (K+1, G) the twist's tempered λ at t_0..t_K (λ at t_K)
    degenerate: Optional[torch.Tensor] = None  # (G,) bool: one particle held (almost) all the weight at some step

    @property
    def mean_reward(self) -> float:
        return float(self.rewards.float().mean())


def paper_nfe(method: str, steps: int, n_particles: int, search_particles: int = 1,
              posterior_steps: int = 1) -> Optional[int]:
    """NFE per output sample as the paper reports it (METHOD §3); None where the paper defines none (DPS).
    posterior_steps = m: each one-step sample of the estimators costs m evaluations instead of one."""
    K, N = steps, n_particles * (posterior_steps if method in ("mfm-g", "mfm-gf", "smc") else 1)
    if method == "none":
        return K
    if method == "mfm-gf":
        return K + 2 * N * K
    if method in ("mfm-g", "smc"):  # SMC's per-step work is MFM-G's (drift + N particles forward and backward)
        return K + 4 * N * K
    if method == "search":
        return 2 * search_particles * N * K
    if method == "best-of-n":
        return K * N + N
    return None


# ---------------------------------------------------------------------------------------------- step functions


def full_t(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A 0-dim or (B,) time as (B,)."""
    return t.expand(x.shape[0]) if t.dim() == 0 else t


def bcast_t(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A 0-dim or (B,) time broadcast against x (B, *event)."""
    return t if t.dim() == 0 else t.reshape(-1, *([1] * (x.dim() - 1)))


def base_drift(model, t: torch.Tensor, x: torch.Tensor, cond: dict) -> torch.Tensor:
    """b_t(x) = v_{t,t}(x; 0, 0), as `sampling.drift`, without its host-synchronising input checks."""
    tb = full_t(t, x)
    return model(tb, tb, x, torch.zeros_like(tb), torch.zeros_like(x), **cond)


def steer_ratio(t: torch.Tensor, clamp_ratio: Optional[float]) -> torch.Tensor:
    """k(t) = (1−t)/t = σ_t²/2, clamped to ≤ clamp_ratio (the release clamps 1/t − 1 to [0, 25])."""
    k = (1 - t) / t
    return k.clamp(0, clamp_ratio) if clamp_ratio is not None else k.clamp_min(0)


def renormalise(base: torch.Tensor, steer_term: torch.Tensor, renorm: str, scale: float) -> torch.Tensor:
    """Per sample: steer_term·scale·‖base‖/(1e-8 + ‖steer_term‖); "clip" caps the factor at 1."""
    dims = tuple(range(1, base.dim()))
    norm = functools.partial(torch.linalg.vector_norm, dim=dims, keepdim=True)  # Tensor.norm rejects 3+ dims
    factor = scale * norm(base) / (1e-8 + norm(steer_term))
    if renorm == "clip":
        factor = factor.clamp(max=1.0)
    return steer_term * factor


def dps_grad(model, reward, t: torch.Tensor, x: torch.Tensor, lam: float, cond: dict):
    """(b_t(x), ∇_x λ·r(x + (1−t)·b_t(x))): backpropagation through the base drift call."""
    with torch.enable_grad():
        xc = x.detach().requires_grad_(True)
        b = base_drift(model, t, xc, cond)
        r = lam * reward(xc + (1 - bcast_t(t, xc)) * b)
        if not r.requires_grad:
            raise ValueError(f"reward {reward_name(reward)!r}: no gradient reaches the state; method 'dps' needs a "
                             "reward differentiable in its input (or use a gradient-free method: 'mfm-gf', "
                             "'search', 'smc' with smc_estimator='mfm-gf')")
        (g,) = torch.autograd.grad(r.sum(), xc, allow_unused=True)
    return b.detach(), (torch.zeros_like(x) if g is None else g)


def guided_drift(model, reward, x, t, eps, *, method: str, sde: bool, lam: float, renorm: Optional[str],
                 renorm_scale: float, clamp_ratio: Optional[float], chunk_size: Optional[int], cond: dict,
                 posterior_steps: int = 1, jackknife: bool = False):
    """The steered drift at (t, x). eps (B, N, *event): particle noise for "mfm-g"/"mfm-gf" (else unused)."""
    if method == "dps":
        b, g = dps_grad(model, reward, t, x, lam, cond)
    else:
        b = base_drift(model, t, x, cond)
        g = None
        if method in ("mfm-g", "mfm-gf"):
            _, g = estimate(model, reward, full_t(t, x), x, eps, method, lam, chunk_size, cond, posterior_steps,
                            jackknife)
    k = bcast_t(steer_ratio(t, clamp_ratio), x)
    if sde:
        tb = bcast_t(t, x)
        base = b + k * (tb * b - x) / (1 - tb)
        scale = 2 * k
    else:
        base, scale = b, k
    if g is None:
        return base
    if method == "mfm-gf":  # the release's term, unclamped (module docstring)
        scale = (2 if sde else 1) * bcast_t(mfmgf_release_ratio(t), x)
    term = scale * g
    if renorm is not None:
        term = renormalise(base, term, renorm, renorm_scale)
    return base + term


def steer_step(model, reward, x, t, dt, eps, xi, *, sde: bool, clamp_ratio: Optional[float], **drift_kw):
    """One Euler (ODE) or Euler–Maruyama (SDE) step from t to t + dt. xi (B, *event): the SDE noise."""
    x_next = x + dt * guided_drift(model, reward, x, t, eps, sde=sde, clamp_ratio=clamp_ratio, **drift_kw)
    if sde:
        x_next = x_next + torch.sqrt(2 * bcast_t(steer_ratio(t, clamp_ratio), x) * dt) * xi
    return x_next


def make_step(model, reward, *, method: str = "mfm-g", sde: bool = False, lam: float = 1.0,
              renorm: Optional[str] = None, renorm_scale: float = 1.0, clamp_ratio: Optional[float] = 25.0,
              chunk_size: Optional[int] = None, cond: Optional[dict] = None, posterior_steps: int = 1,
              jackknife: bool = False):
    """`step(x, t, dt, eps, xi) -> x_next` for methods "none", "mfm-g", "mfm-gf", "dps": all inputs are tensors
    (t, dt 0-dim or (B,); eps (B, N, *event) or None; xi (B, *event) or None), no host synchronisation."""
    if method not in ("none", "mfm-g", "mfm-gf", "dps"):
        raise ValueError(f"make_step builds Doob/DPS steps only; got method {method!r}")
    return functools.partial(steer_step, model, reward, method=method, sde=sde, lam=lam, renorm=renorm,
                             renorm_scale=renorm_scale, clamp_ratio=clamp_ratio, chunk_size=chunk_size,
                             cond=cond or {}, posterior_steps=posterior_steps, jackknife=jackknife)


# ---------------------------------------------------------------------------------------------- shared by the loops
# A steered state this many times the larger of 1 and the initial noise's largest |entry| has left the data's scale:
# the explicit Euler step cannot follow a steering term λ·∇̂V that large (it overshoots, and each step overshoots
# more). Such states are finite, so they are returned, with a SteeringDivergenceWarning naming lam; once they turn
# non-finite (or the reward or SMC's weights overflow on them) the loop stops with a ValueError naming lam
# (`divergence_named`), not one blaming the reward.
DIVERGENCE_FACTOR = 1e6


class SteeringDivergenceWarning(RuntimeWarning):
    """Steered states left the data's scale (`check_diverged`); `warnings.simplefilter("error",
    SteeringDivergenceWarning)` turns it into an exception."""


class DivergenceWatch:
    """State of one eager steering loop for `check_diverged`: the bound on |x|, whether it warned, whether the
    states are beyond the bound, and the last step checked."""

    def __init__(self, scale: float):
        self.scale, self.bound = scale, DIVERGENCE_FACTOR * scale
        self.warned, self.beyond, self.where = False, False, None

    def advice(self) -> str:
        step, steps, t, method, lam, renorm, _ = self.where
        return (f"With method={method!r}, lam={lam:g} and renorm={renorm!r} the steering term λ·∇̂V is too large for "
                f"this time grid and the Euler steps overshoot; lower lam, pass renorm='rescale' (or 'clip'), or take "
                f"more steps")


_ACTIVE = threading.local()  # the watch of the loop `divergence_named` wraps


def divergence_scale(noise: torch.Tensor) -> Optional[DivergenceWatch]:
    """The watch `check_diverged` keeps over an eager loop started from `noise` (None where host reads are not
    allowed: CUDA-graph capture, compile, functorch); `divergence_named` around the loop reads it."""
    if not host_checks_allowed(noise):
        return None
    watch = DivergenceWatch(max(1.0, float(noise.detach().abs().amax())))
    _ACTIVE.watch = watch
    return watch


@contextlib.contextmanager
def divergence_named():
    """Around a steering loop: a ValueError raised once `check_diverged` has seen states beyond the bound (the
    reward overflowing on them, SMC's weights turning non-finite) is re-raised naming lam and the remedies, not
    left to blame the reward. The original message is kept in the new one."""
    _ACTIVE.watch = None
    try:
        yield
    except ValueError as err:
        w = getattr(_ACTIVE, "watch", None)
        if w is None or not w.beyond or w.where is None or "lam=" in str(err):
            raise
        step, steps, t, *_, top = w.where
        raise ValueError(f"steering diverged after step {step} of {steps} (t = {t:.4g}): the states had left the "
                         f"data's scale (|x| up to {top:.3g}; the noise started within {w.scale:.3g}), and then: "
                         f"{str(err).rstrip('.')}. {w.advice()}") from err
    finally:
        _ACTIVE.watch = None


def check_diverged(x: torch.Tensor, k: int, steps: int, t, watch: Optional[DivergenceWatch], method: str,
                   lam: float, renorm: Optional[str]) -> None:
    """After step k of `steps`: a ValueError naming lam if a state is non-finite; a SteeringDivergenceWarning naming
    lam (once per loop) if states are finite but beyond the watch's bound. One host read per step (the reward
    checks already read back once per call)."""
    if watch is None:
        return
    xd = x.detach()
    top = float(xd.abs().amax())
    watch.where = (k + 1, steps, float(t), method, lam, renorm, top)
    watch.beyond = not top <= watch.bound  # True for NaN too
    if not watch.beyond:
        return
    if not math.isfinite(top):
        raise ValueError(f"steering diverged at step {k + 1} of {steps} (t = {float(t):.4g}): the state became "
                         f"non-finite (NaN or ±inf). {watch.advice()}")
    if not watch.warned:
        watch.warned = True
        far = int((xd.flatten(1).abs().amax(1) > watch.bound).sum())
        warnings.warn(f"steering is diverging at step {k + 1} of {steps} (t = {float(t):.4g}): {far} of "
                      f"{x.shape[0]} states reached |x| up to {top:.3g}, over {DIVERGENCE_FACTOR:.0e} times the "
                      f"noise's scale ({watch.scale:.3g}); they are returned as they are. {watch.advice()}",
                      SteeringDivergenceWarning, stacklevel=4)


def progress_bar(iterable, progress, desc):
    # progress=None shows a bar only on an interactive terminal
    return tqdm(iterable, desc=desc, disable=None if progress is None else not progress, leave=False)


def finish(samples, cost, reward, return_result, **extra):
    """The samples, or a `SteerResult` with their rewards when `return_result`."""
    if not return_result:
        return samples
    with torch.no_grad():
        rewards = reward(samples)
    return SteerResult(samples, cost, rewards, **extra)


def check_common(model, noise, steps, t_start):
    """Checks every sampler shares -> t_start as a float."""
    check_input("noise", noise, model)  # finite too: NaN noise would otherwise surface as a non-finite reward
    check_positive_int("steps", steps)
    t_start = check_finite_scalar("t_start", t_start)
    if not 0 < t_start < 1:
        raise ValueError(f"t_start must lie in (0, 1) (the guidance divides by t), got {t_start}")
    # Near 1 the (at least fp32) grid rounds interior points to 1 or onto each other: the SDE then divides by
    # 1 − t = 0 and SMC's transition density by dt = 0.
    grid = time_grid(t_start, steps, noise)
    if bool(((grid[1:] <= grid[:-1]).any() | (grid[:-1] >= 1).any())):
        raise ValueError(f"t_start={t_start} is too close to 1 for steps={steps}: in {grid.dtype} the time grid "
                         f"linspace(t_start, 1, steps + 1) has repeated points or interior points equal to 1; "
                         "lower t_start or steps")
    return t_start


def check_steer_args(model, noise, steps, t_start, method, n_particles, lam, renorm, renorm_scale, clamp_ratio,
                     chunk_size, methods=METHODS, jackknife=False):
    """Validate the arguments steer and steer_graphed share -> (t_start, lam, renorm_scale, chunk_size), with
    chunk_size="auto" resolved once per run (static shapes for CUDA graphs)."""
    t_start = check_common(model, noise, steps, t_start)
    if method not in methods:
        raise ValueError(f"method must be one of {methods}, got {method!r}")
    check_positive_int("n_particles", n_particles)
    if jackknife and method not in ("mfm-g", "mfm-gf", "smc"):
        raise ValueError(f"jackknife applies to the value estimators (methods 'mfm-g', 'mfm-gf', 'smc'), got "
                         f"method {method!r}")
    check_jackknife(jackknife, n_particles)
    lam = check_finite_scalar("lam", lam)
    if renorm not in RENORMS:
        raise ValueError(f"renorm must be one of {RENORMS}, got {renorm!r}")
    renorm_scale = check_finite_scalar("renorm_scale", renorm_scale)
    check_clamp(clamp_ratio)
    if isinstance(chunk_size, str) and chunk_size == "auto":
        from .memory import auto_chunk_size
        chunk_size = auto_chunk_size(model, noise.shape[0], n_particles, noise.dtype, noise.device)
    return t_start, lam, renorm_scale, check_chunk_size(chunk_size)


def check_clamp(clamp_ratio):
    if clamp_ratio is not None and not check_finite_scalar("clamp_ratio", clamp_ratio) > 0:
        raise ValueError(f"clamp_ratio must be positive or None, got {clamp_ratio}")

