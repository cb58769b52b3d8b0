"""Sharded, resumable sampling on one or many processes (torchrun): every rank computes whole shards of the global
sample indices and writes each one atomically; rank 0 merges them into the ADM evaluator's `samples.npz`, a PNG
grid and `rewards.json`. One process is the world_size = 1 case of the same code.

What is invariant. Sample i draws all of its randomness (initial noise, particle noise, SDE noise, a random class)
from one torch.Generator seeded from numpy's SeedSequence([seed, i]) (`sample_generator`). The work is cut into
shards of `shard_size` consecutive indices, and one shard is one batch through the network: a GEMM's bits can
depend on its batch size (on CPU they do), so the shard size — never the world size — fixes every batch. Hence
`samples.npz` is bitwise identical for any world size, any assignment of shards to ranks, and across kills and
resumes, for the same settings (`shard_size` and the value estimator's `chunk_size` included, both recorded in
run.json), device type, library versions and thread count (torchrun sets OMP_NUM_THREADS=1 per worker when
it is unset; give a single process the same).

Layout of the output directory:
    run.json                  the settings the shards belong to, and a content fingerprint of every input file
                              (`fingerprint.fingerprint`); a rerun with other settings or other files behind the
                              same paths is refused once a shard exists (before that, run.json is rewritten, so
                              an argument rejected by the first shard does not bind the corrected rerun)
    shards/shard-000007.npz   shard 7: images uint8 (B, H, W, 3), rewards float32 (R, B), meta (JSON)
    samples.npz               arr_0: uint8 (n, H, W, 3), the format of the ADM evaluator (guided-diffusion
                              evaluations/evaluator.py) and of DiT/SiT's sample_ddp.py
    grid.png                  the first `grid` images
    rewards.json              per-sample rewards by scorer, the summed cost, the settings

Rank 0 lists the shards not yet on disk and each rank takes a contiguous block of them, so a rerun skips finished
shards (a killed job loses at most the shard each rank was computing) and stays balanced on any world size. Ranks
step through their shards in lockstep rounds joined by one all-reduce (which also drives rank 0's progress bar), so
no collective waits longer than one shard's compute: the process group's timeout then turns a rank that hangs into
an error, and torchrun stops the job when a rank fails.

Best-of-N at scale: with `best_of` = N the run makes n·N candidates, candidate j of output sample g being global
index g·N + j, and rank 0 keeps, per group, the candidate with the highest `select_by` reward after the gather.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import distributed as D
from ._checks import check_label, model_dtype
from .sampling import randn_rows, refine_sample
from .steer import steer

# test and drill hook: "RANK:ACTION:K" makes rank RANK raise ("raise") or stop responding ("hang") once it has
# written K shards in this invocation
FAULT_ENV = "MFM_FAST_FAULT"
SHARD_DIR = "shards"


@dataclass
class ShardOutput:
    """What `make_shard` returns for the global indices [start, stop)."""

    images: torch.Tensor  # (B, 3, H, W) float in [0, 1]
    rewards: dict = field(default_factory=dict)  # name -> (B,) scores of these images
    cost: dict = field(default_factory=dict)  # name -> work count, summed over shards (e.g. network rows)
    labels: Optional[torch.Tensor] = None  # (B,) class of each sample: its scorers' prompt, and rewards.json


@dataclass
class RunSummary:
    out: Path
    n: int  # output samples
    candidates: int  # samples computed (n·best_of)
    shards: int
    shards_computed: int  # by this invocation, all ranks
    seconds: float  # wall time of this invocation
    rewards: dict  # name -> (n,) float32, of the output samples
    cost: dict  # summed over every shard, whichever invocation computed it


def sample_seed(seed: int, index: int) -> int:
    """The 64-bit seed of global sample `index`: a SeedSequence hash of (seed, index), independent streams."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0])


def sample_generator(seed: int, index: int, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(sample_seed(seed, index))


def shard_bounds(total: int, shard_size: int) -> list:
    """[(start, stop)] of consecutive shards of `shard_size` indices (the last one may be shorter)."""
    return [(a, min(a + shard_size, total)) for a in range(0, total, shard_size)]


def rank_shards(num_shards: int, rank: int, world: int) -> range:
    """The contiguous block of shard numbers rank takes (sizes differ by at most one)."""
    per, extra = divmod(num_shards, world)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (rank < extra))


# ---------------------------------------------------------------------------------------------- shard builders
def _noise_and_labels(model, label, gens, like):
    """Per sample: its class (drawn first when label == "random") and its initial noise, from its own generator."""
    if isinstance(label, str) and label == "random":
        nc = model.config.num_classes
        y = torch.cat([torch.randint(nc, (1,), generator=g, device=like.device) for g in gens])
    else:
        y = torch.full((len(gens),), check_label("label", label), dtype=torch.long, device=like.device)
    return randn_rows((len(gens), *model.event_shape), like, gens), y


def _like(model, device) -> torch.Tensor:
    return torch.empty((), device=device, dtype=model_dtype(model) or torch.float32)


def refine_shard(model, decode: Callable, steps: int, label, cfg=None, context=contextlib.nullcontext) -> Callable:
    """make_shard for `run_sharded`: K-step refinement samples of class `label` (an int, or "random": one class per
    sample from its generator) with guidance weight `cfg`, decoded to images in [0, 1] by `decode(latents)`.
    `context()` wraps the network calls (e.g. autocast)."""
    if not (isinstance(label, str) and label == "random"):
        check_label("label", label)  # now, not at the first shard: 2.7 would be truncated to class 2

    def make_shard(gens, start, stop):
        noise, y = _noise_and_labels(model, label, gens, _like(model, gens[0].device))
        cond = {"y": y} if cfg is None else {"y": y, "cfg": cfg}
        with context():
            res = refine_sample(model, noise, steps=steps, generator=gens, return_result=True, **cond)
        with torch.no_grad():
            images = decode(res.samples)
        return ShardOutput(images, {}, {"forward_calls": steps, "forward_evals": steps * len(gens)}, y)
    return make_shard


def steer_shard(model, decode: Callable, reward, reward_name: str, label: int, cfg=None,
                context=contextlib.nullcontext, **steer_kw) -> Callable:
    """make_shard for `run_sharded`: `steer(model, reward, noise, generator=<per-sample generators>, **steer_kw)`
    of class `label`, decoded by `decode(latents)`; records each sample's steering reward under `reward_name` and
    the counted cost. Methods whose rows interact (SMC, global search) are refused: a sample would then depend on
    the other samples of its shard."""
    if steer_kw.get("method") == "smc" or steer_kw.get("search_mode") == "global":
        raise ValueError(f"method={steer_kw.get('method')!r} (search_mode={steer_kw.get('search_mode')!r}) couples "
                         "the samples of a population and cannot be sharded; call mfm_fast.steer with population= "
                         "instead")
    if not (isinstance(label, str) and label == "random"):
        check_label("label", label)

    def make_shard(gens, start, stop):
        noise, y = _noise_and_labels(model, label, gens, _like(model, gens[0].device))
        cond = {"y": y} if cfg is None else {"y": y, "cfg": cfg}
        with context():
            res = steer(model, reward, noise, generator=gens, return_result=True, progress=False, **steer_kw,
                        **cond)
        with torch.no_grad():
            images = decode(res.samples)
        c = res.cost
        cost = {"forward_calls": c.forward_calls, "forward_evals": c.forward_evals,
                "backward_evals": c.backward_evals, "reward_evals": c.reward_evals}
        return ShardOutput(images, {reward_name: res.rewards}, cost, y)
    return make_shard


def scored_shard(make_shard: Callable, scorers: Mapping, prompts: Callable) -> Callable:
    """make_shard whose output also holds every scorer's score of its decoded images, with no gradient:
    `scorers` maps a name to an adapter `scorer(images, prompts) -> (B,)` (`reward_models.build_scorers`), and
    `prompts(labels)` gives one prompt per image from the shard's `labels`. Under torchrun each rank scores the
    shards it computes, with the scorers it built once."""
    from .reward_models import score_images
    scorers = dict(scorers)

    def make_scored(gens, start, stop):
        out = make_shard(gens, start, stop)
        clash = sorted(set(out.rewards) & set(scorers))
        if clash:
            raise ValueError(f"scorer name(s) {clash} are already rewards of the shard (the steering reward)")
        if not scorers:
            return out
        if out.labels is None:
            raise ValueError("scored_shard: make_shard must return ShardOutput.labels (the prompts depend on them)")
        scores = score_images(out.images, scorers, prompts=prompts(out.labels))
        out.rewards.update({k: torch.tensor(v, dtype=torch.float32) for k, v in scores.items()})
        return out
    return make_scored


# ---------------------------------------------------------------------------------------------- the runner
def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _fault(rank: int):
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    try:
        r, action, k = spec.split(":")
        r, k = int(r), int(k)
    except ValueError:
        raise ValueError(f"{FAULT_ENV} must look like RANK:raise|hang:SHARDS, got {spec!r}") from None
    if action not in ("raise", "hang"):
        raise ValueError(f"{FAULT_ENV}: action must be 'raise' or 'hang', got {action!r}")
    return (action, k) if r == rank else None


def _maybe_fail(fault, written: int, rank: int) -> None:
    if fault is None or written != fault[1]:
        return
    if fault[0] == "raise":
        raise RuntimeError(f"{FAULT_ENV}: rank {rank} fails after writing {written} shard(s)")
    time.sleep(10 ** 6)  # "hang": the peers' next collective must time out


def _atomic_write(path: Path, write: Callable) -> None:
    """write(file object) into a temporary file beside path, then rename: readers see all of it or nothing."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8, rounded (as `latents.save_image_grid`)."""
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"make_shard must return images of shape (B, 3, H, W) in [0, 1], got "
                         f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _scores(name: str, scores, rows: int) -> np.ndarray:
    if not torch.is_tensor(scores) or scores.shape != (rows,):
        shape = tuple(scores.shape) if torch.is_tensor(scores) else type(scores).__name__
        raise ValueError(f"reward {name!r} must give shape ({rows},) for a shard of {rows} images, got {shape}")
    return scores.detach().float().cpu().numpy()


def _write_shard(path: Path, out: ShardOutput, scorers: Mapping, start: int, stop: int, seconds: float,
                 rank: int, world: int) -> None:
    rows = stop - start
    images = _to_uint8(out.images)
    if images.shape[0] != rows:
        raise ValueError(f"make_shard returned {images.shape[0]} images for the {rows} indices [{start}, {stop})")
    rewards = {k: _scores(k, v, rows) for k, v in out.rewards.items()}
    with torch.no_grad():
        for name, fn in scorers.items():
            rewards[name] = _scores(name, fn(out.images), rows)
    names = sorted(rewards)
    labels = None
    if out.labels is not None:
        labels = [int(v) for v in torch.as_tensor(out.labels).reshape(-1).tolist()]
        if len(labels) != rows:
            raise ValueError(f"make_shard returned {len(labels)} labels for the {rows} indices [{start}, {stop})")
    meta = json.dumps({"start": start, "stop": stop, "reward_names": names, "seconds": seconds, "rank": rank,
                       "world_size": world, "labels": labels,
                       "cost": {k: float(v) for k, v in out.cost.items()}})
    table = np.stack([rewards[k] for k in names]) if names else np.zeros((0, rows), np.float32)
    _atomic_write(path, lambda f: np.savez(f, images=images, rewards=table, meta=np.array(meta)))


def _damaged(path: Path, err: Exception) -> ValueError:
    return ValueError(f"shard {path} is damaged or not a shard of this runner ({type(err).__name__}: {err}); "
                      "delete it and rerun to recompute it")


def _read_meta(path: Path) -> tuple:
    try:
        with np.load(path) as z:
            return json.loads(str(z["meta"])), z["rewards"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise _damaged(path, err) from err


def _read_images(path: Path) -> np.ndarray:
    try:
        with np.load(path) as z:
            return z["images"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise _damaged(path, err) from err


def _settings_json(settings: dict) -> dict:
    return json.loads(json.dumps(settings))  # the form it takes on disk (tuples -> lists, ...)


def _fingerprints(inputs: Optional[Mapping]) -> dict:
    """{argument: path} -> {argument: {"path", "fingerprint"}} (run.json's "inputs")."""
    from .fingerprint import fingerprint
    out = {}
    for label, p in (inputs or {}).items():
        try:
            out[str(label)] = {"path": os.fspath(p), "fingerprint": fingerprint(p)}
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{label}: {err}") from None
    return out


def _check_settings(out: Path, settings: dict, inputs: Optional[dict] = None) -> bool:
    """Whether run.json is to be (re)written: yes when --out holds no shard and no samples.npz yet (an old run.json
    then binds nothing: e.g. the first shard rejected an argument). Otherwise run.json must exist and match the
    settings and the fingerprints of the inputs both record (a run.json of an older version has none)."""
    path = out / "run.json"
    done = sorted((out / SHARD_DIR).glob("shard-*.npz")) if (out / SHARD_DIR).is_dir() else []
    if not (done or (out / "samples.npz").exists()):
        return True
    if not path.is_file():
        what = done[0] if done else out / "samples.npz"
        raise ValueError(f"--out {out} holds {what} but no run.json, so its settings are unknown (not written by "
                         "this runner, or run.json was deleted); it is not overwritten: pass a new output directory "
                         "or move it away")
    try:
        record = json.loads(path.read_text())
        old = record["settings"]
        if not isinstance(old, dict):
            raise TypeError(f"settings is a {type(old).__name__}")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is damaged ({type(err).__name__}: {err}); restore it, or pass a new output "
                         "directory") from err
    diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if diff:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
        raise ValueError(f"--out {out} holds shards of another run (settings differ: {detail}); pass a new output "
                         "directory or delete the old one")
    before, now = record.get("inputs"), inputs or {}
    before = before if isinstance(before, dict) else {}
    for label in sorted(set(before) & set(now)):
        entry = before[label] if isinstance(before[label], dict) else {}
        a, b = entry.get("fingerprint"), now[label]["fingerprint"]
        if a is not None and a != b:
            was = f" (was {entry.get('path')})" if entry.get("path") not in (None, now[label]["path"]) else ""
            raise ValueError(f"--out {out} holds shards made from other inputs: {label} {now[label]['path']}{was} "
                             f"has changed since run.json was written (content fingerprint {a} -> {b}: its size, "
                             "mtime or sampled bytes differ); restore it, or pass a new output directory")
    return False


class _Collective:
    """The few collectives the runner needs, each raising one clear error on a timeout (identity on one process);
    on NCCL the tensors live on the rank's GPU."""

    def __init__(self):
        self.on = D.is_distributed()
        self.device = torch.device("cpu")
        if self.on and dist.get_backend() == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())

    def sync(self) -> None:
        """A barrier with the timeout error of the rounds."""
        self._reduce(0, "SUM")

    def sum(self, value: int) -> int:
        return self._reduce(value, "SUM")

    def from_rank0(self, values: list) -> list:
        """Rank 0's list of ints on every rank."""
        if not self.on:
            return values
        n = torch.tensor([len(values)], dtype=torch.long, device=self.device)
        self._call(dist.broadcast, n, 0)
        t = torch.tensor(values, dtype=torch.long, device=self.device) if dist.get_rank() == 0 else \
            torch.empty(int(n.item()), dtype=torch.long, device=self.device)
        self._call(dist.broadcast, t, 0)
        return t.tolist()

    def _reduce(self, value: int, op: str) -> int:
        if not self.on:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        self._call(dist.all_reduce, t, op=getattr(dist.ReduceOp, op))
        return int(t.item())

    @staticmethod
    def _call(fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
        except RuntimeError as err:  # gloo/NCCL timeouts and lost peers
            raise RuntimeError(f"rank {dist.get_rank()}: the other ranks did not join the collective within the "
                               f"process group's timeout (--timeout), or one of them failed: {err}") from err


def run_sharded(make_shard: Callable, n: int, out, *, seed: int, shard_size: int = 32, best_of: int = 1,
                select_by: Optional[str] = None, scorers: Optional[Mapping[str, Callable]] = None,
                settings: Optional[dict] = None, grid: int = 64, nrow: int = 8, device="cpu",
                progress: bool = True, desc: str = "sample", inputs: Optional[Mapping] = None
                ) -> Optional[RunSummary]:
    """Compute n (·best_of) samples in shards over the ranks of the default process group (one process if none)
    and merge them on rank 0 (module docstring). Returns the `RunSummary` on rank 0, None on the other ranks.

    make_shard(generators, start, stop) -> ShardOutput for global indices [start, stop): generators[i] is sample
    start + i's own torch.Generator (on `device`), the source of all of its randomness. `scorers`: name ->
    callable(images (B, 3, H, W) in [0, 1]) -> (B,), applied to every shard's images and recorded beside the
    rewards make_shard returns. `settings`: whatever else fixes the samples (JSON-serialisable), kept in run.json
    so that a resume with other settings is refused. `select_by`: the reward Best-of-N maximises (best_of > 1).
    `inputs`: {argument: path} of the files and directories the samples depend on (checkpoint, VAE, reward
    weights); their content fingerprints go into run.json, and a resume whose files differ is refused.
    """
    _check_int("n", n, 1)
    _check_int("seed", seed, 0)
    _check_int("shard_size", shard_size, 1)
    _check_int("best_of", best_of, 1)
    _check_int("grid", grid, 1)
    _check_int("nrow", nrow, 1)
    scorers = dict(scorers or {})
    if best_of > 1 and select_by is None:
        raise ValueError("best_of > 1 needs select_by, the name of the reward that picks the best candidate")
    if not os.fspath(out).strip():
        raise ValueError(f"out (--out) must name an output directory, got {os.fspath(out)!r}")
    out = Path(out)
    if out.suffix.lower() == ".png" or out.is_file():
        raise ValueError(f"out must be an output directory (samples.npz, grid.png, rewards.json go inside), got "
                         f"{str(out)!r}")
    info = D.info()
    rank, world = info.rank, info.world_size
    full = _settings_json({**(settings or {}), "n": n, "seed": seed, "shard_size": shard_size, "best_of": best_of,
                           "select_by": select_by, "scorers": sorted(scorers)})
    prints = _fingerprints(inputs)
    fresh = _check_settings(out, full, prints)  # every rank checks, so a refusal stops all of them alike
    (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    comm = _Collective()
    comm.sync()  # nobody writes run.json before every rank has compared it
    if rank == 0 and fresh:  # before any shard is written (the other ranks wait for rank 0's list below)
        _atomic_write(out / "run.json", lambda f: f.write(json.dumps({"settings": full, "inputs": prints},
                                                                     indent=1).encode()))

    total = n * best_of
    bounds = shard_bounds(total, shard_size)
    path = lambda k: out / SHARD_DIR / f"shard-{k:06d}.npz"  # noqa: E731
    # rank 0 alone lists the unfinished shards, so every rank splits the same list (even on a filesystem whose
    # views lag), and a resume on another world size is balanced too
    missing = comm.from_rank0([k for k in range(len(bounds)) if not path(k).is_file()] if rank == 0 else [])
    todo = [missing[j] for j in rank_shards(len(missing), rank, world)]
    rounds = -(-len(missing) // world)
    remaining = sum(bounds[k][1] - bounds[k][0] for k in missing)
    fault = _fault(rank)
    start_time = time.perf_counter()
    with tqdm(total=total, initial=total - remaining, desc=desc, unit="img", dynamic_ncols=True,
              disable=not (progress and rank == 0)) as bar:
        written = 0
        for r in range(rounds):
            _maybe_fail(fault, written, rank)
            rows = 0
            if r < len(todo):
                k = todo[r]
                a, b = bounds[k]
                t0 = time.perf_counter()
                shard = make_shard([sample_generator(seed, i, device) for i in range(a, b)], a, b)
                _write_shard(path(k), shard, scorers, a, b, time.perf_counter() - t0, rank, world)
                written, rows = written + 1, b - a
            bar.update(comm.sum(rows))  # the bar's rate: samples/s over all ranks
        _maybe_fail(fault, written, rank)
    comm.sync()
    if rank != 0:
        return None
    return _merge(out, n, best_of, select_by, bounds, path, grid, nrow, full, len(missing),
                  time.perf_counter() - start_time)


def _merge(out: Path, n: int, best_of: int, select_by, bounds, path, grid, nrow, settings, computed,
           seconds) -> RunSummary:
    for stale in (out / SHARD_DIR).glob(".shard-*.tmp*"):  # left by a rank killed mid-write
        stale.unlink(missing_ok=True)
    missing = [str(path(k)) for k in range(len(bounds)) if not path(k).is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} shard(s) missing after every rank finished (is --out on a filesystem "
                           f"all ranks share?): {', '.join(missing[:5])}")
    cost: dict = {}
    rewards: dict = {}
    labels: Optional[list] = []
    names = None
    for k in range(len(bounds)):
        meta, table = _read_meta(path(k))
        if labels is not None and meta.get("labels") is not None:
            labels += meta["labels"]
        else:
            labels = None  # a shard without labels: none are reported
        if (meta["start"], meta["stop"]) != bounds[k]:
            raise RuntimeError(f"{path(k)} holds indices [{meta['start']}, {meta['stop']}), expected "
                               f"{list(bounds[k])}: shards of another run")
        if names is None:
            names = meta["reward_names"]
        elif names != meta["reward_names"]:
            raise RuntimeError(f"{path(k)} has rewards {meta['reward_names']}, shard 0 has {names}")
        for key, v in meta["cost"].items():
            cost[key] = cost.get(key, 0.0) + v
        cost["shard_seconds"] = cost.get("shard_seconds", 0.0) + meta["seconds"]
        for i, name in enumerate(names):
            rewards.setdefault(name, []).append(table[i])
    rewards = {k: np.concatenate(v) for k, v in rewards.items()}
    if best_of > 1:
        if select_by not in rewards:
            raise ValueError(f"select_by={select_by!r} is not among the recorded rewards {sorted(rewards)}")
        chosen = rewards[select_by].reshape(n, best_of).argmax(1)
        keep = np.arange(n) * best_of + chosen
    else:
        keep = np.arange(n)
    samples = None
    for k, (a, b) in enumerate(bounds):
        lo, hi = np.searchsorted(keep, [a, b])
        if lo == hi:
            continue
        images = _read_images(path(k))
        if samples is None:
            samples = np.empty((n, *images.shape[1:]), dtype=np.uint8)
        samples[lo:hi] = images[keep[lo:hi] - a]
    _atomic_write(out / "samples.npz", lambda f: np.savez(f, arr_0=samples))

    from .latents import save_image_grid
    first = torch.from_numpy(samples[:grid]).permute(0, 3, 1, 2).float() / 255
    save_image_grid(first, out / "grid.png", nrow=nrow)
    selected = {k: v[keep] for k, v in rewards.items()}
    report = {"n": n, "best_of": best_of, "rewards": {k: v.tolist() for k, v in selected.items()},
              "mean_rewards": {k: float(v.mean()) for k, v in selected.items()},
              "cost": cost, "seconds_last_invocation": seconds, "settings": settings}
    if labels is not None:  # the class of every output sample (e.g. `sample --class random`)
        report["labels"] = [labels[i] for i in keep.tolist()]
    if best_of > 1:
        report["candidates"] = {"selected_index": keep.tolist(),
                                "rewards": {k: v.tolist() for k, v in rewards.items()}}
    _atomic_write(out / "rewards.json", lambda f: f.write(json.dumps(report, indent=1).encode()))
    return RunSummary(out, n, n * best_of, len(bounds), computed, seconds, selected, cost)
