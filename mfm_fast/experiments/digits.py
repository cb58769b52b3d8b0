"""`python -m mfm_fast experiment digits` — classifier-reward steering on scikit-learn's 8×8 digits (METHOD §6).

An unconditional "MFM-Digits" DiT (`train.digits_defaults()`: a flow-matching teacher, then the MFM distilled from
it; cached) and a small CNN classifier (cached) define
the reward r(x) = log Σ_c w_c·p(c|x), w ∝ [0,1,0,1,0,2,0,2,0,4]. Under the tilted target p1·exp(λ·r) with λ = 1 the
class histogram of the samples should equal w (the data's classes are balanced), so each sampler is scored by
the L2 distance between its class histogram (classifier argmax) and w, next to its mean reward and cost.

Posterior fidelity: with no closed-form posterior, the reference is model-exact, GLASS rollouts of the learned drift;
one-step and 4-step MFM samples are compared with it through classifier histograms at t = 0.2, 0.5, 0.8.

Reward vs compute: Best-of-N for N = 1 … 1000 against single-particle MFM-G and 4-particle MFM-GF at the release's
settings (λ = 1, 2.5, 5, renorm "rescale"), costs in the paper's NFE accounting (METHOD §3): the paper claims
single-particle steered MFM beats Best-of-1000 at ≥ 100× less compute. Best-of-N is simulated by drawing N candidates with replacement from a pool of base samples (its cost is
counted as K·N + N per output, as if each candidate had been generated).
Writes digits.{md,csv}, digits_cost.{md,csv}, digits_posterior.{md,csv} and digits.png into --out.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from typing import Optional

import torch
import torch.nn as nn

from .common import (cache_dir, cached_train_seconds, experiment_parser, MethodSpec, out_dir, positive_int, pyplot,
                     recipe_cache_path, recipe_steps, resolve_device, run_method, save_recipe_model, timer,
                     write_table)

WEIGHTS = (0, 1, 0, 1, 0, 2, 0, 2, 0, 4)


class DigitClassifier(nn.Module):
    """Small CNN for 1×8×8 digits in [−1, 1] -> logits (B, 10)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),  # (B, 2w, 4, 4)
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(2 * width, 10))

    def forward(self, x):
        return self.net(x)


def split(n: int, seed: int = 0, test_fraction: float = 0.2):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(n * test_fraction)
    return perm[k:], perm[:k]


def train_classifier(images, labels, device, steps: int = 600, seed: int = 0, retrain: bool = False):
    """The reward's classifier, trained on 80% of the digits (light Gaussian-noise augmentation so that it stays
    smooth off the data), cached. Returns (classifier in eval mode, held-out accuracy)."""
    key = hashlib.sha1(json.dumps({"steps": steps, "seed": seed, "v": 1}).encode()).hexdigest()[:12]
    path = cache_dir() / f"digits_classifier_{key}.pt"
    clf = DigitClassifier()
    tr, te = split(images.shape[0], seed)
    if path.exists() and not retrain:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        clf.load_state_dict(ckpt["state"])
        return clf.to(device).eval().requires_grad_(False), ckpt["test_acc"]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    xs, ys = images[tr], labels[tr]
    for _ in range(steps):
        idx = torch.randint(0, xs.shape[0], (128,), generator=gen)
        x = xs[idx] + 0.1 * torch.randn(xs[idx].shape, generator=gen)
        loss = nn.functional.cross_entropy(clf(x), ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (clf(images[te]).argmax(-1) == labels[te]).float().mean().item()
    torch.save({"state": clf.state_dict(), "test_acc": acc}, path)
    return clf.to(device).eval().requires_grad_(False), acc


DIGITS_QUICK = {"steps": 10, "batch": 32, "warmup": 1, "rollout_bank": 64, "rollout_steps": 4}


def digits_mfm(device, steps: Optional[int] = None, batch: Optional[int] = None, retrain: bool = False,
               progress: bool = True, recipe=None, quick: bool = False, impl: str = "auto"):
    """The unconditional MFM-Digits DiT trained with `recipe` (default `train.digits_defaults()`: a flow-matching
    teacher, then the MFM distilled from it), with DIGITS_QUICK for both stages if `quick`, or explicit `steps` /
    `batch` for both stages; cached under cache_dir() by the whole recipe, the teacher beside it. Training resumes
    from its last checkpoint if interrupted. Returns (MFM in eval mode, teacher in eval mode or None, one-line
    description, training seconds)."""
    from ..data import load_digits
    from ..train import dataset_sampler, digits_defaults, load, teacher_path, train_recipe
    recipe = dataclasses.replace(recipe or digits_defaults())
    over = dict(DIGITS_QUICK) if quick else {}
    over.update({k: v for k, v in (("steps", steps), ("batch", batch)) if v is not None})
    if "steps" in over and not quick:
        over["warmup"] = min(recipe.train.warmup, over["steps"] // 10)
    recipe.train = dataclasses.replace(recipe.train, **over)
    if recipe.teacher_train is not None:
        recipe.teacher_train = dataclasses.replace(
            recipe.teacher_train, **{k: v for k, v in over.items() if not k.startswith("rollout")})
    spec = recipe.spec()
    path = recipe_cache_path("digits_mfm", spec)
    run = path.with_suffix(".run.pt")  # resumable training state; the teacher lies beside it

    def teacher_model():
        tp = teacher_path(str(run))
        return load(tp, map_location=device).eval() if recipe.teacher == "learned" else None

    if path.exists() and not retrain:
        return load(str(path), map_location=device).eval(), teacher_model(), \
            f"reusing the cached digits MFM {path}", cached_train_seconds(path)
    images, _ = load_digits()
    what = {"learned": "a flow-matching teacher, then the MFM distilled from it", "none": "the MFM from data"}
    print(f"training the digits MFM ({what[recipe.teacher]}; cached afterwards in {path})", flush=True)
    with timer(device) as elapsed:
        result, teacher = train_recipe(recipe, dataset_sampler(images), out=str(run), resume=not retrain,
                                       progress=progress, device=str(device), impl=impl)
    seconds = elapsed()  # of this session only, when resumed
    save_recipe_model(result, path, spec, seconds)
    return result.ema.to(device).eval(), teacher_model(), \
        f"trained the digits MFM ({recipe_steps(recipe, result, teacher)} steps, {seconds:.0f} s) -> {path}", seconds


def class_histogram(classifier, x) -> torch.Tensor:
    with torch.no_grad():
        pred = classifier(x).argmax(-1)
    return torch.bincount(pred, minlength=10).float() / x.shape[0]


def best_of_n_from_pool(pool_x, pool_r, n: int, batch: int, generator):
    """Best-of-n outputs simulated from a pool: `batch` groups of n candidates drawn with replacement."""
    idx = torch.randint(0, pool_x.shape[0], (batch, n), generator=generator, device=pool_x.device)
    best = idx.gather(1, pool_r[idx].argmax(1, keepdim=True))[:, 0]
    return pool_x[best], pool_r[best]


POSTERIOR_TS = (0.2, 0.5, 0.8)


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    """Total-variation distance between two histograms."""
    return 0.5 * float((p - q).abs().sum())


@torch.no_grad()
def posterior_histograms(model, reference, classifier, images, ts=POSTERIOR_TS, contexts: int = 8, n: int = 128,
                         steps=(1, 4), seed: int = 0, device=None) -> list[dict]:
    """Class histograms of posterior samples p(x1 | x_t = x) against a model-exact reference.

    For each t: `contexts` contexts x = t·x1 + (1−t)·ε from held digits x1; `n` samples per context from the MFM
    (K-step composed flow map for each K in `steps`) and two independent sets from `reference` (GLASS rollouts of
    the learned drift, `glass.GlassFlowMap`). Rows: mean over contexts of the TV distance between classifier
    histograms, model vs reference, with the reference-vs-reference TV at the same n as the noise floor."""
    from ..sampling import posterior_sample
    gen = torch.Generator().manual_seed(seed)
    device = torch.device(device or "cpu")
    rows = []
    for t in ts:
        x1 = images[torch.randint(0, images.shape[0], (contexts,), generator=gen)]
        x = (t * x1 + (1 - t) * torch.randn(x1.shape, generator=gen)).to(device)
        g = torch.Generator(device).manual_seed(seed + int(1000 * t))

        def hists(m, k=1):
            xs = posterior_sample(m, float(t), x, n, generator=g, steps=k)
            return [class_histogram(classifier, xs[i]) for i in range(contexts)]
        ref_a, ref_b = hists(reference), hists(reference)
        floor = sum(tv(a, b) for a, b in zip(ref_a, ref_b)) / contexts
        row = {"t": t, "TV floor (ref vs ref)": floor}
        for k in steps:
            mod = hists(model, k)
            d = sum(tv(a, b) for a, b in zip(mod, ref_a)) / contexts
            row[f"TV K={k}"] = d
            row[f"ratio K={k}"] = d / floor
        rows.append(row)
        print("  posterior t={:.2f}: ".format(t) + ", ".join(
            f"{k} {v:.3f}" for k, v in row.items() if k != "t"), flush=True)
    return rows


def main(argv=None) -> int:
    from ..data import load_digits
    from ..glass import GlassFlowMap
    from ..rewards import ClassifierReward
    from ..steer import paper_nfe, steer
    from ..train import digits_defaults, model_drift

    p = experiment_parser("python -m mfm_fast experiment digits", __doc__.splitlines()[0], "outputs/digits",
                          quick_help="tiny budget (tests): meaningless numbers, all code paths",
                          retrain_help="retrain the MFM and the classifier",
                          train_help="MFM (and teacher) training")
    p.add_argument("--recipe", choices=("learned", "none"), default="learned",
                   help="learned (default): flow-matching teacher, then the MFM distilled from it; none: the "
                        "earlier recipe, from data alone (its own drift is then the posterior reference)")
    p.add_argument("--samples", type=positive_int, default=None, help="outputs per method (default 256; quick 16)")
    p.add_argument("--pool", type=positive_int, default=None, help="base samples for Best-of-N (default 2048; quick 64)")
    p.add_argument("--steps", type=positive_int, default=None, help="Euler steps K (default 25; quick 4)")
    p.add_argument("--lams", default="1,2.5,5", help="λ values for single-particle MFM-G and 4-particle MFM-GF "
                   "(release: 1, 2.5, 5)")
    p.add_argument("--renorm", choices=("rescale", "clip", "none"), default="rescale",
                   help="steering-term renormalisation (release: rescale)")
    p.add_argument("--bon", default="1,2,4,8,16,32,64,128,256,512,1000", help="Best-of-N values")
    p.add_argument("--posterior-contexts", type=positive_int, default=None,
                   help="contexts per t in the posterior check (default 8; quick 2)")
    p.add_argument("--posterior-samples", type=positive_int, default=None,
                   help="posterior samples per context (default 128; quick 8)")
    p.add_argument("--glass-steps", type=positive_int, default=None,
                   help="Heun steps of the GLASS-rollout reference (default 24; quick 2)")
    args = p.parse_args(argv)

    t_begin = time.perf_counter()
    device = resolve_device(args.device)
    out = out_dir(args.out)
    quick = args.quick
    B = args.samples or (16 if quick else 256)
    M = args.pool or (64 if quick else 2048)
    K = args.steps or (4 if quick else 25)
    lams = [float(v) for v in args.lams.split(",")]
    bon = [int(v) for v in args.bon.split(",")]
    renorm = None if args.renorm == "none" else args.renorm

    images, labels = load_digits()
    clf, acc = train_classifier(images, labels, device, steps=60 if quick else 600, retrain=args.retrain)
    print(f"classifier: held-out accuracy {acc:.3f}", flush=True)
    model, teacher, info, train_seconds = digits_mfm(device, args.train_steps, args.train_batch,
                                                     retrain=args.retrain, recipe=digits_defaults(args.recipe),
                                                     quick=quick)
    print(info, flush=True)

    # posterior fidelity against the model-exact reference: GLASS rollouts of the learned drift (the teacher's,
    # which the MFM distils; without a teacher, the MFM's own t = 0 diagonal)
    drift_of = teacher if teacher is not None else model
    reference = GlassFlowMap(model_drift(drift_of), args.glass_steps or (2 if quick else 24),
                             event_shape=tuple(images.shape[1:]))
    post = posterior_histograms(model, reference, clf, images, contexts=args.posterior_contexts or (2 if quick else 8),
                                n=args.posterior_samples or (8 if quick else 128), seed=args.seed, device=device)
    ref_txt = "the teacher's drift" if teacher is not None else "the MFM's own drift"
    write_table(post, out, "digits_posterior",
                f"Posterior class histograms: one-step (K = 1) and 4-step MFM samples vs GLASS rollouts of "
                f"{ref_txt} (mean TV over contexts; the floor is two independent reference sets; recipe "
                f"{args.recipe}, trained in {train_seconds:.0f} s)")

    reward = ClassifierReward(clf, WEIGHTS, name="digits_classifier")
    w = torch.tensor(WEIGHTS, dtype=torch.float32, device=device)
    w = w / w.sum()
    gen = torch.Generator(device=device).manual_seed(args.seed)
    floor = math.sqrt(float((w * (1 - w)).sum()) / B)

    def row(label, n, lam, x, r, cost=None, wall=float("nan"), nfe=None, rn="–"):
        h = class_histogram(clf, x)
        return {"method": label, "N": n, "λ": lam, "renorm": rn, "L2(hist, w)": float((h - w).norm()),
                "mean reward": float(r.float().mean()), "paper NFE": nfe if nfe is not None else "–",
                "fwd evals/sample": cost.forward_evals / cost.batch if cost else "–",
                "bwd evals/sample": cost.backward_evals / cost.batch if cost else "–", "wall s": wall,
                "_hist": h.cpu()}

    rows = []
    noise = torch.randn(B, 1, 8, 8, generator=gen, device=device)
    rn = {"renorm": renorm}
    # the exact λ = 1 tilt (the histogram target): no renormalisation, which would change the drift's magnitude
    specs = [(MethodSpec("base (no steering)", "none"), 1.0)]
    specs += [(MethodSpec(label, meth, n), 1.0) for label, meth, n in
              (("DPS", "dps", 1), ("MFM-G", "mfm-g", 1), ("MFM-GF", "mfm-gf", 4), ("MFM-G", "mfm-g", 4))]
    # the release's settings for the headline claim: single-particle MFM-G with the steering term renormalised
    # (MFM-GF needs N ≥ 2: with one particle its estimate is exactly 0)
    specs += [(MethodSpec(label, meth, n, kwargs=rn), lam) for lam in lams for label, meth, n in
              (("MFM-G", "mfm-g", 1), ("MFM-GF", "mfm-gf", 4))]
    for spec, lam in specs:
        res, wall = run_method(model, reward, noise, spec, K, lam, gen)
        rn_txt = spec.kwargs.get("renorm") or ("–" if spec.method == "none" else "none")
        rows.append(row(spec.label, spec.n if spec.method not in ("none", "dps") else "–", lam, res.samples,
                        res.rewards, res.cost, wall, res.cost.nfe, rn_txt))
        print(f"  {spec.label} N={spec.n} λ={lam} renorm {rn_txt}: L2 {rows[-1]['L2(hist, w)']:.3f}, mean reward "
              f"{rows[-1]['mean reward']:.3f}, {wall:.1f} s", flush=True)

    with timer(device) as elapsed:
        pool = steer(model, reward, torch.randn(M, 1, 8, 8, generator=gen, device=device), steps=K, method="none",
                     generator=gen, return_result=True)
    pool_wall = elapsed()
    print(f"  Best-of-N pool: {M} base samples in {pool_wall:.1f} s", flush=True)
    bon_rows = []
    for n in bon:
        x, r = best_of_n_from_pool(pool.samples, pool.rewards, n, B, gen)
        bon_rows.append(row("Best-of-N (pool)", n, "–", x, r, nfe=paper_nfe("best-of-n", K, n)))
    rows += bon_rows
    write_table([{k: v for k, v in r.items() if k != "_hist"} for r in rows], out, "digits",
                f"8×8 digits, reward log Σ w_c p(c|x): class-histogram distance to the λ = 1 tilt ({B} samples, "
                f"K = {K}; multinomial noise floor of the L2 ≈ {floor:.3f}; classifier accuracy {acc:.3f})")

    # the paper's claim: single-particle MFM-G beats Best-of-1000 at ≥ 100× less compute
    claim = []
    for r in rows:
        if r["method"] in ("MFM-G", "MFM-GF"):
            beaten = [b for b in bon_rows if b["mean reward"] >= r["mean reward"]]
            first = beaten[0] if beaten else None
            top = bon_rows[-1]
            claim.append({"method": f"{r['method']} N={r['N']}", "λ": r["λ"], "renorm": r["renorm"],
                          "mean reward": r["mean reward"],
                          "paper NFE": r["paper NFE"], f"Best-of-{top['N']} reward": top["mean reward"],
                          f"NFE ratio vs Best-of-{top['N']}": top["paper NFE"] / r["paper NFE"],
                          "smallest N with Best-of-N ≥ it": first["N"] if first else f"> {top['N']}",
                          "beats Best-of-max": r["mean reward"] > top["mean reward"]})
    write_table(claim, out, "digits_cost", "Steering vs Best-of-N: mean reward at paper NFE (the paper's claim is "
                "about single-particle MFM-G, N = 1)")

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    ax = axes[0]
    ax.plot([b["paper NFE"] for b in bon_rows], [b["mean reward"] for b in bon_rows], "o-", color="k",
            label="Best-of-N")
    for label, marker in (("MFM-G", "s"), ("MFM-GF", "^")):
        pts = [r for r in rows if r["method"] == label]
        for r in pts:
            ax.scatter(r["paper NFE"], r["mean reward"], marker=marker, s=50,
                       label=f"{label} N={r['N']} λ={r['λ']:g} {r['renorm']}")
    ax.set_xscale("log")
    ax.set_xlabel("paper NFE per sample")
    ax.set_ylabel("mean reward log Σ w_c p(c|x)")
    ax.set_title("reward vs compute")
    ax.legend(fontsize=6)
    ax = axes[1]
    show = [r for r in rows if r["method"] in ("base (no steering)", "DPS")]
    show += [r for r in rows if r["method"] in ("MFM-G", "MFM-GF") and r["λ"] == 1.0 and r["renorm"] == "none"
             and not (r["method"] == "MFM-G" and r["N"] == 4)]
    show += [min(bon_rows, key=lambda b: b["L2(hist, w)"]), bon_rows[-1]]
    width = 0.8 / (len(show) + 1)
    xs = torch.arange(10).float()
    ax.bar(xs, w.cpu(), width, color="k", label="target w")
    for i, r in enumerate(show):
        ax.bar(xs + (i + 1) * width, r["_hist"], width, label=f"{r['method']} N={r['N']}"
               + (f" {r['renorm']}" if r["renorm"] not in ("–",) else ""))
    ax.set_xticks(range(10))
    ax.set_xlabel("class")
    ax.set_title("class histograms")
    ax.legend(fontsize=7)
    ax = axes[2]
    rows_shown = min(32, B) // 8  # image rows of 8 per sampler
    res_g, _ = run_method(model, reward, noise[:8 * rows_shown], MethodSpec("MFM-G", "mfm-g", 1, kwargs=rn), K, 1.0,
                          gen)
    grid = torch.cat([pool.samples[:8 * rows_shown], res_g.samples], 0).clamp(-1, 1).cpu()
    grid = grid.view(2 * rows_shown, 8, 8, 8).permute(0, 2, 1, 3).reshape(16 * rows_shown, 64)
    ax.imshow(grid, cmap="gray_r")
    ax.axhline(8 * rows_shown - 0.5, color="r")
    ax.set_title(f"top: base samples; bottom: MFM-G N=1, λ=1, renorm {args.renorm}")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "digits.png", dpi=110)
    plt.close(fig)
    print(f"wrote {out}/digits.md, digits_cost.md, digits.png ({time.perf_counter() - t_begin:.0f} s)")
    return 0
