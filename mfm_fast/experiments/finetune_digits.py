"""`python -m mfm_fast experiment finetune-digits` — MFM-FT of a class-conditional digits DiT (METHOD §4).

The class-conditional case on the code path of the images (`finetune.finetune` with per-row labels): a
class-conditional MFM-Digits DiT (`train.digits_defaults()` on (image, label) pairs, labels dropped to the null
class with probability p_uncond; a flow-matching teacher, then the MFM distilled from it; cached) is fine-tuned
towards p(x | y)·exp(λ·r(x)) / Z_y with the data's own labels y on every row: y conditions both drifts and the frozen
MFM's posterior sample (no guidance: the model has no trained guidance weight). The reward does not depend on y:
r(x) = log P(even digit | x) under the digits experiment's CNN classifier (≤ 0), λ = 0.5 by default. For an even
label it is ≈ 0 everywhere and the tilt is nearly the identity; for an odd label it favours the samples of label y
that look most like an even digit: on the real digits a shift within the class, on the base model's samples partly
a change of class (its label-conditional tails look even), so both the reward distribution and the class
histogram are measured.

References, per conditioning label y, both self-normalised importance weights w_i ∝ exp(λ·r(x_i)) (exact as the
sample grows; their effective sample size is reported):
- *data tilt*: over the real digits of class y, the exact tilt of the data distribution;
- *model tilt*: over Euler samples of the base drift with label y (`--ref-samples` per label), the tilt of what the
  base model generates: the fixed point of MFM-FT (σ_t²/2 = (1−t)/t), up to the MFM's posterior error.
Fine-tuned samples (Euler, `--ode-steps`, fixed noise per label, the same at every step; step 0 = base drift) are
scored by mean reward, the 1-D Wasserstein distance of their rewards to the weighted reference rewards, and
classifier histograms (P(pred = y) and the TV distance to the model tilt's histogram).
Writes finetune_digits.{md,csv} (per label), finetune_digits_curve.{md,csv} (per evaluation step) and
finetune_digits.png into --out.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional

import torch
import torch.nn as nn

from .common import (cached_train_seconds, experiment_parser, out_dir, positive_int, pyplot,
                     recipe_cache_path, recipe_steps, resolve_device, save_recipe_model, timer, write_table)

EVEN = tuple(c for c in range(10) if c % 2 == 0)
ODD = tuple(c for c in range(10) if c % 2)


class EvenDigitReward(nn.Module):
    """r(x) = log P(even digit | x) = log Σ_{c even} softmax(classifier(x))_c, in (−∞, 0]; independent of any label."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier
        self.register_buffer("even", torch.tensor(EVEN))
        self.name = "log_p_even"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(self.classifier(x), dim=-1)
        return torch.logsumexp(logp[:, self.even], dim=-1)


# the class-conditional MFM's training budget (both stages), against digits_defaults()'s 1200 × 128 at lr 5e-4
# with a bank of 2048: at lr 5e-4, 600 steps left the teacher's samples of label y classified as y only 61% of the
# time (93% at 2e-3)
COND_BUDGET = {"steps": 600, "batch": 128, "lr": 2e-3, "warmup": 50, "rollout_bank": 1024}
COND_QUICK = {"steps": 30, "batch": 32, "lr": 2e-3, "warmup": 3, "rollout_bank": 64, "rollout_steps": 4}


def conditional_digits_mfm(device, steps: Optional[int] = None, batch: Optional[int] = None, retrain: bool = False,
                           progress: bool = True, quick: bool = False, impl: str = "auto"):
    """The class-conditional MFM-Digits DiT: `train.digits_defaults()` (a flow-matching teacher, then the MFM
    distilled from it) trained on (image, label) pairs (`train.dataset_sampler(images, labels)`; labels dropped to
    the null class with probability p_uncond), with COND_BUDGET for both stages (COND_QUICK if `quick`; explicit
    `steps` / `batch` override either); cached under cache_dir() by the whole recipe. Returns (MFM in eval mode,
    one-line description, training seconds)."""
    from ..data import load_digits
    from ..train import dataset_sampler, digits_defaults, load, train_recipe
    recipe = digits_defaults("learned")
    over = dict(COND_QUICK if quick else COND_BUDGET)
    over.update({k: v for k, v in (("steps", steps), ("batch", batch)) if v is not None})
    over["warmup"] = min(over["warmup"], over["steps"] // 10)
    recipe.train = dataclasses.replace(recipe.train, **over)
    recipe.teacher_train = dataclasses.replace(
        recipe.teacher_train, **{k: v for k, v in over.items() if not k.startswith("rollout")})
    spec = {**recipe.spec(), "data": "digits (image, label) pairs: class-conditional"}
    path = recipe_cache_path("digits_cond_mfm", spec)
    if path.exists() and not retrain:
        return load(str(path), map_location=device).eval(), f"reusing the cached class-conditional digits MFM {path}", \
            cached_train_seconds(path)
    images, labels = load_digits()
    print(f"training the class-conditional digits MFM (a flow-matching teacher, then the MFM distilled from it; "
          f"cached afterwards in {path})", flush=True)
    run = path.with_suffix(".run.pt")
    with timer(device) as elapsed:
        result, teacher = train_recipe(recipe, dataset_sampler(images, labels), out=str(run), resume=not retrain,
                                       progress=progress, device=str(device), impl=impl)
    seconds = elapsed()
    save_recipe_model(result, path, spec, seconds)
    return result.ema.to(device).eval(), \
        f"trained the class-conditional digits MFM ({recipe_steps(recipe, result, teacher)} steps, {seconds:.0f} s) " \
        f"-> {path}", seconds


def finetune_config(steps: int, batch: int, lr: float = 1e-3, lam: float = 0.5, seed: int = 0, device="cpu"):
    """The toy recipe (`finetune.gmm_defaults`: σ_t²/2 = (1−t)/t, t ~ U[0.01, 0.99], Adam, EMA with warm-up) with
    no guidance on the posterior sample (cfg_scale None: MFM-Digits never trained a guidance weight)."""
    from ..finetune import gmm_defaults
    return gmm_defaults(steps=steps, batch_size=batch, lr=lr, lam=lam, seed=seed, cfg_scale=None,
                        log_every=max(1, steps // 10), device=str(device))


def run_finetune(mfm, reward, images, labels, cfg, callback=None, every: int = 0, progress: bool = True):
    """MFM-FT on the data's (image, label) pairs: each row's own label conditions both drifts and the frozen MFM's
    posterior sample (`finetune.finetune` with a data callable returning (x1, labels))."""
    from ..finetune import finetune
    from ..train import dataset_sampler
    return finetune(mfm, reward, dataset_sampler(images, labels), cfg, progress=progress, callback=callback,
                    callback_every=every)


# ---------------------------------------------------------------------------------------------- measures
def snis(r: torch.Tensor, lam: float) -> torch.Tensor:
    """Self-normalised importance weights of the λ-tilt: softmax(λ·r)."""
    return torch.softmax(lam * r.double(), dim=0)


def ess(w: torch.Tensor) -> float:
    """Effective sample size 1 / Σ w² of normalised weights."""
    return float(1.0 / (w.double() ** 2).sum())


def wasserstein1(a: torch.Tensor, b: torch.Tensor, wb: Optional[torch.Tensor] = None) -> float:
    """1-D Wasserstein-1 distance ∫|F_a − F_b| between the empirical law of `a` and the (weighted) law of `b`."""
    a, b = a.double().flatten(), b.double().flatten()
    wa = torch.full_like(a, 1.0 / a.numel())
    wb = torch.full_like(b, 1.0 / b.numel()) if wb is None else wb.double() / wb.double().sum()
    x = torch.cat([a, b])
    order = torch.argsort(x)
    x = x[order]
    mass = torch.cat([wa, -wb])[order].cumsum(0)  # F_a − F_b just right of each point
    return float((mass[:-1].abs() * (x[1:] - x[:-1])).sum())


def class_hist(pred: torch.Tensor, w: Optional[torch.Tensor] = None) -> torch.Tensor:
    w = torch.full((pred.numel(),), 1.0 / pred.numel(), dtype=torch.float64) if w is None else w.double()
    return torch.bincount(pred.cpu(), weights=w.cpu(), minlength=10)


@dataclasses.dataclass
class Scored:
    """Rewards and classifier predictions of samples, grouped by conditioning label (lists of 10 tensors)."""
    r: list
    pred: list
    x: Optional[list] = None


@torch.no_grad()
def score(classifier, reward, x: torch.Tensor, labels: torch.Tensor, keep: bool = False) -> Scored:
    r = reward(x).float().cpu()
    pred = classifier(x).argmax(-1).cpu()
    labels = labels.cpu()
    return Scored([r[labels == y] for y in range(10)], [pred[labels == y] for y in range(10)],
                  [x[labels.to(x.device) == y].cpu() for y in range(10)] if keep else None)


def tilt_reference(s: Scored, lam: float) -> dict:
    """Per label: SNIS mean reward, its standard error, class histogram, ESS, and the weights."""
    out = {"mean": [], "se": [], "hist": [], "ess": [], "w": []}
    for y in range(10):
        w = snis(s.r[y], lam)
        r = s.r[y].double()
        m = float((w * r).sum())
        out["mean"].append(m)
        out["ess"].append(ess(w))
        out["se"].append(float(((w * (r - m) ** 2).sum() / ess(w)).sqrt()))
        out["hist"].append(class_hist(s.pred[y], w))
        out["w"].append(w)
    return out


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    from ..data import load_digits
    from ..finetune import FineTunedDrift, euler_sample
    from .digits import train_classifier

    p = experiment_parser("python -m mfm_fast experiment finetune-digits", __doc__.splitlines()[0],
                          "outputs/finetune_digits", quick_help="tiny budget (tests): rough numbers, all code paths",
                          retrain_help="retrain the class-conditional MFM and the classifier",
                          train_help="class-conditional MFM (and teacher) training")
    p.add_argument("--steps", type=positive_int, default=None, help="fine-tuning steps (default 400; quick 20)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="fine-tuning batch (default 64; quick 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (Adam; 3e-4 plateaus at the "
                                                          "same reward, later)")
    p.add_argument("--lam", type=float, default=0.5, help="λ of the tilt p(x|y)·exp(λ·r(x))")
    p.add_argument("--eval-every", type=positive_int, default=None, help="evaluation interval (default 100; quick 10)")
    p.add_argument("--samples", type=positive_int, default=None,
                   help="fine-tuned samples per label at each evaluation (default 64; quick 12)")
    p.add_argument("--ref-samples", type=positive_int, default=None,
                   help="base samples per label for the model-tilt reference (default 256; quick 12); at least "
                        "--samples (the evaluation noise is their first --samples)")
    p.add_argument("--ode-steps", type=positive_int, default=None, help="Euler steps of the samplers (default 25; "
                                                                        "quick 8)")
    args = p.parse_args(argv)

    t_begin = time.perf_counter()
    device = resolve_device(args.device)
    out = out_dir(args.out)
    quick = args.quick
    steps = args.steps or (20 if quick else 400)
    batch = args.batch_size or (32 if quick else 64)
    every = args.eval_every or (10 if quick else 100)
    n_eval = args.samples or (12 if quick else 64)
    n_ref = max(args.ref_samples or (12 if quick else 256), n_eval)
    K = args.ode_steps or (8 if quick else 25)
    lam = args.lam

    images, labels = load_digits()
    clf, acc = train_classifier(images, labels, device, steps=60 if quick else 600, retrain=args.retrain)
    print(f"classifier: held-out accuracy {acc:.3f}", flush=True)
    reward = EvenDigitReward(clf).to(device)
    mfm, info, train_seconds = conditional_digits_mfm(device, args.train_steps, args.train_batch,
                                                      retrain=args.retrain, quick=quick)
    print(info, flush=True)

    # references: the exact tilt of the data (real digits of class y) and of the base model (its samples)
    data_s = score(clf, reward, images.to(device), labels)
    data_ref = tilt_reference(data_s, lam)
    gen = torch.Generator().manual_seed(args.seed)
    ref_labels = torch.arange(10).repeat_interleave(n_ref)
    ref_noise = torch.randn(10 * n_ref, *images.shape[1:], generator=gen)
    with timer(device) as elapsed:
        x_ref = euler_sample(FineTunedDrift(mfm), ref_noise.to(device), K, ref_labels.to(device))
    ref_wall = elapsed()
    base_s = score(clf, reward, x_ref, ref_labels, keep=True)
    model_ref = tilt_reference(base_s, lam)
    print(f"model-tilt reference: {10 * n_ref} base samples in {ref_wall:.1f} s", flush=True)
    first = (torch.arange(10 * n_ref) % n_ref) < n_eval  # the evaluation noise: the first n_eval of each label's
    eval_noise, eval_labels = ref_noise[first].to(device), ref_labels[first].to(device)

    curve, evals = [], {}

    def record(step, s: Scored, wall: float):
        evals[step] = s
        odd = torch.cat([s.r[y] for y in ODD])
        row = {"step": step,
               "mean reward, odd labels": float(odd.mean()),
               "model tilt": sum(model_ref["mean"][y] for y in ODD) / len(ODD),
               "data tilt": sum(data_ref["mean"][y] for y in ODD) / len(ODD),
               "mean reward, even labels": float(torch.cat([s.r[y] for y in EVEN]).mean()),
               "W1 to model tilt (mean over labels)": sum(
                   wasserstein1(s.r[y], base_s.r[y], model_ref["w"][y]) for y in range(10)) / 10,
               "P(pred = y)": float(sum((s.pred[y] == y).float().sum() for y in range(10))) / (10 * n_eval),
               "TV(class hist, model tilt)": sum(tv(class_hist(s.pred[y]), model_ref["hist"][y])
                                                 for y in range(10)) / 10,
               "eval s": wall}
        curve.append(row)
        print(f"  step {step}: mean reward odd labels {row['mean reward, odd labels']:.3f} (model tilt "
              f"{row['model tilt']:.3f}, data tilt {row['data tilt']:.3f}), even {row['mean reward, even labels']:.3f},"
              f" P(pred = y) {row['P(pred = y)']:.3f}", flush=True)

    def evaluate(step, drift_model):
        if step == 0:  # the EMA drift at step 0 is the base drift: the reference samples' first n_eval per label
            s = Scored([base_s.r[y][:n_eval] for y in range(10)], [base_s.pred[y][:n_eval] for y in range(10)],
                       [base_s.x[y][:n_eval] for y in range(10)])
            record(0, s, 0.0)
            return
        with timer(device) as el:
            x = euler_sample(drift_model, eval_noise, K, eval_labels)
            s = score(clf, reward, x, eval_labels, keep=True)
        record(step, s, el())

    cfg = finetune_config(steps, batch, args.lr, lam, args.seed, device)
    with timer(device) as elapsed:
        run_finetune(mfm, reward, images, labels, cfg, callback=evaluate, every=every, progress=not quick)
    ft_wall = elapsed() - sum(r["eval s"] for r in curve)
    write_table(curve, out, "finetune_digits_curve",
                f"MFM-FT of the class-conditional digits DiT, r = log P(even | x), λ = {lam}: evaluation per step "
                f"({n_eval} Euler samples per label, K = {K}; step 0 = base drift; tilts: SNIS means over the odd "
                f"labels)")

    last = evals[steps]
    base = evals[0]
    rows = []
    for y in range(10):
        se = lambda r: float(r.std() / r.numel() ** 0.5) if r.numel() > 1 else float("nan")  # noqa: E731
        rows.append({
            "label": y,
            "base reward": float(base.r[y].mean()), "fine-tuned reward": float(last.r[y].mean()),
            "± (fine-tuned)": se(last.r[y]),
            "model tilt": model_ref["mean"][y], "± (model)": model_ref["se"][y], "ESS model": model_ref["ess"][y],
            "data reward": float(data_s.r[y].mean()), "data tilt": data_ref["mean"][y], "± (data)": data_ref["se"][y],
            "ESS data": data_ref["ess"][y],
            "W1 base": wasserstein1(base.r[y], base_s.r[y], model_ref["w"][y]),
            "W1 fine-tuned": wasserstein1(last.r[y], base_s.r[y], model_ref["w"][y]),
            "P(pred=y) base": float((base.pred[y] == y).float().mean()),
            "P(pred=y) fine-tuned": float((last.pred[y] == y).float().mean()),
            "P(pred=y) model tilt": float(model_ref["hist"][y][y]),
            "P(pred=y) data tilt": float(data_ref["hist"][y][y]),
            "TV base": tv(class_hist(base.pred[y]), model_ref["hist"][y]),
            "TV fine-tuned": tv(class_hist(last.pred[y]), model_ref["hist"][y]),
        })
    write_table(rows, out, "finetune_digits",
                f"MFM-FT of the class-conditional digits DiT after {steps} steps (batch {batch}, λ = {lam}, "
                f"σ_t²/2 = (1−t)/t): per conditioning label, mean reward log P(even | x) of {n_eval} Euler samples "
                f"(K = {K}) vs the exact tilts (SNIS over {n_ref} base samples: model; over the real digits of the "
                f"class: data; ± = standard errors, weighted std / √ESS for the tilts); W1: 1-D Wasserstein "
                f"distance of the rewards to the model tilt's; "
                f"TV: class-histogram distance to the model tilt's; classifier accuracy {acc:.3f}")

    # ------------------------------------------------------------------------------------------ figure
    plt = pyplot()
    fig = plt.figure(figsize=(18, 9))
    spec = fig.add_gridspec(2, 3)
    xs = torch.arange(10).float()
    bw = 0.2
    ax = fig.add_subplot(spec[0, 0])
    for i, (lab, vals, err) in enumerate((
            ("base", [r["base reward"] for r in rows], None),
            (f"fine-tuned ({steps} steps)", [r["fine-tuned reward"] for r in rows],
             [r["± (fine-tuned)"] for r in rows]),
            ("model tilt (SNIS, base samples)", model_ref["mean"], model_ref["se"]),
            ("data tilt (SNIS, real digits)", data_ref["mean"], data_ref["se"]))):
        ax.bar(xs + (i - 1.5) * bw, vals, bw, yerr=err, label=lab, capsize=2)
    ax.set_xticks(range(10))
    ax.set_xlabel("conditioning label y")
    ax.set_ylabel("mean reward log P(even | x)")
    ax.set_title(f"per-label mean reward, λ = {lam}")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(spec[0, 1])
    for i, key in enumerate(("P(pred=y) base", "P(pred=y) fine-tuned", "P(pred=y) model tilt", "P(pred=y) data tilt")):
        ax.bar(xs + (i - 1.5) * bw, [r[key] for r in rows], bw, label=key.replace("P(pred=y) ", ""))
    ax.set_xticks(range(10))
    ax.set_xlabel("conditioning label y")
    ax.set_ylabel("P(classifier predicts y)")
    ax.set_title("does the label still set the class?")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(spec[0, 2])
    ax.plot([r["step"] for r in curve], [r["mean reward, odd labels"] for r in curve], "o-", label="fine-tuned drift")
    ax.axhline(curve[0]["model tilt"], ls="--", color="C2", label="model tilt")
    ax.axhline(curve[0]["data tilt"], ls="-.", color="C3", label="data tilt")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("mean reward over the odd labels")
    ax.set_title("odd labels: reward vs step")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(spec[1, 0])
    rb = torch.cat([base.r[y] for y in ODD])
    rf = torch.cat([last.r[y] for y in ODD])
    rm = torch.cat([base_s.r[y] for y in ODD])
    wm = torch.cat([model_ref["w"][y] for y in ODD]).float() / len(ODD)
    rd = torch.cat([data_s.r[y] for y in ODD])
    wd = torch.cat([data_ref["w"][y] for y in ODD]).float() / len(ODD)
    lo = float(min(rb.min(), rf.min(), rm.min()))
    bins = torch.linspace(lo, 0.0, 31)
    ax.hist(rb, bins=bins, density=True, histtype="step", lw=1.5, label="base")
    ax.hist(rf, bins=bins, density=True, histtype="step", lw=1.5, label="fine-tuned")
    ax.hist(rm, bins=bins, weights=wm, density=True, histtype="step", lw=1.5, ls="--", label="model tilt (weighted)")
    ax.hist(rd.clamp(min=lo), bins=bins, weights=wd, density=True, histtype="step", lw=1.5, ls="-.",
            label="data tilt (weighted)")
    ax.set_xlabel("reward log P(even | x)")
    ax.set_title("reward distribution, odd labels")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(spec[1, 1:])
    ncol = min(8, n_eval)
    tiles = [torch.cat([base.x[y][:ncol], last.x[y][:ncol]], 0) for y in range(10)]
    grid = torch.stack(tiles).clamp(-1, 1)  # (10, 2·ncol, 1, 8, 8)
    grid = grid[:, :, 0].reshape(10, 2, ncol, 8, 8).permute(0, 3, 1, 2, 4).reshape(80, 2 * ncol * 8)
    ax.imshow(grid, cmap="gray_r")
    ax.axvline(ncol * 8 - 0.5, color="r")
    ax.set_yticks([8 * y + 3.5 for y in range(10)])
    ax.set_yticklabels([str(y) for y in range(10)])
    ax.set_xticks([])
    ax.set_ylabel("label y")
    ax.set_title("left: base drift; right: fine-tuned drift (same noise)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "finetune_digits.png", dpi=110)
    plt.close(fig)
    total = time.perf_counter() - t_begin
    print(f"wrote {out}/finetune_digits.md, finetune_digits_curve.md, finetune_digits.png ({total:.0f} s: "
          f"fine-tuning {ft_wall:.0f} s, evaluations {sum(r['eval s'] for r in curve) + ref_wall:.0f} s; the MFM's "
          f"training {train_seconds:.0f} s {'(cached)' if 'reusing' in info else '(this run)'})")
    return 0
