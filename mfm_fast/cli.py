"""`python -m mfm_fast steer` and `python -m mfm_fast sample`: image grids from an MFM checkpoint and an SD-VAE.

    python -m mfm_fast steer --ckpt mfm-xl2.pt --vae sd-vae-ft-mse/ --class 281 --reward hpsv2 \\
        --reward-weights HPS_v2_compressed.pt --method mfm-g --particles 4 --steps 250 --out grid.png
    python -m mfm_fast sample --ckpt mfm-xl2.pt --vae sd-vae-ft-mse/ --class 281 --steps 4 --cfg 2.5 --out grid.png

The checkpoint may be the official release, a nested/prefixed training checkpoint, an mfm_fast checkpoint
(`mfm_fast.train.save`) or an mfm_fast .safetensors file (`mfm_fast.models.checkpoints.load_official_mfm`).
Class conditioning goes through the model's guidance table (`--cfg`, release: 2.5, one forward pass).
"""
from __future__ import annotations

import argparse
import contextlib
import time
from typing import Optional

import torch

from ._checks import check_positive_int

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _common_args(ap: argparse.ArgumentParser, steps: int, n: int) -> None:
    ap.add_argument("--ckpt", required=True, help="MFM checkpoint (.pt / .safetensors)")
    ap.add_argument("--vae", required=True, help="local AutoencoderKL directory (e.g. sd-vae-ft-mse)")
    ap.add_argument("--class", dest="label", type=int, default=281,
                    help="class label (num_classes = the null class; default 281, tabby cat)")
    ap.add_argument("--n", type=int, default=n, help="number of images")
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--cfg", type=float, default=2.5,
                    help="guidance scale: one of the model's guidance-table weights (release: 1.0, 2.5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="grid.png", help="output PNG grid")
    ap.add_argument("--nrow", type=int, default=8, help="images per grid row")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model and VAE weight dtype")
    ap.add_argument("--bf16", action="store_true", help="run under bf16 autocast (CUDA), as the release does")
    ap.add_argument("--impl", choices=("auto", "triton", "torch"), default="auto")
    ap.add_argument("--no-progress", action="store_true")


def _validate(args) -> None:
    for name in ("n", "steps", "nrow"):
        check_positive_int(f"--{name}", getattr(args, name))


def load_model(path, impl="auto", dtype=torch.float32, device="cpu"):
    from .models.checkpoints import load_official_mfm
    return load_official_mfm(path, impl=impl, dtype=dtype, device=device)


def _check_cfg(model, cfg: float) -> None:
    # before the VAE and reward load: a weight outside the guidance table has no embedding row
    from .models.dit import check_guidance_weight
    check_guidance_weight("--cfg", cfg, model.config.class_guidance_ws)


def _labels(model, label: int, n: int, device) -> torch.Tensor:
    nc = model.config.num_classes
    if not 0 <= label <= nc:
        raise ValueError(f"--class must lie in [0, {nc}] ({nc} = null class), got {label}")
    return torch.full((n,), label, dtype=torch.long, device=device)


def _autocast(args):
    if not args.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16)


def _save(vae, z, args) -> None:
    from .latents import decode_latents, save_image_grid
    with torch.no_grad():
        images = decode_latents(vae, z.to(vae.dtype))
    save_image_grid(images, args.out, nrow=args.nrow)


class ProgressModel:
    """Forwards to the model and advances a progress bar by one network call."""

    def __init__(self, model, bar):
        self.model, self.bar = model, bar

    def __getattr__(self, attr):
        if attr in ("model", "bar"):
            raise AttributeError(attr)
        return getattr(self.model, attr)

    def __call__(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        self.bar.update(1)
        return out


# ---------------------------------------------------------------------------------------------- sample
def sample_main(argv=None) -> int:
    """K-step refinement sampling (K network calls per image) of one class, decoded to a PNG grid."""
    from tqdm.auto import tqdm

    from .latents import load_vae
    from .sampling import refine_sample
    ap = argparse.ArgumentParser(prog="python -m mfm_fast sample", description=sample_main.__doc__)
    _common_args(ap, steps=4, n=8)
    args = ap.parse_args(argv)
    _validate(args)
    dtype = DTYPES[args.dtype]
    model = load_model(args.ckpt, args.impl, dtype, args.device)
    _check_cfg(model, args.cfg)
    vae = load_vae(args.vae, device=args.device, dtype=dtype)
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    noise = torch.randn((args.n, *model.event_shape), generator=g, device=args.device, dtype=dtype)
    y = _labels(model, args.label, args.n, args.device)
    start = time.perf_counter()
    with tqdm(total=args.steps, desc="sample", unit="nfe", disable=args.no_progress) as bar, _autocast(args):
        res = refine_sample(ProgressModel(model, bar), noise, steps=args.steps, generator=g, return_result=True,
                            y=y, cfg=args.cfg)
    seconds = time.perf_counter() - start
    _save(vae, res.samples, args)
    print(f"sample: {args.n} images of class {args.label}, {res.nfe} NFE each, cfg {args.cfg}, "
          f"{seconds:.2f} s on {args.device} -> {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------- steer
def _reward_kwargs(args) -> dict:
    from .reward_models import REWARD_MODELS
    kw = {}
    for opt, key in (("reward_weights", "weights"), ("reward_config", "med_config"),
                     ("reward_processor", "processor")):
        if getattr(args, opt) is not None:
            kw[key] = getattr(args, opt)
    if args.reward in REWARD_MODELS:
        kw["device"] = args.device
    return kw


def cost_report(result, seconds: Optional[float] = None) -> str:
    c = result.cost
    lines = [f"  output samples        {c.batch}",
             f"  paper NFE per sample  {c.nfe if c.nfe is not None else 'n/a'}",
             f"  network calls         {c.forward_calls}",
             f"  forward rows          {c.forward_evals}",
             f"  backward rows         {c.backward_evals}",
             f"  reward evaluations    {c.reward_evals}",
             f"  passes per sample     {c.evals_per_sample:.1f}",
             f"  mean reward           {result.mean_reward:.4f}"]
    if seconds is not None:
        lines.append(f"  wall time             {seconds:.2f} s")
    return "\n".join(lines)


def steer_main(argv=None) -> int:
    """Reward-steered sampling of one class with an image reward scored on decoded latents; writes a PNG grid."""
    from .latents import decode_latents, load_vae
    from .reward_models import DEFAULT_TEMPLATE, REWARD_MODELS, get_reward_model
    from .rewards import DecodeThenScore
    from .steer import METHODS, RENORMS, steer
    ap = argparse.ArgumentParser(prog="python -m mfm_fast steer", description=steer_main.__doc__)
    _common_args(ap, steps=250, n=4)
    ap.add_argument("--reward", default="hpsv2",
                    help=f"reward model: {', '.join(sorted(REWARD_MODELS))}, or module:function returning a "
                         "mfm_fast.reward_models.RewardModel")
    ap.add_argument("--reward-weights", help="reward weights (ImageReward.pt, HPS_v2_compressed.pt, PickScore dir)")
    ap.add_argument("--reward-config", help="ImageReward med_config.json")
    ap.add_argument("--reward-processor", help="PickScore: local CLIP-ViT-H-14 processor directory")
    ap.add_argument("--prompt-template", default=DEFAULT_TEMPLATE)
    ap.add_argument("--class-names", help="class names file (one per line or JSON list); default ImageNet-1k")
    ap.add_argument("--method", choices=METHODS, default="mfm-g")
    ap.add_argument("--particles", type=int, default=4, help="one-step samples per state and step")
    ap.add_argument("--lam", type=float, default=2.0, help="reward multiplier lambda (release: 2.0)")
    ap.add_argument("--sde", action="store_true", help="Euler-Maruyama instead of the probability-flow ODE")
    ap.add_argument("--renorm", choices=[r or "none" for r in RENORMS], default="rescale")
    ap.add_argument("--t-start", type=float, default=0.01)
    ap.add_argument("--chunk-size", type=int, default=None, help="rows per network call in the value estimator")
    args = ap.parse_args(argv)
    _validate(args)
    check_positive_int("--particles", args.particles)
    dtype = DTYPES[args.dtype]

    model = load_model(args.ckpt, args.impl, dtype, args.device)
    _check_cfg(model, args.cfg)
    vae = load_vae(args.vae, device=args.device, dtype=dtype)
    scorer = get_reward_model(args.reward, prompt_template=args.prompt_template, **_reward_kwargs(args))
    prompted = scorer.for_labels([args.label], names_file=args.class_names)  # one prompt for every image
    reward = DecodeThenScore(lambda z: decode_latents(vae, z), prompted, name=f"decode_then_{args.reward}")
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    noise = torch.randn((args.n, *model.event_shape), generator=g, device=args.device, dtype=dtype)
    y = _labels(model, args.label, args.n, args.device)
    start = time.perf_counter()
    with _autocast(args):
        res = steer(model, reward, noise, steps=args.steps, method=args.method, n_particles=args.particles,
                    lam=args.lam, sde=args.sde, renorm=None if args.renorm == "none" else args.renorm,
                    t_start=args.t_start, generator=g, return_result=True, chunk_size=args.chunk_size,
                    progress=not args.no_progress, y=y, cfg=args.cfg)
    seconds = time.perf_counter() - start
    _save(vae, res.samples, args)
    print(f"steer[{args.method}]: {args.n} images of class {args.label} ({prompted.prompts[0]!r}), "
          f"reward {args.reward}, lambda {args.lam}, {args.particles} particles, {args.steps} steps -> {args.out}")
    print(cost_report(res, seconds))
    return 0
