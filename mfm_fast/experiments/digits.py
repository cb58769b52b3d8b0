"""`python -m mfm_fast experiment digits` — classifier-reward steering on scikit-learn's 8×8 digits (METHOD §6).

An unconditional "MFM-Digits" DiT (trained with mfm_fast.train, cached) and a small CNN classifier (cached) define
the reward r(x) = log Σ_c w_c·p(c|x), w ∝ [0,1,0,1,0,2,0,2,0,4]. Under the tilted target p1·exp(λ·r) with λ = 1 the
class histogram of the samples should equal w (the data's classes are balanced), so each sampler is scored by
the L2 distance between its class histogram (classifier argmax) and w, next to its mean reward and cost.

Reward vs compute: Best-of-N for N = 1 … 1000 against single-particle MFM-G and MFM-GF with N = 4 (λ = 1, 4, 16),
costs in the paper's NFE accounting (METHOD §3) — the paper claims single-particle MFM-G beats Best-of-1000 at ≥ 100× less
compute. Best-of-N is simulated by drawing N candidates with replacement from a pool of base samples (its cost is
counted as K·N + N per output, as if each candidate had been generated).
Writes digits.{md,csv}, digits_cost.{md,csv} and digits.png into --out.
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

from .common import (cache_dir, experiment_parser, MethodSpec, out_dir, positive_int, pyplot,
                     resolve_device, run_method, timer, write_table)

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


def digits_mfm(device, steps: int, batch: Optional[int] = None, retrain: bool = False, progress: bool = True):
    """Unconditional MFM-Digits DiT trained with `train.digits_defaults()` (optionally fewer steps / a smaller
    batch), cached."""
    from ..data import load_digits
    from ..models import MFMDiT
    from ..train import dataset_sampler, digits_defaults, load, save, train
    name, cfg = digits_defaults()
    cfg = dataclasses.replace(cfg, steps=steps, batch=batch or cfg.batch, warmup=min(cfg.warmup, steps // 10),
                              device=str(device))
    spec = {"config": name, "train": {k: v for k, v in dataclasses.asdict(cfg).items()
                                      if k not in ("device", "log_every", "checkpoint_every")}}
    key = hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = cache_dir() / f"digits_mfm_{key}.pt"
    if path.exists() and not retrain:
        return load(str(path), map_location=device), f"reusing the cached digits MFM {path}"
    images, _ = load_digits()
    torch.manual_seed(cfg.seed)
    with timer(device) as elapsed:
        result = train(MFMDiT(name), dataset_sampler(images), cfg, progress=progress)
    save(result.model, str(path), ema=result.ema, train_config=spec["train"])
    return result.ema.to(device).eval(), f"trained the digits MFM ({steps} steps, {elapsed():.0f} s) -> {path}"


def class_histogram(classifier, x) -> torch.Tensor:
    with torch.no_grad():
        pred = classifier(x).argmax(-1)
    return torch.bincount(pred, minlength=10).float() / x.shape[0]


def best_of_n_from_pool(pool_x, pool_r, n: int, batch: int, generator):
    """Best-of-n outputs simulated from a pool: `batch` groups of n candidates drawn with replacement."""
    idx = torch.randint(0, pool_x.shape[0], (batch, n), generator=generator, device=pool_x.device)
    best = idx.gather(1, pool_r[idx].argmax(1, keepdim=True))[:, 0]
    return pool_x[best], pool_r[best]


def main(argv=None) -> int:
    from ..data import load_digits
    from ..rewards import ClassifierReward
    from ..steer import paper_nfe, steer

    p = experiment_parser("python -m mfm_fast experiment digits", __doc__.splitlines()[0], "outputs/digits",
                          quick_help="tiny budget (tests): meaningless numbers, all code paths",
                          retrain_help="retrain the MFM and the classifier",
                          train_help="MFM training (CPU default 2000 steps)")
    p.add_argument("--samples", type=positive_int, default=None, help="outputs per method (default 256; quick 16)")
    p.add_argument("--pool", type=positive_int, default=None, help="base samples for Best-of-N (default 2048; quick 64)")
    p.add_argument("--steps", type=positive_int, default=None, help="Euler steps K (default 25; quick 4)")
    p.add_argument("--lams", default="1,4,16", help="λ values for single-particle MFM-G / MFM-GF")
    p.add_argument("--bon", default="1,2,4,8,16,32,64,128,256,512,1000", help="Best-of-N values")
    args = p.parse_args(argv)

    t_begin = time.perf_counter()
    device = resolve_device(args.device)
    out = out_dir(args.out)
    quick = args.quick
    from ..train import digits_defaults
    on_gpu = device.type == "cuda"
    train_steps = args.train_steps or (10 if quick else (digits_defaults()[1].steps if on_gpu else 2000))
    train_batch = args.train_batch or (64 if quick else None)
    B = args.samples or (16 if quick else 256)
    M = args.pool or (64 if quick else 2048)
    K = args.steps or (4 if quick else 25)
    lams = [float(v) for v in args.lams.split(",")]
    bon = [int(v) for v in args.bon.split(",")]

    images, labels = load_digits()
    clf, acc = train_classifier(images, labels, device, steps=60 if quick else 600, retrain=args.retrain)
    print(f"classifier: held-out accuracy {acc:.3f}", flush=True)
    model, info = digits_mfm(device, train_steps, train_batch, retrain=args.retrain)
    print(info, flush=True)
    reward = ClassifierReward(clf, WEIGHTS, name="digits_classifier")
    w = torch.tensor(WEIGHTS, dtype=torch.float32, device=device)
    w = w / w.sum()
    gen = torch.Generator(device=device).manual_seed(args.seed)
    floor = math.sqrt(float((w * (1 - w)).sum()) / B)

    def row(label, n, lam, x, r, cost=None, wall=float("nan"), nfe=None):
        h = class_histogram(clf, x)
        return {"method": label, "N": n, "λ": lam, "L2(hist, w)": float((h - w).norm()),
                "mean reward": float(r.float().mean()), "paper NFE": nfe if nfe is not None else "–",
                "fwd evals/sample": cost.forward_evals / cost.batch if cost else "–",
                "bwd evals/sample": cost.backward_evals / cost.batch if cost else "–", "wall s": wall,
                "_hist": h.cpu()}

    rows = []
    noise = torch.randn(B, 1, 8, 8, generator=gen, device=device)
    specs = [(MethodSpec("base (no steering)", "none"), 1.0), (MethodSpec("DPS", "dps"), 1.0)]
    # single-particle MFM-G (the paper's claim); MFM-GF needs N ≥ 2 (with one particle its estimate is exactly 0)
    specs += [(MethodSpec(label, meth, n), lam) for lam in lams for label, meth, n in
              (("MFM-G", "mfm-g", 1), ("MFM-GF", "mfm-gf", 4))]
    specs += [(MethodSpec("MFM-G", "mfm-g", 4), 1.0)]
    for spec, lam in specs:
        res, wall = run_method(model, reward, noise, spec, K, lam, gen)
        rows.append(row(spec.label, spec.n if spec.method != "none" else "–", lam, res.samples, res.rewards,
                        res.cost, wall, res.cost.nfe))
        print(f"  {spec.label} N={spec.n} λ={lam}: L2 {rows[-1]['L2(hist, w)']:.3f}, mean reward "
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
            claim.append({"method": f"{r['method']} N={r['N']}", "λ": r["λ"], "mean reward": r["mean reward"],
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
                       label=f"{label} N={r['N']} λ={r['λ']:g}")
    ax.set_xscale("log")
    ax.set_xlabel("paper NFE per sample")
    ax.set_ylabel("mean reward log Σ w_c p(c|x)")
    ax.set_title("reward vs compute")
    ax.legend(fontsize=6)
    ax = axes[1]
    show = [r for r in rows if r["method"] in ("base (no steering)", "DPS")]
    show += [r for r in rows if r["method"] in ("MFM-G", "MFM-GF") and r["λ"] == 1.0 and r["N"] in (1, 4)
             and not (r["method"] == "MFM-G" and r["N"] == 4)]
    show += [bon_rows[-1]]
    width = 0.8 / (len(show) + 1)
    xs = torch.arange(10).float()
    ax.bar(xs, w.cpu(), width, color="k", label="target w")
    for i, r in enumerate(show):
        ax.bar(xs + (i + 1) * width, r["_hist"], width, label=f"{r['method']} N={r['N']}")
    ax.set_xticks(range(10))
    ax.set_xlabel("class")
    ax.set_title("class histograms")
    ax.legend(fontsize=7)
    ax = axes[2]
    rows_shown = min(32, B) // 8  # image rows of 8 per sampler
    res_g, _ = run_method(model, reward, noise[:8 * rows_shown], MethodSpec("MFM-G", "mfm-g", 1), K, 1.0, gen)
    grid = torch.cat([pool.samples[:8 * rows_shown], res_g.samples], 0).clamp(-1, 1).cpu()
    grid = grid.view(2 * rows_shown, 8, 8, 8).permute(0, 2, 1, 3).reshape(16 * rows_shown, 64)
    ax.imshow(grid, cmap="gray_r")
    ax.axhline(8 * rows_shown - 0.5, color="r")
    ax.set_title("top: base samples; bottom: MFM-G N=1, λ=1")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "digits.png", dpi=110)
    plt.close(fig)
    print(f"wrote {out}/digits.md, digits_cost.md, digits.png ({time.perf_counter() - t_begin:.0f} s)")
    return 0
