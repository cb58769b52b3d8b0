"""`python -m mfm_fast experiment gmm` — the paper's 2-D GMM setup (METHOD §6).

1. Steering quality vs N (the paper's sweep): sliced-W2 and MMD to the exact tilted target for MFM-G and MFM-GF
   (ODE and SDE), SMC, MFM-Search and Best-of-N at N ∈ {1, 2, …, 128, 256}, with DPS (ODE and SDE; no N), SMC with a
   large population as reference, the unsteered base and a second exact draw (the metric's noise floor). The
   "exact posterior" rows feed the same estimators exact posterior samples (closed form for MFM-GF, the exact
   meta flow map by GLASS rollout for MFM-G, at N ≤ --exact-g-max): estimator error alone, so the gap to the
   learned rows is the model's.
2. ∇V accuracy vs N: Pearson correlation (over states and coordinates) and relative error of the MFM-G / MFM-GF
   value gradients with the exact ∇V_t from the oracle, at several t, on states x_t ~ p_t; DPS for comparison.
Writes gmm_steering.{md,csv}, gmm_gradV.{md,csv} and gmm.png into --out.
"""
from __future__ import annotations

import time

import torch

from .common import (
    experiment_parser,
    positive_int,
    MethodSpec,
    gmm_mfm,
    out_dir,
    paper_problem,
    pyplot,
    resolve_device,
    run_scored,
    score_rows,
    write_table,
)

COLUMNS = ["method", "N", "sliced-W2", "MMD²", "mean reward", "far %", "fwd evals/sample", "bwd evals/sample",
           "paper NFE", "wall s", "note"]


def steering_methods(ns, smc_reference: int, exact_g_max: int = 16) -> list:
    specs = [MethodSpec("base (no steering)", "none"), MethodSpec("DPS", "dps"),
             MethodSpec("DPS (SDE)", "dps", kwargs={"sde": True})]
    for n in ns:
        specs += [MethodSpec("MFM-G", "mfm-g", n), MethodSpec("MFM-G (SDE)", "mfm-g", n, {"sde": True}),
                  MethodSpec("MFM-GF", "mfm-gf", n), MethodSpec("MFM-GF (SDE)", "mfm-gf", n, {"sde": True}),
                  MethodSpec("MFM-GF, exact posterior", "mfm-gf", n, exact=True),
                  MethodSpec("SMC (MFM-G twist)", "smc", n), MethodSpec("MFM-Search", "search", n),
                  MethodSpec("Best-of-N", "best-of-n", n)]
        if n <= exact_g_max:
            specs.append(MethodSpec("MFM-G, exact posterior", "mfm-g", n, exact=True))
    specs.append(MethodSpec(f"SMC reference ({smc_reference} particles)", "smc", 1,
                            {"population": smc_reference}))
    return specs


SWEEP = ("MFM-G", "MFM-G (SDE)", "MFM-GF", "MFM-GF (SDE)", "MFM-GF, exact posterior", "MFM-G, exact posterior",
         "SMC (MFM-G twist)", "MFM-Search", "Best-of-N")


def grad_accuracy(model, prob, ts, ns, n_states: int, generator, chunk_size=None) -> list:
    """Rows: estimator, N, t, correlation and relative L2 error of ∇̂V against the exact ∇V_t(x_t)."""
    from ..steer import dps_grad
    from ..value import value_and_grad
    rows = []
    for t in ts:
        x1 = prob.gmm.sample(n_states, generator=generator)
        eps = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        x = t * x1 + (1 - t) * eps
        tt = torch.full((n_states,), t, device=x.device, dtype=x.dtype)
        exact = prob.gmm.value_grad(tt, x, prob.reward.A, prob.reward.y, prob.reward.sigma, prob.lam)

        def score(g, exact=exact):
            a, b = g.flatten().double(), exact.flatten().double()
            corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
            return corr, ((a - b).norm() / b.norm()).item()

        _, g = dps_grad(model, prob.reward, tt, x, prob.lam, {})
        corr, rel = score(g)
        rows.append({"estimator": "DPS", "N": "–", "t": t, "corr": corr, "rel. error": rel})
        for est in ("mfm-g", "mfm-gf"):
            for n in ns:
                _, g = value_and_grad(model, prob.reward, tt, x, n, estimator=est, lam=prob.lam,
                                      chunk_size=chunk_size, generator=generator)
                corr, rel = score(g)
                rows.append({"estimator": est.upper(), "N": n, "t": t, "corr": corr, "rel. error": rel})
    return rows


def plot(rows, grad_rows, ns, ts, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    base = next(r for r in rows if r["method"] == "base (no steering)")
    floor = next(r for r in rows if r["method"].startswith("exact"))
    for metric, ax in zip(("sliced-W2", "MMD²"), axes[:2]):
        for label in SWEEP:
            pts = [(r["N"], r[metric]) for r in rows if r["method"] == label]
            if pts:
                ax.plot(*zip(*pts), "s--" if "exact" in label else "o-", label=label,
                        lw=0.8 if "SDE" in label else 1.5)
        for r, style in ((base, ":"), (next(r for r in rows if r["method"] == "DPS"), "--"),
                         (next(r for r in rows if r["method"] == "DPS (SDE)"), (0, (1, 3))), (floor, "-.")):
            if r[metric] == r[metric]:  # a diverged baseline has no line
                ax.axhline(r[metric], ls=style, color="gray", label=r["method"])
        ref = next(r for r in rows if r["method"].startswith("SMC reference"))
        ax.axhline(ref[metric], ls="-", color="k", lw=0.8, label=ref["method"])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (particles / candidates)")
        ax.set_title(f"{metric} to the exact tilted target")
    axes[0].legend(fontsize=7)
    ax = axes[2]
    for est, marker in (("MFM-G", "o-"), ("MFM-GF", "s--")):
        for t in ts:
            ax.plot(ns, [next(r for r in grad_rows if r["estimator"] == est and r["N"] == n and r["t"] == t)["corr"]
                         for n in ns], marker, label=f"{est} t={t}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N")
    ax.set_ylabel("corr(∇̂V, ∇V exact)")
    ax.set_title("value-gradient accuracy")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = experiment_parser("python -m mfm_fast experiment gmm", __doc__.splitlines()[0], "outputs/gmm",
                          quick_help="tiny budget (tests)",
                          retrain_help="train the GMM MFM again",
                          train_help="GMM MFM training")
    p.add_argument("--samples", type=positive_int, default=None, help="samples per method (default 1024; quick 128)")
    p.add_argument("--steps", type=positive_int, default=None, help="Euler steps K (default 100; quick 50)")
    p.add_argument("--ns", default=None,
                   help="comma-separated N values (default 1,2,4,8,16,32,64,128,256; quick 1,4)")
    p.add_argument("--exact-g-max", type=int, default=16,
                   help="largest N with an 'MFM-G, exact posterior' row (its GLASS rollout costs 64 drift calls)")
    p.add_argument("--smc-reference", type=int, default=4096, help="population of the reference SMC run")
    p.add_argument("--ts", default="0.1,0.3,0.5,0.7,0.9", help="times for the ∇V accuracy study")
    p.add_argument("--grad-states", type=positive_int, default=None, help="states per t for ∇V accuracy (default 512)")
    p.add_argument("--chunk-size", type=positive_int, default=None, help="rows per network call (memory bound)")
    args = p.parse_args(argv)

    t_begin = time.perf_counter()
    device = resolve_device(args.device)
    out = out_dir(args.out)
    quick = args.quick
    n_samples = args.samples or (128 if quick else 1024)
    steps = args.steps or (50 if quick else 100)
    ns = [int(v) for v in (args.ns or ("1,4" if quick else "1,2,4,8,16,32,64,128,256")).split(",")]
    ts = [float(v) for v in args.ts.split(",")]
    smc_ref = 256 if quick and args.smc_reference == 4096 else args.smc_reference
    n_states = args.grad_states or (64 if quick else 512)

    model, info = gmm_mfm(device, quick=quick, retrain=args.retrain, steps=args.train_steps,
                          batch=args.train_batch)
    print(info, flush=True)
    prob = paper_problem(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    target = prob.tilted.sample(n_samples, generator=gen)

    rows = []
    specs = steering_methods(ns, smc_ref, min(args.exact_g_max, 4) if quick else args.exact_g_max)
    for spec in specs:
        B = spec.kwargs.get("population", n_samples)
        noise = torch.randn(B, 2, generator=gen, device=device)
        kw = {"chunk_size": args.chunk_size} if spec.method in ("mfm-g", "mfm-gf", "smc") else {}
        spec.kwargs.update(kw)
        row, res = run_scored(model, prob, noise, spec, steps, gen, target, args.seed, 8 if quick else 32)
        rows.append(row)
        if res is not None:
            print(f"  {spec.label} N={spec.n}: sliced-W2 {row['sliced-W2']:.4f}, {row['wall s']:.1f} s", flush=True)
    rows.append(score_rows(MethodSpec("exact target (2nd draw: noise floor)", "exact"), None, float("nan"), target,
                           samples=prob.tilted.sample(n_samples, generator=gen), reward=prob.reward))
    write_table(rows, out, "gmm_steering", f"2-D GMM: distance to the exact tilted target ({n_samples} samples, "
                f"K = {steps}, λ = {prob.lam})", COLUMNS)

    grad_rows = grad_accuracy(model, prob, ts, ns, n_states, gen, args.chunk_size)
    write_table(grad_rows, out, "gmm_gradV", f"∇V accuracy vs the exact oracle ({n_states} states x_t ~ p_t per t)")
    plot(rows, grad_rows, ns, ts, out / "gmm.png")
    print(f"wrote {out}/gmm_steering.md, gmm_gradV.md, gmm.png ({time.perf_counter() - t_begin:.0f} s)")
    return 0
