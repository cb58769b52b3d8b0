"""`python -m mfm_fast experiment posterior` — how accurate is the one-step posterior sampler, recipe by recipe.

For each training recipe of the paper's GMM MFM: the sliced-W2 between the model's posterior samples
X_{0,1}(ε; t, x) (and the K-step composed flow map, K = 2, 4) and exact samples of p(x1 | x_t = x), divided by
the exact-vs-exact noise floor, at t ∈ {0.05, 0.2, 0.5, 0.8, 0.95} (contexts x ~ p_t; 8 contexts × 2048 samples
each, as the target "within 1.5× the floor" is stated), with the training time. The recipes form an ablation
from the earlier defaults to the shipped one (`train.gmm_defaults()`). Writes posterior.{md,csv} and
posterior.png into --out; trained models are cached like the demo's.
"""
from __future__ import annotations

import dataclasses
import time


from .common import experiment_parser, gmm_mfm, out_dir, positive_int, pyplot, resolve_device, write_table

TS = (0.05, 0.2, 0.5, 0.8, 0.95)
KS = (1, 2, 4)
TARGET = 1.5


def recipes() -> dict:
    """name -> (description, Recipe): the earlier defaults, then one change at a time up to the shipped recipe."""
    from ..train import TrainConfig, gmm_defaults
    shipped = gmm_defaults("learned")
    exact = gmm_defaults("exact")
    old_model = dict(dim=2, hidden=128, depth=3, n_freq=2)
    old_cfg = TrainConfig(steps=8000, batch=512, lr=2e-3, consistency_fraction=0.5)  # MeanFlow, adaptive, t = U²
    sigma = shipped.model["sigma_data"]
    data = gmm_defaults("none")
    esd = dataclasses.replace(exact, model={**data.model, "glass_features": True},
                              train=dataclasses.replace(data.train, consistency="esd", diagonal="distill"))
    out = {
        "earlier defaults": ("plain MLP, from data (MeanFlow), adaptive weights, t = U²",
                             dataclasses.replace(data, model=old_model, train=old_cfg)),
        "+ preconditioning": ("Gaussian-MFM base, output in posterior-spread units",
                              dataclasses.replace(data, model={**old_model, "sigma_data": sigma}, train=old_cfg)),
        "+ output-unit MSE and uniform t": ("from data; plain MSE in output units, t ~ U", data),
        "+ GLASS diagonal and ESD (exact drift)": ("zero-variance targets of the exact drift, (t*, x*) inputs", esd),
        "+ teacher rollouts (exact drift)": ("diagonal + rollout bank (warped grid, wide contexts), width 256",
                                             exact),
        "learned teacher (shipped)": ("flow-matching teacher first, then as the row above", shipped),
    }
    return out


def ratios(model, gmm, ts, ks, n_contexts: int, n: int, seed: int) -> dict:
    """{(t, K): sliced-W2 / floor}."""
    from ..train import gmm_posterior_sw2
    out = {}
    for k in ks:
        for t, (sw, floor) in gmm_posterior_sw2(model, gmm, ts, n_contexts, n, seed, steps=k).items():
            out[(t, k)] = sw / floor
    return out


def plot(rows, ts, ks, path):
    plt = pyplot()
    names = list(dict.fromkeys(r["recipe"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    ax = axes[0]
    for name in names:
        r = next(r for r in rows if r["recipe"] == name and r["K"] == 1)
        ax.plot(ts, [r[f"t={t}"] for t in ts], "o-", label=f"{name} ({r['train s']:.0f} s)")
    ax.axhline(TARGET, ls="--", color="k", lw=0.8, label=f"target {TARGET}× floor")
    ax.axhline(1.0, ls=":", color="gray", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("context time t")
    ax.set_ylabel("sliced-W2 / exact-vs-exact floor")
    ax.set_title("one-step posterior samples X_{0,1}(ε; t, x)")
    ax.legend(fontsize=7)
    ax = axes[1]
    shipped = names[-1]
    for t in ts:
        ax.plot(ks, [next(r for r in rows if r["recipe"] == shipped and r["K"] == k)[f"t={t}"] for k in ks],
                "o-", label=f"t={t}")
    ax.axhline(TARGET, ls="--", color="k", lw=0.8)
    ax.axhline(1.0, ls=":", color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ks), [str(k) for k in ks])
    ax.set_xlabel("flow-map steps K (network calls per sample)")
    ax.set_title(f"{shipped}: composed flow map")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = experiment_parser("python -m mfm_fast experiment posterior", __doc__.splitlines()[0], "outputs/posterior",
                          quick_help="tiny budget (tests): every recipe trained for seconds",
                          retrain_help="train every recipe again", train_help="every recipe's MFM")
    p.add_argument("--recipes", default=None, help="comma-separated recipe names (default: all); "
                   f"known: {', '.join(recipes())}")
    p.add_argument("--contexts", type=positive_int, default=None, help="contexts per t (default 8; quick 2)")
    p.add_argument("--samples", type=positive_int, default=None, help="samples per context (default 2048; quick 256)")
    args = p.parse_args(argv)
    t_begin = time.perf_counter()
    device = resolve_device(args.device)
    out = out_dir(args.out)
    known = recipes()
    names = list(known) if args.recipes is None else [n.strip() for n in args.recipes.split(",")]
    for name in names:
        if name not in known:
            p.error(f"unknown recipe {name!r}; known: {', '.join(known)}")
    n_ctx = args.contexts or (2 if args.quick else 8)
    n = args.samples or (256 if args.quick else 2048)
    from ..data import paper_gmm
    gmm = paper_gmm()
    rows = []
    for name in names:
        desc, recipe = known[name]
        model, info, seconds = gmm_mfm(device, quick=args.quick, retrain=args.retrain, steps=args.train_steps,
                                       batch=args.train_batch, recipe=recipe, return_seconds=True)
        print(f"{name}: {info}", flush=True)
        r = ratios(model.to("cpu").float(), gmm, TS, KS, n_ctx, n, args.seed)
        for k in KS:
            row = {"recipe": name, "what changes": desc, "train s": seconds, "K": k}
            row.update({f"t={t}": r[(t, k)] for t in TS})
            row["max"] = max(r[(t, k)] for t in TS)
            rows.append(row)
    write_table(rows, out, "posterior", f"GMM posterior samples: sliced-W2 / exact-vs-exact floor ({n_ctx} contexts "
                f"x ~ p_t, {n} samples each; K = flow-map steps; target ≤ {TARGET})")
    plot(rows, TS, KS, out / "posterior.png")
    print(f"wrote {out}/posterior.md, posterior.csv, posterior.png ({time.perf_counter() - t_begin:.0f} s)")
    return 0
