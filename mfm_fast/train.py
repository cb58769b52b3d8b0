"""Training loop for Meta Flow Maps (vector and image data), EMA, checkpoint save/load/resume, torchrun.

    python -m mfm_fast train --data gmm --out gmm.pt             # MFMMLP on the paper's 2-D GMM (METHOD §6)
    python -m mfm_fast train --data gmm --teacher exact --out gmm.pt   # ... distilled from the exact drift
    python -m mfm_fast train --data digits --out digits.pt       # "MFM-Digits" DiT on sklearn's 8×8 digits (teacher,
                                                                 # then the MFM distilled from it)
    torchrun --nproc_per_node=K -m mfm_fast.train --data digits --out digits.pt
    python -m mfm_fast train --data latents --latents DIR --init-from dmf --init-ckpt DMF --vae DIR --out mfm.pt
                                                                 # an image MFM, the release's recipe (train_images)

Determinism: step k draws its global batch and all loss randomness from a generator seeded by (seed, k). A resumed
run therefore continues bit-for-bit (the checkpoint holds model, EMA, optimizer, step and history; the random
state of step k is a function of (seed, k)), and K ranks reproduce a single process at the same global batch
(each keeps its slice of the global draw, see `distributed.local_rows`).

Checkpoints hold plain dicts / tensors / Python scalars only and load with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

from . import distributed as D
from ._checks import check_finite_scalar, check_positive_int
from .losses import CONSISTENCY, DIAGONAL, REDUCE, LossWeighting, build_rollout_bank, draw, mfm_loss
# the run loop and checkpoint files, shared with `finetune` (names re-exported for existing callers)
from .runloop import (FORMAT, VERSION, RunLoop, TrainingDiverged, check_plain, check_writable,  # noqa: F401
                      checkpoint_interval, cpu_state, model_spec, read_checkpoint, remove_stale_tmp,
                      resolve_device, run_loop, step_generator)
from .runloop import atomic_save as _atomic_save  # noqa: F401
from .runloop import unwrap as _unwrap

OPTIMIZERS = ("adamw", "radam")
SCHEDULES = ("cosine", "constant")
LAYOUTS = ("split", "paired")


@dataclass
class TrainConfig:
    steps: int = 2000
    batch: int = 256  # global batch (all ranks together)
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # after warm-up: cosine decay to lr·min_lr_ratio, or constant
    warmup: int = 0
    min_lr_ratio: float = 0.0
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    ema_decay: float = 0.999
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    consistency: str = "meanflow"  # see losses.mfm_loss
    consistency_fraction: float = 0.25
    consistency_weight: float = 1.0
    diagonal: str = "data"
    adaptive: bool = True
    diag_p: float = 0.5
    cons_p: float = 1.0
    t_zero_prob: float = 0.1
    gamma: Optional[float] = None
    p_uncond: float = 0.1
    seed: int = 0
    checkpoint_every: int = 0  # steps between checkpoints (needs `out`); 0 with `out`: every
    # max(1, min(1000, steps // 10)) steps (`checkpoint_interval`), always also at the end
    log_every: int = 50
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    device: str = "auto"
    grad_checkpointing: bool = False
    parallel: str = "ddp"  # under torchrun: "ddp" (replicated weights, averaged grads) or "fsdp" (FSDP2)
    ema_targets: bool = False  # bootstrapped targets ("lsd", "semigroup") from the EMA network
    output_units: bool = False  # residuals in units of model.error_scale(t) (see losses.mfm_loss)
    t_power: float = 2.0  # context time t = U^t_power (2: the release's U²; 1: uniform)
    # rows regressed on teacher rollouts (losses.rollout_loss; needs a teacher): a bank of `rollout_bank` contexts,
    # each with its GLASS trajectory on `rollout_steps` Heun steps of warped_grid(·, rollout_warp), built once before
    # training; each row takes a random grid pair, the full jump (0, 1) with probability rollout_full_prob
    rollout_fraction: float = 0.0
    rollout_bank: int = 65536
    rollout_steps: int = 32
    rollout_warp: float = 2.0
    rollout_full_prob: float = 0.25
    rollout_context_spread: float = 1.0  # bank contexts' noise × U[1, spread] (see losses.build_rollout_bank)
    # the image recipe's switches (train_images.image_defaults sets the release's values; see losses.mfm_loss)
    layout: str = "split"  # "split": diagonal rows + consistency rows; "paired": every row trains both (the release)
    reduce: str = "mean"  # per-sample squared residual: "mean" over its elements, or "sum" (the release)
    diag_c: float = 0.01  # offsets c of the adaptive weights (‖Δ‖² + c)^(-p)
    cons_c: float = 0.01
    zero_context: bool = True  # x = 0 where t = 0; False: pure noise there (the release's training)
    guidance_ws: tuple = ()  # model guidance: per-row weights drawn from these (the release: (2.5,)); () = off
    guidance_base_prob: float = 0.0  # probability of the unguided weight 1 for a labelled row
    cons_stop_grad: bool = True  # stop-gradient Eulerian targets (False: the gradient also flows through the jvp)
    loss_weighting: bool = False  # learned log-variance of the diagonal term (losses.LossWeighting), trained along
    loss_weighting_channels: int = 128
    loss_weighting_clamp: float = 10.0
    warmup_start: Optional[float] = None  # None: lr·(k+1)/warmup; f: torch LinearLR from f·lr (the release: 0.1)
    ema_start: int = 0  # > 0: the EMA copies the weights up to this step, then averages (the release: 100)
    ema_warmup: bool = True  # decay min(ema_decay, (1+k)/(10+k)) k steps after ema_start; False: ema_decay

    # fields a resumed run may change freely: how long, where and how it runs, not what it optimises (the parallel
    # layouts give the same trajectory, and grad checkpointing only trades memory for compute)
    RESUME_FREE = ("steps", "device", "log_every", "checkpoint_every", "grad_checkpointing", "parallel")

    def __post_init__(self):
        for name in ("steps", "batch", "log_every", "rollout_bank", "rollout_steps"):
            check_positive_int(name, getattr(self, name))
        for name in ("warmup", "checkpoint_every", "ema_start"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "consistency_weight", "diag_p", "cons_p",
                     "t_power", "rollout_warp", "rollout_context_spread", "diag_c", "cons_c",
                     "loss_weighting_clamp"):
            check_finite_scalar(name, getattr(self, name))
        check_positive_int("loss_weighting_channels", self.loss_weighting_channels)
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.reduce not in REDUCE:
            raise ValueError(f"reduce must be one of {REDUCE}, got {self.reduce!r}")
        if self.diag_c < 0 or self.cons_c < 0:
            raise ValueError(f"diag_c and cons_c must be non-negative, got {self.diag_c}, {self.cons_c}")
        self.guidance_ws = tuple(float(w) for w in self.guidance_ws)
        for w in self.guidance_ws:
            check_finite_scalar("guidance_ws", w)
        if self.warmup_start is not None and not 0 <= check_finite_scalar("warmup_start", self.warmup_start) <= 1:
            raise ValueError(f"warmup_start must lie in [0, 1], got {self.warmup_start}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.t_power <= 0:
            raise ValueError(f"t_power must be positive, got {self.t_power}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        if self.consistency not in CONSISTENCY:
            raise ValueError(f"consistency must be one of {CONSISTENCY}, got {self.consistency!r}")
        if self.diagonal not in DIAGONAL:
            raise ValueError(f"diagonal must be one of {DIAGONAL}, got {self.diagonal!r}")
        if self.parallel not in D.PARALLEL:
            raise ValueError(f"parallel must be one of {D.PARALLEL}, got {self.parallel!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        for name in ("consistency_fraction", "t_zero_prob", "p_uncond", "rollout_fraction", "rollout_full_prob",
                     "guidance_base_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        for name in ("rollout_warp", "rollout_context_spread"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.layout == "paired" and self.n_rollout >= self.batch:
            raise ValueError(f"rollout_fraction={self.rollout_fraction} leaves no paired rows in a batch of "
                             f"{self.batch}")
        if self.layout == "split" and self.n_consistency + self.n_rollout >= self.batch:
            raise ValueError(f"consistency_fraction={self.consistency_fraction} and rollout_fraction="
                             f"{self.rollout_fraction} leave no diagonal rows in a batch of {self.batch}")
        self.betas = tuple(float(b) for b in self.betas)

    @property
    def n_consistency(self) -> int:
        """Rows of the consistency term that no diagonal term shares (layout "split"; "paired" has none)."""
        if self.consistency == "none" or self.layout == "paired":
            return 0
        return int(round(self.consistency_fraction * self.batch))

    @property
    def n_rollout(self) -> int:
        return int(round(self.rollout_fraction * self.batch))

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based): linear warm-up (lr·(k+1)/warmup, or with warmup_start
        = f torch's LinearLR lr·(f + (1−f)·k/warmup)), then cosine or constant."""
        if step < self.warmup:
            if self.warmup_start is not None:
                return self.lr * (self.warmup_start + (1 - self.warmup_start) * step / self.warmup)
            return self.lr * (step + 1) / self.warmup
        if self.lr_schedule == "constant":
            return self.lr
        frac = (step - self.warmup) / max(1, self.steps - self.warmup)
        lo = self.lr * self.min_lr_ratio
        return lo + (self.lr - lo) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))

    def ema_decay_at(self, step: int) -> float:
        """EMA decay at optimizer step `step` (0-based): warm-up (1 + k)/(10 + k), so that early, badly trained
        iterates fade out of short runs' averages. With ema_start > 0: 0 (a copy of the weights) up to step
        ema_start, then the warm-up counted from there, or plain ema_decay without ema_warmup (the release's
        AveragedModel from step 100)."""
        if self.ema_start and step <= self.ema_start:
            return 0.0
        k = step - self.ema_start
        return min(self.ema_decay, (1 + k) / (10 + k)) if self.ema_warmup else self.ema_decay


RESUME_FREE = TrainConfig.RESUME_FREE
_model_spec, _check_plain, _cpu_state = model_spec, check_plain, cpu_state


@dataclass
class TrainResult:
    model: nn.Module  # last iterate, train mode
    ema: nn.Module  # EMA weights, eval mode: the model to sample
    history: list = field(default_factory=list)  # per step: step, loss, diag, cons, lr, grad_norm
    step: int = 0


# ---------------------------------------------------------------------------------------------- save / load
def _build(name: str, config: dict, impl: str = "auto") -> nn.Module:
    from .models import DiTConfig, MFMDiT, MFMMLP
    if name == "MFMDiT":
        return MFMDiT(DiTConfig(**config), impl=impl)
    if name == "MFMMLP":
        return MFMMLP(**config)
    raise ValueError(f"checkpoint names an unknown model class {name!r} (known: MFMDiT, MFMMLP)")


def save(model: nn.Module, path: str, ema: Optional[nn.Module] = None, **extra) -> None:
    """Write an MFMMLP/MFMDiT (and optionally its EMA copy) to `path`; `extra` entries (tensors, scalars, str,
    lists/dicts of them) are stored under "extra". Readable by `load` and by torch.load(weights_only=True)."""
    name, config = _model_spec(model)
    _check_plain("extra", extra)
    ckpt = {"format": FORMAT, "version": VERSION, "model_class": name, "model_config": config,
            "model": _cpu_state(model), "ema": None if ema is None else _cpu_state(ema), "extra": extra}
    _atomic_save(ckpt, path)


def load(path: str, map_location=None, impl: str = "auto", ema: bool = True) -> nn.Module:
    """Rebuild the model saved at `path` with its EMA weights (if stored and `ema`), in eval mode.

    impl: kernel implementation for MFMDiT ("auto" | "torch" | "triton")."""
    ckpt = read_checkpoint(path, map_location="cpu")
    model = _build(ckpt["model_class"], ckpt["model_config"], impl)
    state = ckpt["ema"] if ema and ckpt.get("ema") is not None else ckpt["model"]
    # a learned loss weighting (TrainConfig.loss_weighting) trains beside the model but is no part of it
    state = {k: v for k, v in state.items() if not k.startswith("weighting_model.")}
    model.load_state_dict(state, strict=True)
    if map_location is not None:
        model = model.to(map_location if not isinstance(map_location, dict) else "cpu")
    return model.eval()


# ---------------------------------------------------------------------------------------------- training
def _split_batch(batch) -> tuple:
    """sample_batch may return x1, (x1, y) or a dict with "x1" and extra conditioning."""
    if torch.is_tensor(batch):
        return batch, {}
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], {"y": batch[1]}
    if isinstance(batch, dict) and "x1" in batch:
        return batch["x1"], {k: v for k, v in batch.items() if k != "x1"}
    raise TypeError("sample_batch(n, generator) must return a tensor x1, a pair (x1, y) or a dict with 'x1'")


class _Trainer(RunLoop):
    """The MFM objective (`losses.mfm_loss`) on the run loop: diagonal, consistency and rollout rows.

    identity: settings outside the TrainConfig that a resume must match (the teacher, the initialisation).
    cfg.loss_weighting attaches a `LossWeighting` to the model as `weighting_model` (the release's name, which
    `load_official_mfm` and `load` skip): it is then optimised, clipped, averaged and checkpointed with the model."""

    def __init__(self, model, sample_batch, cfg: TrainConfig, teacher_drift, progress: bool = False,
                 identity: Optional[dict] = None):
        if cfg.loss_weighting:
            if D.info().world_size > 1 and cfg.parallel == "fsdp":
                raise ValueError("loss_weighting is not supported with parallel='fsdp' (its network sits outside "
                                 "the sharded forward); use parallel='ddp'")
            if not hasattr(_unwrap(model), "weighting_model"):
                gen = torch.Generator().manual_seed(cfg.seed + 104729)
                weighting = LossWeighting(cfg.loss_weighting_channels, cfg.loss_weighting_clamp, generator=gen)
                _unwrap(model).weighting_model = weighting.to(next(_unwrap(model).parameters()).dtype)
        super().__init__(model, cfg)
        self.sample_batch, self.teacher_drift = sample_batch, teacher_drift
        self._identity = dict(identity or {})
        if cfg.guidance_ws:
            table = getattr(getattr(self.model, "config", None), "class_guidance_ws", None)
            missing = [w for w in cfg.guidance_ws if table is None or not any(abs(w - v) < 1e-6 for v in table)]
            if missing:
                raise ValueError(f"guidance_ws {cfg.guidance_ws}: {missing} not in the model's guidance table "
                                 f"{table} (model guidance trains those rows)")
        n_c, n_r = cfg.n_consistency, cfg.n_rollout
        self.parts = (cfg.batch - n_c - n_r, n_c, n_r)  # diagonal (paired: both terms), consistency, rollout rows
        world = self.dist.world_size
        if any(n % world for n in self.parts):
            raise ValueError(f"batch={cfg.batch} with {n_c} consistency and {n_r} rollout rows cannot be split over "
                             f"{world} ranks: {self.parts} must all be divisible by {world}")
        self.rows = D.local_rows(self.parts[:2], self.dist.rank, world)
        self.rollout_rows = D.local_rows(self.parts[2:], self.dist.rank, world)
        self._bank, self._bank_inputs = None, None
        if n_r:
            if teacher_drift is None:
                raise ValueError("rollout_fraction > 0 needs teacher_drift(t, x) -> b_t(x)")
            self._bank_inputs = (sample_batch, teacher_drift, progress and self.dist.is_main)

    def identity(self) -> dict:
        return self._identity

    @property
    def bank(self):
        """The teacher-rollout bank (None without rollout rows), built at the first step that draws from it, so a
        resumed run that is already finished never pays for the rollouts. It is drawn from the run's seed: the
        same bank on every rank and after every resume."""
        if self._bank is None and self._bank_inputs is not None:
            sample_batch, teacher_drift, progress = self._bank_inputs
            cfg = self.cfg
            gen = torch.Generator().manual_seed(cfg.seed + 7919)
            x1, cond = _split_batch(sample_batch(cfg.rollout_bank, gen))
            self._bank = build_rollout_bank(teacher_drift, x1, cfg.rollout_steps, cfg.rollout_warp, gen,
                                            cfg.t_power, cfg.t_zero_prob, cfg.rollout_context_spread,
                                            device=self.device, progress=progress, **cond)
        return self._bank

    def global_batch(self, step: int):
        """(x1, cond, draws) of the diagonal and consistency rows, and the (bank rows, i, j) of the rollout rows."""
        cfg = self.cfg
        gen = step_generator(cfg.seed, step)
        n = self.parts[0] + self.parts[1]
        x1, cond = _split_batch(self.sample_batch(n, gen))
        if x1.shape[0] != n:
            raise ValueError(f"sample_batch returned {x1.shape[0]} rows, expected {n}")
        labelled = cond.get("y") is not None
        if cfg.guidance_ws and not labelled:
            raise ValueError("guidance_ws (model guidance) needs class labels: sample_batch must return (x1, y)")
        draws = draw(n, x1.shape[1:], gen, "cpu", torch.float32, cfg.t_zero_prob, cfg.gamma,
                     cfg.p_uncond if labelled else 0.0, cfg.t_power, paired=cfg.layout == "paired",
                     guidance_ws=cfg.guidance_ws if labelled else (), guidance_base_prob=cfg.guidance_base_prob)
        pairs = self.bank.draw_pairs(self.parts[2], gen, cfg.rollout_full_prob) if self.bank is not None else None
        return x1, cond, draws, pairs

    def loss(self) -> tuple:
        cfg = self.cfg
        x1, cond, draws, pairs = self.global_batch(self.step)
        rollout = None
        if pairs is not None:
            local = self.rollout_rows
            rollout = self.bank.rows(*(a[local] for a in pairs), device=self.device, dtype=self.dtype)
        rows = self.rows
        x1 = x1[rows].to(self.device, self.dtype)
        cond = {k: (v[rows].to(self.device) if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in cond.items()}
        draws = draws[rows].to(self.device, self.dtype)
        return mfm_loss(self.model, x1, cfg.consistency, self.teacher_drift, diagonal=cfg.diagonal,
                        n_consistency=self.parts[1] // self.dist.world_size,
                        consistency_weight=cfg.consistency_weight, adaptive=cfg.adaptive,
                        diag_p=cfg.diag_p, cons_p=cfg.cons_p, draws=draws,
                        target_model=self.ema if cfg.ema_targets else None,
                        output_units=cfg.output_units, rollout=rollout, paired=cfg.layout == "paired",
                        diag_c=cfg.diag_c, cons_c=cfg.cons_c, reduce=cfg.reduce, zero_context=cfg.zero_context,
                        cons_stop_grad=cfg.cons_stop_grad,
                        log_weight_fn=self.model.weighting_model if cfg.loss_weighting else None, **cond)


def train(model: nn.Module, sample_batch: Callable, cfg: Optional[TrainConfig] = None, out: Optional[str] = None,
          resume: bool = True, progress: bool = True, teacher_drift: Optional[Callable] = None,
          callback: Optional[Callable] = None, desc: str = "train", override: bool = False,
          identity: Optional[dict] = None, evaluate: Optional[Callable] = None, eval_every: int = 0) -> TrainResult:
    """Train a model following the protocol with `losses.mfm_loss`.

    sample_batch(n, generator) -> x1 | (x1, y) | {"x1": x1, **cond}: n data samples (CPU or device) drawn with the
    given CPU generator. Under torchrun every rank draws the global batch and keeps its slice.
    out: checkpoint file, written every `checkpoint_interval(cfg, out)` steps and at the end (rank 0); its directory
    is created and checked for writing first, and stale `<out>.tmp<pid>` files of killed writes are removed. With
    resume=True an existing file there is resumed from; a checkpoint trained with other settings (TrainConfig
    fields outside RESUME_FREE) is refused unless override=True, which records the changes in the checkpoint
    under "overrides". teacher_drift(t, x, **cond) -> b_t(x) for consistency="esd" or diagonal="distill".
    callback(step, logs) runs after every step (logs: floats).
    identity: settings outside `cfg` that a resume must match as well (e.g. which teacher, which initial weights);
    stored in the checkpoint.
    evaluate(step, ema_model) runs every `eval_every` steps (0: only at the end) and after the last step, on every
    rank (the EMA model is replicated; it must not be modified).
    A NaN/inf loss term or gradient norm raises TrainingDiverged (checked when the logs are read back, at least
    before every checkpoint and before returning), and the diverged model is never saved.
    Returns TrainResult(model, ema, history, step).
    """
    cfg = cfg or TrainConfig()
    if not callable(sample_batch):
        raise TypeError("sample_batch must be a callable (n, generator) -> batch")
    if cfg.checkpoint_every and out is None:
        raise ValueError("checkpoint_every > 0 needs an output path `out`")
    if out is not None:
        check_writable(out)
        if D.info().is_main:
            remove_stale_tmp(out)
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 0:
        raise ValueError(f"eval_every must be a non-negative integer, got {eval_every!r}")
    trainer = _Trainer(model, sample_batch, cfg, teacher_drift, progress=progress, identity=identity)
    each = callback
    if evaluate is not None:
        def each(step, logs):
            if callback is not None:
                callback(step, logs)
            if step == cfg.steps or (eval_every and step % eval_every == 0):
                evaluate(step, trainer.ema)
    run_loop(trainer, out, resume=resume, progress=progress, callback=each, desc=desc, override=override,
             postfix=("loss", "diag", "cons", "roll"))
    return TrainResult(trainer.model, trainer.ema, trainer.history, trainer.step)


# ---------------------------------------------------------------------------------------------- presets
TEACHERS = ("learned", "exact", "none")
ARCHS = ("mlp", "dit")
RECIPE_VERSION = 3  # bump when a code change alters what a recipe trains (caches key on the recipe's spec)


@dataclass
class Recipe:
    """How to train a vector-data MFM: the MFM's MFMMLP kwargs and TrainConfig, and where its diagonal targets come
    from. teacher "learned": a flow-matching drift is trained first (`teacher_model`, `teacher_train`) and the MFM
    is distilled from it (GLASS diagonal + teacher rollouts), the pipeline a user with a pretrained flow model runs;
    "exact": the same distillation from the data's exact drift (Gaussian mixtures only); "none": from data alone.
    arch: "mlp" (`model`, `teacher_model` are MFMMLP kwargs) or "dit" (MFMDiT kwargs, "config" naming the DiT)."""

    model: dict
    train: TrainConfig
    teacher: str = "learned"
    teacher_model: Optional[dict] = None
    teacher_train: Optional[TrainConfig] = None
    arch: str = "mlp"

    def __post_init__(self):
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {TEACHERS}, got {self.teacher!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")

    def build(self, kwargs: dict, impl: str = "auto") -> nn.Module:
        """A fresh network of this recipe's architecture (impl: DiT kernels, not part of the recipe)."""
        from .models import MFMDiT, MFMMLP
        return MFMMLP(**kwargs) if self.arch == "mlp" else MFMDiT(**kwargs, impl=impl)

    def spec(self) -> dict:
        """A JSON-able description (cache keys, checkpoint records). TrainConfig fields added after
        RECIPE_VERSION 3 appear only when they differ from their defaults, so existing cache keys stay valid."""
        def cfg(c):
            return None if c is None else {k: v for k, v in dataclasses.asdict(c).items()
                                            if k not in ("device", "log_every", "checkpoint_every")
                                            and not (k in _LATER_FIELDS and v == _DEFAULTS[k])}
        spec = {"model": self.model, "train": cfg(self.train), "teacher": self.teacher,
                "teacher_model": self.teacher_model, "teacher_train": cfg(self.teacher_train),
                "version": RECIPE_VERSION}
        if self.arch != "mlp":  # MLP recipes keep the keys (and caches) they had before DiT recipes existed
            spec["arch"] = self.arch
        return spec


_LATER_FIELDS = ("layout", "reduce", "diag_c", "cons_c", "zero_context", "guidance_ws", "guidance_base_prob",
                 "cons_stop_grad", "loss_weighting", "loss_weighting_channels", "loss_weighting_clamp",
                 "warmup_start", "ema_start", "ema_warmup")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def teacher_identity(recipe: Recipe) -> dict:
    """What a distilled MFM's resume must match about its teacher: the kind, and for a learned teacher its
    architecture and the settings that shape its weights (not where or how fast it ran)."""
    out = {"teacher": recipe.teacher}
    if recipe.teacher == "learned":
        free = ("device", "log_every", "checkpoint_every", "grad_checkpointing", "parallel")
        out["teacher_model"] = recipe.teacher_model
        out["teacher_train"] = None if recipe.teacher_train is None else {
            k: v for k, v in dataclasses.asdict(recipe.teacher_train).items()
            if k not in free and not (k in _LATER_FIELDS and v == _DEFAULTS[k])}
    return out


def check_resume_identity(out: Optional[str], identity: dict, resume: bool = True, override: bool = False) -> None:
    """Refuse early (before a teacher is trained) to resume `out` when the checkpoint's recorded identity differs
    from `identity` on a key it records; the run loop compares everything again when it loads the file."""
    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return tuple(plain(x) for x in v) if isinstance(v, (list, tuple)) else v

    if out is None or not resume or override or not os.path.exists(out):
        return
    stored = read_checkpoint(out, map_location="cpu").get("identity") or {}
    changes = {k: (stored.get(k), v) for k, v in identity.items() if plain(stored.get(k)) != plain(v)}
    if changes:
        what = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
        raise ValueError(f"checkpoint {out!r} was trained with other settings: {what}. Resume with the checkpoint's "
                         "settings, start afresh (resume=False / --no-resume), or pass override=True (--override) "
                         "to continue with the new ones")


def flow_matching_config(cfg: TrainConfig) -> TrainConfig:
    """`cfg` turned into plain flow matching of the drift b_t = v_{t,t}(·; 0, 0): every context at t = 0, no
    consistency rows, unweighted MSE (its minimiser is the conditional mean, whatever the target noise)."""
    return dataclasses.replace(cfg, consistency="none", diagonal="data", t_zero_prob=1.0, adaptive=False,
                               output_units=False)


def model_drift(model: nn.Module) -> Callable:
    """teacher_drift(t, x, **cond) -> b_t(x) of a trained flow model that follows the MFM protocol (its t = 0
    context diagonal), without gradients: a frozen teacher for GLASS targets."""
    from .sampling import drift

    @torch.no_grad()
    def teacher_drift(t, x, **cond):
        return drift(model, t, x, **cond)
    return teacher_drift


def gmm_defaults(teacher: str = "learned") -> Recipe:
    """The recipe for the paper's 2-D GMM (`python -m mfm_fast experiment posterior` measures it and the
    alternatives; numbers in the README). What makes one-step samples accurate:
    - preconditioning (MFMMLP sigma_data = the data's RMS): the network learns the departure from the Gaussian meta
      flow map in units of the posterior spread, which shrinks like (1−t)/t; without it t ≥ 0.8 stays far off;
    - zero-variance targets from a teacher drift: the GLASS diagonal, and teacher rollouts (`RolloutBank`) that
      give the one-step jump X_{0,1} (and every other jump on the grid) directly, on a grid warped towards s = 1
      where the conditional ODE stiffens, with contexts widened into p_t's tails;
    - the merged observation (t*, x*) as inputs, width 256;
    - residuals in output units with plain MSE (no adaptive weights): each t weighs alike and the minimiser is the
      conditional mean; context t uniform rather than U², since t near 1 needs as much care as t near 0.
    teacher: "learned" (default; a flow-matching MLP trained first, 8000 × 1024), "exact" (the mixture's drift),
    "none" (from data: diagonal from data, MeanFlow consistency; width 128)."""
    if teacher not in TEACHERS:
        raise ValueError(f"teacher must be one of {TEACHERS}, got {teacher!r}")
    from .data import paper_gmm
    sigma = round(paper_gmm().rms(), 4)
    model = dict(dim=2, hidden=128, depth=3, n_freq=2, sigma_data=sigma)
    cfg = TrainConfig(steps=10000, batch=512, lr=2e-3, consistency_fraction=0.5, adaptive=False,
                      output_units=True, t_power=1.0)
    if teacher == "none":
        return Recipe(model, dataclasses.replace(cfg, consistency="meanflow", diagonal="data"), teacher)
    mfm = {**model, "hidden": 256, "glass_features": True}
    cfg = dataclasses.replace(cfg, consistency="none", diagonal="distill", rollout_fraction=0.75,
                              rollout_full_prob=0.5, rollout_steps=48, rollout_context_spread=1.6)
    if teacher == "exact":
        return Recipe(mfm, cfg, teacher)
    teacher_cfg = flow_matching_config(TrainConfig(steps=8000, batch=1024, lr=2e-3, seed=1))
    return Recipe(mfm, cfg, teacher, model, teacher_cfg)


def teacher_path(out: str) -> str:
    """Where `train_recipe` keeps the learned teacher of the MFM written to `out`."""
    root, ext = os.path.splitext(out)
    return f"{root}.teacher{ext or '.pt'}"


def train_recipe(recipe: Recipe, sample_batch: Callable, out: Optional[str] = None, exact_drift: Optional[Callable] = None,
                 resume: bool = True, progress: bool = True, device: Optional[str] = None, override: bool = False,
                 impl: str = "auto"):
    """Run a Recipe: (for teacher "learned") train the flow-matching teacher, then the MFM distilled from it.

    exact_drift(t, x) -> b_t(x): needed for teacher "exact". out: the MFM checkpoint (the teacher's goes to
    `teacher_path(out)`); both resume when present. Returns (TrainResult of the MFM, TrainResult of the teacher or
    None). The models are seeded from their configs' seeds, so a recipe always starts from the same weights.
    override: resume even where the settings changed (see `train`). impl: DiT kernels ("dit" recipes)."""
    train_cfg, teacher_cfg = recipe.train, recipe.teacher_train
    if device is not None:
        train_cfg = dataclasses.replace(train_cfg, device=device)
        teacher_cfg = teacher_cfg and dataclasses.replace(teacher_cfg, device=device)
    teacher_result, teacher_drift = None, None
    identity = teacher_identity(dataclasses.replace(recipe, teacher_train=teacher_cfg))
    check_resume_identity(out, identity, resume, override)
    if recipe.teacher == "exact":
        if exact_drift is None:
            raise ValueError("teacher 'exact' needs exact_drift(t, x) -> b_t(x)")
        teacher_drift = exact_drift
    elif recipe.teacher == "learned":
        if recipe.teacher_model is None or teacher_cfg is None:
            raise ValueError("teacher 'learned' needs teacher_model and teacher_train")
        torch.manual_seed(teacher_cfg.seed)
        teacher_result = train(recipe.build(recipe.teacher_model, impl), sample_batch, teacher_cfg,
                               out=None if out is None else teacher_path(out), resume=resume, progress=progress,
                               desc="train teacher (flow matching)", override=override)
        teacher_drift = model_drift(teacher_result.ema)
    torch.manual_seed(train_cfg.seed)
    result = train(recipe.build(recipe.model, impl), sample_batch, train_cfg, out=out, resume=resume, progress=progress,
                   teacher_drift=teacher_drift, desc="train MFM", override=override, identity=identity)
    return result, teacher_result


def digits_defaults(teacher: str = "learned") -> Recipe:
    """The recipe for sklearn's 8×8 digits (MFM-Digits DiT, unconditional), carrying over what the GMM study
    (`gmm_defaults`) found: a flow-matching teacher trained first, then the MFM distilled from it with zero-variance
    targets (GLASS diagonal on a quarter of the rows, teacher rollouts on 32 warped Heun steps on the rest, half of
    them the one-step jump (0, 1)), unweighted MSE and uniform context times. The contexts are widened only mildly
    (× U[1, 1.25]): in 64 dimensions the noise norm concentrates, so the GMM's 1.6 would leave p_t entirely.
    teacher "none": the earlier recipe, from data alone (data diagonal, MeanFlow consistency, adaptive weights).
    "exact" has no meaning here (the digits have no closed-form drift)."""
    if teacher not in ("learned", "none"):
        raise ValueError(f"teacher must be 'learned' or 'none' for the digits, got {teacher!r}")
    model = {"config": "MFM-Digits"}
    base = TrainConfig(steps=2000, batch=128, lr=5e-4, warmup=100, ema_decay=0.999)
    if teacher == "none":
        return Recipe(model, base, teacher, arch="dit")
    # 1200 + 1200 steps: about the CPU time of the earlier 2000 MeanFlow steps (a flow-matching or distillation
    # step needs no jvp); zero-variance targets need fewer steps than targets from data
    base = dataclasses.replace(base, steps=1200)
    cfg = dataclasses.replace(base, consistency="none", diagonal="distill", adaptive=False, t_power=1.0,
                              rollout_fraction=0.75, rollout_full_prob=0.5, rollout_steps=32, rollout_bank=2048,
                              rollout_context_spread=1.25)
    teacher_cfg = flow_matching_config(dataclasses.replace(base, seed=1))
    return Recipe(model, cfg, teacher, dict(model), teacher_cfg, arch="dit")


def dataset_sampler(x: torch.Tensor, y: Optional[torch.Tensor] = None) -> Callable:
    """sample_batch over a fixed data set: n rows drawn uniformly with replacement."""
    def sample_batch(n: int, generator: torch.Generator):
        idx = torch.randint(0, x.shape[0], (n,), generator=generator)
        return x[idx] if y is None else (x[idx], y[idx])
    return sample_batch


GMM_POSTERIOR_TS = (0.05, 0.2, 0.5, 0.8, 0.95)


@torch.no_grad()
def gmm_posterior_sw2(model: nn.Module, gmm, ts=GMM_POSTERIOR_TS, n_contexts: int = 8, n: int = 2048,
                      seed: int = 0, steps: int = 1) -> dict:
    """Sliced-W2 between one-step posterior samples X_{0,1}(ε; t, x) and exact samples of p(x1 | x_t = x), for
    contexts x ~ p_t, averaged over contexts: {t: (sw2_model, sw2_floor)} where the floor is the sliced-W2 between
    two independent exact sample sets of the same size. steps > 1: the K-step composed flow map instead."""
    from .metrics import sliced_w2
    from .sampling import posterior_sample
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    gen_model = torch.Generator(device).manual_seed(seed + 1)
    out = {}
    for t in ts:
        x1 = gmm.sample(n_contexts, gen)
        x = t * x1 + (1 - t) * torch.randn(x1.shape, generator=gen)
        dtype = next(model.parameters()).dtype
        model_samples = posterior_sample(model, float(t), x.to(device, dtype), n, generator=gen_model,
                                         steps=steps).cpu()
        exact_a = gmm.posterior_sample(torch.full((n_contexts,), float(t)), x, n, gen)
        exact_b = gmm.posterior_sample(torch.full((n_contexts,), float(t)), x, n, gen)
        sw = [float(sliced_w2(model_samples[i], exact_a[i], generator=gen)) for i in range(n_contexts)]
        fl = [float(sliced_w2(exact_b[i], exact_a[i], generator=gen)) for i in range(n_contexts)]
        out[float(t)] = (sum(sw) / n_contexts, sum(fl) / n_contexts)
    return out


# ---------------------------------------------------------------------------------------------- CLI
DATA = ("gmm", "digits", "latents")
CLI_TEACHERS = TEACHERS + ("init",)
# the teachers each --data takes (the first is the default)
DATA_TEACHERS = {"gmm": ("learned", "exact", "none"), "digits": ("learned", "none"), "latents": ("init", "none")}
# options that apply to some --data only (given elsewhere they are an error naming them, not silently ignored)
LATENT_OPTIONS = ("latents", "model", "init_from", "init_ckpt", "init_ignore", "teacher_omega", "vae", "eval_every",
                  "eval_samples", "eval_contexts", "eval_latents", "eval_cfg", "no_model_guidance",
                  "guidance_base_prob")
APPLIES = {"hidden": ("gmm",), "depth": ("gmm",), "config": ("digits",), "impl": ("digits", "latents"),
           "no_eval": ("gmm", "latents"), "p_uncond": ("digits", "latents"),
           "teacher_steps": ("gmm", "digits"), "rollout_fraction": ("gmm", "digits"),
           "rollout_bank": ("gmm", "digits"), **{name: ("latents",) for name in LATENT_OPTIONS}}
# options that apply to some teachers only
TEACHER_OPTIONS = {"teacher_steps": ("learned",), "rollout_fraction": ("learned", "exact"),
                   "rollout_bank": ("learned", "exact"), "teacher_omega": ("init",)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mfm_fast train", description="Train a Meta Flow Map. Under "
                                "`torchrun --nproc_per_node=K -m mfm_fast.train ...` it runs data-parallel.")
    p.add_argument("--data", choices=DATA, required=True,
                   help="gmm: MFMMLP on the paper's 2-D mixture; digits: DiT on sklearn's 8x8 digits; latents: "
                        "an image MFM on SD-VAE latent shards (--latents), the release's recipe "
                        "(mfm_fast.train_images)")
    p.add_argument("--out", required=True, help="checkpoint file (resumed from if it exists)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int, help="global batch (latents: default 32 per process)")
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=OPTIMIZERS)
    p.add_argument("--consistency", choices=CONSISTENCY)
    p.add_argument("--consistency-fraction", type=float, help="layout split: share of consistency rows")
    p.add_argument("--ema-decay", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=int, help="default: every max(1, min(1000, steps // 10)) steps")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-bf16", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--parallel", choices=D.PARALLEL, default="ddp", help="under torchrun: ddp or fsdp (FSDP2)")
    p.add_argument("--teacher", choices=CLI_TEACHERS, default=None,
                   help="gmm/digits: 'learned' (default) trains a flow-matching drift first and distils the MFM from "
                        "it (GLASS diagonal + teacher rollouts); 'exact' (gmm only) distils the mixture's exact "
                        "drift; 'none' trains from data alone (MeanFlow). latents: 'init' (default) distils from a "
                        "frozen copy of the initial weights (ESD-teacher), 'none' from data")
    p.add_argument("--teacher-steps", type=int,
                   help="teacher 'learned': flow-matching steps (default gmm 8000, digits 2000)")
    p.add_argument("--rollout-fraction", type=float, help="rows regressed on teacher rollouts (needs a teacher)")
    p.add_argument("--rollout-bank", type=int, help="contexts in the teacher-rollout bank")
    p.add_argument("--hidden", type=int, help="gmm: MLP width (teacher and MFM; default 128 and 256)")
    p.add_argument("--depth", type=int, help="gmm: MLP depth")
    p.add_argument("--config", default=None, help="digits: DiT config name (default MFM-Digits)")
    p.add_argument("--impl", default=None, help="digits, latents: DiT kernels auto | torch | triton (default auto)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if --out exists")
    p.add_argument("--override", action="store_true",
                   help="resume --out even though training settings changed (the changes are recorded in it)")
    p.add_argument("--no-eval", action="store_true", help="gmm: skip the posterior sliced-W2 report; latents: "
                                                          "write no sample grids (then --vae is not needed)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("objective and optimiser (any --data; latents default to the release's values)")
    g.add_argument("--warmup", type=int, help="linear learning-rate warm-up steps (latents: 2000)")
    g.add_argument("--warmup-start", type=float,
                   help="warm-up from this fraction of --lr (torch LinearLR; latents 0.1)")
    g.add_argument("--lr-schedule", choices=SCHEDULES, help="after the warm-up (latents: constant)")
    g.add_argument("--grad-clip", type=float, help="gradient-norm clip, 0 = none (latents: 1.5)")
    g.add_argument("--ema-start", type=int, help="the EMA copies the weights up to this step (latents: 100)")
    g.add_argument("--t-zero-prob", type=float, help="probability of the empty context t = 0 (0.1)")
    g.add_argument("--t-power", type=float, help="context time t = U^power (2)")
    g.add_argument("--p-uncond", type=float, help="digits, latents: class-label dropout (latents: 0.2)")
    g.add_argument("--no-adaptive", action="store_true", help="plain MSE instead of the adaptive weights")
    g.add_argument("--diag-p", type=float, help="adaptive weight power of the diagonal term (0.5)")
    g.add_argument("--cons-p", type=float, help="adaptive weight power of the consistency term (1.0)")
    g.add_argument("--diag-c", type=float, help="adaptive weight offset of the diagonal term (0.01)")
    g.add_argument("--cons-c", type=float, help="adaptive weight offset of the consistency term (0.01)")
    g.add_argument("--reduce", choices=REDUCE, help="a sample's squared residual: mean or sum over its elements "
                                                    "(latents: sum)")
    g.add_argument("--layout", choices=LAYOUTS, help="split: diagonal rows and consistency rows; paired: every row "
                                                     "trains both (latents: paired)")
    g.add_argument("--t0-context", choices=("zeros", "noise"), help="the context x where t = 0 (latents: noise)")
    g.add_argument("--no-cons-stop-grad", action="store_true",
                   help="let the gradient through the Eulerian (meanflow, esd) target's jvp")
    g.add_argument("--loss-weighting", action="store_true",
                   help="learn a per-sample log-variance of the diagonal term (losses.LossWeighting)")
    im = p.add_argument_group("latents (--data latents)")
    im.add_argument("--latents", help="latent shard directory written by `python -m mfm_fast encode`")
    im.add_argument("--model", help="DiT config name (default MFM-XL/2, or the --init-ckpt's config)")
    im.add_argument("--init-from", choices=("sit", "dmf", "mfm", "none"),
                    help="initial weights: a SiT checkpoint (t = 1 data), a DMF flow-map checkpoint (t = 0 data, "
                         "time-flipped; the release's init_from_dmf), an MFM checkpoint (the official release or "
                         "mfm_fast's) to continue, or none (random; needs --teacher none)")
    im.add_argument("--init-ckpt", help="the checkpoint of --init-from")
    im.add_argument("--init-ignore", action="append", default=[], metavar="PREFIX",
                    help="drop the --init-ckpt keys starting with PREFIX (repeatable; e.g. a DMF's extra heads)")
    im.add_argument("--teacher-omega", type=float,
                    help="teacher 'init': the conditional velocity is (1−ω)·v(y) + ω·v(∅) (the release's DMF "
                         "rearrangement, ω = 0.6 with --init-from dmf; 0 otherwise)")
    im.add_argument("--no-model-guidance", action="store_true",
                    help="no model guidance (every row at guidance weight 1)")
    im.add_argument("--guidance-base-prob", type=float,
                    help="probability of the unguided weight 1 for a labelled row (0)")
    im.add_argument("--vae", help="local AutoencoderKL directory (sd-vae-ft-mse) decoding the sample grids")
    im.add_argument("--eval-every", type=int, help="steps between sample grids (default 10000; 0: only at the end)")
    im.add_argument("--eval-samples", type=int, help="K-step samples per grid (default 128)")
    im.add_argument("--eval-contexts", type=int, help="contexts x_t of the posterior grids (default 32)")
    im.add_argument("--eval-latents", help="held-out latent shards for the contexts (default: --latents)")
    im.add_argument("--eval-cfg", type=float, help="guidance weight of the sample grids (default 2.5)")
    return p


def _given(value) -> bool:
    return value is not None and value is not False and value != []


def _check_options(args) -> None:
    """Refuse options that do not apply to --data / --teacher, naming them."""
    teachers = DATA_TEACHERS[args.data]
    if args.teacher is None:
        args.teacher = teachers[0]
    if args.teacher not in teachers:
        if args.teacher == "exact":
            raise SystemExit("--teacher exact needs a closed-form drift: only --data gmm has one")
        raise ValueError(f"--teacher {args.teacher} does not apply to --data {args.data} (choose from "
                         f"{', '.join(teachers)})")
    for name, kinds in APPLIES.items():
        if _given(getattr(args, name)) and args.data not in kinds:
            raise ValueError(f"--{name.replace('_', '-')} does not apply to --data {args.data} (only to "
                             f"{' and '.join('--data ' + k for k in kinds)})")
    for name, kinds in TEACHER_OPTIONS.items():
        if _given(getattr(args, name)) and args.teacher not in kinds:
            raise ValueError(f"--{name.replace('_', '-')} does not apply to --teacher {args.teacher} (only to "
                             f"{' and '.join('--teacher ' + k for k in kinds)})")
    if args.consistency_fraction is not None and args.layout == "paired":
        raise ValueError("--consistency-fraction does not apply to --layout paired (every row trains both terms)")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    _check_options(args)
    dinfo = D.init_from_env()
    try:
        return _run(args, dinfo)
    finally:
        D.shutdown()


def _run(args, dinfo: D.DistInfo) -> int:
    if args.data == "latents":
        from .train_images import run_latents
        return run_latents(args, dinfo)
    if args.data == "gmm":
        return _run_gmm(args, dinfo)
    from .data import load_digits
    recipe = digits_defaults(teacher=args.teacher)
    if args.config:
        for kw in (recipe.model, recipe.teacher_model):
            if kw is not None:
                kw["config"] = args.config
    _apply_cli(recipe, args)
    images, labels = load_digits()
    result, teacher = train_recipe(recipe, dataset_sampler(images.float(), labels.long()), out=args.out,
                                   resume=not args.no_resume, progress=not args.quiet, override=args.override,
                                   impl=args.impl or "auto")
    if dinfo.is_main:
        last = result.history[-1] if result.history else {}
        what = f"teacher {teacher.step} steps + MFM " if teacher is not None else ""
        print(f"trained {what}{result.step} steps -> {args.out}" + (f" (loss {last['loss']:.4f})" if last else ""))
    return 0


def _apply_cli(recipe: Recipe, args) -> None:
    """The CLI's overrides and run settings applied to a recipe (and its teacher stage) in place."""
    recipe.train = dataclasses.replace(recipe.train, **_overrides(args), **_run_settings(args))
    if recipe.teacher_train is not None:
        extra = {"steps": args.teacher_steps} if args.teacher_steps is not None else {}
        if args.checkpoint_every is not None:
            extra["checkpoint_every"] = args.checkpoint_every
        recipe.teacher_train = dataclasses.replace(recipe.teacher_train, **extra, **_run_settings(args))


def _run_settings(args) -> dict:
    return dict(device=args.device, bf16=not args.no_bf16, grad_checkpointing=args.grad_checkpointing,
                parallel=args.parallel)


def _overrides(args) -> dict:
    """The TrainConfig fields the command line sets (the MFM stage)."""
    out = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "optimizer": args.optimizer,
           "consistency": args.consistency, "consistency_fraction": args.consistency_fraction,
           "ema_decay": args.ema_decay, "seed": args.seed, "checkpoint_every": args.checkpoint_every,
           "rollout_fraction": args.rollout_fraction, "rollout_bank": args.rollout_bank,
           "warmup": args.warmup, "warmup_start": args.warmup_start, "lr_schedule": args.lr_schedule,
           "grad_clip": args.grad_clip, "ema_start": args.ema_start, "t_zero_prob": args.t_zero_prob,
           "t_power": args.t_power, "p_uncond": args.p_uncond, "diag_p": args.diag_p, "cons_p": args.cons_p,
           "diag_c": args.diag_c, "cons_c": args.cons_c, "reduce": args.reduce, "layout": args.layout,
           "guidance_base_prob": args.guidance_base_prob,
           "zero_context": None if args.t0_context is None else args.t0_context == "zeros",
           "adaptive": False if args.no_adaptive else None,
           "cons_stop_grad": False if args.no_cons_stop_grad else None,
           "loss_weighting": True if args.loss_weighting else None}
    return {k: v for k, v in out.items() if v is not None}


def _run_gmm(args, dinfo: D.DistInfo) -> int:
    import time
    from .data import paper_gmm
    recipe = gmm_defaults(teacher=args.teacher)
    sizes = {k: v for k, v in (("hidden", args.hidden), ("depth", args.depth)) if v is not None}
    recipe.model.update(sizes)
    if recipe.teacher_model is not None:
        recipe.teacher_model.update(sizes)
    _apply_cli(recipe, args)
    gmm = paper_gmm()
    exact = gmm.to(device=resolve_device(args.device), dtype=torch.float32).drift if args.teacher == "exact" else None
    t0 = time.perf_counter()
    result, teacher = train_recipe(recipe, paper_gmm(dtype=torch.float32).sample, out=args.out, exact_drift=exact,
                                   resume=not args.no_resume, progress=not args.quiet, override=args.override)
    if dinfo.is_main:
        last = result.history[-1] if result.history else {}
        what = f"teacher {teacher.step} steps + MFM " if teacher is not None else ""
        print(f"trained {what}{result.step} steps in {time.perf_counter() - t0:.0f} s -> {args.out}"
              + (f" (loss {last['loss']:.4f})" if last else ""))
        if not args.no_eval:
            print("one-step posterior sliced-W2 (model vs exact | exact vs exact floor):")
            for t, (sw, floor) in gmm_posterior_sw2(result.ema, gmm).items():
                print(f"  t={t:.2f}: {sw:.4f} | {floor:.4f}  (ratio {sw / floor:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
