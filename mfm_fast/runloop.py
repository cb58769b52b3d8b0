"""The one optimisation loop under `train` and `finetune`: optimizer and learning-rate schedule, bf16 autocast,
gradient clipping, EMA, DDP / FSDP2 under torchrun, atomic checkpoints, resume, divergence checks and progress.

A task subclasses `RunLoop` and implements `loss() -> (loss, logs)` for the current `self.step`; `run_loop`
drives it. What makes a run trustworthy lives here once:
- Determinism: a task draws the randomness of step k from `step_generator(seed, k)`, so a resumed run continues
  bit-for-bit on the CPU and K ranks reproduce one process at the same global batch.
- Checkpoints: plain dicts of tensors and Python scalars (`torch.load(weights_only=True)`), written to
  `<out>.tmp<pid>` and renamed, so a killed run never leaves a truncated file; the model, EMA, optimizer, step,
  history and settings are in every one.
- Resume: a checkpoint written with other settings (the config fields outside the config's RESUME_FREE, plus the
  task's `identity()`) is refused unless override=True, which records the changes in the checkpoint.
- Divergence: a NaN/inf loss term or gradient norm raises `TrainingDiverged`, naming the step and the term,
  before any checkpoint of the diverged model is written.

A config is a dataclass with at least: steps, lr, warmup, optimizer, betas, weight_decay, ema_decay, grad_clip,
seed, log_every, checkpoint_every, bf16, device, grad_checkpointing, parallel, and methods lr_at(step) and
ema_decay_at(step).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import glob
import math
import os
import re
import sys
import tempfile
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from . import distributed as D
from .integrity import check_zip_crc

FORMAT = "mfm_fast.checkpoint"
VERSION = 1
OPTIMIZERS = ("adamw", "radam", "adam")


class TrainingDiverged(RuntimeError):
    """A logged loss term or the gradient norm went NaN/inf. Raised before any checkpoint of the diverged model is
    written: the file at `out` keeps the last good state."""

    def __init__(self, step: int, values: dict, out: Optional[str] = None, saved_step: Optional[int] = None):
        self.step, self.values = step, values
        self.term = next(iter(values))
        what = ", ".join(f"{k} = {v}" for k, v in values.items())
        where = ""
        if out is not None:
            where = (f"; {out!r} keeps the last good checkpoint (step {saved_step})" if saved_step is not None
                     else f"; nothing was written to {out!r}")
        super().__init__(f"training diverged at step {step}: {what}{where}")


# ---------------------------------------------------------------------------------------------- files
def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def model_spec(model: nn.Module) -> tuple:
    """(class name, config dict) from which `mfm_fast.train.load` rebuilds the model."""
    from .models import MFMDiT, MFMMLP
    model = unwrap(model)
    if isinstance(model, MFMDiT):
        return "MFMDiT", dataclasses.asdict(model.config)
    if isinstance(model, MFMMLP):
        return "MFMMLP", model.config_dict()
    raise TypeError(f"save/load support MFMMLP and MFMDiT, got {type(model).__name__}")


def check_plain(name: str, value, path: str = "") -> None:
    """Only what torch.load(weights_only=True) restores: tensors, Python scalars, str, None, lists/tuples/dicts."""
    where = f"{name}{path}"
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_plain(name, v, f"{path}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where} has a key of type {type(k).__name__}; use str or int keys")
            check_plain(name, v, f"{path}[{k!r}]")
        return
    raise TypeError(f"{where} is a {type(value).__name__}; checkpoints store only tensors, Python scalars, str, "
                    "None and lists/tuples/dicts of them")


def cpu_state(module: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in unwrap(module).state_dict().items()}


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows: keep its file
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (or no such pid)
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_tmp(path: str) -> None:
    """Delete the `<path>.tmp<pid>` files of writers killed mid-save (a live process's write in progress is kept;
    our own pid's file is from an earlier failed write)."""
    for tmp in glob.glob(glob.escape(path) + ".tmp*"):
        m = re.fullmatch(r"\.tmp(\d+)", tmp[len(path):])
        if m is None or (int(m.group(1)) != os.getpid() and _pid_alive(int(m.group(1)))):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def check_writable(out: str, name: str = "out") -> None:
    """Create out's directory and write a probe file there, so a bad path fails now, not at the first checkpoint."""
    if os.path.isdir(out):
        raise ValueError(f"{name}={out!r} is a directory; pass a checkpoint file path")
    directory = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".mfm_fast_probe"):
            pass
    except OSError as err:
        raise ValueError(f"{name}={out!r}: cannot write checkpoints to {directory!r} "
                         f"({type(err).__name__}: {err.strerror or err})") from err


def atomic_save(obj: dict, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale_tmp(path)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint behind


def read_checkpoint(path: str, map_location=None) -> dict:
    """torch.load(weights_only=True) plus checks that the file is intact (its zip CRC-32s, `integrity`) and an
    mfm_fast checkpoint."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    damage = check_zip_crc(path)  # torch.load skips the zip's CRC-32s: a flipped byte would load as a changed weight
    if damage is not None:
        raise ValueError(f"{path!r} is a corrupt checkpoint: a CRC-32 check failed ({damage}); it cannot be trusted")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 — any unpickling failure means "not our file"
        raise ValueError(f"{path!r} is not a readable mfm_fast checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        hint = ""
        if isinstance(ckpt, dict) and ("ema" in ckpt or "model" in ckpt):
            hint = " (for the official MFM release use mfm_fast.load_official_mfm)"
        raise ValueError(f"{path!r} is not an mfm_fast checkpoint: no format tag {FORMAT!r}{hint}")
    if ckpt.get("version", 0) > VERSION:
        raise ValueError(f"{path!r} has checkpoint version {ckpt['version']}, newer than this library ({VERSION})")
    for key in ("model_class", "model_config", "model"):
        if key not in ckpt:
            raise ValueError(f"{path!r} is a damaged mfm_fast checkpoint: missing {key!r}")
    return ckpt


# ---------------------------------------------------------------------------------------------- the loop
def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of optimizer step `step`: a pure function of (seed, step)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    return torch.device(device)


def make_optimizer(params, cfg):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.RAdam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                             decoupled_weight_decay=True)


def checkpoint_interval(cfg, out: Optional[str]) -> int:
    """Steps between checkpoints: cfg.checkpoint_every, or with `out` and checkpoint_every = 0 every
    max(1, min(1000, steps // 10)) steps (a killed run loses at most a tenth of its steps, at most 1000)."""
    if cfg.checkpoint_every or out is None:
        return cfg.checkpoint_every
    return max(1, min(1000, cfg.steps // 10))


def _plain(v):
    return tuple(_plain(x) for x in v) if isinstance(v, (list, tuple)) else v


class RunLoop:
    """Model, EMA, optimizer, step and history of one run; subclasses define `loss()` for step `self.step`.

    The model's parameters that require grad are optimised. Under torchrun the model is replicated (DDP-style
    gradient all-reduce) or sharded with FSDP2 (cfg.parallel == "fsdp"); the EMA copy stays replicated."""

    kind = "train"  # recorded in checkpoints: a run of another kind is not resumed

    def __init__(self, model: nn.Module, cfg):
        self.cfg = cfg
        self.dist = D.info()
        self.device = resolve_device(cfg.device)
        self.model = unwrap(model).to(self.device).train()
        if cfg.grad_checkpointing:
            if not hasattr(self.model, "grad_checkpointing"):
                raise ValueError(f"{type(self.model).__name__} has no grad_checkpointing switch")
            self.model.grad_checkpointing = True
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.fsdp = self.dist.world_size > 1 and cfg.parallel == "fsdp"
        if self.dist.world_size > 1:
            D.broadcast_module(self.model)
            D.broadcast_module(self.ema)
            if self.fsdp:
                D.shard_fsdp(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"the {type(self.model).__name__} to optimise has no trainable parameters")
        self.dtype = self.params[0].dtype
        self.opt = make_optimizer(self.params, cfg)
        self.step = 0
        self.history: list = []
        self.overrides: list = []  # resumes with changed settings: {"step", "changes": {field: [old, new]}}

    # -- what a task defines
    def loss(self) -> tuple:
        """(scalar loss to backpropagate, {name: scalar tensor} to log) of step `self.step`, on this rank."""
        raise NotImplementedError

    def backward(self) -> dict:
        """Backpropagate step `self.step`'s loss into the gradients; returns the logs. Tasks that accumulate
        micro-batches override this."""
        with self.autocast():
            loss, logs = self.loss()
        loss.backward()
        return logs

    def identity(self) -> dict:
        """Settings outside the config that a resume must match (e.g. the frozen base model's fingerprint)."""
        return {}

    def extra(self) -> dict:
        """Plain entries stored under the checkpoint's "extra"."""
        return {}

    # -- state
    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.cfg.bf16 and self.device.type == "cuda")

    def state_dict(self) -> dict:
        name, config = model_spec(self.model)
        extra = self.extra()
        check_plain("extra", extra)
        return {"format": FORMAT, "version": VERSION, "model_class": name, "model_config": config,
                "model": self._full_state(self.model), "ema": cpu_state(self.ema),
                "optimizer": self._optim_state(), "step": self.step, "history": list(self.history),
                "kind": self.kind, "train_config": dataclasses.asdict(self.cfg), "identity": self.identity(),
                "rng": {"scheme": "per-step generator seeded by (seed, step)", "seed": self.cfg.seed},
                "world_size": self.dist.world_size, "overrides": list(self.overrides), "extra": extra}

    # torch.distributed.checkpoint's state-dict API gives the same plain layout (full tensors on the CPU, optimizer
    # state keyed by parameter name) for a single process, replicated ranks and FSDP2 shards, so a checkpoint
    # resumes under any of them.
    def _full_state(self, module) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def _optim_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(self.model, self.opt,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state_dict(self, ckpt: dict, path: str, override: bool = False) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        name, config = model_spec(self.model)
        if ckpt["model_class"] != name or ckpt["model_config"] != config:
            raise ValueError(f"checkpoint {path!r} holds a {ckpt['model_class']} {ckpt['model_config']}, "
                             f"not this {name} {config}")
        if "optimizer" not in ckpt or "step" not in ckpt:
            raise ValueError(f"{path!r} is a model file without training state; it cannot be resumed")
        kind = ckpt.get("kind", "train")
        if kind != self.kind:
            raise ValueError(f"checkpoint {path!r} is a {kind!r} run, not a {self.kind!r} run; pass another --out "
                             "or start afresh (--no-resume)")
        changes = self._config_changes(ckpt.get("train_config") or {})
        for key, new in self.identity().items():
            old = (ckpt.get("identity") or {}).get(key)
            if _plain(old) != _plain(new):
                changes[key] = (old, new)
        if changes and not override:
            what = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
            raise ValueError(f"checkpoint {path!r} was trained with other settings: {what}. Resume with the "
                             "checkpoint's settings, start afresh (resume=False / --no-resume), or pass "
                             "override=True (--override) to continue with the new ones")
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, ckpt["model"], options=opts)
        set_optimizer_state_dict(self.model, self.opt, ckpt["optimizer"], options=opts)
        self.ema.load_state_dict(ckpt["ema"])
        self.step = int(ckpt["step"])
        self.history = list(ckpt.get("history", []))
        self.overrides = list(ckpt.get("overrides", []))
        if changes:  # recorded in every later checkpoint of this run
            self.overrides.append({"step": self.step, "changes": {k: list(v) if isinstance(v, tuple) else v
                                                                   for k, v in changes.items()}})

    def _config_changes(self, stored: dict) -> dict:
        """{field: (checkpoint's value, this run's)} over the fields that change the optimisation; a field the
        checkpoint predates counts as its default."""
        free = getattr(type(self.cfg), "RESUME_FREE", ())
        changes = {}
        for f in dataclasses.fields(self.cfg):
            if f.name in free:
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            old, new = _plain(stored.get(f.name, default)), _plain(getattr(self.cfg, f.name))
            if old != new:
                changes[f.name] = (old, new)
        return changes

    def save(self, path: str) -> None:
        state = self.state_dict()  # collective under FSDP: every rank takes part
        if self.dist.is_main:
            atomic_save(state, path)
        D.barrier()

    # -- one optimizer step
    def train_step(self) -> dict:
        cfg, step = self.cfg, self.step
        lr = cfg.lr_at(step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        logs = self.backward()
        if not self.fsdp:
            D.all_reduce_grads(self.params)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        self.opt.step()
        self._update_ema()
        self.step += 1
        keys = sorted(logs)
        vals = D.all_reduce_mean(torch.stack([logs[k].detach().float().reshape(()) for k in keys]))
        out = dict(zip(keys, vals))
        out["grad_norm"] = grad_norm.detach().float()
        out["lr"] = lr
        return out

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.cfg.ema_decay_at(self.step)
        ema_p = list(self.ema.parameters())
        src = list(self.model.parameters())
        if self.fsdp:  # the EMA copy stays replicated: gather the sharded weights
            src = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in src]
        for e, p in zip(ema_p, src):
            e.lerp_(p.detach().to(e.dtype), 1 - decay)
        for e, b in zip(self.ema.buffers(), unwrap(self.model).buffers()):
            e.copy_(b)


def run_loop(loop: RunLoop, out: Optional[str] = None, resume: bool = True, progress: bool = True,
             callback: Optional[Callable] = None, desc: str = "train", override: bool = False,
             postfix: tuple = ("loss",)) -> RunLoop:
    """Drive `loop` to cfg.steps: resume from `out` when it exists (and resume), checkpoint every
    `checkpoint_interval(cfg, out)` steps and at the end (rank 0, atomically), raise `TrainingDiverged` on a
    non-finite logged value, one tqdm bar on rank 0. callback(step, logs) runs after every step (logs: floats);
    `out` must have been checked with `check_writable` by the caller."""
    cfg = loop.cfg
    every = checkpoint_interval(cfg, out)
    saved_step = None  # the step of the last good checkpoint at `out`
    if out is not None and resume and os.path.exists(out):
        loop.load_state_dict(read_checkpoint(out, map_location="cpu"), out, override=override)
        saved_step = loop.step
    bar = None
    if progress and loop.dist.is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=min(loop.step, cfg.steps), desc=desc, dynamic_ncols=True,
                   mininterval=0.1 if sys.stderr.isatty() else 30)  # a log file gets an update every 30 s
    pending = []

    def flush():  # one host sync per logging interval; it runs before every save and before returning
        for step, lg in pending:
            entry = {"step": step, **{k: float(v) for k, v in lg.items()}}
            bad = {k: v for k, v in entry.items() if not math.isfinite(v)}
            if bad:
                pending.clear()
                if bar is not None:
                    bar.close()
                # loss terms first: a non-finite gradient norm alone means a finite loss had non-finite gradients
                bad = dict(sorted(bad.items(), key=lambda kv: kv[0] == "grad_norm"))
                raise TrainingDiverged(step, bad, out, saved_step)
            loop.history.append(entry)
        pending.clear()
        if bar is not None and loop.history:
            h = loop.history[-1]
            bar.set_postfix({k: f"{h[k]:.4f}" for k in postfix if k in h}, refresh=False)

    while loop.step < cfg.steps:
        pending.append((loop.step + 1, loop.train_step()))
        last = loop.step == cfg.steps
        save_now = out is not None and (last or (every and loop.step % every == 0))
        if len(pending) >= cfg.log_every or save_now or last or callback is not None:
            flush()
        if bar is not None:
            bar.update(1)
        if save_now:
            loop.save(out)
            saved_step = loop.step
        if callback is not None:
            callback(loop.step, loop.history[-1])
    if bar is not None:
        bar.close()
    return loop
