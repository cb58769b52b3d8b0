"""Training loop for Meta Flow Maps (vector and image data), EMA, checkpoint save/load/resume, torchrun.

    python -m mfm_fast train --data gmm --out gmm.pt             # MFMMLP on the paper's 2-D GMM (METHOD §6)
    python -m mfm_fast train --data gmm --teacher exact --out gmm.pt   # ... distilled from the exact drift
    python -m mfm_fast train --data digits --out digits.pt       # "MFM-Digits" DiT on sklearn's 8×8 digits (teacher,
                                                                 # then the MFM distilled from it)
    torchrun --nproc_per_node=K -m mfm_fast.train --data digits --out digits.pt

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
from .losses import CONSISTENCY, DIAGONAL, build_rollout_bank, draw, mfm_loss
# the run loop and checkpoint files, shared with `finetune` (names re-exported for existing callers)
from .runloop import (FORMAT, VERSION, RunLoop, TrainingDiverged, check_plain, check_writable,  # noqa: F401
                      checkpoint_interval, cpu_state, model_spec, read_checkpoint, remove_stale_tmp,
                      resolve_device, run_loop, step_generator)
from .runloop import atomic_save as _atomic_save  # noqa: F401
from .runloop import unwrap as _unwrap

OPTIMIZERS = ("adamw", "radam")
SCHEDULES = ("cosine", "constant")


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

    # fields a resumed run may change freely: how long, where and how it runs, not what it optimises (the parallel
    # layouts give the same trajectory, and grad checkpointing only trades memory for compute)
    RESUME_FREE = ("steps", "device", "log_every", "checkpoint_every", "grad_checkpointing", "parallel")

    def __post_init__(self):
        for name in ("steps", "batch", "log_every", "rollout_bank", "rollout_steps"):
            check_positive_int(name, getattr(self, name))
        for name in ("warmup", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "consistency_weight", "diag_p", "cons_p",
                     "t_power", "rollout_warp", "rollout_context_spread"):
            check_finite_scalar(name, getattr(self, name))
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
        for name in ("consistency_fraction", "t_zero_prob", "p_uncond", "rollout_fraction", "rollout_full_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        for name in ("rollout_warp", "rollout_context_spread"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_consistency + self.n_rollout >= self.batch:
            raise ValueError(f"consistency_fraction={self.consistency_fraction} and rollout_fraction="
                             f"{self.rollout_fraction} leave no diagonal rows in a batch of {self.batch}")
        self.betas = tuple(float(b) for b in self.betas)

    @property
    def n_consistency(self) -> int:
        return 0 if self.consistency == "none" else int(round(self.consistency_fraction * self.batch))

    @property
    def n_rollout(self) -> int:
        return int(round(self.rollout_fraction * self.batch))

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine or constant."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.lr_schedule == "constant":
            return self.lr
        frac = (step - self.warmup) / max(1, self.steps - self.warmup)
        lo = self.lr * self.min_lr_ratio
        return lo + (self.lr - lo) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))

    def ema_decay_at(self, step: int) -> float:
        """EMA decay after optimizer step `step` (1-based): warm-up (1 + k)/(10 + k), so that early, badly trained
        iterates fade out of short runs' averages."""
        return min(self.ema_decay, (1 + step) / (10 + step))


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
    """The MFM objective (`losses.mfm_loss`) on the run loop: diagonal, consistency and rollout rows."""

    def __init__(self, model, sample_batch, cfg: TrainConfig, teacher_drift, progress: bool = False):
        super().__init__(model, cfg)
        self.sample_batch, self.teacher_drift = sample_batch, teacher_drift
        n_c, n_r = cfg.n_consistency, cfg.n_rollout
        self.parts = (cfg.batch - n_c - n_r, n_c, n_r)  # diagonal, consistency, rollout rows
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
        draws = draw(n, x1.shape[1:], gen, "cpu", torch.float32, cfg.t_zero_prob, cfg.gamma,
                     cfg.p_uncond if cond.get("y") is not None else 0.0, cfg.t_power)
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
                        output_units=cfg.output_units, rollout=rollout, **cond)


def train(model: nn.Module, sample_batch: Callable, cfg: Optional[TrainConfig] = None, out: Optional[str] = None,
          resume: bool = True, progress: bool = True, teacher_drift: Optional[Callable] = None,
          callback: Optional[Callable] = None, desc: str = "train", override: bool = False) -> TrainResult:
    """Train a model following the protocol with `losses.mfm_loss`.

    sample_batch(n, generator) -> x1 | (x1, y) | {"x1": x1, **cond}: n data samples (CPU or device) drawn with the
    given CPU generator. Under torchrun every rank draws the global batch and keeps its slice.
    out: checkpoint file, written every `checkpoint_interval(cfg, out)` steps and at the end (rank 0); its directory
    is created and checked for writing first, and stale `<out>.tmp<pid>` files of killed writes are removed. With
    resume=True an existing file there is resumed from; a checkpoint trained with other settings (TrainConfig
    fields outside RESUME_FREE) is refused unless override=True, which records the changes in the checkpoint
    under "overrides". teacher_drift(t, x, **cond) -> b_t(x) for consistency="esd" or diagonal="distill".
    callback(step, logs) runs after every step (logs: floats).
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
    trainer = _Trainer(model, sample_batch, cfg, teacher_drift, progress=progress)
    run_loop(trainer, out, resume=resume, progress=progress, callback=callback, desc=desc, override=override,
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
        """A JSON-able description (cache keys, checkpoint records)."""
        def cfg(c):
            return None if c is None else {k: v for k, v in dataclasses.asdict(c).items()
                                            if k not in ("device", "log_every", "checkpoint_every")}
        spec = {"model": self.model, "train": cfg(self.train), "teacher": self.teacher,
                "teacher_model": self.teacher_model, "teacher_train": cfg(self.teacher_train),
                "version": RECIPE_VERSION}
        if self.arch != "mlp":  # MLP recipes keep the keys (and caches) they had before DiT recipes existed
            spec["arch"] = self.arch
        return spec


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
                   teacher_drift=teacher_drift, desc="train MFM", override=override)
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
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mfm_fast train", description="Train a Meta Flow Map. Under "
                                "`torchrun --nproc_per_node=K -m mfm_fast.train ...` it runs data-parallel.")
    p.add_argument("--data", choices=("gmm", "digits"), required=True,
                   help="gmm: MFMMLP on the paper's 2-D mixture; digits: DiT on sklearn's 8x8 digits")
    p.add_argument("--out", required=True, help="checkpoint file (resumed from if it exists)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int, help="global batch")
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=OPTIMIZERS)
    p.add_argument("--consistency", choices=CONSISTENCY)
    p.add_argument("--consistency-fraction", type=float)
    p.add_argument("--ema-decay", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=int, help="default: every max(1, min(1000, steps // 10)) steps")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-bf16", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--parallel", choices=D.PARALLEL, default="ddp", help="under torchrun: ddp or fsdp (FSDP2)")
    p.add_argument("--teacher", choices=TEACHERS, default="learned",
                   help="'learned' (default) trains a flow-matching drift first and distils the MFM from it "
                        "(GLASS diagonal + teacher rollouts); 'exact' (gmm only) distils the mixture's exact drift; "
                        "'none' trains from data alone (MeanFlow)")
    p.add_argument("--teacher-steps", type=int,
                   help="teacher 'learned': flow-matching steps (default gmm 8000, digits 2000)")
    p.add_argument("--rollout-fraction", type=float, help="rows regressed on teacher rollouts (needs a teacher)")
    p.add_argument("--rollout-bank", type=int, help="contexts in the teacher-rollout bank")
    p.add_argument("--hidden", type=int, help="gmm: MLP width (teacher and MFM; default 128 and 256)")
    p.add_argument("--depth", type=int, help="gmm: MLP depth")
    p.add_argument("--config", default=None, help="digits: DiT config name (default MFM-Digits)")
    p.add_argument("--impl", default="auto", help="DiT kernels: auto | torch | triton")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if --out exists")
    p.add_argument("--override", action="store_true",
                   help="resume --out even though training settings changed (the changes are recorded in it)")
    p.add_argument("--no-eval", action="store_true", help="gmm: skip the posterior sliced-W2 report")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    dinfo = D.init_from_env()
    try:
        return _run(args, dinfo)
    finally:
        D.shutdown()


def _run(args, dinfo: D.DistInfo) -> int:
    if args.data == "gmm":
        return _run_gmm(args, dinfo)
    from .data import load_digits
    if args.teacher == "exact":
        raise SystemExit("--teacher exact needs a closed-form drift: only --data gmm has one")
    recipe = digits_defaults(teacher=args.teacher)
    if args.config:
        for kw in (recipe.model, recipe.teacher_model):
            if kw is not None:
                kw["config"] = args.config
    _apply_cli(recipe, args)
    images, labels = load_digits()
    result, teacher = train_recipe(recipe, dataset_sampler(images.float(), labels.long()), out=args.out,
                                   resume=not args.no_resume, progress=not args.quiet, override=args.override,
                                   impl=args.impl)
    if dinfo.is_main:
        last = result.history[-1] if result.history else {}
        what = f"teacher {teacher.step} steps + MFM " if teacher is not None else ""
        print(f"trained {what}{result.step} steps -> {args.out}" + (f" (loss {last['loss']:.4f})" if last else ""))
    return 0


def _apply_cli(recipe: Recipe, args) -> None:
    """The CLI's overrides and run settings applied to a recipe (and its teacher stage) in place."""
    run = dict(device=args.device, bf16=not args.no_bf16, grad_checkpointing=args.grad_checkpointing,
               parallel=args.parallel)
    recipe.train = dataclasses.replace(recipe.train, **_overrides(args), **run)
    if recipe.teacher_train is not None:
        extra = {"steps": args.teacher_steps} if args.teacher_steps is not None else {}
        if args.checkpoint_every is not None:
            extra["checkpoint_every"] = args.checkpoint_every
        recipe.teacher_train = dataclasses.replace(recipe.teacher_train, **extra, **run)


def _overrides(args) -> dict:
    out = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "optimizer": args.optimizer,
           "consistency": args.consistency, "consistency_fraction": args.consistency_fraction,
           "ema_decay": args.ema_decay, "seed": args.seed, "checkpoint_every": args.checkpoint_every,
           "rollout_fraction": args.rollout_fraction, "rollout_bank": args.rollout_bank}
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
