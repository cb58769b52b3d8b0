"""MFM-FT: off-policy, unbiased reward fine-tuning of the diagonal drift (METHOD §4).

Per step, from data states x_t = t·x1 + (1−t)·ε (no rollouts) and one frozen-MFM posterior sample
x̂1 = X_{0,1}(ε'; t, x_t):

    ĥ = exp(λ·r(x̂1)),   g = ∇_{x_t} ĥ   (autograd through the frozen MFM's context input)
    target = b^base − (ĥ − 1)·(b^θ − b^base) + (σ_t²/2)·g          (stop-gradient)
    L_FT(θ) = E ‖b^θ_t(x_t) − target‖²

Since E[ĥ | x_t] = h = exp V_t and E[g | x_t] = ∇h = h·∇V_t, the expected gradient is ∝ h·(b^θ − b − (σ²/2)∇V):
the fixed point is b^θ = b + (σ_t²/2)·∇V_t. With σ_t²/2 = (1−t)/t this is the Doob-tilted ODE drift of METHOD §3,
whose Euler samples follow p1·exp(λr)/Z. Adding a constant to r rescales ĥ and leaves that fixed point unchanged.
"""
from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from ._checks import as_time, check_finite_scalar, check_positive_int, check_state
from .interpolant import bcast, interpolate
from .sampling import drift, posterior_sample

SCHEDULES = ("(1-t)/t", "constant")


def half_sigma2(t: torch.Tensor, schedule: str = "(1-t)/t", sigma_const: float = 100.0) -> torch.Tensor:
    """σ_t²/2 per sample: "(1-t)/t" (the tilted ODE drift at the fixed point) or a constant (the release's 100)."""
    if schedule == "(1-t)/t":
        return (1 - t) / t
    if schedule == "constant":
        return torch.full_like(t, float(sigma_const))
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


def ft_target(base: nn.Module, reward: Callable, t: torch.Tensor, x_t: torch.Tensor, b_theta: torch.Tensor,
              lam: float = 1.0, schedule: str = "(1-t)/t", sigma_const: float = 100.0,
              noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
              **cond) -> FTTarget:
    """The MFM-FT target at states x_t (B, *event), times t (B,) in (0, 1), current drift b_theta (detached)."""
    check_state("x_t", x_t)
    check_state("b_theta", b_theta, x_t.shape[1:], batch=x_t.shape[0])
    half_sigma2(torch.ones(1), schedule, sigma_const)  # validates the schedule before any model call
    t = as_time("t", t, x_t.shape[0], x_t)
    if bool(((t <= 0) | (t >= 1)).any()):
        raise ValueError("t must lie strictly inside (0, 1): σ_t² = 2(1−t)/t and the posterior degenerates at the ends")
    lam = check_finite_scalar("lam", lam)
    with torch.no_grad():
        b_base = drift(base, t, x_t, **cond)
    with torch.enable_grad():
        xg = x_t.detach().requires_grad_(True)
        x1_hat = posterior_sample(base, t, xg, 1, generator=generator, noise=noise, **cond)[:, 0]
        r = reward(x1_hat)
        if not torch.is_tensor(r) or r.shape != (x_t.shape[0],):
            raise ValueError(f"reward must return a tensor of shape ({x_t.shape[0]},), got "
                             f"{tuple(r.shape) if torch.is_tensor(r) else type(r).__name__}")
        if not bool(torch.isfinite(r).all()):
            raise ValueError("reward returned NaN or infinite values")
        h = torch.exp(lam * r)
        if not h.requires_grad:
            raise ValueError("the reward is not differentiable in its input: MFM-FT needs ∇_{x_t} exp(λ·r(x̂1))")
        (g,) = torch.autograd.grad(h.sum(), xg)
    h = h.detach()
    b_theta = b_theta.detach()
    target = b_base - bcast(h - 1, b_base) * (b_theta - b_base) + bcast(half_sigma2(t, schedule, sigma_const), g) * g
    return FTTarget(target, b_base, h, g.detach(), x1_hat.detach())


def sample_times(batch: int, t_eps: float, device, dtype, generator=None) -> torch.Tensor:
    """t ~ U[t_eps, 1 − t_eps]: the endpoints are excluded (σ_t² diverges at 0, the posterior is a point at 1)."""
    return t_eps + (1 - 2 * t_eps) * torch.rand(batch, generator=generator, device=device, dtype=dtype)


def ft_loss(model: nn.Module, base: nn.Module, reward: Callable, x1: torch.Tensor, lam: float = 1.0,
            schedule: str = "(1-t)/t", sigma_const: float = 100.0, t_eps: float = 1e-2,
            generator: Optional[torch.Generator] = None, reduction: str = "mean", **cond) -> torch.Tensor:
    """L_FT for a data batch x1. `model` follows the model protocol; its drift v_{t,t}(x; 0, 0) is b^θ.

    reduction "none" returns the per-sample losses ‖b^θ − sg(target)‖² (B,).
    """
    check_state("x1", x1)
    B = x1.shape[0]
    t = sample_times(B, t_eps, x1.device, x1.dtype, generator)
    eps = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
    x_t = interpolate(t, eps, x1)
    b_theta = drift(model, t, x_t, **cond)
    tgt = ft_target(base, reward, t, x_t, b_theta.detach(), lam, schedule, sigma_const, generator=generator, **cond)
    per = (b_theta - tgt.target).pow(2).flatten(1).sum(1)
    if reduction == "none":
        return per
    if reduction == "mean":
        return per.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


@dataclass
class FinetuneConfig:
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-4
    lam: float = 1.0
    schedule: str = "(1-t)/t"
    sigma_const: float = 100.0  # σ²/2 of the "constant" schedule (the release's value)
    t_eps: float = 1e-2
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        check_positive_int("steps", self.steps)
        check_positive_int("batch_size", self.batch_size)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 < self.t_eps < 0.5:
            raise ValueError(f"t_eps must lie in (0, 0.5), got {self.t_eps}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        for name in ("lr", "lam", "sigma_const", "grad_clip"):
            check_finite_scalar(name, getattr(self, name))


@dataclass
class FineTuneResult:
    model: FineTunedDrift  # EMA weights: the drift to sample
    raw: FineTunedDrift  # last iterate
    config: FinetuneConfig
    history: list = field(default_factory=list)  # dicts: step, loss, h_mean


def _data_sampler(data) -> Callable:
    if callable(data) and not torch.is_tensor(data):
        return data
    if not torch.is_tensor(data) or data.dim() < 2:
        raise TypeError("data must be a tensor (n, *event) of samples or a callable (n, generator) -> samples")

    def sample(n, generator=None):
        idx = torch.randint(0, data.shape[0], (n,), generator=generator, device=data.device)
        return data[idx]
    return sample


def finetune(mfm: nn.Module, reward: Callable, data: Union[torch.Tensor, Callable],
             config: Optional[FinetuneConfig] = None, trainable: Optional[nn.Module] = None, progress: bool = True,
             callback: Optional[Callable] = None, callback_every: int = 0, **cond) -> FineTuneResult:
    """MFM-FT of `mfm`'s diagonal drift towards the λ-tilt of its data distribution.

    data: samples (n, *event) on the model's device, or a callable (n, generator) -> (n, *event) (the generator
    lives on the model's device).
    trainable: the module whose drift v_{t,t}(x; 0, 0) is b^θ (model protocol); default a copy of `mfm`.
    callback(step, ema_model: FineTunedDrift) runs every `callback_every` steps (and at step 0 and the end) for
    evaluation; the model is in eval mode and must not be modified.
    """
    cfg = config or FinetuneConfig()
    sample_data = _data_sampler(data)
    base = copy.deepcopy(mfm).eval().requires_grad_(False)
    trainable = copy.deepcopy(mfm if trainable is None else trainable).train().requires_grad_(True)
    ema = copy.deepcopy(trainable).eval().requires_grad_(False)
    raw_model, ema_model = FineTunedDrift(trainable), FineTunedDrift(ema)
    params = [p for p in trainable.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the trainable drift has no parameters")
    device = params[0].device
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    result = FineTuneResult(ema_model, raw_model, cfg)
    if callback is not None:
        callback(0, ema_model)
    steps = range(1, cfg.steps + 1)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="MFM-FT", leave=False, mininterval=0.1 if sys.stderr.isatty() else 30)
    ema_params = [e for e, p in zip(ema.parameters(), trainable.parameters()) if p.requires_grad]
    for step in steps:
        x1 = sample_data(cfg.batch_size, gen)
        loss = ft_loss(raw_model, base, reward, x1, cfg.lam, cfg.schedule, cfg.sigma_const, cfg.t_eps, gen, **cond)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"MFM-FT loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            # warm-up so that early evaluations are not dominated by the initial weights
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
        result.history.append({"step": step, "loss": loss.item()})
        if progress and step % 50 == 0:
            steps.set_postfix(loss=f"{loss.item():.4g}")
        if callback is not None and callback_every and (step % callback_every == 0 or step == cfg.steps):
            callback(step, ema_model)
    return result


def save_finetuned(path: str, result: FineTuneResult) -> None:
    """Checkpoint loadable with torch.load(weights_only=True): the MFM format of mfm_fast.train plus FT metadata."""
    from .train import save
    save(result.raw.mfm, path, ema=result.model.mfm, finetune=asdict(result.config))


def load_finetuned(path: str, map_location=None) -> FineTunedDrift:
    """The fine-tuned drift (EMA weights) saved by `save_finetuned`."""
    from .train import load, read_checkpoint
    if "finetune" not in read_checkpoint(path, map_location="cpu").get("extra", {}):
        raise ValueError(f"{path!r} is an MFM checkpoint, not an MFM-FT one (no 'finetune' entry)")
    return FineTunedDrift(load(path, map_location=map_location))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mfm_fast finetune", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="frozen MFM checkpoint (mfm_fast.train format)")
    p.add_argument("--reward", default="gmm-linear", choices=["gmm-linear"],
                   help="gmm-linear: the paper's linear inverse-problem reward on the 2-D GMM")
    p.add_argument("--out", required=True, help="where to write the fine-tuned checkpoint")
    p.add_argument("--steps", type=int, default=FinetuneConfig.steps)
    p.add_argument("--batch-size", type=int, default=FinetuneConfig.batch_size)
    p.add_argument("--lr", type=float, default=FinetuneConfig.lr)
    p.add_argument("--lam", type=float, default=FinetuneConfig.lam)
    p.add_argument("--schedule", default=FinetuneConfig.schedule, choices=SCHEDULES)
    p.add_argument("--sigma-const", type=float, default=FinetuneConfig.sigma_const)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    from .data import PAPER_REWARD, paper_gmm
    from .rewards import LinearInverseReward
    from .train import load
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    mfm = load(args.ckpt, map_location=device)
    gmm = paper_gmm(dtype=torch.float32, device=device)
    reward = LinearInverseReward(PAPER_REWARD["A"], PAPER_REWARD["y"], PAPER_REWARD["sigma"]).to(device, torch.float32)
    cfg = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, lam=args.lam,
                         schedule=args.schedule, sigma_const=args.sigma_const, seed=args.seed)
    result = finetune(mfm, reward, gmm.sample, cfg)
    save_finetuned(args.out, result)
    last = result.history[-100:]
    print(f"MFM-FT: {cfg.steps} steps, final loss {sum(h['loss'] for h in last) / len(last):.4g}; wrote {args.out}")
    return 0
