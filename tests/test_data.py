"""GaussianMixture oracle and ExactGaussianMFM, checked against independent closed forms (scipy densities, Bayes'
rule, autograd, finite differences, Monte Carlo with tolerances from its standard error)."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from mfm_fast.data import PAPER_REWARD, ExactGaussianMFM, GaussianMixture, load_digits, paper_gmm

F64 = torch.float64


def random_spd(d, g, k=None):
    shape = (d, d) if k is None else (k, d, d)
    a = torch.randn(shape, generator=g, dtype=F64)
    return a @ a.mT / d + 0.2 * torch.eye(d, dtype=F64)


def random_mixture(seed=0, d=3, k=3):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(k, generator=g, dtype=F64) + 0.2
    return GaussianMixture(w, 2 * torch.randn(k, d, generator=g, dtype=F64), random_spd(d, g, k))


def scipy_logpdf(mix, x, t=1.0):
    """log p_t(x) of Σ_k w_k N(t m_k, t² S_k + (1−t)² I) with scipy, as an independent reference."""
    eye = np.eye(mix.dim)
    comps = [np.log(w) + multivariate_normal(t * m, t ** 2 * S + (1 - t) ** 2 * eye).logpdf(x.numpy())
             for w, m, S in zip(mix.weights.numpy(), mix.means.numpy(), mix.covs.numpy())]
    return torch.as_tensor(np.logaddexp.reduce(np.stack(comps), axis=0)).reshape(-1)


def mixture_moments(weights, means, covs):
    mean = torch.einsum("...k,...kd->...d", weights, means)
    second = torch.einsum("...k,...kij->...ij", weights, covs + means[..., :, None] * means[..., None, :])
    return mean, second - mean[..., :, None] * mean[..., None, :]


def reward(x, A, y, sigma, lam):
    A, y = torch.as_tensor(A, dtype=F64), torch.as_tensor(y, dtype=F64)
    return -lam * ((y - x @ A.T) ** 2).sum(-1) / (2 * sigma ** 2)


# ---------------------------------------------------------------------------------------------- construction
def test_validation_names_the_argument():
    eye = torch.eye(2, dtype=F64)[None]
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture([-1.0], [[0.0, 0.0]], eye)
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture([0.0], [[0.0, 0.0]], eye)
    with pytest.raises(ValueError, match="means"):
        GaussianMixture([1.0], [[0.0, 0.0], [1.0, 1.0]], eye)
    with pytest.raises(ValueError, match="covs"):
        GaussianMixture([1.0], [[0.0, 0.0]], torch.tensor([[[1.0, 0.0], [0.0, -1.0]]]))
    with pytest.raises(ValueError, match="covs"):
        GaussianMixture([1.0], [[0.0, 0.0]], torch.tensor([[[1.0, 0.5], [0.0, 1.0]]]))
    with pytest.raises(ValueError, match="means"):
        GaussianMixture([1.0], [[float("nan"), 0.0]], eye)
    mix = paper_gmm()
    with pytest.raises(ValueError, match="t"):
        mix.drift(1.5, torch.zeros(2, 2, dtype=F64))
    with pytest.raises(ValueError, match="x"):
        mix.drift(0.5, torch.zeros(2, 3, dtype=F64))
    with pytest.raises(ValueError, match="sigma"):
        mix.value(0.5, torch.zeros(2, 2, dtype=F64), **{**PAPER_REWARD, "sigma": 0.0})
    with pytest.raises(ValueError, match="A"):
        mix.tilt([[1.0, 2.0, 3.0]], [0.0], 1.0)


def test_paper_gmm_and_weights_normalised():
    mix = paper_gmm()
    assert (mix.n_components, mix.dim, mix.dtype) == (3, 2, F64)
    torch.testing.assert_close(mix.weights, torch.full((3,), 1 / 3, dtype=F64))
    torch.testing.assert_close(mix.means, torch.tensor([[-3.0, -3.0], [0.0, 0.0], [3.0, 3.0]], dtype=F64))
    torch.testing.assert_close(mix.covs, 0.5 * torch.eye(2, dtype=F64).expand(3, 2, 2))
    assert PAPER_REWARD == {"A": [[1.2, -0.8]], "y": [-1.0], "sigma": 0.2, "lam": 1.0}
    mix2 = GaussianMixture([2.0, 6.0], [[0.0], [1.0]], [[[1.0]], [[2.0]]])
    torch.testing.assert_close(mix2.weights, torch.tensor([0.25, 0.75], dtype=F64))
    f32 = mix2.to(dtype=torch.float32)
    assert f32.dtype == torch.float32 and f32.weights.dtype == torch.float32


def test_log_prob_and_marginal_match_scipy():
    mix = random_mixture(1)
    x = 2 * torch.randn(64, 3, dtype=F64)
    torch.testing.assert_close(mix.log_prob(x), scipy_logpdf(mix, x), rtol=1e-10, atol=1e-10)
    for t in (0.0, 0.37, 1.0):
        ref = scipy_logpdf(mix, x, t)
        torch.testing.assert_close(mix.log_prob_t(t, x), ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(mix.marginal(t).log_prob(x), ref, rtol=1e-10, atol=1e-10)
    t = torch.rand(64, dtype=F64)
    per_row = torch.stack([scipy_logpdf(mix, x[i:i + 1], float(t[i]))[0] for i in range(0, 64, 8)])
    torch.testing.assert_close(mix.log_prob_t(t, x)[::8], per_row, rtol=1e-10, atol=1e-10)


def test_sample_moments():
    mix = random_mixture(2)
    n = 40000
    xs = mix.sample(n, generator=torch.Generator().manual_seed(0))
    mean, cov = mixture_moments(mix.weights, mix.means, mix.covs)
    se = (torch.diagonal(cov) / n).sqrt()
    assert ((xs.mean(0) - mean).abs() < 5 * se).all()
    emp = torch.cov(xs.T)
    # sd of an empirical covariance entry ≈ √((Σ_ii Σ_jj + Σ_ij²)/n) (Gaussian approximation; the mixture's fourth
    # moments are bounded by a small multiple of it here)
    sd = ((torch.diagonal(cov)[:, None] * torch.diagonal(cov)[None] + cov ** 2) / n).sqrt()
    assert ((emp - cov).abs() < 8 * sd).all()


# ---------------------------------------------------------------------------------------------- drift, score
@pytest.mark.parametrize("seed", [0, 1])
def test_score_drift_denoiser_identities(seed):
    mix = random_mixture(seed)
    x = 2 * torch.randn(32, 3, dtype=F64)
    t = torch.rand(32, dtype=F64).clamp(0.02, 0.98)
    xr = x.clone().requires_grad_(True)
    (auto_score,) = torch.autograd.grad(mix.log_prob_t(t, xr).sum(), xr)
    torch.testing.assert_close(mix.score(t, x), auto_score, rtol=1e-9, atol=1e-10)
    b = mix.drift(t, x)
    # ∇log p_t = (t·b − x)/(1−t) ties the drift to the density
    torch.testing.assert_close((t[:, None] * b - x) / (1 - t[:, None]), auto_score, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(mix.denoiser(t, x), x + (1 - t[:, None]) * b, rtol=1e-12, atol=1e-12)
    # endpoints: b_0(x) = E[I1] − x, b_1(x) = x
    mean, _ = mixture_moments(mix.weights, mix.means, mix.covs)
    torch.testing.assert_close(mix.drift(0.0, x), mean - x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mix.drift(1.0, x), x, rtol=1e-12, atol=1e-12)


def test_drift_monte_carlo_on_paper_gmm():
    # E[I1 − I0 | I_t = x] by self-normalised importance weighting of prior draws of I1 with weights N(x; t·I1,
    # (1−t)²I); the noise is I0 = (x − t·I1)/(1−t)
    mix = paper_gmm()
    t = 0.6
    x = torch.tensor([[1.0, 0.5], [-2.0, -1.5]], dtype=F64)
    x1 = mix.sample(200000, generator=torch.Generator().manual_seed(3))
    logw = -((x[:, None] - t * x1) ** 2).sum(-1) / (2 * (1 - t) ** 2)
    w = logw.softmax(-1)  # (2, n)
    x0 = (x[:, None] - t * x1) / (1 - t)
    mc = torch.einsum("bn,bnd->bd", w, x1 - x0)
    ess = 1 / (w ** 2).sum(-1)
    assert (ess > 1000).all()
    tol = 6 * (2 / (1 - t)) / ess.sqrt()  # |I1 − I0| spread ≲ 2/(1−t) near these points
    assert ((mc - mix.drift(t, x)).abs() < tol[:, None]).all()


# ---------------------------------------------------------------------------------------------- posterior
def test_posterior_density_is_bayes():
    mix = random_mixture(3)
    B, n = 6, 10
    x = 2 * torch.randn(B, 3, dtype=F64)
    t = torch.rand(B, dtype=F64).clamp(0.05, 0.95)
    x1 = 2 * torch.randn(B, n, 3, dtype=F64)
    post = mix.posterior(t, x)
    lik = -((x[:, None] - t[:, None, None] * x1) ** 2).sum(-1) / (2 * (1 - t[:, None]) ** 2) \
        - 3 * torch.log(math.sqrt(2 * math.pi) * (1 - t[:, None]))
    bayes = mix.log_prob(x1.reshape(-1, 3)).view(B, n) + lik - mix.log_prob_t(t, x)[:, None]
    torch.testing.assert_close(post.log_prob(x1), bayes, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(post.mean(), mix.posterior_mean(t, x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(post.scales @ post.scales.mT, post.covs, rtol=1e-10, atol=1e-12)


def test_posterior_samples_moments():
    mix = random_mixture(4)
    x = 2 * torch.randn(3, 3, dtype=F64)
    t = torch.tensor([0.0, 0.5, 0.9], dtype=F64)
    n = 30000
    xs = mix.posterior_sample(t, x, n, generator=torch.Generator().manual_seed(1))
    assert xs.shape == (3, n, 3)
    post = mix.posterior(t, x)
    mean, cov = mixture_moments(post.weights, post.means, post.covs)
    torch.testing.assert_close(mean, mix.posterior_mean(t, x))
    for b in range(3):
        se = (torch.diagonal(cov[b]) / n).sqrt()
        assert ((xs[b].mean(0) - mean[b]).abs() < 5 * se).all()
        sd = ((torch.diagonal(cov[b])[:, None] * torch.diagonal(cov[b])[None] + cov[b] ** 2) / n).sqrt()
        assert ((torch.cov(xs[b].T) - cov[b]).abs() < 8 * sd).all()


def test_posterior_at_t_one_is_a_point_mass():
    mix = random_mixture(5)
    x = torch.randn(4, 3, dtype=F64)
    xs = mix.posterior_sample(1.0, x, 5)
    torch.testing.assert_close(xs, x[:, None].expand(4, 5, 3), rtol=0, atol=1e-12)


def test_posterior_sample_differentiable_in_x():
    mix = paper_gmm()
    x = torch.randn(2, 2, dtype=F64, requires_grad=True)
    xs = mix.posterior_sample(0.5, x, 4, generator=torch.Generator().manual_seed(0))
    (g,) = torch.autograd.grad(xs.sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- GLASS oracle
def test_glass_oracle_limits():
    mix = random_mixture(6)
    B = 16
    x, xbar = 2 * torch.randn(B, 3, dtype=F64), 2 * torch.randn(B, 3, dtype=F64)
    s, t = torch.rand(B, dtype=F64), torch.rand(B, dtype=F64)
    # t = 0: the context is pure noise, the conditional drift is the unconditional one at (s, x̄)
    torch.testing.assert_close(mix.glass_drift(s, xbar, 0.0, x), mix.drift(s, xbar), rtol=1e-10, atol=1e-10)
    # s = 0: x̄ = Ī0 is observed exactly and independent of (I1, I_t): E[I1 | I_t] − x̄
    torch.testing.assert_close(mix.glass_drift(0.0, xbar, t, x), mix.posterior_mean(t, x) - xbar,
                               rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------- reward tilt, value
def test_tilt_density_ratio_is_constant():
    mix = random_mixture(7)
    A = torch.randn(2, 3, dtype=F64)
    y = torch.randn(2, dtype=F64)
    tilted = mix.tilt(A, y, sigma=0.7, lam=1.5)
    x = 2 * torch.randn(50, 3, dtype=F64)
    ratio = tilted.log_prob(x) - mix.log_prob(x) - reward(x, A, y, 0.7, 1.5)
    assert float(ratio.std()) < 1e-10
    # the normaliser is log Z = log E_p1[exp(λr)] = V_0 (the t = 0 context carries no information)
    torch.testing.assert_close(-ratio.mean(), mix.value(0.0, x[:1], A, y, 0.7, 1.5)[0], rtol=1e-10, atol=1e-10)


def test_value_matches_monte_carlo():
    mix = paper_gmm()
    R = {**PAPER_REWARD, "sigma": 1.0}  # a broad reward keeps the Monte-Carlo error small
    x = torch.tensor([[1.0, -0.5], [-2.0, -2.5], [0.3, 0.2]], dtype=F64)
    t = torch.tensor([0.3, 0.6, 0.9], dtype=F64)
    n = 40000
    xs = mix.posterior_sample(t, x, n, generator=torch.Generator().manual_seed(2))
    e = reward(xs, **R).exp()  # (B, n)
    mc = e.mean(1).log()
    se = e.std(1) / math.sqrt(n) / e.mean(1)  # delta method for the log
    v = mix.value(t, x, **R)
    assert ((mc - v).abs() < 5 * se).all(), (mc, v, se)


def test_value_grad_matches_finite_differences():
    mix = random_mixture(8)
    A, y = torch.randn(1, 3, dtype=F64), torch.randn(1, dtype=F64)
    x = torch.randn(5, 3, dtype=F64)
    t = torch.rand(5, dtype=F64).clamp(0.1, 0.9)
    g = mix.value_grad(t, x, A, y, 0.5, 2.0)
    h = 1e-5
    fd = torch.stack([(mix.value(t, x + h * e, A, y, 0.5, 2.0) - mix.value(t, x - h * e, A, y, 0.5, 2.0)) / (2 * h)
                      for e in torch.eye(3, dtype=F64)], -1)
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-7)


def test_value_at_t_one_is_the_reward():
    mix = paper_gmm()
    x = torch.randn(8, 2, dtype=F64)
    torch.testing.assert_close(mix.value(1 - 1e-7, x, **PAPER_REWARD), reward(x, **PAPER_REWARD),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mix.value(1.0, x, **PAPER_REWARD), reward(x, **PAPER_REWARD), rtol=1e-10,
                               atol=1e-10)


def test_tilted_drift_is_doob():
    # b*_t = b_t + ((1−t)/t)·∇V_t (METHOD §3), against the drift of the exactly tilted mixture
    mix = paper_gmm()
    x = 2 * torch.randn(10, 2, dtype=F64)
    t = torch.rand(10, dtype=F64).clamp(0.05, 0.95)
    doob = mix.drift(t, x) + ((1 - t) / t)[:, None] * mix.value_grad(t, x, **PAPER_REWARD)
    torch.testing.assert_close(mix.tilted_drift(t, x, **PAPER_REWARD), doob, rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------------------------------------- ExactGaussianMFM
@pytest.fixture
def gauss():
    g = torch.Generator().manual_seed(11)
    return ExactGaussianMFM(torch.randn(3, generator=g, dtype=F64), random_spd(3, g))


def sqrtm(m):
    evals, evecs = torch.linalg.eigh(m)
    return evecs @ torch.diag_embed(evals.clamp_min(0).sqrt()) @ evecs.mT


def reference_flow_map(model, s, u, xbar, t, x):
    """X_{s,u} = u·μ + C̄_u^{1/2}·C̄_s^{−1/2}·(x̄ − s·μ) from the oracle's posterior, with generic matrix roots."""
    post = model.data.posterior(t, x)
    mu, sig = post.means[:, 0], post.covs[:, 0]
    eye = torch.eye(3, dtype=F64)
    cbar = lambda r: (1 - r[:, None, None]) ** 2 * eye + r[:, None, None] ** 2 * sig  # noqa: E731
    m = sqrtm(cbar(u)) @ torch.linalg.inv(sqrtm(cbar(s)))
    return u[:, None] * mu + (m @ (xbar - s[:, None] * mu)[..., None])[..., 0]


def test_exact_mfm_matches_matrix_formula(gauss):
    B = 12
    s, u, t = torch.rand(B, dtype=F64), torch.rand(B, dtype=F64), torch.rand(B, dtype=F64)
    xbar, x = torch.randn(B, 3, dtype=F64), 2 * torch.randn(B, 3, dtype=F64)
    torch.testing.assert_close(gauss.flow_map(s, u, xbar, t, x), reference_flow_map(gauss, s, u, xbar, t, x),
                               rtol=1e-10, atol=1e-10)
    assert gauss.event_shape == (3,) and gauss.supports_particle_groups


def test_exact_mfm_one_step_posterior(gauss):
    B = 3
    t = torch.tensor([0.0, 0.4, 0.95], dtype=F64)
    x = 2 * torch.randn(B, 3, dtype=F64)
    post = gauss.data.posterior(t, x)
    mu, sig = post.means[:, 0], post.covs[:, 0]
    zeros, ones = torch.zeros(B, dtype=F64), torch.ones(B, dtype=F64)
    # X_{0,1}(ε) is affine in ε: μ at ε = 0 and Jacobian J with J·Jᵀ = Σ, exactly
    torch.testing.assert_close(gauss.flow_map(zeros, ones, torch.zeros(B, 3, dtype=F64), t, x), mu)
    basis = torch.eye(3, dtype=F64).repeat(B, 1)  # particle groups: the 3 basis vectors per context row
    jac = (gauss.flow_map(zeros, ones, basis, t, x).view(B, 3, 3) - mu[:, None]).mT  # columns X(e_i) − X(0)
    torch.testing.assert_close(jac @ jac.mT, sig, rtol=1e-10, atol=1e-12)
    n = 20000
    eps = torch.randn(B * n, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    xs = gauss.flow_map(zeros, ones, eps, t, x).view(B, n, 3)  # particle groups: n per context row
    for b in range(B):
        se = (torch.diagonal(sig[b]) / n).sqrt()
        assert ((xs[b].mean(0) - mu[b]).abs() < 5 * se).all()
        sd = ((torch.diagonal(sig[b])[:, None] * torch.diagonal(sig[b])[None] + sig[b] ** 2) / n).sqrt()
        assert ((torch.cov(xs[b].T) - sig[b]).abs() < 6 * sd).all()


def test_exact_mfm_semigroup(gauss):
    B = 10
    a, _ = torch.rand(B, 3, dtype=F64).sort(-1)
    s, w, u = a.unbind(-1)
    t, x, xbar = torch.rand(B, dtype=F64), 2 * torch.randn(B, 3, dtype=F64), torch.randn(B, 3, dtype=F64)
    two = gauss.flow_map(w, u, gauss.flow_map(s, w, xbar, t, x), t, x)
    torch.testing.assert_close(two, gauss.flow_map(s, u, xbar, t, x), rtol=1e-10, atol=1e-10)
    # backwards maps invert forwards ones
    torch.testing.assert_close(gauss.flow_map(u, s, gauss.flow_map(s, u, xbar, t, x), t, x), xbar,
                               rtol=1e-10, atol=1e-10)


def test_exact_mfm_diagonal_is_glass_drift(gauss):
    B = 10
    s, t = torch.rand(B, dtype=F64), torch.rand(B, dtype=F64)
    x, xbar = 2 * torch.randn(B, 3, dtype=F64), torch.randn(B, 3, dtype=F64)
    torch.testing.assert_close(gauss(s, s, xbar, t, x), gauss.data.glass_drift(s, xbar, t, x), rtol=1e-9, atol=1e-9)
    # t = 0 context: the unconditional drift
    torch.testing.assert_close(gauss(s, s, xbar, 0.0, torch.zeros_like(x)), gauss.data.drift(s, xbar),
                               rtol=1e-10, atol=1e-10)


def test_exact_mfm_continuous_as_u_to_s(gauss):
    B = 6
    s, t = torch.rand(B, dtype=F64) * 0.9, torch.rand(B, dtype=F64)
    x, xbar = 2 * torch.randn(B, 3, dtype=F64), torch.randn(B, 3, dtype=F64)
    v0 = gauss(s, s, xbar, t, x)
    slope = (gauss(s, s + 1e-2, xbar, t, x) - v0).abs().max() / 1e-2  # v is smooth in u: gaps shrink like δ
    for delta in (1e-4, 1e-7, 1e-10, 1e-13):
        gap = (gauss(s, s + delta, xbar, t, x) - v0).abs().max()
        assert gap <= 2 * delta * slope + 1e-13, (delta, gap)


def test_exact_mfm_particle_groups_equal_repeated_rows(gauss):
    G, N = 3, 4
    s, u, t = torch.rand(G, dtype=F64), torch.rand(G, dtype=F64), torch.rand(G, dtype=F64)
    x, xbar = torch.randn(G, 3, dtype=F64), torch.randn(G * N, 3, dtype=F64)
    rep = lambda a: a.repeat_interleave(N, 0)  # noqa: E731
    torch.testing.assert_close(gauss(s, u, xbar, t, x), gauss(rep(s), rep(u), xbar, rep(t), rep(x)),
                               rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="xbar"):
        gauss(s, u, xbar[:-1], t, x)
    with pytest.raises(ValueError, match="t"):
        gauss(s, u, xbar, t + 2, x)


def test_exact_mfm_at_full_information(gauss):
    # t = 1: the posterior is the point mass at x, X_{s,u}(x̄) = u·x + (1−u)/(1−s)·(x̄ − s·x)
    B = 5
    s, u = torch.rand(B, dtype=F64) * 0.9, torch.rand(B, dtype=F64)
    x, xbar = torch.randn(B, 3, dtype=F64), torch.randn(B, 3, dtype=F64)
    ref = u[:, None] * x + ((1 - u) / (1 - s))[:, None] * (xbar - s[:, None] * x)
    torch.testing.assert_close(gauss.flow_map(s, u, xbar, 1.0, x), ref, rtol=1e-10, atol=1e-10)
    assert torch.isfinite(gauss(1.0, 1.0, x, 1.0, x)).all()


def test_load_digits():
    images, labels = load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (1797,) and set(labels.tolist()) == set(range(10))
    assert float(images.min()) == -1.0 and float(images.max()) == 1.0
