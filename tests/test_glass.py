"""Closed-form GLASS drift against the two-observation Bayes oracle, and the GLASS-rollout baseline sampler."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mfm_fast.data import PAPER_REWARD, ExactGaussianMFM, GaussianMixture, paper_gmm
from mfm_fast.glass import glass_drift, glass_posterior_sample, glass_value_and_grad

F64 = torch.float64


def random_mixture(seed, d=3, k=3):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, d, d, generator=g, dtype=F64)
    covs = a @ a.mT / d + 0.2 * torch.eye(d, dtype=F64)
    return GaussianMixture(torch.rand(k, generator=g, dtype=F64) + 0.2, 2 * torch.randn(k, d, generator=g, dtype=F64),
                           covs)


def rel_err(a, b):
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)).max())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_closed_form_equals_bayes_oracle(seed):
    mix = random_mixture(seed)
    B = 256
    x, xbar = 2 * torch.randn(B, 3, dtype=F64), 2 * torch.randn(B, 3, dtype=F64)
    s, t = torch.rand(B, dtype=F64), torch.rand(B, dtype=F64)
    assert rel_err(glass_drift(mix.drift, s, xbar, t, x), mix.glass_drift(s, xbar, t, x)) < 1e-8
    # scalar times broadcast to the batch
    assert rel_err(glass_drift(mix.drift, 0.3, xbar, 0.8, x), mix.glass_drift(0.3, xbar, 0.8, x)) < 1e-8


_MIX = random_mixture(10)


@settings(max_examples=60, deadline=None)
@given(s=st.floats(0.0, 0.995), t=st.floats(0.0, 0.995), seed=st.integers(0, 2 ** 16))
def test_closed_form_equals_oracle_over_times(s, t, seed):
    g = torch.Generator().manual_seed(seed)
    x, xbar = 2 * torch.randn(8, 3, generator=g, dtype=F64), 2 * torch.randn(8, 3, generator=g, dtype=F64)
    assert rel_err(glass_drift(_MIX.drift, s, xbar, t, x), _MIX.glass_drift(s, xbar, t, x)) < 1e-8


def test_t_zero_is_teacher_drift_exactly():
    mix = random_mixture(3)
    B = 32
    x, xbar, s = torch.randn(B, 3, dtype=F64), torch.randn(B, 3, dtype=F64), torch.rand(B, dtype=F64)
    s[0] = 0.0
    assert torch.equal(glass_drift(mix.drift, s, xbar, 0.0, x), mix.drift(s, xbar))


def test_s_zero_uses_context_directly():
    # s = 0 ⇒ t* = t, x* = x: the teacher is called at the context itself
    mix = random_mixture(4)
    B = 16
    x, xbar, t = torch.randn(B, 3, dtype=F64), torch.randn(B, 3, dtype=F64), torch.rand(B, dtype=F64)
    calls = []

    def teacher(tt, xx):
        calls.append((tt.clone(), xx.clone()))
        return mix.drift(tt, xx)

    out = glass_drift(teacher, 0.0, xbar, t, x)
    assert len(calls) == 1
    torch.testing.assert_close(calls[0][0], t, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(calls[0][1], x, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(out, mix.posterior_mean(t, x) - xbar, rtol=1e-12, atol=1e-12)


def test_near_and_at_one():
    mix = random_mixture(5)
    B = 64
    x, xbar = torch.randn(B, 3, dtype=F64), torch.randn(B, 3, dtype=F64)
    s, t = torch.rand(B, dtype=F64) * 0.9, torch.rand(B, dtype=F64) * 0.9
    # s = 1: Ī_1 = I1 is observed, b̄ = b_1(x̄) = x̄
    torch.testing.assert_close(glass_drift(mix.drift, 1.0, xbar, t, x), xbar, rtol=1e-12, atol=1e-12)
    # t = 1: the posterior is the point mass at x, b̄ = (x − x̄)/(1 − s)
    torch.testing.assert_close(glass_drift(mix.drift, s, xbar, 1.0, x), (x - xbar) / (1 - s)[:, None],
                               rtol=1e-12, atol=1e-12)
    # approaching either limit the closed form stays continuous (no 0/0 cancellation)
    for eps in (1e-6, 1e-10, 1e-14):
        near_s = glass_drift(mix.drift, 1 - eps, xbar, t, x)
        assert (near_s - xbar).abs().max() < 1e3 * eps + 1e-12
        near_t = glass_drift(mix.drift, s, xbar, 1 - eps, x)
        assert rel_err(near_t, (x - xbar) / (1 - s)[:, None]) < 1e3 * eps + 1e-12
    both = glass_drift(mix.drift, 1 - 1e-9, xbar, 1 - 1e-9, x)
    assert torch.isfinite(both).all()
    assert torch.isfinite(glass_drift(mix.drift, 1.0, x, 1.0, x)).all()
    # moderately close to 1 the oracle is still well conditioned: compare
    assert rel_err(glass_drift(mix.drift, 1 - 1e-3, xbar, t, x), mix.glass_drift(1 - 1e-3, xbar, t, x)) < 1e-8
    assert rel_err(glass_drift(mix.drift, s, xbar, 1 - 1e-3, x), mix.glass_drift(s, xbar, 1 - 1e-3, x)) < 1e-8


def test_image_shaped_states():
    mix = random_mixture(6, d=6)
    B = 8
    x, xbar = torch.randn(B, 2, 3, dtype=F64), torch.randn(B, 2, 3, dtype=F64)
    s, t = torch.rand(B, dtype=F64), torch.rand(B, dtype=F64)
    out = glass_drift(lambda tt, xx: mix.drift(tt, xx.flatten(1)).view_as(xx), s, xbar, t, x)
    assert out.shape == (B, 2, 3)
    assert rel_err(out.flatten(1), mix.glass_drift(s, xbar.flatten(1), t, x.flatten(1))) < 1e-8


def test_bad_inputs():
    mix = paper_gmm()
    x = torch.randn(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="xbar"):
        glass_drift(mix.drift, 0.5, torch.randn(4, 3, dtype=F64), 0.5, x)
    with pytest.raises(ValueError, match="s"):
        glass_drift(mix.drift, 1.5, x, 0.5, x)
    with pytest.raises(TypeError, match="teacher_drift"):
        glass_drift(None, 0.5, x, 0.5, x)
    with pytest.raises(ValueError, match="steps"):
        glass_posterior_sample(mix.drift, 0.5, x, 2, steps=0)


def test_rollout_converges_to_exact_flow_map():
    # for Gaussian data the conditional ODE has the closed-form flow X_{0,1}; Euler error must shrink like 1/steps
    g = torch.Generator().manual_seed(7)
    a = torch.randn(3, 3, generator=g, dtype=F64)
    model = ExactGaussianMFM(torch.randn(3, generator=g, dtype=F64), a @ a.T / 3 + 0.2 * torch.eye(3, dtype=F64))
    B, n = 4, 8
    t = torch.tensor([0.0, 0.3, 0.7, 0.95], dtype=F64)
    x = 2 * torch.randn(B, 3, dtype=F64)
    noise = torch.randn(B * n, 3, dtype=F64)
    exact = model.flow_map(torch.zeros(B, dtype=F64), torch.ones(B, dtype=F64), noise, t, x).view(B, n, 3)
    errs = []
    for steps in (16, 64):
        out, nfe = glass_posterior_sample(model.data.drift, t, x, n, steps=steps, noise=noise, return_nfe=True)
        assert nfe == steps and out.shape == (B, n, 3)
        errs.append(float((out - exact).abs().max()))
    assert errs[1] < errs[0] / 3 and errs[1] < 0.1, errs


def test_rollout_samples_posterior_of_mixture():
    mix = paper_gmm()
    x = torch.tensor([[1.0, 0.2], [-1.5, -2.0]], dtype=F64)
    t = torch.tensor([0.5, 0.8], dtype=F64)
    n = 1500
    xs = glass_posterior_sample(mix.drift, t, x, n, steps=24, generator=torch.Generator().manual_seed(0))
    post = mix.posterior(t, x)
    mean = post.mean()
    var = torch.einsum("bk,bkd->bd", post.weights, torch.diagonal(post.covs, dim1=-2, dim2=-1) + post.means ** 2) \
        - mean ** 2
    # sampling error (5 standard errors) plus a small allowance for the Euler discretisation
    assert ((xs.mean(1) - mean).abs() < 5 * (var / n).sqrt() + 0.03).all()


def test_glass_value_and_grad_against_exact():
    mix = paper_gmm()
    R = {**PAPER_REWARD, "sigma": 1.0}
    A, y = torch.tensor(R["A"], dtype=F64), torch.tensor(R["y"], dtype=F64)

    def reward(x1):
        return -((y - x1 @ A.T) ** 2).sum(-1) / (2 * R["sigma"] ** 2)

    x = torch.tensor([[0.5, -0.5], [-1.0, -2.0]], dtype=F64)
    t = torch.tensor([0.4, 0.7], dtype=F64)
    v, grad = glass_value_and_grad(mix.drift, reward, t, x, n_particles=1000, steps=16,
                                   generator=torch.Generator().manual_seed(1))
    assert v.shape == (2,) and grad.shape == (2, 2)
    torch.testing.assert_close(v, mix.value(t, x, **R), rtol=0, atol=0.08)
    ref = mix.value_grad(t, x, **R)
    assert float((grad - ref).norm(dim=-1).max()) < 0.15 * float(ref.norm(dim=-1).max()) + 0.05, (grad, ref)
    with pytest.raises(ValueError, match="reward"):
        glass_value_and_grad(mix.drift, lambda z: torch.full((z.shape[0],), math.nan, dtype=F64), t, x, 2, steps=2)
