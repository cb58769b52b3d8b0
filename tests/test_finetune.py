"""MFM-FT against the exact Gaussian oracles: the tilted drift is the fixed point of the objective, and a short
fine-tune moves Euler samples of the drift towards the exact tilted target."""
import math

import pytest
import torch
import torch.nn as nn

from mfm_fast.data import ExactGaussianMFM
from mfm_fast.finetune import (
    FinetuneConfig,
    FineTunedDrift,
    finetune,
    gmm_defaults,
    ft_loss,
    ft_target,
    half_sigma2,
    load_finetuned,
    save_finetuned,
)
from mfm_fast.models.mlp import fourier_features
from mfm_fast.rewards import LinearInverseReward
from mfm_fast.sampling import ode_sample

MEAN = [0.3, -0.4]
COV = [[0.8, 0.3], [0.3, 0.6]]
A, Y, SIGMA = [[1.2, -0.8]], [0.5], 0.5


@pytest.fixture
def setup():
    base = ExactGaussianMFM(MEAN, COV)
    reward = LinearInverseReward(A, Y, SIGMA)
    return base, reward, base.data


class OracleDrift(nn.Module):
    """b^θ = b + κ·(σ_t²/2)·∇V_t + W·x + c, exact b and ∇V from the oracle (model protocol on the diagonal)."""

    def __init__(self, data, kappa, schedule, sigma_const=100.0):
        super().__init__()
        self.data, self.schedule, self.sigma_const = data, schedule, sigma_const
        self.kappa = nn.Parameter(torch.tensor(float(kappa), dtype=torch.float64))
        self.W = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
        self.c = nn.Parameter(torch.zeros(2, dtype=torch.float64))

    def forward(self, s, u, xbar, t, x):
        b = self.data.drift(s, xbar)
        gv = self.data.value_grad(s, xbar, A, Y, SIGMA, 1.0)
        return b + self.kappa * half_sigma2(s, self.schedule, self.sigma_const)[:, None] * gv + xbar @ self.W.T + self.c

    def flat_grad(self):
        return torch.cat([self.kappa.grad.view(1), self.W.grad.flatten(), self.c.grad])


def mc_gradient(model, base, reward, data, schedule, sigma_const, chunks=16, batch=2048):
    """Monte-Carlo mean and standard error of the loss gradient w.r.t. (κ, W, c), over independent batches."""
    gen = torch.Generator().manual_seed(1)
    grads = []
    for _ in range(chunks):
        model.zero_grad()
        ft_loss(model, base, reward, data.sample(batch, gen), schedule=schedule, sigma_const=sigma_const,
                generator=gen).backward()
        grads.append(model.flat_grad())
    G = torch.stack(grads)
    return G.mean(0), G.std(0) / math.sqrt(chunks)


@pytest.mark.parametrize("schedule, sigma_const", [("(1-t)/t", None), ("constant", 2.0)])
def test_fixed_point_is_b_plus_half_sigma2_grad_v(setup, schedule, sigma_const):
    """The expected gradient vanishes at b + (σ_t²/2)·∇V_t and not at the base drift b."""
    base, reward, data = setup
    c = 100.0 if sigma_const is None else sigma_const
    mean, se = mc_gradient(OracleDrift(data, 1.0, schedule, c), base, reward, data, schedule, c)
    assert (mean.abs() < 5 * se).all(), (mean, se)
    mean0, se0 = mc_gradient(OracleDrift(data, 0.0, schedule, c), base, reward, data, schedule, c)
    assert mean0[0] < -15 * se0[0], (mean0, se0)  # gradient descent pushes κ from 0 up towards 1


def test_principled_fixed_point_is_the_exact_tilted_drift(setup):
    """b + ((1−t)/t)·∇V_t equals the drift of the exact tilted mixture (METHOD §3), which MFM-FT then targets."""
    _, _, data = setup
    gen = torch.Generator().manual_seed(2)
    t = 0.05 + 0.9 * torch.rand(64, generator=gen, dtype=torch.float64)
    x = torch.randn(64, 2, generator=gen, dtype=torch.float64) * 2
    fixed = OracleDrift(data, 1.0, "(1-t)/t")(t, t, x, t * 0, x * 0)
    torch.testing.assert_close(fixed, data.tilted_drift(t, x, A, Y, SIGMA, 1.0), rtol=1e-8, atol=1e-8)


def test_target_expectation_matches_closed_form(setup):
    """E[target | x_t] over the posterior noise is b − (h − 1)·(b^θ − b) + ((1−t)/t)·∇h with h = exp V_t: ĥ and
    g = ∇ĥ are unbiased for h and ∇h (the exact value from the oracle)."""
    base, reward, data = setup
    gen = torch.Generator().manual_seed(3)
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    x = torch.randn(2, 2, generator=gen, dtype=torch.float64)
    n = 200_000
    b_theta = torch.randn(2, 2, generator=gen, dtype=torch.float64)
    tgt = ft_target(base, reward, t.repeat_interleave(n), x.repeat_interleave(n, 0), b_theta.repeat_interleave(n, 0),
                    generator=gen)
    mean = tgt.target.view(2, n, 2).mean(1)
    V = data.value(t, x, A, Y, SIGMA, 1.0)
    h = V.exp()[:, None]
    grad_h = h * data.value_grad(t, x, A, Y, SIGMA, 1.0)
    b = data.drift(t, x)
    expected = b - (h - 1) * (b_theta - b) + ((1 - t) / t)[:, None] * grad_h
    torch.testing.assert_close(mean, expected, rtol=0, atol=0.02 * expected.abs().max().item())


class ResidualDrift(nn.Module):
    """b^θ_t(x) = b_t(x) + MLP(x, t): the exact base drift plus a learned correction that starts at zero."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.net = nn.Sequential(nn.Linear(2 + 9, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 2))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, s, u, xbar, t, x):
        b = self.base(s, s, xbar, torch.zeros_like(s), torch.zeros_like(xbar))
        return b + self.net(torch.cat([xbar, fourier_features(s, 4)], dim=-1))


def moment_error(x, target):
    """‖mean − mean*‖ + ‖cov − cov*‖_F against the exact tilted Gaussian."""
    return ((x.mean(0) - target.means[0]).norm() + (torch.cov(x.T) - target.covs[0]).norm()).item()


def test_short_finetune_moves_samples_to_the_tilted_target(setup):
    base, reward, data = setup
    tilted = data.tilt(A, Y, SIGMA, 1.0).to(dtype=torch.float32)
    noise = torch.randn(4096, 2, generator=torch.Generator().manual_seed(5))
    errors = []

    def evaluate(step, model):
        errors.append(moment_error(ode_sample(model, noise, steps=50, t_start=0.01), tilted))

    cfg = gmm_defaults(steps=60, batch_size=256, lr=5e-3, ema_decay=0.98, seed=0)
    finetune(base, reward, lambda n, g: data.sample(n, g).float(), cfg, trainable=ResidualDrift(base),
             progress=False, callback=evaluate, callback_every=60)
    assert errors[0] > 0.4  # the base drift samples the untilted Gaussian
    assert errors[-1] < 0.3 * errors[0], errors


def test_checkpoint_roundtrip_and_cli(setup, tmp_path):
    from mfm_fast.models import MFMMLP
    from mfm_fast.train import save
    _, reward, data = setup
    torch.manual_seed(0)
    mfm = MFMMLP(2, hidden=16, depth=2)
    result = finetune(mfm, reward, lambda n, g: data.sample(n, g).float(), gmm_defaults(steps=3, batch_size=32),
                      progress=False)
    path = tmp_path / "ft.pt"
    save_finetuned(str(path), result)
    assert "finetune" in torch.load(path, weights_only=True)["extra"]
    loaded = load_finetuned(str(path))
    x, t = torch.randn(5, 2), torch.rand(5)
    torch.testing.assert_close(loaded(t, t, x, t, x), result.model(t, t, x, t, x))
    assert not torch.allclose(loaded(t, t, x, t, x), mfm(t, t, x, t * 0, x * 0))  # the weights moved
    with pytest.raises(ValueError, match="not an MFM-FT"):
        save(mfm, str(tmp_path / "plain.pt"))
        load_finetuned(str(tmp_path / "plain.pt"))
    from mfm_fast.__main__ import main
    assert main(["finetune", "--ckpt", str(tmp_path / "plain.pt"), "--out", str(tmp_path / "cli.pt"),
                 "--steps", "2", "--batch-size", "16", "--device", "cpu"]) == 0
    assert isinstance(load_finetuned(str(tmp_path / "cli.pt")), FineTunedDrift)


def test_bad_inputs(setup):
    base, reward, data = setup
    x1 = data.sample(8).float()
    with pytest.raises(ValueError, match="schedule"):
        ft_loss(base, base, reward, x1, schedule="linear")
    with pytest.raises(ValueError, match=r"strictly inside \(0, 1\)"):
        ft_target(base, reward, torch.zeros(8), x1, x1)
    with pytest.raises(ValueError, match="NaN"):
        ft_loss(base, base, lambda x: torch.full((x.shape[0],), float("nan")), x1)
    with pytest.raises(ValueError, match="not differentiable"):
        ft_loss(base, base, lambda x: x.detach().sum(1), x1)
    with pytest.raises(ValueError, match="steps"):
        FinetuneConfig(steps=0)
    with pytest.raises(ValueError, match="no parameters"):
        finetune(base, reward, x1, gmm_defaults(steps=1), progress=False)
