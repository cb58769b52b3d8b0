"""What the value-gradient estimators converge to at a finite N, against closed-form oracles.

MFM-G with N particles is an unbiased estimate of ∇V_N, V_N = E log (1/N)Σ exp(λ·r(X1^i)) (the importance-weighted
bound): at N = 1 the gradient of the expected reward, ∇V_∞ = ∇V only in the limit. The oracles here are the mixture's
closed-form E[λ·r(X1) | x_t] and ∇V_t, and the score-function estimate of ∇V_N from closed-form posterior samples
(`experiments.estimators.iwae_value_grad`); the pathwise side uses the exact meta flow map of a Gaussian."""
import torch

import pytest

from mfm_fast.data import paper_gmm
from mfm_fast.experiments.estimators import expected_estimate, iwae_value_grad
from mfm_fast.rewards import LinearInverseReward


def test_expected_reward_closed_form_matches_monte_carlo():
    gmm = paper_gmm()
    reward = LinearInverseReward.paper().to(torch.float64)
    gen = torch.Generator().manual_seed(0)
    x = gmm.marginal(0.4).sample(6, generator=gen)
    t = torch.full((6,), 0.4, dtype=torch.float64)
    lam = 0.7
    closed = gmm.expected_reward(t, x, reward.A, reward.y, reward.sigma, lam)
    x1 = gmm.posterior_sample(t, x, 200_000, gen)
    mc = lam * reward(x1.reshape(-1, 2)).view(6, -1)
    torch.testing.assert_close(closed, mc.mean(1), rtol=0.02, atol=4 * mc.std(1).max().item() / 200_000 ** 0.5)
    # V_1 ≤ V (Jensen), strictly for a non-degenerate posterior
    assert (closed < gmm.value(t, x, reward.A, reward.y, reward.sigma, lam)).all()
    with pytest.raises(ValueError, match="sigma"):
        gmm.expected_reward(t, x, reward.A, reward.y, -1.0)


def test_score_function_reference_at_n1_is_the_expected_reward_gradient():
    gmm = paper_gmm()
    reward = LinearInverseReward.paper().to(torch.float64)
    gen = torch.Generator().manual_seed(1)
    x = gmm.marginal(0.5).sample(16, generator=gen)
    t = torch.full((16,), 0.5, dtype=torch.float64)
    closed = gmm.expected_reward_grad(t, x, reward.A, reward.y, reward.sigma, 1.0)
    mean, se = iwae_value_grad(gmm, reward, 1.0, 0.5, x, 1, 20_000, gen)
    assert (mean - closed).norm() < 4 * se.norm(), ((mean - closed).norm(), se.norm())
    exact = gmm.value_grad(t, x, reward.A, reward.y, reward.sigma, 1.0)
    assert (closed - exact).norm() > 5 * exact.norm()  # N = 1 is far from ∇V on this sharp reward
    with pytest.raises(ValueError, match="reps"):
        iwae_value_grad(gmm, reward, 1.0, 0.5, x, 1, 1)
    with pytest.raises(ValueError, match="t must"):
        iwae_value_grad(gmm, reward, 1.0, 1.0, x, 1, 4)


def test_pathwise_mfm_g_expectation_is_the_iwae_gradient_not_grad_v(sharp_gaussian):
    """The exact meta flow map (a transport of ε, differentiable in x) fed to MFM-G: the mean over many draws
    matches the model-free score-function ∇V_N at N = 1 and N = 8, and over-steers against ∇V by a wide margin —
    so the finite-N bias belongs to the estimator, whatever the posterior model."""
    model, reward = sharp_gaussian
    gmm = model.data
    gen = torch.Generator().manual_seed(2)
    t = 0.5
    x = gmm.tilt(reward.A, reward.y, reward.sigma).marginal(t).sample(8, generator=gen)
    tt = torch.full((8,), t, dtype=torch.float64)
    exact = gmm.value_grad(tt, x, reward.A, reward.y, reward.sigma, 1.0)
    ratios = {}
    for n, reps in ((1, 4000), (8, 4000), (128, 400)):
        pathwise, se_p = expected_estimate(model, reward, 1.0, t, x, n, reps, "mfm-g", gen, chunk_size=None)
        ref, se_r = iwae_value_grad(gmm, reward, 1.0, t, x, n, reps * 4, gen)
        se = (se_p.square() + se_r.square()).sum().sqrt()
        assert (pathwise - ref).norm() < 4 * se + 0.02 * ref.norm(), (n, (pathwise - ref).norm(), se)
        ratios[n] = (pathwise.norm() / exact.norm()).item()
        if n == 1:  # V_1 = E[λ·r]: closed form
            closed = gmm.expected_reward_grad(tt, x, reward.A, reward.y, reward.sigma, 1.0)
            assert (ref - closed).norm() < 4 * se_r.norm(), ((ref - closed).norm(), se_r.norm())
    print(ratios)
    assert ratios[1] > 3 and ratios[8] > 1.5, ratios  # over-steering at small N
    assert abs(ratios[128] - 1) < 0.5 * (ratios[8] - 1), ratios  # and consistency: it approaches ∇V


def test_mfm_gf_expectation_approaches_grad_v(sharp_gaussian):
    """MFM-GF's finite-N expectation: zero at N = 1 (its two terms cancel), then towards ∇V from below."""
    model, reward = sharp_gaussian
    gmm = model.data
    gen = torch.Generator().manual_seed(3)
    t = 0.5
    x = gmm.tilt(reward.A, reward.y, reward.sigma).marginal(t).sample(8, generator=gen)
    exact = gmm.value_grad(torch.full((8,), t, dtype=torch.float64), x, reward.A, reward.y, reward.sigma, 1.0)
    m1, _ = expected_estimate(model, reward, 1.0, t, x, 1, 16, "mfm-gf", gen)
    assert m1.abs().max() < 1e-9
    bias = {}
    for n in (4, 64):
        m, se = expected_estimate(model, reward, 1.0, t, x, n, 2000, "mfm-gf", gen)
        bias[n] = ((m - exact).norm() / exact.norm()).item()
    print(bias)
    assert bias[64] < 0.5 * bias[4] and bias[64] < 0.2, bias

