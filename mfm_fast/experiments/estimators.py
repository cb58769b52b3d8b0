"""`python -m mfm_fast experiment estimators` — what MFM-G and MFM-GF estimate at a finite N, on the paper's GMM.

With N one-step samples per state, MFM-G (∇ of the log-mean-exp of the N rewards, ε held fixed) is an unbiased
estimate of ∇V_N, where

    V_N(x) = E[ log (1/N)·Σ_i exp(λ·r(X1^i)) ],   X1^1..X1^N iid ~ p(x1 | x_t = x),

the importance-weighted lower bound of V = V_∞ (V_1 = E[λ·r(X1)]). MFM-GF likewise has a finite-N expectation of
its own. Both expectations depend only on the law of the posterior samples, not on how a network couples ε to
them: they are properties of the estimator, which no posterior model — learned or exact — can change. The
jackknifed weights (`jackknife=True`) cancel the O(1/N) term of that bias; their rows show what is left.

For each estimator, t and N, on states drawn from the tilted marginal p*_t (where a steered sampler should be) and
from the base marginal p_t, this measures:
- E[∇̂V] with the learned MFM: the mean of `reps` independent estimates per state;
- the same expectation with exact posterior samples: for MFM-G the score-function identity
  ∇V_N = E[(L − b)·Σ_i ∇_x log p(X1^i | x)], L the log-mean-exp, b a leave-one-out baseline, with closed-form
  posterior samples and ∇_x log p(x1 | x) = (t·x1 − x)/(1−t)² − ∇log p_t(x); for MFM-GF the estimator itself on
  closed-form samples;
- the exact ∇V_t from the mixture's closed form.
Columns: ‖E∇̂V‖/‖∇V‖ (> 1: the estimator over-steers on average, < 1: under-steers), the relative bias
‖E∇̂V − ∇V‖/‖∇V‖, both for the learned model and for exact posterior samples, the model's share
‖E_learned − E_exact‖/‖∇V‖, and the Monte-Carlo standard error of these (relative to ‖∇V‖). Norms are over all
states of a row. Writes estimators.{md,csv} and estimators.png into --out.
"""
from __future__ import annotations

import math
import time
from typing import Optional

import torch

from .common import experiment_parser, gmm_mfm, out_dir, positive_int, pyplot, resolve_device, write_table

TS = (0.2, 0.5, 0.8)
NS = (1, 8, 64)
COLUMNS = ["estimator", "states", "t", "N", "|E g|/|∇V| learned", "|E g|/|∇V| exact post.", "bias learned",
           "bias exact post.", "learned − exact", "MC s.e."]


def iwae_value_grad(gmm, reward, lam: float, t: float, x: torch.Tensor, n: int, reps: int,
                    generator: Optional[torch.Generator] = None):
    """(mean, standard error), each (B, d): ∇_x V_N(x) for the mixture `gmm`, by the score-function identity on
    `reps` independent sets of n closed-form posterior samples per state (float64). The expectation of MFM-G with
    n particles and any exact posterior sampler; at n = 1 it equals `gmm.expected_reward_grad`."""
    if reps < 2:
        raise ValueError(f"reps must be at least 2 (leave-one-out baseline), got {reps}")
    if not 0.0 < t < 1.0:
        raise ValueError(f"t must lie in (0, 1) for the score-function identity, got {t}")
    g64 = gmm.to(dtype=torch.float64)
    x = x.to(torch.float64)
    B, d = x.shape
    tt = torch.full((B,), t, dtype=torch.float64, device=x.device)
    A, y = reward.A.to(torch.float64), reward.y.to(torch.float64)
    post = g64.posterior(tt, x)
    score_t = g64.score(tt, x)
    L_all, S_all = [], []
    block = max(1, (1 << 20) // (B * n))  # reps per block: ≈1M samples in memory at a time
    for start in range(0, reps, block):
        k = min(block, reps - start)
        x1 = post.sample(k * n, generator).view(B, k, n, d)
        r = lam * (-((y - x1 @ A.T) ** 2).sum(-1) / (2 * reward.sigma ** 2))  # (B, k, n)
        L_all.append(torch.logsumexp(r, dim=-1) - math.log(n))
        S_all.append(((t * x1 - x[:, None, None]) / (1 - t) ** 2 - score_t[:, None, None]).sum(2))  # (B, k, d)
    L, S = torch.cat(L_all, 1), torch.cat(S_all, 1)
    baseline = (L.sum(1, keepdim=True) - L) / (reps - 1)  # leave-one-out: independent of the rep it centres
    terms = (L - baseline)[..., None] * S
    return terms.mean(1), (terms.var(1) / reps).sqrt()


def expected_estimate(model, reward, lam: float, t: float, x: torch.Tensor, n: int, reps: int, estimator: str,
                      generator: Optional[torch.Generator] = None, chunk_size: Optional[int] = 262144,
                      jackknife: bool = False):
    """(mean, standard error), each (B, d), of `reps` independent ∇̂V estimates per state (n particles each;
    `jackknife`: the jackknifed weights)."""
    from ..value import value_and_grad
    B, d = x.shape
    mean = torch.zeros(B, d, dtype=torch.float64, device=x.device)
    sq = torch.zeros_like(mean)
    rows = max(1, (1 << 21) // (B * n))  # reps per call: ≈2M (state, particle) rows
    done = 0
    while done < reps:
        k = min(rows, reps - done)
        xs = x.repeat(k, 1)
        _, g = value_and_grad(model, reward, t, xs, n, estimator=estimator, lam=lam, chunk_size=chunk_size,
                              generator=generator, jackknife=jackknife)
        g = g.detach().to(torch.float64).view(k, B, d)
        mean += g.sum(0)
        sq += (g ** 2).sum(0)
        done += k
    mean /= reps
    var = (sq / reps - mean ** 2).clamp_min(0) * reps / max(reps - 1, 1)
    return mean, (var / reps).sqrt()


ESTIMATORS = {"MFM-G": ("mfm-g", False), "MFM-GF": ("mfm-gf", False), "MFM-G, jackknife": ("mfm-g", True),
              "MFM-GF, jackknife": ("mfm-gf", True)}


def bias_rows(model, prob, ts, ns, n_states: int, budget: int, generator, estimators=tuple(ESTIMATORS),
              state_laws=("tilted", "base"), chunk_size: Optional[int] = 262144) -> list:
    """Rows of the table (COLUMNS). `budget`: posterior samples per state and estimate, so reps = budget // N.
    `estimators`: keys of ESTIMATORS; the jackknifed ones skip N = 1. The jackknifed MFM-G has no exact-posterior
    column ("–"): its reference N·∇V_N − (N−1)·∇V_{N−1} would carry ~N times the score-function estimate's error."""
    from ..data import ExactPosteriorMFM
    exact_sampler = ExactPosteriorMFM(prob.gmm, seed=int(torch.randint(0, 2 ** 31, (1,), generator=generator)))
    A, y, sigma = prob.reward.A, prob.reward.y, prob.reward.sigma
    laws = {"tilted": ("p*_t", prob.tilted), "base": ("p_t", prob.gmm)}
    rows = []
    for law in state_laws:
        label, mixture = laws[law]
        for t in ts:
            x = mixture.marginal(t).sample(n_states, generator=generator).to(torch.float32)
            tt = torch.full((n_states,), t, dtype=torch.float64)
            exact = prob.gmm.to(dtype=torch.float64).value_grad(tt, x.double(), A.double(), y.double(), sigma,
                                                                 prob.lam)
            norm = exact.norm().item()
            for name in estimators:
                est, jk = ESTIMATORS[name]
                for n in ns:
                    if jk and n < 2:
                        continue
                    reps = max(2, budget // n)
                    learned, se_l = expected_estimate(model, prob.reward, prob.lam, t, x, n, reps, est, generator,
                                                      chunk_size, jackknife=jk)
                    row = {"estimator": name, "states": label, "t": t, "N": n,
                           "|E g|/|∇V| learned": learned.norm().item() / norm,
                           "bias learned": (learned - exact).norm().item() / norm}
                    if est == "mfm-g" and jk:
                        # N·∇V_N − (N−1)·∇V_{N−1} by the score-function identity multiplies its Monte-Carlo error
                        # by ~N: no usable reference at this budget, so the learned expectation stands alone
                        rows.append({**row, "|E g|/|∇V| exact post.": "–", "bias exact post.": "–",
                                     "learned − exact": "–", "MC s.e.": se_l.square().sum().sqrt().item() / norm})
                        continue
                    if est == "mfm-g":
                        ref, se_r = iwae_value_grad(prob.gmm, prob.reward, prob.lam, t, x, n, reps, generator)
                    else:
                        ref, se_r = expected_estimate(exact_sampler, prob.reward, prob.lam, t, x, n, reps, est,
                                                      generator, chunk_size, jackknife=jk)
                    rows.append({**row,
                                 "|E g|/|∇V| exact post.": ref.norm().item() / norm,
                                 "bias exact post.": (ref - exact).norm().item() / norm,
                                 "learned − exact": (learned - ref).norm().item() / norm,
                                 "MC s.e.": (se_l.square() + se_r.square()).sum().sqrt().item() / norm})
    return rows


def plot(rows, path):
    plt = pyplot()
    ests = list(dict.fromkeys(r["estimator"] for r in rows))
    laws = list(dict.fromkeys(r["states"] for r in rows))
    fig, axes = plt.subplots(len(laws), len(ests), figsize=(4.6 * len(ests), 3.8 * len(laws)), squeeze=False)
    for i, law in enumerate(laws):
        for j, est in enumerate(ests):
            ax = axes[i][j]
            sel = [r for r in rows if r["estimator"] == est and r["states"] == law]
            for k, t in enumerate(dict.fromkeys(r["t"] for r in sel)):
                pts = [(r["N"], r["bias learned"], r["bias exact post."]) for r in sel if r["t"] == t]
                ns, lv, ev = zip(*pts)
                line, = ax.plot(ns, lv, "o-", label=f"t = {t}, learned MFM")
                if "–" not in ev:
                    ax.plot(ns, ev, "s--", color=line.get_color(), alpha=0.7, label=f"t = {t}, exact posterior")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (one-step samples per state)")
            ax.set_ylabel("‖E ∇̂V − ∇V‖ / ‖∇V‖")
            ax.set_title(f"{est}, states ~ {law}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = experiment_parser("python -m mfm_fast experiment estimators", __doc__.splitlines()[0], "outputs/estimators",
                          quick_help="tiny budget (tests): seconds", retrain_help="train the GMM MFM again",
                          train_help="GMM MFM training")
    p.add_argument("--states", type=positive_int, default=None, help="states per t (default 64; quick: 8)")
    p.add_argument("--budget", type=positive_int, default=None,
                   help="posterior samples per state and estimate; reps = budget // N (default 16384; quick: 512)")
    p.add_argument("--ns", default=None, help="comma-separated N (default 1,8,64; quick: 1,8)")
    p.add_argument("--ts", default=None, help="comma-separated t in (0, 1) (default 0.2,0.5,0.8; quick: 0.5)")
    args = p.parse_args(argv)
    t_begin = time.perf_counter()
    device = resolve_device(args.device)
    out = out_dir(args.out)
    quick = args.quick
    n_states = args.states or (8 if quick else 64)
    budget = args.budget or (512 if quick else 16384)
    ns = [positive_int(v) for v in args.ns.split(",")] if args.ns else ([1, 8] if quick else list(NS))
    ts = [float(v) for v in args.ts.split(",")] if args.ts else ([0.5] if quick else list(TS))
    for t in ts:
        if not 0.0 < t < 1.0:
            p.error(f"--ts: every t must lie in (0, 1), got {t}")
    from .common import paper_problem
    model, info = gmm_mfm(device, quick=quick, retrain=args.retrain, steps=args.train_steps, batch=args.train_batch)
    print(info, flush=True)
    prob = paper_problem(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    rows = bias_rows(model, prob, ts, ns, n_states, budget, gen)
    write_table(rows, out, "estimators", f"finite-N expectation of the value-gradient estimators vs the exact ∇V "
                f"({n_states} states per t, {budget} posterior samples per state and estimate)", COLUMNS)
    plot(rows, out / "estimators.png")
    print(f"wrote {out}/estimators.md, estimators.csv, estimators.png ({time.perf_counter() - t_begin:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
