"""Hardening (issue #12): `mfm_fast.steer` stays the function, SMC never mixes conditioning, guidance weights outside
the table are refused, diverged training stops without saving, checkpoint defaults / writability / resume checks /
stale temporary files, and degenerate steering settings raise instead of returning NaN."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from mfm_fast import train as T
from mfm_fast.__main__ import main as cli_main
from mfm_fast.data import ExactGaussianMFM, paper_gmm
from mfm_fast.models import MFMMLP
from mfm_fast.rewards import LinearInverseReward
from mfm_fast.steer import best_of_n, steer

F64 = torch.float64


# ---------------------------------------------------------------------------------------------- public API
def test_steer_attribute_stays_the_function_after_submodule_imports():
    code = """
import sys
import mfm_fast
import mfm_fast.graphs, mfm_fast.profile, mfm_fast.cli
mfm_fast.best_of_n, mfm_fast.SteerResult
import mfm_fast.steer
from mfm_fast.steer import steer, make_step
module = sys.modules["mfm_fast.steer"]
assert callable(mfm_fast.steer), type(mfm_fast.steer)
assert mfm_fast.steer is module.steer is steer, mfm_fast.steer
from mfm_fast import steer as s
assert s is steer
assert dir(mfm_fast).count("steer") == 1
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# ---------------------------------------------------------------------------------------------- steering
def image_reward(x):
    return -x.pow(2).flatten(1).mean(1)


def test_smc_and_global_search_refuse_populations_that_mix_labels(tiny_dit):
    model = tiny_dit
    noise = torch.randn(4, 4, 8, 8)
    y = torch.tensor([3, 3, 7, 7])
    kw = dict(steps=2, n_particles=2, progress=False, generator=torch.Generator().manual_seed(0))
    for extra in (dict(method="smc"), dict(method="smc", population=4),
                  dict(method="search", search_mode="global")):
        with pytest.raises(ValueError, match=r"population.*y.*population=2"):
            steer(model, image_reward, noise, y=y, **kw, **extra)
    # a per-row cfg counts as conditioning too
    with pytest.raises(ValueError, match="cfg"):
        steer(model, image_reward, noise, method="smc", y=torch.full((4,), 3), cfg=torch.tensor([1.0, 1.0, 2.5, 2.5]),
              **kw)
    # one label per population runs; so does a batch with a single label and the default population
    res = steer(model, image_reward, noise, method="smc", population=2, y=y, return_result=True, **kw)
    assert res.samples.shape == noise.shape and res.log_normalizer.shape == (2,)
    assert bool(torch.isfinite(res.samples).all())
    x = steer(model, image_reward, noise, method="smc", y=torch.full((4,), 5), **kw)
    assert bool(torch.isfinite(x).all())
    # per-particle search and the Doob methods never move states between rows
    steer(model, image_reward, noise, method="search", y=y, **kw)


def gaussian_case(dtype=F64):
    m = torch.tensor([0.8, -0.4], dtype=F64)
    S = torch.tensor([[1.0, 0.3], [0.3, 0.6]], dtype=F64)
    return ExactGaussianMFM(m, S, dtype=dtype), LinearInverseReward([[1.2, -0.8]], [-1.0], 0.5)


def test_smc_applies_renorm_to_its_proposal_and_the_weights_correct_for_it():
    model, reward = gaussian_case()
    noise = torch.randn(64, 2, dtype=F64)
    kw = dict(steps=6, method="smc", n_particles=4, lam=1.5, t_start=0.05, ess_threshold=0.0, progress=False,
              return_result=True)
    plain = steer(model, reward, noise, generator=torch.Generator().manual_seed(1), **kw)
    resc = steer(model, reward, noise, renorm="rescale", generator=torch.Generator().manual_seed(1), **kw)
    assert not torch.allclose(plain.particles, resc.particles)
    # renorm_scale = 0 removes the steering move: the proposal is the base chain, p/q = 1, the V̂ telescope and
    # without resampling the final weights are exactly softmax(λ·r) of the particles
    off = steer(model, reward, noise, renorm="clip", renorm_scale=0.0, generator=torch.Generator().manual_seed(1),
                **kw)
    assert off.n_resamples == 0
    expected = torch.log_softmax(1.5 * reward(off.particles), 0)
    torch.testing.assert_close(off.log_weights, expected)
    assert not torch.allclose(plain.log_weights, torch.log_softmax(1.5 * reward(plain.particles), 0))


def test_time_grids_that_round_to_one_are_refused():
    model, reward = gaussian_case(torch.float32)
    noise = torch.randn(8, 2)
    t_start = 1 - 1e-7  # fp32 rounds the interior points of linspace(t_start, 1, 251) onto each other and onto 1
    for kw in (dict(method="mfm-g", sde=True), dict(method="smc"), dict(method="none", sde=True)):
        with pytest.raises(ValueError, match=r"t_start=.* too close to 1 for steps=250"):
            steer(model, reward, noise, steps=250, t_start=t_start, progress=False, **kw)
    with pytest.raises(ValueError, match="too close to 1"):
        best_of_n(model, reward, noise, 2, steps=250, t_start=t_start, sde=True)
    # a distinct grid near 1 is fine
    x = steer(model, reward, noise, steps=4, t_start=0.999, method="smc", n_particles=2, progress=False)
    assert bool(torch.isfinite(x).all())


# ---------------------------------------------------------------------------------------------- guidance table
def test_guidance_weights_outside_the_table_raise(tiny_dit):
    model = tiny_dit
    x, xbar, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.rand(3)
    y = torch.tensor([1, 2, 3])
    with torch.no_grad():
        for cfg in (7.0, 2.0, float("nan"), torch.tensor([1.0, 2.5, 3.0]), torch.tensor([1.0, float("nan"), 2.5])):
            with pytest.raises(ValueError, match=r"cfg must be one of .*\(1\.0, 2\.5\)"):
                model(t, t, xbar, t, x, y=y, cfg=cfg)
        with pytest.raises(ValueError, match="x_cond_scale"):
            model(t, t, xbar, t, x, y=y, x_cond_scale=2.5)
        a = model(t, t, xbar, t, x, y=y, cfg=2.5 + 1e-7)  # within the tolerance
        b = model(t, t, xbar, t, x, y=y, cfg=torch.full((3,), 2.5, dtype=torch.bfloat16))
        c = model(t, t, xbar, t, x, y=y, cfg=torch.tensor([2.5, 2.5, 2.5]))
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    torch.testing.assert_close(b, c, rtol=0, atol=0)


def test_sample_cli_refuses_cfg_outside_the_table_before_loading_the_vae(tmp_path, tiny_dit):
    model = tiny_dit
    torch.save({"model": {"model.model.dit." + k: v for k, v in model.state_dict().items()},
                "config": dataclasses.asdict(model.config)}, tmp_path / "mfm-tiny.pt")
    base = ["sample", "--ckpt", str(tmp_path / "mfm-tiny.pt"), "--vae", str(tmp_path / "no-vae"), "--impl", "torch",
            "--device", "cpu", "--out", str(tmp_path / "x"), "--n", "1", "--steps", "1"]
    with pytest.raises(ValueError, match=r"--cfg must be one of .*\(1\.0, 2\.5\), got 7"):
        cli_main([*base, "--cfg", "7"])
    with pytest.raises(ValueError, match="--cfg"):
        cli_main([*base, "--cfg", "nan"])


# ---------------------------------------------------------------------------------------------- training
def _cfg(**kw):
    base = dict(steps=12, batch=32, lr=1e-3, log_every=5, checkpoint_every=4, ema_decay=0.9, seed=3)
    return T.TrainConfig(**{**base, **kw})


def _sampler(n, gen):
    return paper_gmm().sample(n, gen)


def _nan_after(calls_ok):
    """sample_batch whose data turns NaN from optimizer step calls_ok + 1 on (one call per step)."""
    calls = []

    def sample_batch(n, gen):
        x = paper_gmm().sample(n, gen)
        calls.append(1)
        return x * float("nan") if len(calls) > calls_ok else x
    return sample_batch


def _finite_state(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt["step"], all(bool(torch.isfinite(v).all()) for v in ckpt["model"].values())


def test_diverged_training_raises_and_keeps_the_last_good_checkpoint(tmp_path):
    out = str(tmp_path / "run.pt")
    torch.manual_seed(0)
    with pytest.raises(T.TrainingDiverged, match=r"step 6: .*loss = nan.*step 4") as info:
        T.train(MFMMLP(2, 16, 2), _nan_after(5), _cfg(), out=out, progress=False)
    assert isinstance(info.value, RuntimeError)
    assert info.value.step == 6 and info.value.term in ("diag", "cons", "loss")
    assert _finite_state(out) == (4, True)
    # without `out` the pending logs are checked before returning (steps < log_every: no flush on the way)
    with pytest.raises(T.TrainingDiverged, match="step 3"):
        T.train(MFMMLP(2, 16, 2), _nan_after(2), _cfg(steps=3, log_every=50, checkpoint_every=0), progress=False)


def test_default_checkpoint_interval_with_out(tmp_path):
    assert T.checkpoint_interval(_cfg(checkpoint_every=0, steps=20), None) == 0
    assert T.checkpoint_interval(_cfg(checkpoint_every=0, steps=20), "x.pt") == 2
    assert T.checkpoint_interval(_cfg(checkpoint_every=0, steps=50000), "x.pt") == 1000
    assert T.checkpoint_interval(_cfg(checkpoint_every=0, steps=5), "x.pt") == 1
    assert T.checkpoint_interval(_cfg(checkpoint_every=7), "x.pt") == 7

    class Killed(Exception):
        pass

    def die(step, logs):
        if step == 15:
            raise Killed

    out = str(tmp_path / "run.pt")
    with pytest.raises(Killed):
        T.train(MFMMLP(2, 16, 2), _sampler, _cfg(steps=20, checkpoint_every=0), out=out, progress=False,
                callback=die)
    assert _finite_state(out) == (14, True)


def test_out_directory_is_created_and_checked_before_training(tmp_path):
    calls = []

    def failing(n, gen):
        calls.append(1)
        raise RuntimeError("data source down")

    out = tmp_path / "a" / "b" / "run.pt"
    with pytest.raises(RuntimeError, match="data source down"):
        T.train(MFMMLP(2, 16, 2), failing, _cfg(), out=str(out), progress=False)
    assert out.parent.is_dir()
    (tmp_path / "file").write_text("not a directory")
    calls.clear()
    with pytest.raises(ValueError, match=r"out=.*file.*run\.pt.*cannot write"):
        T.train(MFMMLP(2, 16, 2), failing, _cfg(), out=str(tmp_path / "file" / "run.pt"), progress=False)
    with pytest.raises(ValueError, match="out=.* is a directory"):
        T.train(MFMMLP(2, 16, 2), failing, _cfg(), out=str(tmp_path), progress=False)
    assert not calls  # refused before the first step


def test_resume_refuses_changed_settings_unless_overridden(tmp_path):
    out = str(tmp_path / "run.pt")
    T.train(MFMMLP(2, 16, 2), _sampler, _cfg(steps=4), out=out, progress=False)
    for changed, fields in ((dict(lr=2e-3), ["lr"]), (dict(lr=2e-3, betas=(0.9, 0.99)), ["lr", "betas"]),
                            (dict(consistency="lsd"), ["consistency"])):
        with pytest.raises(ValueError, match="other settings") as info:
            T.train(MFMMLP(2, 16, 2), _sampler, _cfg(steps=8, **changed), out=out, progress=False)
        assert all(f in str(info.value) for f in fields) and "override" in str(info.value)
        assert torch.load(out, weights_only=True)["step"] == 4
    # how long / where / how often it logs or saves may change freely
    res = T.train(MFMMLP(2, 16, 2), _sampler, _cfg(steps=6, log_every=1, checkpoint_every=3, device="cpu"),
                  out=out, progress=False)
    assert res.step == 6 and torch.load(out, weights_only=True)["overrides"] == []
    res = T.train(MFMMLP(2, 16, 2), _sampler, _cfg(steps=8, lr=2e-3), out=out, progress=False, override=True)
    ckpt = torch.load(out, weights_only=True)
    assert res.step == ckpt["step"] == 8 and ckpt["train_config"]["lr"] == 2e-3
    assert ckpt["overrides"] == [{"step": 6, "changes": {"lr": [1e-3, 2e-3]}}]
    # the new settings are the checkpoint's now
    assert T.train(MFMMLP(2, 16, 2), _sampler, _cfg(steps=9, lr=2e-3), out=out, progress=False).step == 9


def test_train_cli_override_flag(tmp_path):
    out = str(tmp_path / "gmm.pt")
    base = ["--data", "gmm", "--teacher", "none", "--out", out, "--batch", "32", "--hidden", "16", "--depth", "1",
            "--quiet", "--no-eval", "--device", "cpu"]
    assert T.main([*base, "--steps", "2"]) == 0
    with pytest.raises(ValueError, match="lr"):
        T.main([*base, "--steps", "3", "--lr", "1e-2"])
    assert T.main([*base, "--steps", "3", "--lr", "1e-2", "--override"]) == 0
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["step"] == 3 and list(ckpt["overrides"][0]["changes"]) == ["lr"]


def test_stale_temporary_checkpoint_files_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run.pt"
    stale = tmp_path / f"run.pt.tmp{dead.pid}"
    own = tmp_path / f"run.pt.tmp{os.getpid()}"
    live = tmp_path / f"run.pt.tmp{os.getppid()}"  # a live writer's file is left alone
    other = tmp_path / "run.pt.tmp-notes"
    for f in (stale, own, live, other):
        f.write_bytes(b"partial")

    def failing(n, gen):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        T.train(MFMMLP(2, 16, 2), failing, _cfg(), out=str(out), progress=False)
    assert not stale.exists() and not own.exists() and live.exists() and other.exists()
    # saving cleans up as well
    stale.write_bytes(b"partial")
    T.save(MFMMLP(2, 16, 2), str(out))
    assert not stale.exists() and live.exists() and out.exists()
    assert not (tmp_path / f"run.pt.tmp{os.getpid()}").exists()


def test_resume_comparison_covers_every_optimisation_field():
    free = set(T.RESUME_FREE)
    fields = {f.name for f in dataclasses.fields(T.TrainConfig)}
    assert free <= fields
    assert {"lr", "batch", "seed", "betas", "consistency", "ema_decay", "t_power"} <= fields - free
