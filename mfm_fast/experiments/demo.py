"""`python -m mfm_fast demo` — the main job: the paper's 2-D GMM inverse problem, end to end.

Trains the GMM Meta Flow Map with the shipped defaults (or reuses the cached checkpoint), steers it towards
p1·exp(λ·r) with MFM-G, MFM-GF, DPS, SMC and Best-of-N, and compares every sampler with the exact tilted target.
The "exact posterior" rows run the same estimators on exact posterior samples (the mixture's closed form for
MFM-GF, the exact meta flow map by GLASS rollout for MFM-G): what is left there is estimator error, the gap to
the learned rows is model error. The "jackknife" rows use the jackknifed particle weights (`jackknife=True`),
and the "oracle" rows integrate the same Doob ODE with the closed-form ∇V: what a perfect estimator reaches at
this K. Every row is compared with the exact tilted target (closed form): sliced-W2, MMD, mean reward, counted
network work, the paper's NFE and wall time. Writes demo.md / demo.csv and demo.png (base samples, exact target,
steered samples) into --out; `--methods` runs a subset of the rows.
"""
from __future__ import annotations

import hashlib
import time
from typing import Optional

import torch

from .common import (
    experiment_parser,
    positive_int,
    MethodSpec,
    gmm_mfm,
    out_dir,
    paper_problem,
    resolve_device,
    run_scored,
    scatter_panels,
    score_rows,
    timer,
    write_table,
)

COLUMNS = ["method", "N", "sliced-W2", "MMD²", "mean reward", "far %", "fwd evals/sample", "bwd evals/sample",
           "paper NFE", "wall s", "note"]


EXACT_G_MAX = 16  # the exact MFM-G row's GLASS rollout costs 64 drift calls per particle: skipped above this N


def demo_methods(n: int, n_smc: int) -> dict:
    """The samplers compared, by key (`--methods`), with n one-step samples per state (value estimators) or
    candidates (Best-of-N).

    SMC gets its own n_smc: its weights use the estimated value V̂ itself, not only its gradient, and with few
    samples the noise of V̂ degenerates the weights (the population collapses onto one mode)."""
    specs = {
        "base": MethodSpec("base (no steering)", "none"),
        "mfm-g": MethodSpec("MFM-G", "mfm-g", n),
        "mfm-gf": MethodSpec("MFM-GF", "mfm-gf", n),
        "mfm-g-exact": MethodSpec("MFM-G, exact posterior", "mfm-g", n, exact=True),
        "mfm-gf-exact": MethodSpec("MFM-GF, exact posterior", "mfm-gf", n, exact=True),
        "mfm-g-jk": MethodSpec("MFM-G, jackknife", "mfm-g", n, {"jackknife": True}),
        "mfm-gf-jk": MethodSpec("MFM-GF, jackknife", "mfm-gf", n, {"jackknife": True}),
        "mfm-gf-jk-exact": MethodSpec("MFM-GF, jackknife, exact posterior", "mfm-gf", n, {"jackknife": True},
                                      exact=True),
        "dps": MethodSpec("DPS", "dps"),
        "smc": MethodSpec("SMC (MFM-G twist)", "smc", n_smc),
        "best-of-n": MethodSpec("Best-of-N", "best-of-n", n),
        # a perfect value gradient in the same Euler loop (`exact_doob`): unclamped like MFM-GF's term, clamped
        # like MFM-G's and DPS's
        "exact-grad": MethodSpec("exact ∇V (oracle), unclamped", "exact", kwargs={"clamp_ratio": None}),
        "exact-grad-clamped": MethodSpec("exact ∇V (oracle), (1−t)/t ≤ 25", "exact", kwargs={"clamp_ratio": 25.0}),
    }
    if n > EXACT_G_MAX:
        del specs["mfm-g-exact"]
    if n < 2:  # the jackknife leaves one particle out
        for key in ("mfm-g-jk", "mfm-gf-jk", "mfm-gf-jk-exact"):
            del specs[key]
    return specs


def exact_doob(prob, noise: torch.Tensor, steps: int, t_start: float = 0.01, clamp_ratio: Optional[float] = None):
    """The steering ODE of the Doob rows (same Euler grid; (1−t)/t clamped at `clamp_ratio` as `steer` does for
    MFM-G and DPS, None: unclamped, as for MFM-GF's term) with the mixture's closed-form drift and ∇V_t: what a
    perfect value-gradient estimator would reach at this K."""
    from ..interpolant import time_grid
    from ..steps import steer_ratio
    gmm = prob.gmm.to(dtype=torch.float64, device=noise.device)
    A, y, sigma = prob.reward.A, prob.reward.y, prob.reward.sigma
    grid = time_grid(t_start, steps, noise).double()
    x = noise.double()
    for k in range(steps):
        t = grid[k].expand(x.shape[0])
        x = x + (grid[k + 1] - grid[k]) * (gmm.drift(t, x) + steer_ratio(t[:, None], clamp_ratio)
                                          * gmm.value_grad(t, x, A, y, sigma, prob.lam))
    return x.to(noise.dtype)


def method_seed(seed: int, key: str) -> int:
    """Each sampler's own random stream, so that a row does not depend on which other rows ran (`--methods`)."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16)


def main(argv=None) -> int:
    p = experiment_parser("python -m mfm_fast demo", __doc__.splitlines()[0], "outputs/demo",
                          quick_help="tiny budget (tests): seconds instead of minutes",
                          retrain_help="train the GMM MFM again even if a cached one exists",
                          train_help="GMM MFM training")
    p.add_argument("--samples", type=positive_int, default=None, help="samples per method (default 1024; quick: 128)")
    p.add_argument("--steps", type=positive_int, default=None, help="Euler steps K (default 100; quick: 50)")
    p.add_argument("--particles", type=positive_int, default=None, help="N: particles / candidates (default 8; quick: 4)")
    p.add_argument("--smc-particles", type=positive_int, default=None,
                   help="one-step samples per state for SMC's value estimate (default 64; quick: 8)")
    known = demo_methods(2, 2)  # every key
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of the rows (default: all): " + ",".join(known))
    args = p.parse_args(argv)

    t_begin = time.perf_counter()
    device = resolve_device(args.device)
    out = out_dir(args.out)
    quick = args.quick
    n_samples = args.samples if args.samples is not None else (128 if quick else 1024)
    steps = args.steps if args.steps is not None else (50 if quick else 100)
    n = args.particles if args.particles is not None else (4 if quick else 8)
    n_smc = args.smc_particles if args.smc_particles is not None else (8 if quick else 64)
    specs = demo_methods(n, n_smc)
    if args.methods is not None:
        keys = [k.strip() for k in args.methods.split(",") if k.strip()]
        unknown = [k for k in keys if k not in known]
        if unknown or not keys:
            p.error(f"--methods: unknown {unknown or args.methods!r}; choose from {','.join(known)}")
        absent = [k for k in keys if k not in specs]
        if absent:
            p.error(f"--methods: {','.join(absent)} do not run at N = {n} (mfm-g-exact: N <= {EXACT_G_MAX}, its "
                    f"GLASS rollout is costly; the jackknife rows: N >= 2)")
        specs = {k: specs[k] for k in keys}
    print(f"mfm_fast demo on {device}: {n_samples} samples per method, K = {steps} Euler steps, N = {n} "
          f"(SMC: {n_smc})", flush=True)

    model, info = gmm_mfm(device, quick=quick, retrain=args.retrain, steps=args.train_steps,
                          batch=args.train_batch)
    print(info, flush=True)
    prob = paper_problem(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    target = prob.tilted.sample(n_samples, generator=gen)
    noise = torch.randn(n_samples, 2, generator=gen, device=device)

    rows, panels = [], [("exact tilted target", target)]
    for key, spec in specs.items():
        if spec.method == "exact":  # the oracle rows
            with timer(device) as elapsed:
                samples = exact_doob(prob, noise, steps, **spec.kwargs)
            rows.append(score_rows(spec, None, elapsed(), target, samples=samples, reward=prob.reward))
            panels.append((spec.label, samples))
            continue
        own = torch.Generator(device=device).manual_seed(method_seed(args.seed, key))
        row, res = run_scored(model, prob, noise, spec, steps, own, target, args.seed, 8 if quick else 32)
        rows.append(row)
        if res is None:
            continue
        panels.append((spec.label if spec.n == 1 else f"{spec.label} (N={spec.n})", res.samples))
        if spec.method == "none":
            panels.insert(0, panels.pop())  # base samples first
    reference = prob.tilted.sample(n_samples, generator=gen)
    rows.append(score_rows(MethodSpec("exact target (2nd draw: noise floor)", "exact"), None, float("nan"),
                           target, samples=reference, reward=prob.reward))
    write_table(rows, out, "demo", f"2-D GMM, linear inverse reward (λ = {prob.lam}): distance to the exact tilted "
                f"target ({n_samples} samples, K = {steps})", COLUMNS)
    scatter_panels(panels, out / "demo.png", lim=(-6, 6))
    print(f"wrote {out / 'demo.md'}, {out / 'demo.csv'}, {out / 'demo.png'} "
          f"({time.perf_counter() - t_begin:.0f} s in total)")
    return 0
