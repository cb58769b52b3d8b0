"""Teacher-rollout distillation: the warped GLASS grid, the rollout bank against the closed-form Gaussian meta flow
map, pair draws, `rollout_loss`, and the trainer's rollout rows (validation, resume)."""
import dataclasses

import pytest
import torch

from mfm_fast import train as T
from mfm_fast.data import ExactGaussianMFM, GaussianMixture
from mfm_fast.glass import GlassFlowMap, warped_grid
from mfm_fast.losses import RolloutBank, build_rollout_bank, mfm_loss, rollout_loss
from mfm_fast.models.mlp import MFMMLP, marginal_var

F64 = torch.float64


def _gauss(dtype=F64):
    m = torch.tensor([0.5, -0.2], dtype=dtype)
    S = torch.tensor([[1.0, 0.2], [0.2, 0.5]], dtype=dtype)
    return ExactGaussianMFM(m, S, dtype=dtype)


def test_warped_grid():
    g = warped_grid(8, 2.0)
    assert g.shape == (9,) and g.dtype == torch.float32 and g[0] == 0 and g[-1] == 1
    assert bool((g[1:] > g[:-1]).all()) and bool((g.diff()[1:] < g.diff()[:-1]).all())  # finer towards 1
    torch.testing.assert_close(warped_grid(4, 1.0), torch.linspace(0, 1, 5))
    assert warped_grid(4, 3.0, like=torch.zeros(1, dtype=F64)).dtype == F64
    for bad in (0.5, float("nan")):
        with pytest.raises(ValueError, match="warp"):
            warped_grid(4, bad)
    with pytest.raises(ValueError, match="warp"):
        GlassFlowMap(lambda t, x: x, warp=0.0)


def test_warped_rollout_is_accurate_where_uniform_steps_are_not():
    """At t = 0.95 the posterior spread is ~5% of the data's; 32 uniform Heun steps miss the closed-form X_{0,1}
    by ~10% of it (worst case), 32 quadratically warped steps by ~2%."""
    exact = _gauss()
    g = torch.Generator().manual_seed(3)
    B = 64
    t = torch.full((B,), 0.95, dtype=F64)
    x = 0.95 * exact.data.sample(B, g) + 0.05 * torch.randn(B, 2, generator=g, dtype=F64)
    eps = torch.randn(B, 2, generator=g, dtype=F64)
    s, u = torch.zeros(B, dtype=F64), torch.ones(B, dtype=F64)
    want = exact.flow_map(s, u, eps, t, x)
    spread = float(exact.data.posterior(t, x).covs[0, 0].diagonal().sqrt().min())
    errs = {}
    for warp in (1.0, 2.0):
        got = eps + GlassFlowMap(exact.data.drift, steps=32, warp=warp)(s, u, eps, t, x)
        errs[warp] = float((got - want).norm(dim=-1).max()) / spread
    assert errs[2.0] < 0.03 and errs[1.0] > 3 * errs[2.0], errs


def test_rollout_bank_holds_the_exact_flow_map_along_each_trajectory():
    exact = _gauss(torch.float32)
    g = torch.Generator().manual_seed(0)
    x1 = exact.data.sample(256, g).float()
    bank = build_rollout_bank(exact.data.drift, x1, steps=24, generator=g, chunk=100)
    assert len(bank) == 256 and bank.traj.shape == (256, 25, 2) and bank.grid.shape == (25,)
    assert float((bank.t == 0).float().mean()) == pytest.approx(0.1, abs=0.08)  # t_zero_prob
    assert bool((bank.x[bank.t == 0] == 0).all())
    ex64 = _gauss()
    rows, i, j = bank.draw_pairs(512, torch.Generator().manual_seed(1), full_prob=0.25)
    r = bank.rows(rows, i, j, dtype=F64)
    want = ex64.flow_map(r.s, r.u, r.xs, r.t, r.x)
    # in units of the posterior spread: the bank is float32 and 24 warped Heun steps
    scale = (2.0 * (1 - r.t) / marginal_var(1.0, r.t).sqrt()).clamp_min(1e-2)[:, None]
    assert float(((r.xu - want) / scale).abs().max()) < 5e-2
    # the exact model has zero rollout loss (up to that error); a perturbed one does not
    zero, logs = rollout_loss(ex64, r)
    assert float(zero) < 1e-6 and set(logs) == {"roll"}
    wrong = ExactGaussianMFM(ex64.mean + 0.3, ex64.cov)
    assert float(rollout_loss(wrong, r)[0]) > 1e-3


def test_draw_pairs_cover_all_pairs_and_the_full_jump():
    R = 5
    bank = RolloutBank(torch.zeros(10), torch.zeros(10, 2), warped_grid(R), torch.zeros(10, R + 1, 2))
    g = torch.Generator().manual_seed(0)
    rows, i, j = bank.draw_pairs(20000, g, full_prob=0.0)
    assert bool((i < j).all()) and int(i.min()) == 0 and int(j.max()) == R and int(rows.max()) < 10
    counts = torch.bincount(i * (R + 1) + j, minlength=(R + 1) ** 2).float()
    pairs = counts[counts > 0]
    assert pairs.numel() == R * (R + 1) // 2  # every pair i < j occurs
    assert float(pairs.max() / pairs.min()) < 1.25  # uniformly
    _, i, j = bank.draw_pairs(100, g, full_prob=1.0)
    assert bool((i == 0).all()) and bool((j == R).all())


def test_bank_validates_its_inputs():
    x1 = torch.zeros(8, 2)
    with pytest.raises(TypeError, match="teacher_drift"):
        build_rollout_bank(None, x1)
    with pytest.raises(ValueError, match="conditioning 'y'"):
        build_rollout_bank(lambda t, x: x, x1, y=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="not finite"):
        build_rollout_bank(lambda t, x: x / 0, x1, steps=2)


def test_mfm_loss_adds_the_rollout_rows():
    exact = _gauss(torch.float32)
    g = torch.Generator().manual_seed(0)
    bank = build_rollout_bank(exact.data.drift, exact.data.sample(64, g).float(), steps=8, generator=g)
    torch.manual_seed(0)
    model = MFMMLP(dim=2, hidden=16, depth=1, n_freq=1, sigma_data=1.0)
    rows = bank.rows(*bank.draw_pairs(32, g))
    x1 = exact.data.sample(32, g).float()
    base, logs = mfm_loss(model, x1, "none", generator=torch.Generator().manual_seed(5), output_units=True,
                          adaptive=False)
    both, logs2 = mfm_loss(model, x1, "none", generator=torch.Generator().manual_seed(5), output_units=True,
                           adaptive=False, rollout=rows)
    roll, _ = rollout_loss(model, rows, error_scale=model.error_scale(rows.t))
    torch.testing.assert_close(both, base + roll)
    assert "roll" in logs2 and "roll" not in logs


def test_trainer_rollout_rows_validate_and_resume_bitwise(tmp_path):
    data = GaussianMixture(torch.full((2,), 0.5), [[-1.0, 0.0], [1.0, 0.0]], 0.2 * torch.eye(2).expand(2, 2, 2),
                           dtype=torch.float32)
    cfg = T.TrainConfig(steps=6, batch=32, consistency="esd", diagonal="distill", consistency_fraction=0.25,
                        rollout_fraction=0.5, rollout_bank=64, rollout_steps=4, adaptive=False, log_every=1)
    with pytest.raises(ValueError, match="leave no diagonal rows"):
        dataclasses.replace(cfg, rollout_fraction=0.75)
    with pytest.raises(ValueError, match="rollout_warp"):
        dataclasses.replace(cfg, rollout_warp=0.5)

    def make():
        torch.manual_seed(0)
        return MFMMLP(dim=2, hidden=16, depth=1, n_freq=1, sigma_data=1.0)

    with pytest.raises(ValueError, match="teacher_drift"):
        T.train(make(), data.sample, dataclasses.replace(cfg, consistency="none", diagonal="data"), progress=False)
    full = T.train(make(), data.sample, cfg, teacher_drift=data.drift, progress=False)
    assert all("roll" in h for h in full.history)
    out = str(tmp_path / "m.pt")

    class Killed(Exception):
        pass

    def kill(step, logs):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):  # killed right after the step-3 checkpoint
        T.train(make(), data.sample, dataclasses.replace(cfg, checkpoint_every=3), out=out,
                teacher_drift=data.drift, progress=False, callback=kill)
    resumed = T.train(make(), data.sample, dataclasses.replace(cfg, checkpoint_every=3), out=out,
                      teacher_drift=data.drift, progress=False)
    assert resumed.step == 6
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    calls = []

    def counting_drift(t, x):
        calls.append(x.shape[0])
        return data.drift(t, x)
    # resuming a finished run: nothing to train, so the teacher is never rolled out
    again = T.train(make(), data.sample, dataclasses.replace(cfg, checkpoint_every=3), out=out,
                    teacher_drift=counting_drift, progress=False)
    assert again.step == 6 and calls == []


def test_recipe_archs_and_cache_keys():
    from mfm_fast.models import MFMDiT
    spec = T.gmm_defaults().spec()
    assert "arch" not in spec  # MLP recipes keep their pre-DiT cache keys
    digits = T.digits_defaults()
    assert digits.spec()["arch"] == "dit" and digits.teacher == "learned"
    assert isinstance(digits.build(digits.model, impl="torch"), MFMDiT)
    with pytest.raises(ValueError, match="arch"):
        T.Recipe({}, T.TrainConfig(), "none", arch="unet")
    with pytest.raises(ValueError, match="digits"):
        T.digits_defaults("exact")


def test_digits_recipe_distils_a_dit():
    """The digits recipe at a tiny budget: a DiT teacher, its rollout bank, and the DiT MFM's rollout loss falls."""
    from mfm_fast.data import load_digits
    images, _ = load_digits()
    recipe = T.digits_defaults()
    recipe.teacher_train = dataclasses.replace(recipe.teacher_train, steps=20, batch=32, warmup=2, device="cpu")
    recipe.train = dataclasses.replace(recipe.train, steps=40, batch=32, warmup=2, rollout_bank=64,
                                       rollout_steps=4, device="cpu", lr=1e-3)
    result, teacher = T.train_recipe(recipe, T.dataset_sampler(images), progress=False, impl="torch")
    assert teacher is not None and teacher.step == 20 and result.step == 40
    roll = [h["roll"] for h in result.history]
    assert sum(roll[-8:]) / 8 < 0.8 * sum(roll[:8]) / 8, roll
