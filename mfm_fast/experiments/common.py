"""Shared plumbing for the experiments: devices, output folders, tables (markdown + CSV), timing, figures."""
from __future__ import annotations

import argparse
import csv
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch



def positive_int(text: str) -> int:
    """argparse type of counts: 0 or a negative count is an error, never a silent stand-in for a default."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def experiment_parser(prog: str, description: str, out: str, quick_help: str = "tiny budget (tests)",
                      retrain_help: str = "train the cached models again",
                      train_help: str = "GMM MFM training") -> argparse.ArgumentParser:
    """The options every experiment shares: output folder, device, budget, cache, training budget, seed."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--out", default=out, help="output folder (table + figure)")
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--retrain", action="store_true", help=retrain_help)
    p.add_argument("--train-steps", type=positive_int, default=None, help=f"{train_help} steps (default: shipped defaults)")
    p.add_argument("--train-batch", type=positive_int, default=None, help=f"{train_help} batch (default: shipped defaults)")
    p.add_argument("--seed", type=int, default=0)
    return p

def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def out_dir(path) -> Path:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def cache_dir() -> Path:
    """Where trained checkpoints are reused between runs: $MFM_FAST_CACHE or ~/.cache/mfm_fast."""
    return out_dir(os.environ.get("MFM_FAST_CACHE", Path.home() / ".cache" / "mfm_fast"))


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def timer(device="cpu"):
    """with timer(dev) as elapsed: ...; elapsed() -> seconds (device work included)."""
    sync(device)
    t0 = time.perf_counter()
    box = {}
    yield lambda: box.get("dt", time.perf_counter() - t0)
    sync(device)
    box["dt"] = time.perf_counter() - t0


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        a = abs(v)
        if a != 0 and (a >= 1e5 or a < 1e-3):
            return f"{v:.3g}"
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def markdown_table(rows: Sequence[dict], columns: Optional[Sequence[str]] = None) -> str:
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_table(rows: Sequence[dict], out: Path, name: str, title: str = "", columns=None,
                echo: bool = True) -> str:
    """Writes <name>.md and <name>.csv under out, prints the markdown, returns it."""
    columns = list(columns or rows[0].keys())
    md = (f"### {title}\n\n" if title else "") + markdown_table(rows, columns) + "\n"
    (out / f"{name}.md").write_text(md)
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    if echo:
        print(md, flush=True)
    return md


def pyplot():
    """matplotlib.pyplot on the Agg backend (headless)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def scatter_panels(panels: Sequence[tuple], path: Path, lim=None, ncols: Optional[int] = None, point_size: float = 1.0):
    """One 2-D scatter per (title, samples (n, 2)) panel, written to path (PNG)."""
    plt = pyplot()
    n = len(panels)
    ncols = ncols or min(n, 4)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (title, x) in zip(axes.flat, panels):
        x = x.detach().float().cpu()
        ax.scatter(x[:, 0], x[:, 1], s=point_size, alpha=0.5, linewidths=0)
        ax.set_title(title, fontsize=9)
        if lim is not None:
            ax.set_xlim(*lim)
            ax.set_ylim(*lim)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- GMM problem
@dataclass
class Problem:
    """The paper's 2-D GMM inverse problem (METHOD §6): data, reward, λ, and the exact tilted target."""
    gmm: object
    reward: object
    lam: float
    tilted: object


def paper_problem(device, lam: float = 1.0) -> Problem:
    from ..data import PAPER_REWARD, paper_gmm
    from ..rewards import LinearInverseReward
    gmm = paper_gmm(dtype=torch.float32, device=device)
    reward = LinearInverseReward(PAPER_REWARD["A"], PAPER_REWARD["y"], PAPER_REWARD["sigma"],
                                 name="paper_linear_inverse").to(device=device, dtype=torch.float32)
    tilted = gmm.tilt(reward.A, reward.y, reward.sigma, lam)
    return Problem(gmm, reward, lam, tilted)


QUICK_BUDGET = {"steps": 600, "batch": 256, "rollout_bank": 4096}  # smoke tests: seconds of training, a rough model


def recipe_cache_path(prefix: str, spec: dict) -> Path:
    """Where a model trained by a recipe is cached: keyed by the whole `Recipe.spec()`, so that any change to what
    the recipe trains trains afresh."""
    import hashlib
    import json
    key = hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return cache_dir() / f"{prefix}_{key}.pt"


def save_recipe_model(result, path: Path, spec: dict, seconds: float) -> None:
    """The trained MFM (and its EMA) at `path`, with the recipe that made it and its training time."""
    import json

    from ..train import save
    save(result.model, str(path), ema=result.ema, recipe=json.loads(json.dumps(spec, default=str)),
         train_seconds=seconds)


def cached_train_seconds(path: Path) -> float:
    """The training time recorded by `save_recipe_model` (NaN if none)."""
    from ..train import read_checkpoint
    return float(read_checkpoint(str(path))["extra"].get("train_seconds", float("nan")))


def recipe_steps(recipe, result, teacher) -> str:
    """"teacher S × B + MFM S × B" of a finished `train_recipe` run."""
    return (f"teacher {teacher.step} × {recipe.teacher_train.batch} + " if teacher is not None else "") + \
        f"MFM {result.step} × {recipe.train.batch}"


def gmm_mfm(device, quick: bool = False, retrain: bool = False, progress: bool = True, steps: Optional[int] = None,
            batch: Optional[int] = None, recipe=None, return_seconds: bool = False):
    """The GMM Meta Flow Map trained with `recipe` (default `train.gmm_defaults()`: a flow-matching teacher, then
    the MFM distilled from it), with QUICK_BUDGET for both stages if `quick`, or explicit MFM `steps` / `batch`;
    cached under cache_dir() by the whole recipe. Returns (model in eval mode on device, one-line description),
    and the training time in seconds (recorded in the cached checkpoint) if `return_seconds`."""
    import dataclasses

    from ..data import paper_gmm
    from ..train import gmm_defaults, load, train_recipe
    recipe = dataclasses.replace(recipe or gmm_defaults())
    budget = QUICK_BUDGET if quick else {}
    recipe.train = dataclasses.replace(recipe.train, **budget, **{k: v for k, v in (("steps", steps),
                                                                                     ("batch", batch)) if v is not None})
    if recipe.teacher_train is not None and quick:
        recipe.teacher_train = dataclasses.replace(recipe.teacher_train, **QUICK_BUDGET)
    spec = recipe.spec()
    path = recipe_cache_path("gmm_mfm", spec)
    if path.exists() and not retrain:
        model, info = load(str(path), map_location=device), f"reusing the cached GMM MFM {path}"
        return (model, info, cached_train_seconds(path)) if return_seconds else (model, info)
    gmm = paper_gmm(dtype=torch.float32)
    what = {"learned": "a flow-matching teacher, then the MFM distilled from it", "exact": "the MFM distilled from "
            "the exact drift", "none": "the MFM from data"}[recipe.teacher]
    print(f"training the GMM MFM ({what}; cached afterwards in {path})", flush=True)
    with timer(device) as elapsed:
        result, teacher = train_recipe(recipe, gmm.sample, exact_drift=gmm.to(device=device).drift,
                                       progress=progress, device=str(device))
    save_recipe_model(result, path, spec, elapsed())
    model = result.ema.to(device).eval()
    info = f"trained the GMM MFM ({recipe_steps(recipe, result, teacher)} steps, {elapsed():.0f} s) -> {path}"
    return (model, info, elapsed()) if return_seconds else (model, info)


# ---------------------------------------------------------------------------------------------- methods
@dataclass
class MethodSpec:
    label: str
    method: str  # a steer() method, "best-of-n", or "exact" (samples given)
    n: int = 1  # value-estimator particles / search candidates / Best-of-N candidates
    kwargs: dict = field(default_factory=dict)  # extra steer() options (e.g. population for SMC)
    exact: bool = False  # run on the exact posterior sampler (`exact_posterior_model`) instead of the learned MFM


def exact_posterior_model(prob: "Problem", method: str, seed: int = 0, glass_steps: int = 32):
    """The model an "exact posterior" row feeds to its estimator: the mixture's closed-form posterior samples
    (data.ExactPosteriorMFM) for MFM-GF, which needs samples only; for the pathwise MFM-G, the exact meta flow map
    by rollout (glass.GlassFlowMap of the exact drift, `glass_steps` Heun steps)."""
    from ..data import ExactPosteriorMFM
    from ..glass import GlassFlowMap
    if method == "mfm-g":
        return GlassFlowMap(prob.gmm.drift, glass_steps, event_shape=(prob.gmm.dim,))
    return ExactPosteriorMFM(prob.gmm, seed=seed + 12345)


def run_method(model, reward, noise, spec: MethodSpec, steps: int, lam: float, generator, progress=None, **cond):
    """(SteerResult, wall seconds) of one sampler from `noise`."""
    from ..steer import best_of_n, steer
    with timer(noise.device) as elapsed:
        if spec.method == "best-of-n":
            res = best_of_n(model, reward, noise, spec.n, steps=steps, generator=generator, return_result=True,
                            progress=progress, **cond)
        else:
            res = steer(model, reward, noise, steps=steps, method=spec.method, n_particles=spec.n, lam=lam,
                        generator=generator, return_result=True, progress=progress, **spec.kwargs, **cond)
    return res, elapsed()


def diverged(err: Exception) -> bool:
    """A sampler whose states ran off to NaN/inf: the reward's finite-value check names it."""
    return isinstance(err, ValueError) and "non-finite" in str(err)


def diverged_row(spec: MethodSpec, err: Exception) -> dict:
    """The table row of a sampler that diverged: recorded with its reason, not dropped and not scored."""
    nan = float("nan")
    print(f"  {spec.label} N={spec.n}: diverged ({err})", flush=True)
    return {"method": spec.label, "N": spec.n if spec.method not in ("none", "dps", "exact") else "–",
            "sliced-W2": nan, "MMD²": nan, "mean reward": nan, "far %": nan, "fwd evals/sample": "–",
            "bwd evals/sample": "–", "paper NFE": "–", "wall s": nan, "note": f"diverged: {err}"}


def run_scored(model, prob: "Problem", noise, spec: MethodSpec, steps: int, generator, target, seed: int = 0,
               glass_steps: int = 32):
    """(table row, SteerResult or None) of one sampler on the GMM problem: on `model`, or on the exact posterior
    for an "exact posterior" spec; a sampler that diverges gives its `diverged_row` and None."""
    m = exact_posterior_model(prob, spec.method, seed, glass_steps) if spec.exact else model
    try:
        res, wall = run_method(m, prob.reward, noise, spec, steps, prob.lam, generator)
    except ValueError as err:
        if not diverged(err):
            raise
        return diverged_row(spec, err), None
    return score_rows(spec, res, wall, target), res


def mmd_bandwidths(target: torch.Tensor) -> list:
    """Fixed RBF bandwidths for every comparison with one target: its median pairwise distance × the default
    factors (a per-pair median would give each method its own kernel)."""
    from ..metrics import MMD_BANDWIDTH_FACTORS
    med = float(torch.pdist(target[:1024].double()).median())
    return [med * f for f in MMD_BANDWIDTH_FACTORS]


def distances(samples, target, n_projections: int = 256) -> dict:
    """Sliced-W2 and unbiased MMD² (fixed multi-bandwidth RBF kernel, METHOD §6) to the target samples. The
    projections are the same for every call, so the rows of a table are paired comparisons."""
    from ..metrics import mmd, sliced_w2
    samples = samples.to(target.dtype)
    gen = torch.Generator(device=target.device).manual_seed(0)
    return {"sliced-W2": float(sliced_w2(samples, target, n_projections=n_projections, generator=gen)),
            "MMD²": float(mmd(samples, target, bandwidths=mmd_bandwidths(target)))}


FAR = 12.0  # radius beyond which a GMM sample counts as thrown off (the data live within ≈ 6 of the origin)


def score_rows(spec: MethodSpec, res, wall: float, target, samples=None, reward=None) -> dict:
    """One table row: distances to the target, mean reward, counted work per sample, paper NFE, wall time."""
    row = {"method": spec.label, "N": spec.n if spec.method not in ("none", "dps", "exact") else "–"}
    if res is not None:
        samples = res.samples
    row.update(distances(samples, target))
    # samples thrown far outside the data (Euler instability of a stiff steering term) dominate sliced-W2
    row["far %"] = 100 * float((samples.flatten(1).norm(dim=1) > FAR).float().mean())
    if res is not None:
        row["mean reward"] = res.mean_reward
        c = res.cost
        row["fwd evals/sample"] = c.forward_evals / max(c.batch, 1)
        row["bwd evals/sample"] = c.backward_evals / max(c.batch, 1)
        row["paper NFE"] = c.nfe if c.nfe is not None else "–"
    else:
        row["mean reward"] = float(reward(samples).float().mean())
        row.update({"fwd evals/sample": "–", "bwd evals/sample": "–", "paper NFE": "–"})
    row["wall s"] = wall
    return row
