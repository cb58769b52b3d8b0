"""Training an image MFM on SD-VAE latent shards: the release's recipe (`scripts/train.py`, `conf/config_train.yaml`,
`src/mfm/losses/losses.py`) on mfm_fast's run loop (`train.train`, `runloop`).

    python -m mfm_fast train --data latents --latents DIR --init-from dmf --init-ckpt dmf_xl_2_256.pt \\
        --vae sd-vae-ft-mse/ --out runs/mfm.pt
    torchrun --standalone --nproc_per_node=8 -m mfm_fast train --data latents ...   # DDP (--parallel fsdp: FSDP2)

Per step (`losses.mfm_loss` with `image_defaults()`): every row of the batch draws one context (t, x_t) with
t = U² (0 with probability 0.1; x_t is then pure noise) and its label (dropped to the null class with probability
0.2) and trains two terms on it:
- the diagonal v_{s,s}(x̄; t, x_t) against the GLASS conditional drift of the teacher, a frozen copy of the initial
  weights, s ~ U[0, 1];
- the Eulerian (ESD-teacher) consistency v_{s,u}(x̄') against sg(ṽ + (u−s)·(∂_s v + ∇v·ṽ)), ṽ the same GLASS drift
  at (s, x̄'), (s, u) a sorted uniform pair, on its own transported state x̄';
with adaptive weights (‖Δ‖² + 0.01)^(-p), p = 0.5 and 1, ‖Δ‖² summed over the latent's elements. Model guidance:
each labelled row trains the guidance row w = 2.5 of the DiT, and the teacher's drift is then classifier-free
guided, v(∅) + w·(v(y) − v(∅)) (for a DMF initialisation v(y) is first rearranged, (1−ω)·v(y) + ω·v(∅), ω = 0.6).

`ImageEvaluator` writes the release's sample grids next to the checkpoint: one- and 4-step posterior samples at
t ∈ {0, 0.2, 0.4} from held-out latents, and 1-, 2-, 4-step refinement samples at guidance 2.5.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from . import distributed as D
from ._checks import check_positive_int, check_state
from .interpolant import bcast
from .train import TrainConfig, _overrides, _run_settings, train

INIT_SOURCES = ("sit", "dmf", "mfm", "none")
DMF_OMEGA = 0.6  # the release's `omega` for a DMF teacher (`extract_posterior_velocity`, checkpoint_type "dmf")


def image_defaults(**overrides) -> TrainConfig:
    """The release's training recipe (conf/config_train.yaml, conf/model/sit_xl_2.yaml) as a TrainConfig; `batch`
    is global (the release: 32 per GPU). guidance_ws is the model's guidance table without 1.0 (the release's
    model_guidance_class_ws = [2.5])."""
    base = dict(steps=100000, batch=32, lr=1e-4, lr_schedule="constant", warmup=2000, warmup_start=0.1,
                optimizer="radam", betas=(0.9, 0.999), weight_decay=0.0, ema_decay=0.9999, ema_start=100,
                ema_warmup=False, grad_clip=1.5, consistency="esd", diagonal="distill", layout="paired",
                adaptive=True, diag_p=0.5, cons_p=1.0, diag_c=0.01, cons_c=0.01, reduce="sum",
                consistency_weight=1.0, t_zero_prob=0.1, t_power=2.0, p_uncond=0.2, guidance_ws=(2.5,),
                guidance_base_prob=0.0, zero_context=False, cons_stop_grad=True, seed=42, log_every=25, bf16=True)
    return TrainConfig(**{**base, **overrides})


# ---------------------------------------------------------------------------------------------- teacher, init
def guided_drift(teacher: nn.Module, omega: float = 0.0) -> Callable:
    """teacher_drift(t, x, y=None, cfg=None) -> b_t(x) of a frozen DiT teacher, as the release's GLASS targets call
    it (`extract_posterior_velocity`): the unconditional drift v_{t,t}(x; 0, 0) with the null label and with y
    (guidance row 1, one batched call), v_c = (1−ω)·v(y) + ω·v(∅), then v(∅) + cfg·(v_c − v(∅)) per row (v_c
    without cfg; v(∅) alone without labels). No gradients."""
    from .sampling import drift
    omega = float(omega)
    if not math.isfinite(omega):
        raise ValueError(f"omega must be finite, got {omega}")
    null = teacher.config.num_classes

    @torch.no_grad()
    def teacher_drift(t, x, y=None, cfg=None, **cond):
        if y is None:
            return drift(teacher, t, x, **cond)
        two = lambda a: torch.cat([a, a])  # noqa: E731
        v = drift(teacher, two(t), two(x), y=torch.cat([torch.full_like(y, null), y]), **cond)
        v_u, v_c = v.chunk(2)
        if omega:
            v_c = (1 - omega) * v_c + omega * v_u
        if cfg is None:
            return v_c
        return v_u + bcast(cfg.to(v_u.dtype), v_u) * (v_c - v_u)
    return teacher_drift


def init_model(init_from: str, path=None, config=None, impl: str = "auto", ignore: Sequence[str] = (),
               seed: int = 0) -> nn.Module:
    """The MFMDiT a run starts from (float32, CPU):
    - "sit": an official SiT checkpoint (`models.checkpoints.mfm_from_sit`: SiT's modules copied, its time
      embedder into s_embedder and t_embedder_second, t_embedder.mlp[2] zeroed, the context branch gated off);
    - "dmf": a flow-map (DMF) checkpoint the same way, time-flipped (t = 0 data): the release's `init_from_dmf`;
    - "mfm": an MFM checkpoint (the official release, an mfm_fast checkpoint or .safetensors), to continue training;
    - "none": random weights of `config` (default MFM-XL/2), seeded by `seed`.
    config: a registry name or DiTConfig (sit/dmf: where the heads and encoder depth come from; mfm: must agree
    with the file's). ignore: key prefixes of `path` to drop (e.g. a DMF's extra heads)."""
    from .models.checkpoints import load_official_mfm, mfm_from_sit
    from .models.dit import MFMDiT, make_config
    if init_from not in INIT_SOURCES:
        raise ValueError(f"init_from must be one of {INIT_SOURCES}, got {init_from!r}")
    if init_from == "none":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return MFMDiT(config or "MFM-XL/2", impl=impl)
    if path is None:
        raise ValueError(f"init_from={init_from!r} needs the checkpoint's path")
    if init_from in ("sit", "dmf"):
        return mfm_from_sit(path, impl=impl, dtype=torch.float32, config=config, ignore=tuple(ignore),
                            **({"time_flip": True} if init_from == "dmf" else {}))
    model = load_official_mfm(path, impl=impl, dtype=torch.float32, ignore=tuple(ignore))
    if config is not None and model.config != make_config(config):
        raise ValueError(f"--model {config} contradicts the config of the MFM checkpoint {path} "
                         f"({model.config}); drop --model to keep the checkpoint's")
    return model


# ---------------------------------------------------------------------------------------------- evaluation
class ImageEvaluator:
    """The release's sample grids (`SamplingCallback`), decoded with the VAE, of the EMA model at a step, written to
    `out_dir/step_<k>/`:
    - `posterior_t<t>_steps<K>.png`: for every held-out latent x1 (one row each) x1, the context
      x_t = t·x1 + (1−t)·ξ and `per_context` K-step posterior samples X(0→1; t, x_t) at guidance `cfg`, for t in
      `t_conds` and K in `posterior_steps` (release: t ∈ {0, 0.2, 0.4}, K ∈ {1, 4}, 32 contexts × 4);
    - `samples_cfg<w>_steps<K>.png`: K-step refinement samples (`sampling.refine_sample`) of random classes at
      guidance `cfg`, K in `refine_steps` (release: 128 samples, K ∈ {1, 2, 4}).
    Noise and classes are fixed (drawn from seed + 12345), so grids of different steps compare. Rank 0 samples
    and writes; the other ranks wait."""

    def __init__(self, out_dir: str, vae, x1: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 n_samples: int = 128, per_context: int = 4, t_conds=(0.0, 0.2, 0.4), posterior_steps=(1, 4),
                 refine_steps=(1, 2, 4), cfg: float = 2.5, zero_context: bool = False, seed: int = 0,
                 batch: int = 32, context: Optional[Callable] = None):
        check_state("x1", x1)
        for name, value in (("n_samples", n_samples), ("per_context", per_context), ("batch", batch)):
            check_positive_int(name, value)
        self.out, self.vae = out_dir, vae
        self.x1, self.labels = x1.float().cpu(), labels.long().cpu()
        self.per_context, self.t_conds = per_context, tuple(float(t) for t in t_conds)
        self.posterior_steps, self.refine_steps = tuple(posterior_steps), tuple(refine_steps)
        self.cfg, self.zero_context, self.seed, self.batch = float(cfg), zero_context, seed, batch
        self.context = context or contextlib.nullcontext
        gen = torch.Generator().manual_seed(seed + 12345)
        event = tuple(x1.shape[1:])
        self.sample_labels = torch.randint(0, num_classes, (n_samples,), generator=gen)
        self.sample_noise = torch.randn((n_samples, *event), generator=gen)
        self.context_noise = torch.randn(self.x1.shape, generator=gen)
        self.posterior_noise = torch.randn((self.x1.shape[0] * per_context, *event), generator=gen)

    def folder(self, step: int) -> str:
        return os.path.join(self.out, f"step_{step:07d}")

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        from .latents import decode_latents
        return torch.cat([decode_latents(self.vae, z[i:i + self.batch]).float().cpu()
                          for i in range(0, z.shape[0], self.batch)])

    @torch.no_grad()
    def __call__(self, step: int, model: nn.Module) -> list:
        written = []
        if D.info().is_main:
            written = self._write(step, model)
        D.barrier()
        return written

    def _write(self, step: int, model: nn.Module) -> list:
        from .latents import save_image_grid
        from .sampling import posterior_sample, refine_sample
        p = next(model.parameters())
        device, dtype = p.device, p.dtype
        folder = self.folder(step)
        written = []
        n = self.sample_noise.shape[0]
        for K in self.refine_steps:
            out = []
            for lo in range(0, n, self.batch):
                hi = min(n, lo + self.batch)
                gens = [torch.Generator(device).manual_seed(self.seed * 1_000_003 + i) for i in range(lo, hi)]
                with self.context():
                    z = refine_sample(model, self.sample_noise[lo:hi].to(device, dtype), steps=K, generator=gens,
                                      y=self.sample_labels[lo:hi].to(device),
                                      cfg=torch.full((hi - lo,), self.cfg, device=device))
                out.append(z.float())
            path = os.path.join(folder, f"samples_cfg{self.cfg:g}_steps{K}.png")
            save_image_grid(self._decode(torch.cat(out)), path, nrow=max(1, math.isqrt(n)))
            written.append(path)
        M, m = self.x1.shape[0], self.per_context
        x1_images = self._decode(self.x1.to(device, dtype))
        for t in self.t_conds:
            x_t = t * self.x1 + (1 - t) * self.context_noise
            if t == 0 and self.zero_context:
                x_t = torch.zeros_like(x_t)
            x_t_images = self._decode(x_t.to(device, dtype))
            for K in self.posterior_steps:
                samples = []
                for lo in range(0, M, max(1, self.batch // m)):
                    hi = min(M, lo + max(1, self.batch // m))
                    with self.context():
                        z = posterior_sample(model, t, x_t[lo:hi].to(device, dtype), m,
                                             noise=self.posterior_noise[lo * m:hi * m].to(device, dtype), steps=K,
                                             y=self.labels[lo:hi].to(device),
                                             cfg=torch.full((hi - lo,), self.cfg, device=device))
                    samples.append(z.float())
                images = self._decode(torch.cat(samples).flatten(0, 1)).view(M, m, *x1_images.shape[1:])
                grid = torch.cat([x1_images[:, None], x_t_images[:, None], images], dim=1).flatten(0, 1)
                path = os.path.join(folder, f"posterior_t{t:g}_steps{K}.png")
                save_image_grid(grid, path, nrow=m + 2)
                written.append(path)
        return written


def samples_dir(out: str) -> str:
    """Where `train --data latents --out CKPT` writes its sample grids: beside CKPT, `<CKPT without .pt>_samples/`."""
    root, _ = os.path.splitext(out)
    return f"{root}_samples"


# ---------------------------------------------------------------------------------------------- CLI
def run_latents(args, dinfo: D.DistInfo) -> int:
    """`python -m mfm_fast train --data latents ...` (options in `train._parser`)."""
    from .fingerprint import fingerprint
    from .latents import LatentRows, load_vae
    from .models.dit import make_config
    from .runloop import check_writable, resolve_device
    # everything that can be wrong is checked before the model loads
    if not args.latents:
        raise ValueError("--data latents needs --latents DIR (shards written by `python -m mfm_fast encode`)")
    if args.init_from is None:
        raise ValueError("--data latents needs --init-from sit|dmf|mfm|none (with --init-ckpt PATH)")
    if args.init_from == "none":
        if args.init_ckpt is not None:
            raise ValueError("--init-ckpt does not apply to --init-from none")
        if args.teacher != "none":
            raise ValueError("--init-from none (random weights) needs --teacher none: the teacher is a frozen copy of "
                             "the initial weights")
    elif args.init_ckpt is None:
        raise ValueError(f"--init-from {args.init_from} needs --init-ckpt PATH")
    elif not os.path.isfile(args.init_ckpt):
        raise FileNotFoundError(f"--init-ckpt: no checkpoint at {args.init_ckpt!r}")
    if args.teacher == "none" and args.consistency == "esd":
        raise ValueError("--consistency esd needs a teacher (--teacher init)")
    if not args.no_eval and not args.vae:
        raise ValueError("--data latents writes sample grids decoded with the VAE: pass --vae DIR (or --no-eval)")
    for name in ("eval_samples", "eval_contexts"):
        if getattr(args, name) is not None:
            check_positive_int(f"--{name.replace('_', '-')}", getattr(args, name))
    if args.eval_every is not None and args.eval_every < 0:
        raise ValueError(f"--eval-every must be a non-negative integer, got {args.eval_every}")
    if args.model is not None:
        make_config(args.model)  # an unknown name fails here
    check_writable(args.out, "--out")
    try:
        data = LatentRows(args.latents)
        eval_data = None if args.no_eval else (LatentRows(args.eval_latents) if args.eval_latents else data)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--latents/--eval-latents: {err}") from None
    world = dinfo.world_size
    impl = args.impl or "auto"
    overrides = _overrides(args)
    cfg = image_defaults(batch=32 * world, **_run_settings(args))
    if args.teacher == "none":  # from data: the release's data_fm + MeanFlow ("mf") consistency
        cfg = dataclasses.replace(cfg, diagonal="data", consistency="meanflow")
    model = init_model(args.init_from, args.init_ckpt, args.model, impl, args.init_ignore,
                       seed=overrides.get("seed", cfg.seed))
    mc = model.config
    guidance = () if args.no_model_guidance else tuple(w for w in mc.class_guidance_ws if w != 1.0)
    cfg = dataclasses.replace(cfg, guidance_ws=guidance, **overrides)
    labels = data.labels()
    if int(labels.min()) < 0 or int(labels.max()) >= mc.num_classes:
        raise ValueError(f"--latents: labels must lie in [0, {mc.num_classes}) for this model, found "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    shape = tuple(data.rows(torch.tensor([0]))[0].shape[1:])
    if shape != tuple(mc.event_shape):
        raise ValueError(f"--latents hold latents of shape {shape}, the model takes {tuple(mc.event_shape)}")
    eval_cfg = 2.5 if args.eval_cfg is None else args.eval_cfg
    if not args.no_eval:
        from .models.dit import check_guidance_weight
        check_guidance_weight("--eval-cfg", eval_cfg, mc.class_guidance_ws)
    device = resolve_device(cfg.device)
    teacher_drift, omega = None, None
    if args.teacher == "init":
        omega = args.teacher_omega if args.teacher_omega is not None else (
            DMF_OMEGA if args.init_from == "dmf" else 0.0)
        teacher = copy.deepcopy(model).to(device).eval().requires_grad_(False)
        teacher_drift = guided_drift(teacher, omega)
    identity = {"init_from": args.init_from,
                "init_fingerprint": None if args.init_ckpt is None else fingerprint(args.init_ckpt),
                "teacher": args.teacher, "teacher_omega": omega, "latents_rows": len(data)}
    evaluate = None
    if not args.no_eval:
        gen = torch.Generator().manual_seed(cfg.seed + 54321)
        x1, y = eval_data.sample(args.eval_contexts or 32, gen)
        if tuple(x1.shape[1:]) != tuple(mc.event_shape) or int(y.min()) < 0 or int(y.max()) >= mc.num_classes:
            raise ValueError(f"--eval-latents hold latents of shape {tuple(x1.shape[1:])} with labels in "
                             f"[{int(y.min())}, {int(y.max())}]; the model takes {tuple(mc.event_shape)}, labels in "
                             f"[0, {mc.num_classes})")
        vae = load_vae(args.vae, device=device) if dinfo.is_main else None  # rank 0 writes the grids
        evaluate = ImageEvaluator(samples_dir(args.out), vae, x1, y, mc.num_classes,
                                  n_samples=args.eval_samples or 128, cfg=eval_cfg, zero_context=cfg.zero_context,
                                  seed=cfg.seed,
                                  context=lambda: torch.autocast(device.type, dtype=torch.bfloat16,
                                                                 enabled=cfg.bf16 and device.type == "cuda"))
    eval_every = 10000 if args.eval_every is None else args.eval_every
    result = train(model, data.sample, cfg, out=args.out, resume=not args.no_resume, progress=not args.quiet,
                   teacher_drift=teacher_drift, desc="train image MFM", override=args.override, identity=identity,
                   evaluate=evaluate, eval_every=eval_every)
    if dinfo.is_main:
        last = result.history[-1] if result.history else {}
        where = "" if args.no_eval else f"; sample grids in {samples_dir(args.out)}/"
        print(f"trained {result.step} steps (global batch {cfg.batch}) -> {args.out}"
              + (f" (loss {last['loss']:.4f})" if last else "") + where)
    return 0

