"""MFM-FT: off-policy, unbiased reward fine-tuning of the diagonal drift (METHOD §4), for vector data and for
class-conditional latent image models (the release's `scripts/finetune.py` recipe).

Per step, from data states x_t = t·x1 + (1−t)·ε (no rollouts) and one frozen-MFM posterior sample
x̂1 = X_{0,1}(ε'; t, x_t):

    ĥ = exp(λ·r(x̂1)),   g = ∇_{x_t} ĥ   (autograd through the frozen MFM's context input)
    target = b^base − (ĥ − 1)·(b^θ − b^base) + (σ_t²/2)·g          (stop-gradient)
    L_FT(θ) = mean ‖b^θ_t(x_t) − target‖²

Since E[ĥ | x_t] = h = exp V_t and E[g | x_t] = ∇h = h·∇V_t, the expected gradient is ∝ h·(b^θ − b − (σ²/2)∇V):
the fixed point is b^θ = b + (σ_t²/2)·∇V_t. With σ_t²/2 = (1−t)/t this is the Doob-tilted ODE drift of METHOD §3,
whose Euler samples follow p1·exp(λr)/Z. Adding a constant to r rescales ĥ and leaves that fixed point unchanged.

σ_t²/2 options (`half_sigma2`): "(1-t)/t" (the tilted ODE drift), "constant" (the release's default, σ² = 200,
i.e. σ²/2 = `sigma_const` = 100) and "schedule" (the release's option σ² = 2·clamp(1/t − 1, 0, 1000)).

What the release does on images, and this module with it (`image_defaults`, `python -m mfm_fast finetune`):
- per-row class labels y; the drifts b^θ and b^base are called with y and no guidance (cfg 1), the posterior sample
  with y at the guidance scale 2.5 (`posterior_cond`);
- the reward scores the SD-VAE decode of x̂1 (unclamped: (decode + 1)/2) against per-row prompts
  "A high-resolution, high-quality photograph of a " + the class's WordNet lemmas (`finetune_prompts`);
- t ~ U[0, 1], the loss averaged over every element; λ = 50, RAdam at 1e-4 with a linear warm-up from 0.1·lr over
  250 steps, batch 18 per GPU, bf16 autocast, gradient clip 1.5, EMA 0.999 from step 100.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn

from . import distributed as D
from ._checks import as_time, check_finite_scalar, check_positive_int, check_state
from .interpolant import bcast, interpolate
from .runloop import RunLoop, check_writable, remove_stale_tmp, run_loop, step_generator
from .sampling import drift, posterior_sample

SCHEDULES = ("(1-t)/t", "constant", "schedule")
REDUCTIONS = ("mean", "sum", "none")


def half_sigma2(t: torch.Tensor, schedule: str = "(1-t)/t", sigma_const: float = 100.0) -> torch.Tensor:
    """σ_t²/2 per sample: "(1-t)/t" (the tilted ODE drift at the fixed point), "constant" (`sigma_const`, the
    release's 100) or "schedule" (the release's σ² = 2·clamp(1/(t + 1e-8) − 1, 0, 1000), finite at t = 0)."""
    if schedule == "(1-t)/t":
        return (1 - t) / t
    if schedule == "constant":
        return torch.full_like(t, float(sigma_const))
    if schedule == "schedule":
        return torch.clamp(1 / (t + 1e-8) - 1, min=0, max=1000)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


class FineTunedDrift(nn.Module):
    """Model-protocol view of a fine-tuned drift: forward(s, u, xbar, t, x) = b^θ_s(xbar) = mfm(s, s, xbar, 0, 0).

    Only the diagonal with the empty context was trained, so only the drift is meaningful: sample it with
    `mfm_fast.sampling.ode_sample` (or use it as the base drift of a steering ODE), not with posterior sampling.
    """

    def __init__(self, mfm: nn.Module):
        super().__init__()
        self.mfm = mfm
        self.supports_particle_groups = getattr(mfm, "supports_particle_groups", False)

    @property
    def event_shape(self) -> tuple:
        return tuple(self.mfm.event_shape)

    @property
    def config(self):
        """The wrapped network's config (DiT models: classes, guidance table), for samplers that read it."""
        return getattr(self.mfm, "config", None)

    def forward(self, s, u, xbar, t, x, **cond):
        return self.mfm(s, s, xbar, torch.zeros_like(t), torch.zeros_like(x), **cond)


@dataclass
class FTTarget:
    """One MFM-FT regression batch: the stop-gradient target and its ingredients (all detached)."""
    target: torch.Tensor
    b_base: torch.Tensor
    h: torch.Tensor  # ĥ = exp(λ r(x̂1)), (B,)
    grad_h: torch.Tensor  # g = ∇_{x_t} ĥ
    x1_hat: torch.Tensor
    reward: Optional[torch.Tensor] = None  # r(x̂1), (B,)


def _call_reward(reward: Callable, x1_hat: torch.Tensor, prompts) -> torch.Tensor:
    r = reward(x1_hat) if prompts is None else reward(x1_hat, prompts)
    B = x1_hat.shape[0]
    if not torch.is_tensor(r) or r.shape != (B,):
        raise ValueError(f"reward must return a tensor of shape ({B},), got "
                         f"{tuple(r.shape) if torch.is_tensor(r) else type(r).__name__}")
    if not bool(torch.isfinite(r).all()):
        raise ValueError("reward returned NaN or infinite values")
    return r


def _check_times(t: torch.Tensor, schedule: str) -> None:
    if schedule == "(1-t)/t":
        if bool(((t <= 0) | (t >= 1)).any()):
            raise ValueError("t must lie strictly inside (0, 1) with schedule '(1-t)/t': σ_t² = 2(1−t)/t diverges "
                             "at t = 0 (use t_eps > 0, or the 'schedule' / 'constant' options)")
    elif bool(((t < 0) | (t > 1)).any()):
        raise ValueError("t must lie in [0, 1]")


def ft_target(base: nn.Module, reward: Callable, t: torch.Tensor, x_t: torch.Tensor, b_theta: torch.Tensor,
              lam: float = 1.0, schedule: str = "(1-t)/t", sigma_const: float = 100.0,
              noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
              posterior_cond: Optional[dict] = None, prompts: Optional[Sequence[str]] = None,
              **cond) -> FTTarget:
    """The MFM-FT target at states x_t (B, *event), times t (B,), current drift b_theta (detached).

    cond: conditioning of the base drift (e.g. y = per-row labels). posterior_cond: conditioning of the frozen
    MFM's posterior sample (default `cond`; the release: y and cfg = 2.5). prompts: one per row, passed to the
    reward as reward(x̂1, prompts) (without prompts: reward(x̂1)). noise (B, *event): the posterior's ε'."""
    check_state("x_t", x_t)
    check_state("b_theta", b_theta, x_t.shape[1:], batch=x_t.shape[0])
    half_sigma2(torch.ones(1), schedule, sigma_const)  # validates the schedule before any model call
    t = as_time("t", t, x_t.shape[0], x_t)
    _check_times(t, schedule)
    lam = check_finite_scalar("lam", lam)
    if prompts is not None and (isinstance(prompts, str) or len(prompts) != x_t.shape[0]):
        raise ValueError(f"prompts must hold one prompt per row ({x_t.shape[0]}), got "
                         f"{1 if isinstance(prompts, str) else len(prompts)}")
    post = cond if posterior_cond is None else posterior_cond
    with torch.no_grad():
        b_base = drift(base, t, x_t, **cond)
    with torch.enable_grad():
        xg = x_t.detach().requires_grad_(True)
        x1_hat = posterior_sample(base, t, xg, 1, generator=generator, noise=noise, **post)[:, 0]
        r = _call_reward(reward, x1_hat, prompts)
        h = torch.exp(lam * r)
        if not h.requires_grad:
            raise ValueError("the reward is not differentiable in its input: MFM-FT needs ∇_{x_t} exp(λ·r(x̂1))")
        if not bool(torch.isfinite(h).all()):
            raise ValueError(f"exp(lam·r) overflows: lam = {lam} times rewards up to {float(r.max()):.4g}; lower "
                             "lam or shift the reward")
        (g,) = torch.autograd.grad(h.sum(), xg)
    h = h.detach()
    b_theta = b_theta.detach()
    g = g.to(b_base.dtype)
    target = (b_base - bcast(h.to(b_base.dtype) - 1, b_base) * (b_theta - b_base)
              + bcast(half_sigma2(t, schedule, sigma_const).to(b_base.dtype), g) * g)
    return FTTarget(target, b_base, h, g.detach(), x1_hat.detach(), r.detach())


def sample_times(batch: int, t_eps: float, device, dtype, generator=None) -> torch.Tensor:
    """t ~ U[t_eps, 1 − t_eps] (t_eps = 0: the release's U[0, 1])."""
    return t_eps + (1 - 2 * t_eps) * torch.rand(batch, generator=generator, device=device, dtype=dtype)


def ft_draws(x1: torch.Tensor, t_eps: float = 0.0, generator: Optional[torch.Generator] = None) -> tuple:
    """(t, ε, ε') of one batch, drawn in the release's order: t ~ U, the interpolant's ε, the posterior's ε'."""
    B = x1.shape[0]
    t = sample_times(B, t_eps, x1.device, x1.dtype, generator)
    eps = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
    noise = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
    return t, eps, noise


def ft_loss(model: nn.Module, base: nn.Module, reward: Callable, x1: torch.Tensor, lam: float = 1.0,
            schedule: str = "(1-t)/t", sigma_const: float = 100.0, t_eps: float = 1e-2,
            generator: Optional[torch.Generator] = None, reduction: str = "mean",
            posterior_cond: Optional[dict] = None, prompts: Optional[Sequence[str]] = None,
            draws: Optional[tuple] = None, return_target: bool = False, **cond):
    """L_FT for a data batch x1. `model` follows the model protocol; its drift v_{t,t}(x; 0, 0) is b^θ.

    reduction: "mean" over every element (the release), "sum" over each sample's elements then the batch mean,
    "none" the per-sample mean over elements (B,). draws: (t, ε, ε') from `ft_draws` instead of drawing them from
    `generator` (same order). cond / posterior_cond / prompts: see `ft_target`. return_target: (loss, FTTarget).
    """
    check_state("x1", x1)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    half_sigma2(torch.ones(1), schedule, sigma_const)
    t, eps, noise = ft_draws(x1, t_eps, generator) if draws is None else draws
    x_t = interpolate(t, eps, x1)
    b_theta = drift(model, t, x_t, **cond)
    tgt = ft_target(base, reward, t, x_t, b_theta.detach(), lam, schedule, sigma_const, noise=noise,
                    posterior_cond=posterior_cond, prompts=prompts, **cond)
    sq = (b_theta - tgt.target).pow(2).flatten(1)
    if reduction == "none":
        loss = sq.mean(1)
    elif reduction == "mean":
        loss = sq.mean()
    else:
        loss = sq.sum(1).mean()
    return (loss, tgt) if return_target else loss


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class FinetuneConfig:
    """MFM-FT settings. The defaults are the release's image recipe (conf/config_finetune.yaml); `gmm_defaults`
    is the recipe for the 2-D toy."""
    steps: int = 10000
    batch_size: int = 18  # global batch (all ranks together); the release: 18 per GPU
    lr: float = 1e-4
    warmup: int = 250  # linear warm-up from warmup_start·lr to lr over this many steps (torch LinearLR)
    warmup_start: float = 0.1
    optimizer: str = "radam"
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    lam: float = 50.0
    schedule: str = "constant"
    sigma_const: float = 100.0  # σ²/2 of the "constant" schedule (the release's σ² = 200)
    t_eps: float = 0.0  # t ~ U[t_eps, 1 − t_eps]
    reduction: str = "mean"  # see ft_loss
    cfg_scale: Optional[float] = 2.5  # guidance of the posterior sample of labelled data (None: no cfg argument)
    ema_decay: float = 0.999
    ema_start: int = 100  # the EMA copies the weights until this step, then averages
    ema_warmup: bool = False  # decay min(ema_decay, (1 + k)/(10 + k)) k steps after ema_start (short runs)
    grad_clip: float = 1.5
    micro_batch: int = 0  # rows per forward/backward on each rank (gradient accumulation); 0 = all rows
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0  # 0 with an output path: every max(1, min(1000, steps // 10)) steps
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    device: str = "auto"
    grad_checkpointing: bool = False
    parallel: str = "ddp"

    RESUME_FREE = ("steps", "device", "log_every", "checkpoint_every", "grad_checkpointing", "parallel",
                   "micro_batch")

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every"):
            check_positive_int(name, getattr(self, name))
        for name in ("warmup", "ema_start", "micro_batch", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {self.reduction!r}")
        if not 0 <= self.t_eps < 0.5:
            raise ValueError(f"t_eps must lie in [0, 0.5), got {self.t_eps}")
        if self.schedule == "(1-t)/t" and self.t_eps == 0:
            raise ValueError("schedule '(1-t)/t' needs t_eps > 0: σ_t² = 2(1−t)/t diverges at t = 0")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        for name in ("lr", "lam", "sigma_const", "grad_clip", "warmup_start", "weight_decay"):
            check_finite_scalar(name, getattr(self, name))
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.cfg_scale is not None:
            check_finite_scalar("cfg_scale", self.cfg_scale)
        if self.optimizer not in ("adam", "adamw", "radam"):
            raise ValueError(f"optimizer must be 'adam', 'adamw' or 'radam', got {self.optimizer!r}")
        if self.parallel not in D.PARALLEL:
            raise ValueError(f"parallel must be one of {D.PARALLEL}, got {self.parallel!r}")
        self.betas = tuple(float(b) for b in self.betas)

    def lr_at(self, step: int) -> float:
        """torch's LinearLR(start_factor=warmup_start, total_iters=warmup), then constant (the release)."""
        if step < self.warmup:
            return self.lr * (self.warmup_start + (1 - self.warmup_start) * step / self.warmup)
        return self.lr

    def ema_decay_at(self, step: int) -> float:
        """0 (copy the weights) up to step `ema_start`, `ema_decay` after (the release: AveragedModel from step
        100, which starts from the weights of that step)."""
        if step <= self.ema_start:
            return 0.0
        k = step - self.ema_start
        return min(self.ema_decay, (1 + k) / (10 + k)) if self.ema_warmup else self.ema_decay


def gmm_defaults(**overrides) -> FinetuneConfig:
    """The 2-D GMM recipe (`experiment finetune-gmm`): the principled σ_t²/2 = (1−t)/t, λ = 1, plain Adam, no
    guidance. Measured in the README."""
    base = dict(steps=1500, batch_size=256, lr=3e-4, warmup=0, optimizer="adam", lam=1.0, schedule="(1-t)/t",
                t_eps=1e-2, cfg_scale=None, ema_decay=0.999, ema_start=0, ema_warmup=True, grad_clip=1.0,
                log_every=50)
    return FinetuneConfig(**{**base, **overrides})


@dataclass
class FineTuneResult:
    model: FineTunedDrift  # EMA weights: the drift to sample
    raw: FineTunedDrift  # last iterate
    config: FinetuneConfig
    history: list = field(default_factory=list)  # dicts: step, loss, reward, h, grad_norm, lr


def split_batch(batch) -> tuple:
    """A data batch as (x1, labels or None): a tensor x1, a pair (x1, labels) or a dict with "x1" and "y"."""
    if torch.is_tensor(batch):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, dict) and "x1" in batch:
        return batch["x1"], batch.get("y")
    raise TypeError("data must yield a tensor x1, a pair (x1, labels) or a dict with 'x1' (and 'y')")


def data_sampler(data) -> Callable:
    """data -> sample(n, generator) -> x1 | (x1, labels), with a CPU generator: a tensor of samples (n, *event),
    latent shards (a `LatentShards`, a `LatentRows` or a shard directory), or a callable (n, generator) -> batch."""
    from .latents import LatentRows, LatentShards
    if isinstance(data, (str, os.PathLike)):
        data = LatentRows(data)
    elif isinstance(data, LatentShards):
        data = LatentRows(data)
    if isinstance(data, LatentRows):
        return data.sample
    if callable(data) and not torch.is_tensor(data):
        return data
    if not torch.is_tensor(data) or data.dim() < 2:
        raise TypeError("data must be a tensor (n, *event) of samples, latent shards (LatentShards, LatentRows or "
                        "a shard directory) or a callable (n, generator) -> x1 | (x1, labels)")

    def sample(n, generator=None):
        idx = torch.randint(0, data.shape[0], (n,), generator=generator)
        return data[idx.to(data.device)]
    return sample


class FinetuneRun(RunLoop):
    """MFM-FT on the run loop: one frozen MFM (posterior samples and the base drift) and a trainable drift.

    Step k draws its global batch and (t, ε, ε') from `step_generator(seed, k)` on the CPU; each rank keeps its
    slice and runs it in micro-batches of cfg.micro_batch rows (the gradient of the full batch mean, whatever
    the micro-batch)."""

    kind = "finetune"

    def __init__(self, mfm: nn.Module, trainable: nn.Module, reward: Callable, sample_batch: Callable,
                 cfg: FinetuneConfig, prompts: Optional[Callable] = None, identity: Optional[dict] = None,
                 **cond):
        super().__init__(trainable, cfg)
        self.base = copy.deepcopy(mfm).to(self.device).eval().requires_grad_(False)
        self.reward, self.sample_batch, self.prompts, self.cond = reward, sample_batch, prompts, cond
        self._identity = dict(identity or {})
        world = self.dist.world_size
        if cfg.batch_size % world:
            raise ValueError(f"batch_size={cfg.batch_size} cannot be split over {world} ranks")
        self.rows = D.local_rows((cfg.batch_size,), self.dist.rank, world)

    def identity(self) -> dict:
        return self._identity

    def extra(self) -> dict:
        return {"finetune": {**dataclasses.asdict(self.cfg), **self._identity}}

    def global_batch(self, step: int):
        cfg = self.cfg
        gen = step_generator(cfg.seed, step)
        x1, labels = split_batch(self.sample_batch(cfg.batch_size, gen))
        if x1.shape[0] != cfg.batch_size:
            raise ValueError(f"the data returned {x1.shape[0]} rows, expected {cfg.batch_size}")
        x1 = x1.detach().to("cpu", torch.float32)
        draws = ft_draws(x1, cfg.t_eps, gen)
        return x1, labels, draws

    def backward(self) -> dict:
        cfg = self.cfg
        x1, labels, draws = self.global_batch(self.step)
        rows = self.rows
        n = len(rows)
        chunk = cfg.micro_batch or n
        totals = {"loss": 0.0, "reward": 0.0, "h": 0.0}
        for lo in range(0, n, chunk):
            idx = rows[lo:lo + chunk]
            m = len(idx)
            to = lambda z: z[idx].to(self.device, self.dtype)  # noqa: E731
            cond = dict(self.cond)
            prompts = None
            if labels is not None:
                y = labels[idx].to(self.device)
                cond["y"] = y
                if self.prompts is not None:
                    prompts = self.prompts(labels[idx])
            post = dict(cond)
            if cfg.cfg_scale is not None and labels is not None:  # guidance is of the class conditioning
                post["cfg"] = torch.full((m,), float(cfg.cfg_scale), device=self.device)
            with self.autocast():
                loss, tgt = ft_loss(self.model, self.base, self.reward, to(x1), cfg.lam, cfg.schedule,
                                    cfg.sigma_const, reduction=cfg.reduction, posterior_cond=post, prompts=prompts,
                                    draws=tuple(to(d) for d in draws), return_target=True, **cond)
            (loss * (m / n)).backward()
            totals["loss"] = totals["loss"] + loss.detach().float() * (m / n)
            totals["reward"] = totals["reward"] + tgt.reward.float().sum() / n
            totals["h"] = totals["h"] + tgt.h.float().sum() / n
        return {k: torch.as_tensor(v, device=self.device) for k, v in totals.items()}


def finetune(mfm: nn.Module, reward: Callable, data, config: Optional[FinetuneConfig] = None,
             trainable: Optional[nn.Module] = None, progress: bool = True, callback: Optional[Callable] = None,
             callback_every: int = 0, out: Optional[str] = None, resume: bool = True, override: bool = False,
             prompts: Optional[Callable] = None, identity: Optional[dict] = None, **cond) -> FineTuneResult:
    """MFM-FT of `mfm`'s diagonal drift towards the λ-tilt of its data distribution.

    data: see `data_sampler` (samples, latent shards, or a callable (n, generator) -> x1 | (x1, labels) drawing
    with the given CPU generator). Labels, when present, condition both drifts and the posterior sample (`y`).
    reward(x̂1) -> (B,), or reward(x̂1, prompts) with `prompts(labels) -> list[str]` (e.g. `finetune_prompts`).
    trainable: the module whose drift v_{t,t}(x; 0, 0) is b^θ (model protocol); default a copy of `mfm`.
    out: checkpoint file, written atomically every `checkpoint_every` steps and at the end; resumed from when it
    exists (a run with other settings, or another frozen model `identity`, is refused unless override=True).
    callback(step, ema_model: FineTunedDrift) runs at step 0 (before training), every `callback_every` steps and at
    the end; the model is in eval mode and must not be modified. Under torchrun the ranks split the global batch.
    """
    cfg = config or FinetuneConfig()
    sample_data = data_sampler(data)
    if out is not None:
        check_writable(out)
        if D.info().is_main:
            remove_stale_tmp(out)
    trainable = copy.deepcopy(mfm if trainable is None else trainable).train().requires_grad_(True)
    if not any(p.requires_grad for p in trainable.parameters()):
        raise ValueError("the trainable drift has no parameters")
    run = FinetuneRun(mfm, trainable, reward, sample_data, cfg, prompts=prompts, identity=identity, **cond)
    raw_model, ema_model = FineTunedDrift(run.model), FineTunedDrift(run.ema)
    result = FineTuneResult(ema_model, raw_model, cfg)
    if callback is not None and run.step == 0 and not (out is not None and resume and os.path.exists(out)):
        callback(0, ema_model)

    def each(step, logs):
        if callback is not None and callback_every and (step % callback_every == 0 or step == cfg.steps):
            callback(step, ema_model)

    run_loop(run, out, resume=resume, progress=progress, callback=each, desc="MFM-FT", override=override,
             postfix=("loss", "reward"))
    result.history = run.history
    return result


def save_finetuned(path: str, result: FineTuneResult) -> None:
    """Checkpoint loadable with torch.load(weights_only=True): the MFM format of mfm_fast.train plus FT metadata."""
    from .train import save
    save(result.raw.mfm, path, ema=result.model.mfm, finetune=asdict(result.config))


def is_finetuned(path: str) -> bool:
    """Whether `path` is an mfm_fast checkpoint of a fine-tuned drift (written by `finetune` or `save_finetuned`)."""
    from .runloop import FORMAT
    if not str(path).endswith(".pt") or not os.path.isfile(path):
        return False
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 — not a readable checkpoint: not ours to judge here
        return False
    return isinstance(ckpt, dict) and ckpt.get("format") == FORMAT and "finetune" in (ckpt.get("extra") or {})


def load_finetuned(path: str, map_location=None, impl: str = "auto") -> FineTunedDrift:
    """The fine-tuned drift (EMA weights) saved by `finetune(out=...)` or `save_finetuned`."""
    from .train import load, read_checkpoint
    if "finetune" not in read_checkpoint(path, map_location="cpu").get("extra", {}):
        raise ValueError(f"{path!r} is an MFM checkpoint, not an MFM-FT one (no 'finetune' entry)")
    return FineTunedDrift(load(path, map_location=map_location, impl=impl))


# ---------------------------------------------------------------------------------------------- evaluation
def euler_sample(drift_model: nn.Module, noise: torch.Tensor, steps: int, labels: Optional[torch.Tensor] = None,
                 cfg_scale: Optional[float] = None) -> torch.Tensor:
    """Euler samples of a (fine-tuned) drift from t = 0 to 1 in `steps` uniform steps, with per-row labels and
    the guidance weight as the release's evaluation calls it (cfg 2.5 on the drift)."""
    from .sampling import ode_sample
    cond = {}
    if labels is not None:
        cond["y"] = labels
    if cfg_scale is not None:
        cond["cfg"] = torch.full((noise.shape[0],), float(cfg_scale), device=noise.device)
    return ode_sample(drift_model, noise, steps=steps, t_start=0.0, **cond)


def euler_shard(model: FineTunedDrift, decode: Callable, steps: int, label, cfg=None, context=None) -> Callable:
    """make_shard for `parallel_sample.run_sharded`: Euler samples of a fine-tuned drift (`steps` network calls
    each) of class `label` (an int or "random"), decoded to images by `decode(latents)`."""
    import contextlib
    from .parallel_sample import ShardOutput, _like, _noise_and_labels
    context = context or contextlib.nullcontext

    def make_shard(gens, start, stop):
        noise, y = _noise_and_labels(model, label, gens, _like(model, gens[0].device))
        with context():
            x = euler_sample(model, noise, steps, y, cfg)
        with torch.no_grad():
            images = decode(x)
        return ShardOutput(images, {}, {"forward_calls": steps, "forward_evals": steps * len(gens)}, y)
    return make_shard


class FinetuneEvaluator:
    """The paper's curves while fine-tuning: at step 0 and every `callback_every` steps, Euler samples (`steps`
    steps, guidance `cfg_scale`) of the EMA drift from M fixed (noise, class) pairs, decoded and scored under every
    scorer with the rows' prompts. Appends {"step", "n", <scorer>: mean} to OUT/eval.jsonl, writes
    OUT/grids/step_<k>.png and redraws OUT/rewards.png (each reward against the step).

    Under torchrun rank r evaluates rows r, r + world, ... and the means are all-reduced; rank 0 writes."""

    def __init__(self, out_dir: str, noise: torch.Tensor, labels: torch.Tensor, decode: Callable, scorers: dict,
                 prompts: Callable, steps: int = 250, cfg_scale: Optional[float] = 2.5, batch: int = 16,
                 grid: int = 16, context: Optional[Callable] = None):
        import contextlib
        self.out = out_dir
        self.noise, self.labels = noise, labels
        self.decode, self.scorers, self.prompts = decode, dict(scorers), prompts
        self.steps, self.cfg_scale = check_positive_int("eval steps", steps), cfg_scale
        self.batch, self.grid = check_positive_int("eval batch", batch), grid
        self.context = context or contextlib.nullcontext
        self.records: list = []
        path = os.path.join(out_dir, "eval.jsonl")
        if os.path.exists(path):  # a resumed run continues the curve
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    try:
                        self.records.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path} line {i + 1} is not JSON ({err}); move the file away") from None

    @torch.no_grad()
    def __call__(self, step: int, drift_model: nn.Module) -> dict:
        from .latents import save_image_grid
        info = D.info()
        device = next(drift_model.parameters()).device
        rows = torch.arange(info.rank, self.noise.shape[0], info.world_size)
        sums = torch.zeros(len(self.scorers) + 1, dtype=torch.float64)
        shown = []
        for lo in range(0, len(rows), self.batch):
            idx = rows[lo:lo + self.batch]
            noise = self.noise[idx].to(device)
            labels = self.labels[idx].to(device)
            with self.context():
                x = euler_sample(drift_model, noise.to(next(drift_model.parameters()).dtype), self.steps, labels,
                                 self.cfg_scale)
                images = self.decode(x).float()
                prompts = self.prompts(labels.cpu())
                for k, scorer in enumerate(self.scorers.values()):
                    sums[k] += scorer(images, prompts).double().sum().cpu()
            sums[-1] += len(idx)
            if sum(len(s) for s in shown) < self.grid:
                shown.append(images.clamp(0, 1).cpu())
        sums = D.all_reduce_mean(sums.to(device)).cpu() * info.world_size  # NCCL reduces device tensors
        n = int(sums[-1])
        record = {"step": int(step), "n": n, **{name: float(sums[k] / n) for k, name in enumerate(self.scorers)}}
        if info.is_main:
            os.makedirs(os.path.join(self.out, "grids"), exist_ok=True)
            self.records = [r for r in self.records if r["step"] < step] + [record]
            with open(os.path.join(self.out, "eval.jsonl.tmp"), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.records)
            os.replace(os.path.join(self.out, "eval.jsonl.tmp"), os.path.join(self.out, "eval.jsonl"))
            if shown:
                save_image_grid(torch.cat(shown)[: self.grid], os.path.join(self.out, "grids", f"step_{step:07d}.png"),
                                nrow=max(1, int(math.sqrt(min(self.grid, n)))))
            plot_rewards(self.records, os.path.join(self.out, "rewards.png"))
            print(f"eval step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in record.items()
                                                     if k not in ("step", "n")), flush=True)
        return record


def plot_rewards(records: list, path: str) -> None:
    """Every reward of `records` (eval.jsonl) against the fine-tuning step, one panel per reward."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [k for k in records[0] if k not in ("step", "n")] if records else []
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
    steps = [r["step"] for r in records]
    for ax, name in zip(axes[0], names):
        ax.plot(steps, [r.get(name, float("nan")) for r in records], "o-")
        ax.set_title(name)
        ax.set_xlabel("fine-tuning step")
    axes[0][0].set_ylabel(f"mean score ({records[-1]['n']} samples)")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


# ---------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mfm_fast finetune", description=__doc__.splitlines()[0],
        epilog="Images: --ckpt mfm-xl2.pt --vae DIR --latents DIR --reward hpsv2,weights=DIR --out DIR (the release's "
               "defaults). Under torchrun each process takes --batch-size rows. The 2-D toy: --reward gmm-linear.")
    p.add_argument("--ckpt", required=True, help="the frozen MFM (official release, mfm_fast checkpoint or "
                                                 ".safetensors; gmm-linear: an mfm_fast checkpoint)")
    p.add_argument("--reward", default="gmm-linear", metavar="SPEC",
                   help="gmm-linear (the paper's linear inverse problem on the 2-D GMM) or an image reward "
                        "NAME[,key=value...] as `steer` takes it, e.g. hpsv2,weights=DIR")
    p.add_argument("--out", required=True, help="output directory (finetune.pt, eval.jsonl, grids/, rewards.png), "
                                                "or a checkpoint file path ending in .pt; resumed from if present")
    p.add_argument("--vae", help="images: local AutoencoderKL directory (sd-vae-ft-mse)")
    p.add_argument("--latents", help="images: latent shard directory written by `python -m mfm_fast encode`")
    p.add_argument("--score-with", action="append", default=[], metavar="SPEC",
                   help="images: extra evaluation reward (repeatable), e.g. pickscore,weights=DIR,processor=DIR")
    p.add_argument("--prompt-prefix", default=None, help="images: prompt = prefix + class lemmas (release: "
                                                          "'A high-resolution, high-quality photograph of a ')")
    for name, typ, what in (
            ("steps", int, "optimizer steps (release 10000; gmm 1500)"),
            ("batch-size", int, "rows per process per step (release 18 per GPU; gmm 256)"),
            ("lr", float, "learning rate (1e-4; gmm 3e-4)"),
            ("warmup", int, "linear warm-up steps from 0.1·lr (release 250)"),
            ("lam", float, "reward multiplier λ (release 50; gmm 1)"),
            ("sigma-const", float, "σ²/2 of the constant schedule (release σ² = 200, so 100)"),
            ("t-eps", float, "t ~ U[t_eps, 1 − t_eps] (release 0)"),
            ("cfg", float, "guidance of the posterior sample and of the evaluation sampler (release 2.5)"),
            ("ema-decay", float, "EMA decay (0.999)"),
            ("ema-start", int, "EMA averages from this step (release 100)"),
            ("grad-clip", float, "gradient norm clip (release 1.5)"),
            ("checkpoint-every", int, "steps between checkpoints (default max(1, min(1000, steps // 10)))"),
            ("seed", int, "seed of the data, time and noise draws (release 42)")):
        p.add_argument(f"--{name}", type=typ, help=what)
    p.add_argument("--schedule", choices=SCHEDULES, help="σ_t² option (release 'constant'; gmm '(1-t)/t')")
    p.add_argument("--micro-batch", default="0", help="rows per forward/backward on each process (gradient "
                                                      "accumulation, same result); 'auto': sized from free GPU memory")
    p.add_argument("--eval-every", type=int, default=500, help="images: evaluation interval (0: only step 0 and end)")
    p.add_argument("--eval-samples", type=int, default=64, help="images: fixed (noise, class) pairs per evaluation "
                                                                "(release 512)")
    p.add_argument("--eval-steps", type=int, default=250, help="images: Euler steps of the evaluation sampler")
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--impl", default="auto", choices=("auto", "triton", "torch"))
    p.add_argument("--parallel", choices=D.PARALLEL, default="ddp", help="under torchrun: ddp or fsdp (FSDP2)")
    p.add_argument("--no-bf16", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if the checkpoint exists")
    p.add_argument("--override", action="store_true", help="resume although settings changed (recorded)")
    p.add_argument("--quiet", action="store_true")
    return p


_CLI_FIELDS = {"steps": "steps", "lr": "lr", "warmup": "warmup", "lam": "lam", "sigma_const": "sigma_const",
               "t_eps": "t_eps", "cfg": "cfg_scale", "ema_decay": "ema_decay", "ema_start": "ema_start",
               "grad_clip": "grad_clip", "checkpoint_every": "checkpoint_every", "seed": "seed",
               "schedule": "schedule"}


def _config_from_args(args, preset: FinetuneConfig, world: int) -> FinetuneConfig:
    kw = {field_: getattr(args, arg) for arg, field_ in _CLI_FIELDS.items() if getattr(args, arg) is not None}
    per_rank = args.batch_size if args.batch_size is not None else preset.batch_size
    check_positive_int("--batch-size", per_rank)
    kw["batch_size"] = per_rank * world
    if args.micro_batch != "auto":
        try:
            kw["micro_batch"] = int(args.micro_batch)
        except ValueError:
            raise ValueError(f"--micro-batch must be a non-negative integer or 'auto', got {args.micro_batch!r}") \
                from None
    kw.update(bf16=not args.no_bf16, grad_checkpointing=args.grad_checkpointing, parallel=args.parallel,
              device=args.device)
    return dataclasses.replace(preset, **kw)


def _out_paths(out: str) -> tuple:
    if not out:
        raise ValueError("--out must name an output directory or a .pt checkpoint file, got ''")
    if out.endswith(".pt"):
        return out, os.path.dirname(os.path.abspath(out))
    return os.path.join(out, "finetune.pt"), out


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    dinfo = D.init_from_env()
    try:
        if args.reward == "gmm-linear":
            return _main_gmm(args, dinfo)
        return _main_images(args, dinfo)
    finally:
        D.shutdown()


def _device(args, dinfo) -> torch.device:
    from .runloop import resolve_device
    device = resolve_device(args.device)
    if device.type == "cuda" and device.index is None or (device.type == "cuda" and dinfo.world_size > 1):
        device = torch.device("cuda", dinfo.local_rank)
    return device


def _main_gmm(args, dinfo) -> int:
    from .data import PAPER_REWARD, paper_gmm
    from .rewards import LinearInverseReward
    from .train import load
    for name in ("vae", "latents"):
        if getattr(args, name) is not None:
            raise ValueError(f"--{name} applies to image rewards, not --reward gmm-linear")
    ckpt_path, _ = _out_paths(args.out)
    device = _device(args, dinfo)
    mfm = load(args.ckpt, map_location=device)
    gmm = paper_gmm(dtype=torch.float32)
    reward = LinearInverseReward(PAPER_REWARD["A"], PAPER_REWARD["y"], PAPER_REWARD["sigma"]).to(device, torch.float32)
    cfg = _config_from_args(args, gmm_defaults(), dinfo.world_size)
    cfg = dataclasses.replace(cfg, device=str(device))
    result = finetune(mfm, reward, gmm.sample, cfg, out=ckpt_path, resume=not args.no_resume,
                      override=args.override, progress=not args.quiet and dinfo.is_main)
    if dinfo.is_main:
        last = result.history[-100:]
        loss = sum(h["loss"] for h in last) / max(1, len(last))
        print(f"MFM-FT: {cfg.steps} steps, final loss {loss:.4g}; wrote {ckpt_path}")
    return 0


def _main_images(args, dinfo) -> int:
    from .fingerprint import fingerprint
    from .latents import LatentDecoder, LatentRows, load_vae
    from .memory import activation_bytes_per_row, auto_chunk_size, reward_bytes_per_row
    from .models.checkpoints import load_official_mfm
    from .reward_models import (FT_PROMPT_PREFIX, REWARD_MODELS, build_scorers, finetune_prompts,
                                get_reward_model, parse_reward_spec)
    from .rewards import DecodeThenScore
    # everything that can be wrong is checked before the 2.7 GB model loads and before the first step
    ckpt_path, out_dir = _out_paths(args.out)
    check_writable(ckpt_path, "--out")
    for name in ("vae", "latents"):
        if getattr(args, name) is None:
            raise ValueError(f"--{name} is required with an image reward (--reward {args.reward})")
    if not os.path.isfile(args.ckpt):
        raise FileNotFoundError(f"--ckpt: no checkpoint at {args.ckpt!r}")
    try:
        reward_name, reward_kwargs = parse_reward_spec(args.reward)
        score_specs = [parse_reward_spec(s) for s in args.score_with]
    except ValueError as err:
        raise ValueError(f"--reward/--score-with: {err}") from None
    if reward_name not in REWARD_MODELS and ":" not in reward_name:
        raise ValueError(f"--reward: unknown reward {reward_name!r}; known: gmm-linear, {sorted(REWARD_MODELS)} or "
                         "module:function")
    names = [reward_name] + [n for n, _ in score_specs]
    if len(set(names)) != len(names):
        raise ValueError(f"--reward/--score-with name a reward twice: {names}")
    for name in ("eval_samples", "eval_steps", "eval_batch"):
        check_positive_int(f"--{name.replace('_', '-')}", getattr(args, name))
    if args.eval_every < 0:
        raise ValueError(f"--eval-every must be a non-negative integer, got {args.eval_every}")
    cfg = _config_from_args(args, FinetuneConfig(), dinfo.world_size)
    try:
        data = LatentRows(args.latents)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--latents: {err}") from None
    device = _device(args, dinfo)
    cfg = dataclasses.replace(cfg, device=str(device))
    mfm = load_official_mfm(args.ckpt, impl=args.impl, device="cpu", dtype=torch.float32)
    nc = mfm.config.num_classes
    labels = data.labels()
    if int(labels.min()) < 0 or int(labels.max()) >= nc:
        raise ValueError(f"--latents: labels must lie in [0, {nc}) for this model, found "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    if cfg.cfg_scale is not None:
        from .models.dit import check_guidance_weight
        check_guidance_weight("--cfg", cfg.cfg_scale, mfm.config.class_guidance_ws)
    vae = load_vae(args.vae, device=device)
    if tuple(mfm.event_shape) != tuple(data.rows(torch.tensor([0]))[0].shape[1:]):
        raise ValueError(f"--latents hold latents of shape {tuple(data.rows(torch.tensor([0]))[0].shape[1:])}, the "
                         f"model takes {tuple(mfm.event_shape)}")
    kw = {"device": device, **reward_kwargs} if reward_name in REWARD_MODELS else reward_kwargs
    scorer = get_reward_model(reward_name, **kw)
    reward = DecodeThenScore(LatentDecoder(vae, clamp=False), scorer, name=f"decode_then_{reward_name}")
    prefix = FT_PROMPT_PREFIX if args.prompt_prefix is None else args.prompt_prefix
    prompts = lambda y: finetune_prompts(y, prefix)  # noqa: E731
    scorers = {reward_name: scorer, **build_scorers(dict(score_specs), device)}
    if args.micro_batch == "auto":
        rows = cfg.batch_size // dinfo.world_size
        if device.type == "cuda":
            extra = reward_bytes_per_row(lambda z: reward(z, [prefix] * z.shape[0]), tuple(mfm.event_shape),
                                         torch.bfloat16, device) or 0
            extra += activation_bytes_per_row(mfm, torch.bfloat16)  # the trainable drift's own pass
            rows = auto_chunk_size(mfm, rows, 1, torch.bfloat16, device, extra_bytes_per_row=extra)
        cfg = dataclasses.replace(cfg, micro_batch=int(rows))
    identity = {"base": os.path.abspath(args.ckpt), "base_fingerprint": fingerprint(args.ckpt),
                "reward": args.reward, "prompt_prefix": prefix}
    gen = torch.Generator().manual_seed(cfg.seed + 12345)  # fixed evaluation pairs, as the release draws them
    noise = torch.randn(args.eval_samples, *mfm.event_shape, generator=gen)
    eval_labels = labels[torch.randint(0, len(labels), (args.eval_samples,), generator=gen)]
    decode_eval = LatentDecoder(vae, clamp=False)
    evaluator = FinetuneEvaluator(out_dir, noise, eval_labels, decode_eval, scorers, prompts, args.eval_steps,
                                  cfg.cfg_scale, args.eval_batch,
                                  context=lambda: torch.autocast(device.type, dtype=torch.bfloat16,
                                                                 enabled=cfg.bf16 and device.type == "cuda"))
    result = finetune(mfm, reward, data, cfg, out=ckpt_path, resume=not args.no_resume, override=args.override,
                      progress=not args.quiet and dinfo.is_main, prompts=prompts, identity=identity,
                      callback=evaluator, callback_every=args.eval_every or cfg.steps)
    if dinfo.is_main:
        last = result.history[-1] if result.history else {}
        print(f"MFM-FT: {cfg.steps} steps (global batch {cfg.batch_size}, λ {cfg.lam}, σ² {cfg.schedule}); "
              f"last loss {last.get('loss', float('nan')):.4g}; wrote {ckpt_path}, {out_dir}/eval.jsonl, "
              f"{out_dir}/rewards.png")
    return 0
