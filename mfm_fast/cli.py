"""`python -m mfm_fast steer` and `python -m mfm_fast sample`: images from an MFM checkpoint and an SD-VAE, on one
process or data-parallel under torchrun, written into an output directory: samples.npz (the ADM evaluator's
format), grid.png and rewards.json (`mfm_fast.parallel_sample` has the layout and what is invariant).

    python -m mfm_fast steer --ckpt mfm-xl2.pt --vae sd-vae-ft-mse/ --class 281 --reward hpsv2,weights=hpsv21/ \\
        --score-with clip,weights=clip-vit-base-patch16/ --method mfm-g --particles 4 --steps 250 \\
        --num-samples 64 --out steer_out
    torchrun --standalone --nproc_per_node=8 -m mfm_fast sample --ckpt mfm-xl2.pt --vae sd-vae-ft-mse/ \\
        --class random --steps 4 --cfg 2.5 --num-samples 50000 --out fid50k

Rewards are spec strings `NAME[,key=value...]` (`mfm_fast.reward_models.parse_reward_spec`): a name of
`reward_models.REWARD_MODELS` or `module:function`, and the keyword arguments of its factory (local files only).
`--reward` is the steering reward; each `--score-with` adds a scorer whose score of every output sample, with the
sample's class prompt, goes into rewards.json beside the steering reward (scored after decoding, without
gradients, by each process on the shards it computes; the scorers are built once per process).

The checkpoint may be the official release, a nested/prefixed training checkpoint, an mfm_fast checkpoint
(`mfm_fast.train.save`) or an mfm_fast .safetensors file (`mfm_fast.models.checkpoints.load_official_mfm`).
Class conditioning goes through the model's guidance table (`--cfg`, release: 2.5, one forward pass).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime

import torch

from ._checks import check_positive_int
from .reward_models import DEFAULT_TEMPLATE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# arguments that do not change the samples: left out of the settings a resume must match
_NOT_SETTINGS = ("out", "nrow", "grid", "device", "no_progress", "timeout")


def _common_args(ap: argparse.ArgumentParser, steps: int, n: int) -> None:
    ap.add_argument("--ckpt", required=True, help="MFM checkpoint (.pt / .safetensors)")
    ap.add_argument("--vae", required=True, help="local AutoencoderKL directory (e.g. sd-vae-ft-mse)")
    ap.add_argument("--class", dest="label", default="281",
                    help="class label (num_classes = the null class; default 281, tabby cat)")
    # --num-samples under torchrun: its own parser rejects --n as an ambiguous prefix of --nnodes/--nproc-per-node
    ap.add_argument("--num-samples", "--n", dest="n", type=int, default=n, help="number of output images")
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--cfg", type=float, default=2.5,
                    help="guidance scale: one of the model's guidance-table weights (release: 1.0, 2.5)")
    ap.add_argument("--seed", type=int, default=0, help="sample i draws its randomness from (seed, i) only")
    ap.add_argument("--out", default="samples",
                    help="output directory: samples.npz (uint8 NHWC under arr_0), grid.png, rewards.json, "
                         "shards/ (a rerun resumes from them)")
    ap.add_argument("--shard-size", type=int, default=32,
                    help="samples per shard: the unit of work, of resumption, and the network batch (the "
                         "samples depend on it, not on the number of processes)")
    ap.add_argument("--grid", type=int, default=64, help="images in grid.png (the first ones)")
    ap.add_argument("--nrow", type=int, default=8, help="images per grid row")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu or cuda; under torchrun each rank takes cuda:LOCAL_RANK")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model and VAE weight dtype")
    ap.add_argument("--bf16", action="store_true", help="run under bf16 autocast (CUDA), as the release does")
    ap.add_argument("--impl", choices=("auto", "triton", "torch"), default="auto")
    ap.add_argument("--timeout", type=float, default=1800.0,
                    help="seconds a rank waits for the others before the job fails: at most one shard's compute "
                         "(and the ranks' difference in start-up time) in a healthy run")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--score-with", action="append", default=[], metavar="SPEC",
                    help="extra scorer NAME[,key=value...] (repeatable), e.g. 'imagereward,weights=DIR,tokenizer=DIR': "
                         "every output sample's score with its class prompt goes into rewards.json (names: "
                         "hpsv2, imagereward, pickscore, clip, aesthetic, toy, or module:function)")
    ap.add_argument("--prompt-template", default=DEFAULT_TEMPLATE, help="class prompt; {class} is the class name")
    ap.add_argument("--class-names", help="class names file (one per line or JSON list); default ImageNet-1k")


def _score_specs(args) -> dict:
    """--score-with as {name: factory keyword arguments}; a malformed or repeated spec is an error."""
    from .reward_models import parse_reward_spec
    specs = {}
    for spec in args.score_with:
        try:
            name, kwargs = parse_reward_spec(spec)
        except ValueError as err:
            raise ValueError(f"--score-with: {err}") from None
        if name in specs:
            raise ValueError(f"--score-with names {name!r} twice; give each scorer once")
        specs[name] = kwargs
    return specs


def _validate(args) -> None:
    from .reward_models import class_prompts
    _score_specs(args)
    class_prompts([0], args.prompt_template)  # "{class}" present
    for name in ("num_samples", "steps", "nrow", "shard_size", "grid"):
        check_positive_int(f"--{name.replace('_', '-')}", getattr(args, "n" if name == "num_samples" else name))
    if args.seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {args.seed}")
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if not args.out.strip():
        raise ValueError(f"--out must name an output directory, got {args.out!r}")
    if args.out.lower().endswith(".png"):
        raise ValueError(f"--out is an output directory (samples.npz, grid.png, rewards.json go inside), got the "
                         f"file name {args.out!r}")


def load_model(path, impl="auto", dtype=torch.float32, device="cpu"):
    from .models.checkpoints import load_official_mfm
    return load_official_mfm(path, impl=impl, dtype=dtype, device=device)


def _check_cfg(model, cfg: float) -> None:
    # before the VAE and reward load: a weight outside the guidance table has no embedding row
    from .models.dit import check_guidance_weight
    check_guidance_weight("--cfg", cfg, model.config.class_guidance_ws)


def _label(model, label: str, allow_random: bool):
    """--class as an int in [0, num_classes], or "random" (a class per sample, from that sample's generator)."""
    nc = model.config.num_classes
    if label == "random" and allow_random:
        return "random"
    try:
        value = int(label)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= nc:
        extra = ' or "random"' if allow_random else ""
        raise ValueError(f"--class must lie in [0, {nc}] ({nc} = null class){extra}, got {label}")
    return value


def _autocast(args, device):
    if not args.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def _rank_device(device: str, info) -> str:
    """One GPU per rank: a bare "cuda" becomes cuda:LOCAL_RANK under torchrun."""
    if torch.device(device).type == "cuda" and torch.device(device).index is None and info.world_size > 1:
        return f"cuda:{info.local_rank}"
    return device


def _settings(args) -> dict:
    settings = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    settings["device_type"] = torch.device(args.device).type
    return settings


def _inputs(args) -> dict:
    """{argument: path} of the files and directories the samples depend on: --ckpt, --vae, --class-names and every
    path in the --reward / --score-with specs (a value naming an existing file or directory). run.json records
    their content fingerprints, so a resume with other files behind the same paths is refused."""
    from pathlib import Path
    inputs = {"--ckpt": args.ckpt, "--vae": args.vae}
    if args.class_names is not None:
        inputs["--class-names"] = args.class_names
    specs = [(f"--score-with {name}", kwargs) for name, kwargs in _score_specs(args).items()]
    if getattr(args, "reward", None) is not None:
        specs.insert(0, ("--reward", _reward_spec(args)[1]))
    for label, kwargs in specs:
        for key, value in kwargs.items():
            if isinstance(value, str) and value.strip() and Path(value).exists():
                inputs[f"{label} {key}"] = value
    return inputs


def _decode(vae, z):
    from .latents import decode_latents
    with torch.no_grad():
        return decode_latents(vae, z.to(vae.dtype))


def _run(args, desc: str, build) -> int:
    """Set up the process group (torchrun) or a single process, build (args, device) -> (make_shard, run kwargs),
    run the shards, report on rank 0."""
    from . import distributed as D
    from .parallel_sample import run_sharded
    _validate(args)
    backend = "nccl" if torch.device(args.device).type == "cuda" else "gloo"  # gloo for --device cpu on a GPU host
    info = D.init_from_env(backend, timeout=datetime.timedelta(seconds=args.timeout))
    try:
        device = _rank_device(args.device, info)
        make_shard, kw, describe = build(args, device)
        summary = run_sharded(make_shard, args.n, args.out, seed=args.seed, shard_size=args.shard_size,
                              settings=_settings(args), grid=args.grid, nrow=args.nrow, device=device,
                              progress=not args.no_progress, desc=desc, inputs=_inputs(args), **kw)
        if summary is not None:
            print(describe(summary))
    finally:
        D.shutdown()
    return 0


def _scoring(args, device, steering: tuple = ("", {})):
    """The --score-with scorers, built once on this process's device, and prompts(labels) -> one class prompt per
    sample. A scorer named like the steering reward is the steering reward (its scores are recorded already) when
    its spec matches, an error otherwise."""
    from .reward_models import build_scorers, class_names, class_prompts
    specs = _score_specs(args)
    name, kwargs = steering
    if name in specs:
        if specs[name] != kwargs:
            raise ValueError(f"--score-with {name} differs from the steering reward --reward {name} ({specs[name]} vs "
                             f"{kwargs}); rewards.json records the steering reward under {name!r}, so give the same "
                             "files or drop it from --score-with")
        del specs[name]
    names = class_names(args.class_names)
    scorers = build_scorers(specs, device)
    return scorers, lambda labels: class_prompts(labels, args.prompt_template, names)


def cost_report(summary, nfe=None) -> str:
    c, n = summary.cost, summary.candidates
    fwd, bwd = int(c.get("forward_evals", 0)), int(c.get("backward_evals", 0))
    lines = [f"  output samples        {summary.n} ({summary.candidates} computed)",
             f"  paper NFE per sample  {nfe if nfe is not None else 'n/a'}",
             f"  network calls         {int(c.get('forward_calls', 0))}",
             f"  forward rows          {fwd}",
             f"  backward rows         {bwd}",
             f"  reward evaluations    {int(c.get('reward_evals', 0))}",
             f"  passes per sample     {(fwd + bwd) / max(n, 1):.1f}"]
    lines += [f"  mean reward           {v.mean():.4f} ({k})" for k, v in summary.rewards.items()]
    lines += [f"  shards                {summary.shards} ({summary.shards_computed} computed by this run)",
              f"  wall time             {summary.seconds:.2f} s (this run)"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- sample
def sample_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mfm_fast sample", description=sample_main.__doc__)
    _common_args(ap, steps=4, n=8)
    return ap


def sample_main(argv=None) -> int:
    """K-step refinement sampling (K network calls per image) of one class or random classes, on one process or
    under torchrun; writes samples.npz, grid.png and rewards.json into --out. An MFM-FT checkpoint (written by
    `finetune`) is sampled by K Euler steps of its fine-tuned drift instead."""

    def build(args, device):
        from .latents import load_vae
        from .parallel_sample import refine_shard, scored_shard
        from .finetune import euler_shard, is_finetuned, load_finetuned
        dtype = DTYPES[args.dtype]
        finetuned = is_finetuned(args.ckpt)
        if finetuned:  # an MFM-FT checkpoint holds a drift: Euler steps, not the flow map's refinement
            model = load_finetuned(args.ckpt, impl=args.impl).to(device=device, dtype=dtype)
            _check_cfg(model.mfm, args.cfg)
        else:
            model = load_model(args.ckpt, args.impl, dtype, device)
            _check_cfg(model, args.cfg)
        label = _label(model, args.label, allow_random=True)
        vae = load_vae(args.vae, device=device, dtype=dtype)
        scorers, prompts = _scoring(args, device)
        if finetuned:
            make_shard = euler_shard(model, lambda z: _decode(vae, z), args.steps, label, cfg=args.cfg,
                                     context=lambda: _autocast(args, device))
        else:
            make_shard = refine_shard(model, lambda z: _decode(vae, z), args.steps, label, cfg=args.cfg,
                                      context=lambda: _autocast(args, device))
        make_shard = scored_shard(make_shard, scorers, prompts)

        def describe(s):
            return "\n".join([f"sample: {s.n} images of class {args.label}, {args.steps} NFE each, cfg {args.cfg}, "
                              f"{s.seconds:.2f} s -> {args.out}/samples.npz"]
                             + [f"  mean score            {v.mean():.4f} ({k})" for k, v in s.rewards.items()])
        return make_shard, {}, describe

    return _run(sample_parser().parse_args(argv), "sample", build)


# ---------------------------------------------------------------------------------------------- steer
def _reward_spec(args) -> tuple:
    """--reward NAME[,key=value...] with the shorthands --reward-weights / --reward-processor merged in."""
    from .reward_models import parse_reward_spec
    try:
        name, kwargs = parse_reward_spec(args.reward)
    except ValueError as err:
        raise ValueError(f"--reward: {err}") from None
    for opt, key in (("reward_weights", "weights"), ("reward_processor", "processor")):
        value = getattr(args, opt)
        if value is None:
            continue
        if str(kwargs.get(key, value)) != value:
            raise ValueError(f"--{opt.replace('_', '-')} {value} contradicts {key}={kwargs[key]} in --reward")
        kwargs[key] = value
    return name, kwargs


def steer_parser() -> argparse.ArgumentParser:
    from .reward_models import REWARD_MODELS
    from .steer import METHODS, RENORMS
    ap = argparse.ArgumentParser(prog="python -m mfm_fast steer", description=steer_main.__doc__)
    _common_args(ap, steps=250, n=4)
    ap.add_argument("--reward", default="hpsv2", metavar="SPEC",
                    help=f"steering reward NAME[,key=value...]: NAME one of {', '.join(sorted(REWARD_MODELS))} or "
                         "module:function returning a mfm_fast.reward_models.RewardModel, keys the factory's "
                         "local files: hpsv2,weights=DIR|FILE; imagereward,weights=DIR,tokenizer=DIR; "
                         "pickscore,weights=DIR,processor=DIR; clip,weights=DIR; aesthetic,weights=DIR,clip_config=FILE")
    ap.add_argument("--reward-weights", help="shorthand for weights= in --reward (hpsv21 directory or "
                                             "HPS_v2.1_compressed.pt, ImageReward directory, PickScore directory)")
    ap.add_argument("--reward-processor", help="shorthand for processor= in --reward (PickScore: local "
                                               "CLIP-ViT-H-14 processor directory)")
    ap.add_argument("--method", choices=METHODS, default="mfm-g")
    ap.add_argument("--particles", type=int, default=4, help="one-step samples per state and step")
    ap.add_argument("--lam", type=float, default=2.0, help="reward multiplier lambda (release: 2.0)")
    ap.add_argument("--sde", action="store_true", help="Euler-Maruyama instead of the probability-flow ODE")
    ap.add_argument("--renorm", choices=[r or "none" for r in RENORMS], default="rescale")
    ap.add_argument("--t-start", type=float, default=0.01)
    ap.add_argument("--chunk-size", type=int, default=None, help="rows per network call in the value estimator")
    ap.add_argument("--posterior-steps", type=int, default=1,
                    help="flow-map steps per posterior sample in the value estimator (1: one step; m: the m-step "
                         "composed map, m times the cost, counted in the NFE)")
    ap.add_argument("--jackknife", action="store_true",
                    help="jackknifed particle weights in the value estimator (needs --particles >= 2): removes "
                         "the O(1/N) bias of the softmax weights at no extra network work")
    ap.add_argument("--best-of", type=int, default=1,
                    help="Best-of-N: N candidates per output sample (global indices), the highest reward kept "
                         "(with --method none: the Best-of-N baseline)")
    return ap


def steer_main(argv=None) -> int:
    """Reward-steered sampling of one class with an image reward scored on decoded latents, on one process or
    under torchrun; optionally Best-of-N over candidate pools (--best-of). Writes samples.npz, grid.png and
    rewards.json (every sample's steering reward and --score-with scores, the counted cost) into --out."""

    def build(args, device):
        from .latents import decode_latents, load_vae
        from .parallel_sample import scored_shard, steer_shard
        from .reward_models import REWARD_MODELS, get_reward_model
        from .rewards import DecodeThenScore
        from .steps import paper_nfe
        check_positive_int("--particles", args.particles)
        check_positive_int("--best-of", args.best_of)
        check_positive_int("--posterior-steps", args.posterior_steps)
        if args.method == "smc":  # before any loading; steer_shard refuses it too
            raise ValueError("--method smc couples the samples of a population and cannot be sharded; use "
                             "mfm_fast.steer.steer with population= directly")
        if args.chunk_size is not None:
            check_positive_int("--chunk-size", args.chunk_size)
        reward_name, reward_kwargs = _reward_spec(args)
        dtype = DTYPES[args.dtype]
        model = load_model(args.ckpt, args.impl, dtype, device)
        _check_cfg(model, args.cfg)
        label = _label(model, args.label, allow_random=False)
        vae = load_vae(args.vae, device=device, dtype=dtype)
        kwargs = {"device": device, **reward_kwargs} if reward_name in REWARD_MODELS else reward_kwargs
        scorer = get_reward_model(reward_name, prompt_template=args.prompt_template, **kwargs)
        prompted = scorer.for_labels([label], names_file=args.class_names)  # one prompt for every image
        name = getattr(scorer, "name", reward_name)
        scorers, prompts = _scoring(args, device, steering=(name, reward_kwargs))
        reward = DecodeThenScore(lambda z: decode_latents(vae, z), prompted, name=f"decode_then_{name}")
        make_shard = steer_shard(model, lambda z: _decode(vae, z), reward, name, label, cfg=args.cfg,
                                 context=lambda: _autocast(args, device), steps=args.steps, method=args.method,
                                 n_particles=args.particles, lam=args.lam, sde=args.sde,
                                 renorm=None if args.renorm == "none" else args.renorm, t_start=args.t_start,
                                 chunk_size=args.chunk_size, posterior_steps=args.posterior_steps,
                                 jackknife=args.jackknife)
        make_shard = scored_shard(make_shard, scorers, prompts)

        nfe = paper_nfe(args.method, args.steps, args.particles, posterior_steps=args.posterior_steps)
        if nfe is not None and args.best_of > 1:
            nfe = nfe * args.best_of + args.best_of  # N candidates and their N reward evaluations

        def describe(s):
            return (f"steer[{args.method}]: {s.n} images of class {label} ({prompted.prompts[0]!r}), reward "
                    f"{name}, lambda {args.lam}, {args.particles} particles, {args.steps} steps"
                    f"{f', best of {args.best_of}' if args.best_of > 1 else ''} -> {args.out}/samples.npz\n"
                    + cost_report(s, nfe))
        return make_shard, dict(best_of=args.best_of, select_by=name), describe

    return _run(steer_parser().parse_args(argv), "steer", build)

