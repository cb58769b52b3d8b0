"""Reward-steered sampling (METHOD §3, OFFICIAL_CHECKPOINT §4): sample from p*_1 ∝ p_1·exp(λ·r).

Methods: "none" (base sampler), "mfm-g" / "mfm-gf" (Doob guidance with the value-gradient estimators of
`mfm_fast.value`), "dps" (∇ of the reward at the Tweedie denoiser), "search" (MFM-Search), "smc" (twisted SMC with
MFM value estimates), and `best_of_n`.

Doob guidance, Euler on t_k = linspace(t_start, 1, K+1), k(t) = (1−t)/t clamped to ≤ `clamp_ratio` (release: 25):
- ODE: x ← x + dt·(b + k·∇̂V)
- SDE: x ← x + dt·(b + k·(t·b − x)/(1−t) + 2k·∇̂V) + √(2k·dt)·ξ. Where the clamp is inactive the drift equals the
  release's 2b − x/t; where it is active (t < 1/26) the same clamped σ² = 2k multiplies the score, so the SDE
  keeps the marginals of the base flow (the release keeps 2b − x/t there).
MFM-GF follows the release's formula instead: its steering term is exactly c = (Σ w_i x̂_i − mean x̂)/max(1−t, 1e-3)
in the ODE and 2c in the SDE, at every t: the release divides c by σ²/2 and multiplies back, so neither the clamp
of k (t < 1/26) nor the 1e-3 clamp of ∇̂V's second 1 − t (t > 0.999) changes it (`value.mfmgf_release_ratio`).
`renorm` ("rescale" | "clip", release: "rescale"): per sample the steering term s is multiplied by
`renorm_scale`·‖base‖/(1e-8 + ‖s‖) — capped at 1 for "clip" — where base is the integrator's base drift.

Each step is a function of explicit tensors (`steer_step(x, t, dt, eps, xi)` built by `make_step`, both in
`mfm_fast.steps`, which `mfm_fast.graphs` shares), so a step can be captured in a CUDA graph (`graph=True` hands
the whole loop to `mfm_fast.graphs.steer_graphed`).
Every sampler counts the network and reward work it actually ran (`Cost`) and reports the paper's NFE accounting.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from ._checks import check_cond_rows, check_finite_scalar, check_positive_int, host_checks_allowed
from .interpolant import time_grid
from .rewards import CheckedReward, as_reward
from .sampling import Generators, check_generators, rand_groups, randn_rows
from .steps import (METHODS, RENORMS, SteerResult, base_drift, bcast_t, check_clamp, check_common, check_diverged,
                    check_steer_args, divergence_named, divergence_scale, dps_grad, finish, full_t, guided_drift,
                    make_step, paper_nfe, progress_bar, renormalise, steer_ratio, steer_step)
from .value import Cost, CountedModel, CountedReward, check_estimator, check_pathwise, estimate, log_weights

# the step functions and checks live in mfm_fast.steps (shared with mfm_fast.graphs); they are part of this API too
__all__ = ["METHODS", "RENORMS", "SEARCH_MODES", "SEARCH_GRID_POWER", "SteerResult", "base_drift", "best_of_n",
           "dps_grad", "ess", "guided_drift", "make_step", "paper_nfe", "renormalise", "search_step", "steer",
           "steer_ratio", "steer_step", "systematic_resample"]

SEARCH_MODES = ("particle", "global")
# MFM-Search runs on linspace(t_start, 1, K+1) ** SEARCH_GRID_POWER (release), concentrating steps near t = 1.
SEARCH_GRID_POWER = 2.5


# ---------------------------------------------------------------------------------------------- search and SMC steps


def search_step(model, reward, x, t, t_next, eps, xi, *, mode: str, population: int, cond: dict):
    """MFM-Search: N one-step samples per particle, keep the best (per particle, or per population for
    "global"), move to x' = t'·x̂1* + (1−t')·ξ. eps (B, N, *event). Returns (x', x̂1*, λ-free reward of x̂1*)."""
    B, N = eps.shape[:2]
    ev = x.shape[1:]
    tb = full_t(t, x)
    rows = eps.reshape(B * N, *ev)
    x1 = (rows + model(torch.zeros_like(tb), torch.ones_like(tb), rows, tb, x, **cond)).view(B, N, *ev)
    r = reward(x1.reshape(B * N, *ev)).view(B, N)
    if mode == "particle":
        best = r.argmax(dim=1)
        x1b, rb = x1[torch.arange(B, device=x.device), best], r.gather(1, best[:, None])[:, 0]
    else:
        G = B // population
        flat = r.view(G, population * N)
        best = flat.argmax(dim=1)  # (G,)
        x1g = x1.view(G, population * N, *ev)[torch.arange(G, device=x.device), best]
        x1b = x1g.repeat_interleave(population, dim=0)
        rb = flat.gather(1, best[:, None])[:, 0].repeat_interleave(population)
    tn = bcast_t(t_next, x)
    return tn * x1b + (1 - tn) * xi, x1b, rb


def systematic_resample(log_w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Systematic resampling per row: log_w (G, P) unnormalised, u (G,) uniforms in [0, 1).
    Returns ancestor indices (G, P); particle i is copied ⌊P·W_i⌋ or ⌈P·W_i⌉ times, E[copies] = P·W_i."""
    G, P = log_w.shape
    cdf = torch.softmax(log_w, dim=1).cumsum(dim=1)
    cdf = cdf / cdf[:, -1:]  # exact 1 at the end despite rounding
    pos = (u[:, None] + torch.arange(P, device=log_w.device, dtype=cdf.dtype)) / P
    return torch.searchsorted(cdf, pos.contiguous()).clamp_max(P - 1)


def ess(log_w: torch.Tensor) -> torch.Tensor:
    """Effective sample size per row of unnormalised log weights (G, P)."""
    return torch.exp(2 * torch.logsumexp(log_w, 1) - torch.logsumexp(2 * log_w, 1))


# ---------------------------------------------------------------------------------------------- samplers


def _randn(shape, like, generator):
    return randn_rows(shape, like, generator)


def _run_doob(model, reward, x, grid, method, sde, n_particles, generator, progress, step_kw):
    step = make_step(model, reward, method=method, sde=sde, **step_kw)
    K = grid.shape[0] - 1
    scale = divergence_scale(x) if method != "none" else None
    for k in progress_bar(range(K), progress, f"steer[{method}]"):
        eps = _randn((x.shape[0], n_particles, *x.shape[1:]), x, generator) if method in ("mfm-g", "mfm-gf") \
            else None
        xi = _randn(x.shape, x, generator) if sde else None
        x = step(x, grid[k], grid[k + 1] - grid[k], eps, xi)
        if scale is not None:
            check_diverged(x, k, K, grid[k + 1], scale, method, step_kw["lam"], step_kw["renorm"])
    return x


def _run_search(model, reward, x, grid, n_particles, mode, population, generator, progress, cond):
    K = grid.shape[0] - 1
    for k in progress_bar(range(K), progress, "steer[search]"):
        eps = _randn((x.shape[0], n_particles, *x.shape[1:]), x, generator)
        xi = _randn(x.shape, x, generator)
        x, _, _ = search_step(model, reward, x, grid[k], grid[k + 1], eps, xi, mode=mode, population=population,
                              cond=cond)
    return x  # the last move is to t' = 1, where x' = x̂1*


def _run_smc(model, reward, x, grid, n_particles, lam, estimator, clamp_ratio, chunk_size, population,
             ess_threshold, generator, progress, cond, posterior_steps=1, renorm=None, renorm_scale=1.0,
             jackknife=False):
    """Twisted SMC (TDS-style) on the Euler–Maruyama chain of the base SDE.

    Proposal q: the Doob-steered Euler–Maruyama step with ∇̂V; base transition p: the same step without ∇̂V (same
    σ²). Incremental weight exp(V̂_{t'}(x') − V̂_t(x))·p(x'|x)/q(x'|x), with V̂ at t = 1 the exact λ·r and the
    initial weight exp(V̂_{t_0}(x_0)); the V̂ telescope, so the final weights target base chain × exp(λ·r) whatever
    the estimation noise, and log Ẑ (product of mean weights over resampling epochs) is unbiased for
    E_chain[exp(λ·r(x_K))]. Systematic resampling within each population when ESS < ess_threshold·P.
    `renorm` rescales the proposal's steering move against the base SDE drift; p/q corrects the weights for it.
    """
    B, ev = x.shape[0], x.shape[1:]
    P, G = population, x.shape[0] // population
    dims = tuple(range(1, x.dim()))
    K = grid.shape[0] - 1
    scale = divergence_scale(x)

    def value(t, x_):
        eps = _randn((B, n_particles, *ev), x_, generator)
        return estimate(model, reward, full_t(t, x_), x_, eps, estimator, lam, chunk_size, cond, posterior_steps,
                        jackknife)

    V, g = value(grid[0], x)
    log_w = V.clone()
    log_z = torch.zeros(G, device=x.device, dtype=log_w.dtype)
    n_res = torch.zeros((), device=x.device, dtype=torch.long)
    offs = (torch.arange(G, device=x.device) * P)[:, None]
    for k in progress_bar(range(K), progress, "steer[smc]"):
        t, dt = grid[k], grid[k + 1] - grid[k]
        kk = steer_ratio(t, clamp_ratio)
        b = base_drift(model, t, x, cond)
        base = b + kk * (t * b - x) / (1 - t)
        mean_p = x + dt * base
        move = dt * 2 * kk * g
        if renorm is not None:
            move = renormalise(dt * base, move, renorm, renorm_scale)
        mean_q = mean_p + move
        var = 2 * kk * dt
        x = mean_q + torch.sqrt(var) * _randn(x.shape, x, generator)
        log_pq = (((x - mean_q).pow(2).sum(dims) - (x - mean_p).pow(2).sum(dims)) / (2 * var)).to(log_w.dtype)
        check_diverged(x, k, K, grid[k + 1], scale, "smc", lam, renorm)
        if k + 1 < K:
            V_new, g = value(grid[k + 1], x)
        else:
            V_new = log_weights(lam, reward(x))  # λ·r in float64: huge λ stays finite
        log_w = log_w + V_new - V + log_pq
        V = V_new
        if k + 1 < K:
            lw = log_w.view(G, P)
            do = ess(lw) < ess_threshold * P  # (G,)
            idx = systematic_resample(lw, rand_groups(G, x, generator))
            idx = torch.where(do[:, None], idx, torch.arange(P, device=x.device)) + offs
            idx = idx.reshape(-1)
            log_z = log_z + torch.where(do, torch.logsumexp(lw, 1) - math.log(P), torch.zeros_like(log_z))
            x, V, g = x[idx], V[idx], g[idx]
            log_w = torch.where(do[:, None], torch.zeros_like(lw), lw).reshape(-1)
            n_res = n_res + do.sum()
    lw = log_w.view(G, P)
    log_z = log_z + torch.logsumexp(lw, 1) - math.log(P)
    log_w_norm = (lw - torch.logsumexp(lw, 1, keepdim=True)).reshape(-1)
    idx = (systematic_resample(lw, rand_groups(G, x, generator))
           + offs).reshape(-1)
    return x[idx], x, log_w_norm, log_z, int(n_res)


def _check_population(population, B):
    if population is None:
        return B
    check_positive_int("population", population)
    if B % population:
        raise ValueError(f"population ({population}) must divide the batch size ({B})")
    return population


def _check_population_cond(method, population, cond, B):
    """SMC resampling and global search copy states between the rows of a population: every per-row conditioning
    tensor (y, a per-row cfg, ...) must then be constant within each population, else chains cross classes."""
    for name, v in cond.items():
        if not torch.is_tensor(v) or v.dim() == 0 or v.shape[0] != B or not host_checks_allowed(v):
            continue
        rows = v.reshape(B, -1)
        groups = rows.view(B // population, population, -1)
        if not bool((groups == groups[:, :1]).all()):
            # rows sharing a value must be contiguous runs of one length for populations to separate them
            starts = torch.cat([torch.ones(1, dtype=torch.bool, device=v.device),
                                (rows[1:] != rows[:-1]).any(1)]).nonzero()[:, 0].tolist() + [B]
            runs = {b - a for a, b in zip(starts, starts[1:])}
            hint = (f"e.g. population={runs.pop()}" if len(runs) == 1 else
                    f"order the rows so that rows sharing {name} are contiguous, in runs of one length")
            raise ValueError(f"method={method!r} resamples within a population of {population} rows, but {name} "
                             f"differs within a population, which would move chains across conditionings: pass "
                             f"population= so that each population holds one {name} (its rows contiguous); {hint}")


def steer(model, reward, noise: torch.Tensor, steps: int = 250, method: str = "mfm-g", n_particles: int = 1,
          lam: float = 1.0, sde: bool = False, renorm: Optional[str] = None, t_start: float = 0.01,
          generator: Generators = None, graph: bool = False, return_result: bool = False, *,
          renorm_scale: float = 1.0, clamp_ratio: Optional[float] = 25.0, chunk_size: Optional[int] = None,
          search_mode: str = "particle", population: Optional[int] = None, smc_estimator: str = "mfm-g",
          ess_threshold: float = 0.5, progress: Optional[bool] = None, posterior_steps: int = 1,
          jackknife: bool = False, **cond):
    """Reward-steered samples (B, *event) from `noise` (B, *event) at t_start, or a `SteerResult`.

    method: "none" | "mfm-g" | "mfm-gf" | "dps" (Doob ODE, or SDE if `sde`; module docstring) | "search" |
    "smc". `n_particles`: one-step samples per state and step (value estimators, search candidates).
    `renorm`/`renorm_scale` apply to the Doob and DPS methods and to SMC's proposal (its weights correct for it).
    `clamp_ratio`: cap on (1−t)/t (None: exact Doob). `chunk_size`: rows per network call in the value estimators.
    `population`: consecutive rows forming one population for "search" with search_mode="global" and for "smc"
    (default: the whole batch); per-row conditioning (e.g. `y`) must be constant within each population.
    MFM-Search runs on linspace(t_start, 1, K+1)**2.5 and returns the best one-step sample of the last step.
    SMC always uses the Euler–Maruyama transition (its weights need a transition density), `smc_estimator` for V̂
    and ∇̂V, resamples systematically when ESS < `ess_threshold`·P, and returns the particles resampled once more
    by their final weights (the weighted ones are in the `SteerResult`).
    `graph=True` runs `mfm_fast.graphs.steer_graphed` on CUDA, falling back to eager with a warning.
    `generator`: one torch.Generator for the batch, or a list of one per row of `noise`: every random number of
    row i (particle noise, SDE noise; SMC's resampling uniforms come from the first row of each population) is then
    drawn from generator[i] alone, so a row's randomness does not depend on the rest of the batch.
    `posterior_steps` = m: the value estimators (MFM-G, MFM-GF, SMC's) draw each one-step sample with the m-step
    composed flow map, m network calls per particle (counted, and in the paper NFE).
    `jackknife=True` (N ≥ 2; MFM-G, MFM-GF, SMC): the value estimators use `value.jackknife_weights` instead of the
    softmax, removing the O(1/N) bias that makes MFM-G over-steer and MFM-GF under-steer at small N, at no extra
    network work unless `chunk_size` splits a state's particles (`value.value_and_grad`).
    """
    t_start, lam, renorm_scale, chunk_size = check_steer_args(model, noise, steps, t_start, method, n_particles, lam,
                                                              renorm, renorm_scale, clamp_ratio, chunk_size,
                                                              jackknife=jackknife)
    if search_mode not in SEARCH_MODES:
        raise ValueError(f"search_mode must be one of {SEARCH_MODES}, got {search_mode!r}")
    check_cond_rows(cond, noise.shape[0], "noise")
    check_generators("generator", generator, noise.shape[0], noise.device)
    population = _check_population(population, noise.shape[0])
    if method == "smc" or (method == "search" and search_mode == "global"):
        _check_population_cond(method, population, cond, noise.shape[0])
    check_estimator("smc_estimator", smc_estimator)
    posterior_steps = check_positive_int("posterior_steps", posterior_steps)
    if method in ("mfm-g", "mfm-gf") or method == "smc":
        check_pathwise(model, method if method != "smc" else smc_estimator)
    ess_threshold = check_finite_scalar("ess_threshold", ess_threshold)
    if not 0 <= ess_threshold <= 1:
        raise ValueError(f"ess_threshold must lie in [0, 1], got {ess_threshold}")
    reward = reward if isinstance(reward, CheckedReward) else as_reward(reward)

    if graph and not (generator is None or isinstance(generator, torch.Generator)):
        warnings.warn("graph=True replays one generator's draws; per-row generators run eagerly", stacklevel=2)
        graph = False
    if graph:
        kwargs = dict(steps=steps, method=method, n_particles=n_particles, lam=lam, sde=sde, renorm=renorm,
                      t_start=t_start, generator=generator, return_result=return_result, renorm_scale=renorm_scale,
                      clamp_ratio=clamp_ratio, chunk_size=chunk_size, search_mode=search_mode,
                      population=population, smc_estimator=smc_estimator, ess_threshold=ess_threshold,
                      progress=progress, posterior_steps=posterior_steps, jackknife=jackknife, **cond)
        out = _try_graphed(model, reward, noise, kwargs)
        if out is not None:
            return out

    B = noise.shape[0]
    cost = Cost(batch=B, nfe=paper_nfe(method, steps, n_particles,
                                       population if search_mode == "global" else 1, posterior_steps))
    cmodel, creward = CountedModel(model, cost), CountedReward(reward, cost)
    grid = time_grid(t_start, steps, noise)
    extra = {}
    with torch.no_grad(), divergence_named():  # an error after states ran off names lam, not the reward
        if method == "search":
            x = _run_search(cmodel, creward, noise, grid ** SEARCH_GRID_POWER, n_particles, search_mode,
                            population, generator, progress, cond)
        elif method == "smc":
            x, parts, log_w, log_z, n_res = _run_smc(cmodel, creward, noise, grid, n_particles, lam, smc_estimator,
                                                     clamp_ratio, chunk_size, population, ess_threshold,
                                                     generator, progress, cond, posterior_steps, renorm,
                                                     renorm_scale, jackknife)
            extra = dict(particles=parts, log_weights=log_w, log_normalizer=log_z, n_resamples=n_res)
        else:
            step_kw = dict(lam=lam, renorm=renorm, renorm_scale=renorm_scale, clamp_ratio=clamp_ratio,
                           chunk_size=chunk_size, cond=cond, posterior_steps=posterior_steps, jackknife=jackknife)
            x = _run_doob(cmodel, creward, noise, grid, method, sde, n_particles, generator, progress, step_kw)
    return finish(x, cost, reward, return_result, **extra)


def _try_graphed(model, reward, noise, kwargs):
    """The CUDA-graph path, or None (with a warning saying why) when it cannot run."""
    if noise.device.type != "cuda":
        warnings.warn(f"graph=True needs CUDA tensors; noise is on {noise.device}, running eagerly", stacklevel=3)
        return None
    try:
        from .graphs import GraphCaptureError, steer_graphed
    except ImportError as e:
        warnings.warn(f"graph=True: CUDA-graph steering is unavailable ({e}); running eagerly", stacklevel=3)
        return None
    try:
        return steer_graphed(model, reward, noise, **kwargs)
    except GraphCaptureError as e:
        warnings.warn(f"graph=True: CUDA-graph capture failed ({e}); running eagerly", stacklevel=3)
        return None


def best_of_n(model, reward, noise: torch.Tensor, n: int, steps: int = 250, t_start: float = 0.01,
              sde: bool = False, clamp_ratio: Optional[float] = 25.0, generator: Generators = None,
              return_result: bool = False, progress: Optional[bool] = None, **cond):
    """Best-of-N: for each row of `noise` (B, *event), n base samples (Euler, `steps` steps; the first starts from
    that row, the other n − 1 from fresh noise), keep the one with the highest reward. Cost K·n + n per sample.
    `generator`: one for the batch, or one per row of `noise` (that row's candidates draw from it)."""
    t_start = check_common(model, noise, steps, t_start)
    check_generators("generator", generator, noise.shape[0], noise.device)
    check_positive_int("n", n)
    check_clamp(clamp_ratio)
    check_cond_rows(cond, noise.shape[0], "noise")
    reward = reward if isinstance(reward, CheckedReward) else as_reward(reward)
    B, ev = noise.shape[0], noise.shape[1:]
    cost = Cost(batch=B, nfe=paper_nfe("best-of-n", steps, n))
    cmodel, creward = CountedModel(model, cost), CountedReward(reward, cost)
    grid = time_grid(t_start, steps, noise)
    x0 = torch.cat([noise[:, None], _randn((B, n - 1, *ev), noise, generator)], dim=1).reshape(B * n, *ev)
    cond_n = {k: (v.repeat_interleave(n, 0) if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == B else v)
              for k, v in cond.items()}
    # per-row generators: a row's n candidates draw, in order, from that row's generator
    gen_n = generator if generator is None or isinstance(generator, torch.Generator) else \
        [g for g in generator for _ in range(n)]
    with torch.no_grad():
        x1 = _run_doob(cmodel, creward, x0, grid, "none", sde, 1, gen_n, progress,
                       dict(lam=1.0, renorm=None, renorm_scale=1.0, clamp_ratio=clamp_ratio, chunk_size=None,
                            cond=cond_n)).view(B, n, *ev)
        r = creward(x1.reshape(B * n, *ev)).view(B, n)
        best = r.argmax(dim=1)
        samples = x1[torch.arange(B, device=noise.device), best]
    if not return_result:
        return samples
    return SteerResult(samples, cost, r.gather(1, best[:, None])[:, 0])
