"""Sharded sampling and steering (mfm_fast.parallel_sample) on CPU: `python -m mfm_fast sample|steer --out A` and
`torchrun --standalone --nproc_per_node=2 -m mfm_fast sample|steer --out B` (gloo) write byte-identical
samples.npz; a run killed after some shards (one process, or one failing rank of two) resumes to the same bytes
without recomputing finished shards; a hanging rank ends the job with a timeout error; Best-of-N selects per group
after the gather; pluggable scorers land in rewards.json. The Python API (`run_sharded` in an initialised process
group) gives the same bytes on 1 and 2 processes, and a hanging rank ends it with a timeout error."""
import datetime
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from mfm_fast.__main__ import main as cli_main
from mfm_fast.latents import decode_latents, load_vae
from mfm_fast.models.checkpoints import load_official_mfm
from mfm_fast.parallel_sample import (FAULT_ENV, ShardOutput, rank_shards, run_sharded, sample_generator,
                                      sample_seed, shard_bounds, steer_shard)
from mfm_fast.sampling import randn_rows, refine_sample

ROOT = Path(__file__).resolve().parents[1]  # the checkout under test, whatever its path


@pytest.fixture
def one_thread():
    # torchrun gives each worker OMP_NUM_THREADS=1; the in-process run uses the same, as CPU GEMM bits may depend
    # on the thread count
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sample_args(files, out, *extra):
    return ["sample", "--ckpt", str(files / "mfm-tiny.pt"), "--vae", str(files / "vae"), "--class", "random",
            "--num-samples", "5", "--shard-size", "2", "--steps", "2", "--seed", "11", "--impl", "torch",
            "--device", "cpu", "--no-progress", "--out", str(out), *extra]


def steer_args(files, out, *extra):
    return ["steer", "--ckpt", str(files / "mfm-tiny.pt"), "--vae", str(files / "vae"), "--class", "2",
            "--reward", "mfm_fast.reward_models:toy_reward", "--method", "mfm-g", "--particles", "2", "--sde",
            "--steps", "2", "--num-samples", "5", "--shard-size", "2", "--impl", "torch", "--device", "cpu",
            "--score-with", f"{SCORER},dim=16", "--no-progress", "--out", str(out), *extra]


def toy16(dim="32", device="cpu"):
    """An extra scorer for --score-with (spec values arrive as strings)."""
    from mfm_fast.reward_models import toy_reward
    return toy_reward(int(dim), seed=1, device=device)


SCORER = "test_parallel_sample:toy16"


def torchrun_cmd() -> list:
    """This environment's torchrun script, else the module it runs (the same program)."""
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def torchrun(args, fault=None, timeout=240):
    """`torchrun --standalone --nproc_per_node=2 -m mfm_fast ARGS`."""
    # ROOT/tests too: the steer runs score with this module's toy16
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"),
                                                        os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    cmd = [*torchrun_cmd(), "--standalone", "--nproc_per_node=2", "-m", "mfm_fast", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def npz_bytes(out):
    return (Path(out) / "samples.npz").read_bytes()


@pytest.fixture(scope="module")
def sample_a(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("A") / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli_main(sample_args(files, out)) == 0
    finally:
        torch.set_num_threads(n)
    return out


# ---------------------------------------------------------------------------------------------- sample
def test_sample_on_two_ranks_equals_one_process_byte_for_byte(files, sample_a, tmp_path):
    res = torchrun(sample_args(files, tmp_path / "B"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert npz_bytes(tmp_path / "B") == npz_bytes(sample_a)
    with np.load(sample_a / "samples.npz") as z:
        assert list(z.keys()) == ["arr_0"]  # the ADM evaluator's layout
        arr = z["arr_0"]
    assert arr.shape == (5, 32, 32, 3) and arr.dtype == np.uint8
    assert len({a.tobytes() for a in arr}) == 5
    grid = np.array(Image.open(sample_a / "grid.png"))
    assert grid.shape == (2 + 34, 2 + 5 * 34, 3)
    np.testing.assert_array_equal(grid[2:34, 2:34], arr[0])
    assert np.array_equal(np.array(Image.open(tmp_path / "B" / "grid.png")), grid)


def test_a_sample_is_a_function_of_seed_and_index(files, sample_a, one_thread):
    """Samples 2 and 3 (shard 1) by hand: their own generators -> class, noise, 2-step refinement -> decode."""
    model = load_official_mfm(files / "mfm-tiny.pt", impl="torch")
    gens = [sample_generator(11, i) for i in (2, 3)]
    y = torch.cat([torch.randint(10, (1,), generator=g) for g in gens])
    noise = randn_rows((2, 4, 8, 8), torch.empty(()), gens)
    x1 = refine_sample(model, noise, steps=2, generator=gens, y=y, cfg=2.5)
    with torch.no_grad():
        img = decode_latents(load_vae(files / "vae"), x1)
    expect = (img.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    with np.load(sample_a / "samples.npz") as z:
        np.testing.assert_array_equal(z["arr_0"][2:4], expect)
    assert sample_seed(11, 2) != sample_seed(11, 3) != sample_seed(12, 3)


def test_shard_size_sets_the_batch_only_up_to_rounding(files, sample_a, tmp_path, one_thread):
    """The shard is the network batch, so another shard size may move a value by a rounding step, nothing more."""
    assert cli_main(sample_args(files, tmp_path / "S5", "--shard-size", "5")) == 0
    with np.load(sample_a / "samples.npz") as a, np.load(tmp_path / "S5" / "samples.npz") as b:
        assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1


def test_killed_run_resumes_to_the_same_bytes_without_redoing_shards(files, sample_a, tmp_path, monkeypatch,
                                                                      one_thread):
    out = tmp_path / "K"
    monkeypatch.setenv(FAULT_ENV, "0:raise:2")
    with pytest.raises(RuntimeError, match="rank 0 fails after writing 2 shard"):
        cli_main(sample_args(files, out))
    shards = sorted(p.name for p in (out / "shards").iterdir())
    assert shards == ["shard-000000.npz", "shard-000001.npz"] and not (out / "samples.npz").exists()
    stamp = (out / "shards" / "shard-000000.npz").stat().st_mtime_ns
    monkeypatch.delenv(FAULT_ENV)
    assert cli_main(sample_args(files, out)) == 0
    assert npz_bytes(out) == npz_bytes(sample_a)
    assert (out / "shards" / "shard-000000.npz").stat().st_mtime_ns == stamp  # reused, not recomputed
    # a rerun of a finished run recomputes nothing and rewrites the same bytes
    assert cli_main(sample_args(files, out)) == 0
    assert npz_bytes(out) == npz_bytes(sample_a)


def test_bad_outputs_and_changed_settings_are_refused(files, sample_a, tmp_path):
    with pytest.raises(ValueError, match="settings differ: steps: 2 -> 3"):
        cli_main(sample_args(files, sample_a, "--steps", "3"))
    with pytest.raises(ValueError, match="--out is an output directory"):
        cli_main(sample_args(files, tmp_path / "grid.png"))
    with pytest.raises(ValueError, match="--shard-size must be a positive integer"):
        cli_main(sample_args(files, tmp_path / "x", "--shard-size", "0"))
    with pytest.raises(ValueError, match="--method smc couples the samples"):
        cli_main(steer_args(files, tmp_path / "y", "--method", "smc"))
    with pytest.raises(ValueError, match="search_mode='global'.* cannot be sharded"):
        steer_shard(None, None, None, "r", 1, method="search", search_mode="global")


# ---------------------------------------------------------------------------------------------- steer
def test_steer_failing_rank_then_resume_on_two_ranks_equals_one_process(files, tmp_path, one_thread):
    assert cli_main(steer_args(files, tmp_path / "A")) == 0
    report = json.loads((tmp_path / "A" / "rewards.json").read_text())
    assert len(report["rewards"]["toy"]) == 5 and np.isfinite(report["rewards"]["toy"]).all()
    # --score-with: each rank scores the shards it computes; the merged scores equal one process's (below)
    extra = np.array(report["rewards"][SCORER])
    assert extra.shape == (5,) and np.isfinite(extra).all() and not np.allclose(extra, report["rewards"]["toy"])
    assert report["cost"]["backward_evals"] > 0 and report["cost"]["reward_evals"] > 0

    # rank 1 (shard 2 of shards 0-1 | 2) fails after writing its shard: the job ends with an error, no samples.npz
    res = torchrun(steer_args(files, tmp_path / "B"), fault="1:raise:1")
    assert res.returncode != 0
    assert "rank 1 fails after writing 1 shard" in res.stdout + res.stderr
    assert (tmp_path / "B" / "shards" / "shard-000002.npz").is_file()
    assert not (tmp_path / "B" / "samples.npz").exists()
    stamp = (tmp_path / "B" / "shards" / "shard-000002.npz").stat().st_mtime_ns

    res = torchrun(steer_args(files, tmp_path / "B"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "paper NFE per sample  18" in res.stdout  # K + 4NK with K = 2, N = 2
    assert (tmp_path / "B" / "shards" / "shard-000002.npz").stat().st_mtime_ns == stamp
    assert npz_bytes(tmp_path / "B") == npz_bytes(tmp_path / "A")
    assert json.loads((tmp_path / "B" / "rewards.json").read_text())["rewards"] == report["rewards"]


# ---------------------------------------------------------------------------------------------- API
def _fake_shard(gens, start, stop):
    """Images constant per sample and rewards drawn from the sample's generator (no model needed)."""
    r = torch.stack([torch.rand((), generator=g) for g in gens])
    images = torch.arange(start, stop, dtype=torch.float32)[:, None, None, None].expand(-1, 3, 4, 4) / 255
    return ShardOutput(images, {"steer": r}, {"forward_evals": stop - start})


def test_best_of_n_selects_per_group_after_the_gather_and_scorers_are_recorded(tmp_path):
    scorers = {"brightness": lambda im: im.mean((1, 2, 3))}
    s = run_sharded(_fake_shard, 4, tmp_path / "bon", seed=3, shard_size=5, best_of=3, select_by="steer",
                    scorers=scorers, progress=False)
    cand = torch.stack([torch.rand((), generator=sample_generator(3, i)) for i in range(12)]).view(4, 3)
    keep = (torch.arange(4) * 3 + cand.argmax(1)).numpy()
    with np.load(tmp_path / "bon" / "samples.npz") as z:
        np.testing.assert_array_equal(z["arr_0"][:, 0, 0, 0], keep)  # groups straddle shards [0,5) [5,10) [10,12)
    report = json.loads((tmp_path / "bon" / "rewards.json").read_text())
    assert report["candidates"]["selected_index"] == keep.tolist()
    np.testing.assert_allclose(report["rewards"]["steer"], cand.max(1).values.numpy())
    np.testing.assert_allclose(report["rewards"]["brightness"], keep / 255, rtol=1e-6)
    assert report["cost"]["forward_evals"] == 12 and s.shards == 3 and s.candidates == 12
    with pytest.raises(ValueError, match="best_of > 1 needs select_by"):
        run_sharded(_fake_shard, 4, tmp_path / "x", seed=3, best_of=2)
    with pytest.raises(ValueError, match="reward 'bad' must give shape"):
        run_sharded(_fake_shard, 2, tmp_path / "y", seed=3, scorers={"bad": lambda im: im.mean()}, progress=False)


@pytest.mark.parametrize("total,size", [(5, 2), (12, 5), (1, 4)])
def test_ranks_take_contiguous_blocks_covering_every_shard(total, size):
    bounds = shard_bounds(total, size)
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    for world in (1, 2, 3, 8):
        blocks = [list(rank_shards(len(bounds), r, world)) for r in range(world)]
        assert sum(blocks, []) == list(range(len(bounds)))
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api_worker(rank, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=3))
    try:
        run_sharded(_fake_shard, 4, out, seed=3, shard_size=5, best_of=3, select_by="steer", progress=False)
    finally:
        dist.destroy_process_group()


def _spawn_api(out):
    # fork: the children inherit the parent's imports, so they start in well under a second
    mp.start_processes(_api_worker, args=(_free_port(), str(out)), nprocs=2, join=True, start_method="fork")


def test_python_api_on_two_processes_equals_one_and_a_hanging_rank_times_out(tmp_path, monkeypatch):
    run_sharded(_fake_shard, 4, tmp_path / "one", seed=3, shard_size=5, best_of=3, select_by="steer",
                progress=False)
    _spawn_api(tmp_path / "two")
    assert npz_bytes(tmp_path / "two") == npz_bytes(tmp_path / "one")
    # one process killed after its first shard, resumed on two: the remaining shards 1 and 2 are split between
    # the ranks, and the bytes are the same
    monkeypatch.setenv(FAULT_ENV, "0:raise:1")
    with pytest.raises(RuntimeError, match="rank 0 fails after writing 1 shard"):
        run_sharded(_fake_shard, 4, tmp_path / "resumed", seed=3, shard_size=5, best_of=3, select_by="steer",
                    progress=False)
    monkeypatch.delenv(FAULT_ENV)
    _spawn_api(tmp_path / "resumed")
    assert npz_bytes(tmp_path / "resumed") == npz_bytes(tmp_path / "one")
    writers = []
    for k in range(3):
        with np.load(tmp_path / "resumed" / "shards" / f"shard-{k:06d}.npz") as z:
            meta = json.loads(str(z["meta"]))
        writers.append((meta["rank"], meta["world_size"]))
    assert writers == [(0, 1), (0, 2), (1, 2)]
    # rank 1 stops responding before its first shard: rank 0's next collective raises after the 3 s timeout
    # and the launcher then ends rank 1 instead of waiting for it forever
    monkeypatch.setenv(FAULT_ENV, "1:hang:0")
    start = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException, match="did not join the collective within the process group"):
        _spawn_api(tmp_path / "hang")
    assert time.monotonic() - start < 60
    assert not (tmp_path / "hang" / "samples.npz").exists()


def readme_torchrun_commands() -> list:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Many GPUs"):]
    section = section[:section.index("\n## ", 1)]
    commands = re.sub(r"\\\n\s*", "", section)  # join continued lines
    return [shlex.split(line) for line in commands.splitlines() if line.startswith("torchrun ")]


def test_the_readme_multi_gpu_commands_parse_as_the_tested_ones():
    """Every torchrun command of the README parses with torchrun's own parser (no ambiguous prefix such as --n)
    and runs `-m mfm_fast sample|steer` with arguments the command's parser accepts."""
    from torch.distributed.run import get_args_parser

    from mfm_fast.cli import sample_parser, steer_parser
    commands = readme_torchrun_commands()
    assert len(commands) >= 4
    used = set()
    for cmd in commands:
        launch = get_args_parser().parse_args(cmd[1:])
        assert launch.module and launch.training_script == "mfm_fast", cmd
        sub, *rest = launch.training_script_args
        args = {"sample": sample_parser, "steer": steer_parser}[sub]().parse_args(rest)
        assert args.n >= 1000 and args.out, cmd  # real-size runs
        used.add(sub)
    assert used == {"sample", "steer"}
    # and the tests launch the same way: torchrun --standalone --nproc_per_node=K -m mfm_fast <command>
    tested = get_args_parser().parse_args(["--standalone", "--nproc_per_node=2", "-m", "mfm_fast",
                                           *sample_args(Path("f"), "B")])
    assert tested.standalone and tested.training_script_args[0] == "sample"
