"""The jackknifed value estimators (value.jackknife_weights / jackknife_value, `jackknife=True`): brute-force
leave-one-out oracles, autograd, chunking, cost, errors, and the bias they remove against closed-form ∇V."""
import math

import torch

import pytest

from mfm_fast.experiments.estimators import expected_estimate, iwae_value_grad
from mfm_fast.graphs import steer_graphed
from mfm_fast.sampling import compose_flow_map
from mfm_fast.steer import steer
from mfm_fast.value import jackknife_value, jackknife_weights, value_and_grad


def brute_force(r):
    """(weights, value) by literally leaving each particle out."""
    B, N = r.shape
    w = torch.softmax(r, 1)
    c, loo_values = N * w, []
    for j in range(N):
        keep = [k for k in range(N) if k != j]
        c[:, keep] -= (N - 1) / N * torch.softmax(r[:, keep], 1)
        loo_values.append(torch.logsumexp(r[:, keep], 1) - math.log(N - 1))
    value = N * (torch.logsumexp(r, 1) - math.log(N)) - (N - 1) * torch.stack(loo_values, 1).mean(1)
    return c, value


@pytest.mark.parametrize("scale", [0.1, 3.0, 40.0])
def test_weights_and_value_match_leave_one_out(scale):
    r = torch.randn(6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * scale
    c, v = brute_force(r)
    torch.testing.assert_close(jackknife_weights(r), c, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(jackknife_value(r), v, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(jackknife_weights(r).sum(1), torch.ones(6, dtype=torch.float64))
    # the weights are the value's gradient in r: MFM-G seeded with them differentiates the jackknifed value
    rg = r.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(jackknife_value(rg).sum(), rg)
    torch.testing.assert_close(g, jackknife_weights(r), rtol=1e-9, atol=1e-12)


def test_weights_stay_finite_when_one_particle_dominates():
    r = torch.tensor([[0.0, -800.0, -900.0, -1000.0], [5.0, 5.0, -2000.0, 3.0]], dtype=torch.float64)
    c = jackknife_weights(r)
    assert torch.isfinite(c).all()
    # first row: the leave-out-the-top estimate puts all its weight on particle 2
    torch.testing.assert_close(c[0, :2], torch.tensor([1.75, -0.75], dtype=torch.float64))
    torch.testing.assert_close(c.sum(1), torch.ones(2, dtype=torch.float64))
    assert torch.isfinite(jackknife_value(r)).all()


@pytest.mark.parametrize("estimator", ["mfm-g", "mfm-gf"])
def test_value_and_grad_is_the_jackknifed_estimate_of_the_same_samples(estimator, sharp_gaussian):
    model, reward = sharp_gaussian
    gen = torch.Generator().manual_seed(1)
    B, N, t = 5, 6, 0.4
    x = torch.randn(B, 2, dtype=torch.float64, generator=gen)
    noise = torch.randn(B, N, 2, dtype=torch.float64, generator=gen)
    V, g = value_and_grad(model, reward, t, x, N, estimator=estimator, lam=0.8, noise=noise, jackknife=True)
    xg = x.clone().requires_grad_(True)
    x1 = compose_flow_map(model, noise.reshape(B * N, 2), torch.full((B,), t, dtype=torch.float64), xg)
    r = 0.8 * reward(x1).view(B, N)
    torch.testing.assert_close(V, jackknife_value(r.detach()))
    if estimator == "mfm-g":
        (ref,) = torch.autograd.grad(jackknife_value(r).sum(), xg)
    else:
        c = jackknife_weights(r.detach())[..., None]
        x1 = x1.detach().view(B, N, 2)
        ref = t / (1 - t) ** 2 * ((c * x1).sum(1) - x1.mean(1))
    torch.testing.assert_close(g, ref)
    # particles split over chunks: the same numbers; MFM-G pays one forward-only pass more
    full = value_and_grad(model, reward, t, x, N, estimator=estimator, lam=0.8, noise=noise, jackknife=True,
                          return_info=True)
    chunked = value_and_grad(model, reward, t, x, N, estimator=estimator, lam=0.8, noise=noise, jackknife=True,
                             chunk_size=4, return_info=True)
    torch.testing.assert_close(chunked.value, full.value)
    torch.testing.assert_close(chunked.grad, full.grad)
    extra = B * N if estimator == "mfm-g" else 0
    assert chunked.cost.forward_evals == full.cost.forward_evals + extra
    assert chunked.cost.backward_evals == full.cost.backward_evals


def test_jackknife_removes_most_of_the_small_n_bias(sharp_gaussian):
    """Against the closed-form ∇V at states of the tilted marginal: the jackknifed MFM-GF's expectation at N = 8 is
    closer than the softmax one, and the jackknifed MFM-G's expectation equals the model-free
    N·∇V_N − (N−1)·∇V_{N−1} (score-function oracle) and is closer to ∇V than MFM-G's ∇V_N."""
    model, reward = sharp_gaussian
    gmm = model.data
    gen = torch.Generator().manual_seed(2)
    t, N = 0.5, 8
    x = gmm.tilt(reward.A, reward.y, reward.sigma).marginal(t).sample(8, generator=gen)
    exact = gmm.value_grad(torch.full((8,), t, dtype=torch.float64), x, reward.A, reward.y, reward.sigma, 1.0)

    def bias(m):
        return ((m - exact).norm() / exact.norm()).item()

    gf, _ = expected_estimate(model, reward, 1.0, t, x, N, 3000, "mfm-gf", gen)
    gf_jk, _ = expected_estimate(model, reward, 1.0, t, x, N, 3000, "mfm-gf", gen, jackknife=True)
    assert bias(gf_jk) < 0.5 * bias(gf), (bias(gf_jk), bias(gf))
    g, _ = expected_estimate(model, reward, 1.0, t, x, N, 4000, "mfm-g", gen)
    g_jk, se = expected_estimate(model, reward, 1.0, t, x, N, 4000, "mfm-g", gen, jackknife=True)
    vn, se_n = iwae_value_grad(gmm, reward, 1.0, t, x, N, 16000, gen)
    vn1, se_n1 = iwae_value_grad(gmm, reward, 1.0, t, x, N - 1, 16000, gen)
    ref = N * vn - (N - 1) * vn1
    tol = 4 * (se.square().sum() + N ** 2 * se_n.square().sum() + (N - 1) ** 2 * se_n1.square().sum()).sqrt()
    assert (g_jk - ref).norm() < tol, ((g_jk - ref).norm(), tol)
    assert bias(g_jk) < 0.5 * bias(g), (bias(g_jk), bias(g))


def test_errors_name_the_argument(sharp_gaussian):
    model, reward = sharp_gaussian
    x = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="n_particles >= 2"):
        value_and_grad(model, reward, 0.5, x, 1, jackknife=True)
    with pytest.raises(ValueError, match="jackknife must be True or False"):
        value_and_grad(model, reward, 0.5, x, 4, jackknife="yes")
    with pytest.raises(ValueError, match="jackknife applies to the value estimators"):
        steer(model, reward, x, steps=2, method="dps", jackknife=True)
    with pytest.raises(ValueError, match="jackknife applies to the value estimators"):  # the graphed twin too
        steer_graphed(model, reward, x, steps=2, method="dps", jackknife=True)
    with pytest.raises(ValueError, match="n_particles >= 2"):
        steer(model, reward, x, steps=2, method="mfm-gf", n_particles=1, jackknife=True)


def test_steer_with_jackknife_runs_every_value_method(sharp_gaussian):
    model, reward = sharp_gaussian
    noise = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for method in ("mfm-g", "mfm-gf", "smc"):
        res = steer(model, reward, noise, steps=50, method=method, n_particles=4, jackknife=True,
                    generator=torch.Generator().manual_seed(4), return_result=True, progress=False)
        assert torch.isfinite(res.samples).all() and res.rewards.mean() > reward(noise).mean(), method
        plain = steer(model, reward, noise, steps=50, method=method, n_particles=4,
                      generator=torch.Generator().manual_seed(4), progress=False)
        assert (plain - res.samples).abs().max() > 1e-3, method  # the flag reaches the estimator


def test_low_precision_rewards_are_weighted_in_float32():
    r = torch.randn(4, 16, generator=torch.Generator().manual_seed(5)) * 20
    ref = jackknife_weights(r.double())
    half = jackknife_weights(r.bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), jackknife_weights(r.bfloat16().double()).bfloat16().double())
    assert (jackknife_weights(r).double() - ref).abs().max() < 1e-5
