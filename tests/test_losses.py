"""Losses against the exact meta flow map of Gaussian data (mfm_fast.data.ExactGaussianMFM).

On the exact model every zero-variance consistency residual (LSD, semigroup, ESD with the exact teacher, the GLASS
diagonal) vanishes to rounding error, while a perturbed model gives a clearly positive loss. The data-target losses
(diagonal, MeanFlow) have noisy targets: there the exact model is a stationary point — the derivative of the loss
along a perturbation is zero within its Monte-Carlo error — and perturbations in either direction increase the loss.
"""
import math

import pytest
import torch
import torch.nn as nn

from mfm_fast import losses as L
from mfm_fast.data import ExactGaussianMFM

D = 3


def _spd(d, gen):
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return a @ a.T / d + 0.3 * torch.eye(d, dtype=torch.float64)


@pytest.fixture(scope="module")
def setup():
    gen = torch.Generator().manual_seed(123)
    mean = torch.randn(D, generator=gen, dtype=torch.float64)
    cov = _spd(D, gen)
    exact = ExactGaussianMFM(mean, cov)
    chol = torch.linalg.cholesky(cov)

    def sample(n, g):
        return mean + torch.randn(n, D, generator=g, dtype=torch.float64) @ chol.T

    return exact, sample


class Perturbed(nn.Module):
    """v + eps·direction(s, u, x̄); eps is a parameter so the loss can be differentiated along the perturbation."""

    def __init__(self, base, eps=0.0, kind="xbar"):
        super().__init__()
        self.base, self.kind = base, kind
        self.eps = nn.Parameter(torch.tensor(float(eps), dtype=torch.float64))

    def forward(self, s, u, xbar, t, x, **cond):
        v = self.base(s, u, xbar, t, x, **cond)
        if self.kind == "xbar":
            return v + self.eps * xbar
        # a time-dependent off-diagonal error: zero on the diagonal u = s
        return v * (1 + self.eps * (u - s)[:, None])


class ImageView(nn.Module):
    """The exact model on (B, 1, 1, D) 'images': checks that the losses handle image-shaped states."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, s, u, xbar, t, x, **cond):
        return self.base(s, u, xbar.flatten(1), t, x.flatten(1)).view_as(xbar)


def _draws(B, seed, **kw):
    return L.draw(B, (D,), torch.Generator().manual_seed(seed), dtype=torch.float64, **kw)


def _x1(sample, B, seed):
    return sample(B, torch.Generator().manual_seed(seed + 1))


def _teacher(exact):
    gmm = exact.data
    return lambda t, x: gmm.drift(t, x)


ZERO_VAR = {
    "lsd": lambda m, ex, x1, dr: L.lsd_loss(m, x1, dr),
    "semigroup": lambda m, ex, x1, dr: L.semigroup_loss(m, x1, dr),
    "esd": lambda m, ex, x1, dr: L.esd_teacher_loss(m, _teacher(ex), x1, dr),
    "distill": lambda m, ex, x1, dr: L.distill_diagonal_loss(m, _teacher(ex), x1, dr),
}


@pytest.mark.parametrize("name", sorted(ZERO_VAR))
def test_zero_variance_losses_vanish_on_exact_model(setup, name):
    exact, sample = setup
    B = 512
    x1, dr = _x1(sample, B, 0), _draws(B, 0)
    assert float((dr.times.t == 0).double().mean()) > 0.03  # uninformative contexts are exercised
    loss, logs = ZERO_VAR[name](exact, exact, x1, dr)
    assert float(loss) < 1e-18, (name, float(loss))
    kinds = ("xbar",) if name == "distill" else ("xbar", "offdiag")
    for kind in kinds:
        bad, _ = ZERO_VAR[name](Perturbed(exact, 0.3, kind), exact, x1, dr)
        assert float(bad.detach()) > 1e-4, (name, kind, float(bad.detach()))


def test_semigroup_shortcut_gamma_half(setup):
    exact, sample = setup
    x1, dr = _x1(sample, 256, 1), _draws(256, 1, gamma=0.5)
    assert torch.all(dr.times.gamma == 0.5)
    assert float(L.semigroup_loss(exact, x1, dr)[0]) < 1e-18
    assert float(L.semigroup_loss(Perturbed(exact, 0.3, "offdiag"), x1, dr)[0].detach()) > 1e-4


@pytest.mark.parametrize("name", ["lsd", "esd"])
def test_image_shaped_states(setup, name):
    exact, sample = setup
    B = 128
    x1 = _x1(sample, B, 2).view(B, 1, 1, D)
    dr = L.draw(B, (1, 1, D), torch.Generator().manual_seed(2), dtype=torch.float64)
    img = ImageView(exact)
    teacher = lambda t, x: exact.data.drift(t, x.flatten(1)).view_as(x)  # noqa: E731
    fn = (lambda m: L.lsd_loss(m, x1, dr)) if name == "lsd" else (lambda m: L.esd_teacher_loss(m, teacher, x1, dr))
    assert float(fn(img)[0]) < 1e-18
    assert float(fn(ImageView(Perturbed(exact, 0.3)))[0].detach()) > 1e-4


def _grad_stats(loss_fn, exact, sample, eps, kind, chunks=16, B=2048):
    """Derivative of the loss along the perturbation at eps, per independent chunk: (mean, standard error)."""
    grads = []
    for c in range(chunks):
        m = Perturbed(exact, eps, kind)
        loss, _ = loss_fn(m, _x1(sample, B, 100 + c), _draws(B, 100 + c))
        (g,) = torch.autograd.grad(loss, m.eps)
        grads.append(float(g))
    g = torch.tensor(grads, dtype=torch.float64)
    return float(g.mean()), float(g.std() / math.sqrt(chunks))


NOISY = {
    "diagonal": lambda m, x1, dr: L.diagonal_loss(m, x1, dr),
    "meanflow": lambda m, x1, dr: L.meanflow_loss(m, x1, dr),
}


@pytest.mark.parametrize("name", sorted(NOISY))
def test_noisy_target_losses_are_stationary_at_exact_model(setup, name):
    exact, sample = setup
    fn = NOISY[name]
    kinds = ("xbar",) if name == "diagonal" else ("xbar", "offdiag")
    for kind in kinds:
        mean0, se0 = _grad_stats(fn, exact, sample, 0.0, kind)
        assert abs(mean0) < 4 * se0 + 1e-12, (name, kind, mean0, se0)
        mean1, se1 = _grad_stats(fn, exact, sample, 0.3, kind, chunks=4)
        assert mean1 > 10 * se1 and mean1 > 20 * se0, (name, kind, mean1, se1, se0)
    # the same draws: the exact model has the lowest loss among ± perturbations
    x1, dr = _x1(sample, 8192, 7), _draws(8192, 7)
    base = float(fn(exact, x1, dr)[0])
    for eps in (-0.1, 0.1):
        assert float(fn(Perturbed(exact, eps, kinds[-1]), x1, dr)[0].detach()) > base


def test_adaptive_weighting_formula():
    gen = torch.Generator().manual_seed(3)
    delta = torch.randn(64, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    loss, mse = L.weighted_mse(delta, adaptive_p=0.5, c=0.01)
    sq = delta.detach().pow(2).flatten(1).mean(1)
    w = (sq + 0.01) ** -0.5
    torch.testing.assert_close(loss, (w * sq).mean())
    torch.testing.assert_close(mse, sq.mean())
    (g,) = torch.autograd.grad(loss, delta)  # the weight is stop-gradient
    torch.testing.assert_close(g, (w / 64)[:, None, None] * 2 * delta.detach() / 6)
    plain, _ = L.weighted_mse(delta, None)
    torch.testing.assert_close(plain, sq.mean())


def test_sample_times_distribution():
    tm = L.sample_times(20000, torch.Generator().manual_seed(4), t_zero_prob=0.1)
    frac0 = float((tm.t == 0).float().mean())
    assert abs(frac0 - 0.1) < 0.01
    pos = tm.t[tm.t > 0]
    # t = U²: P(t ≤ 1/4) = 1/2 among the informative contexts
    assert abs(float((pos <= 0.25).float().mean()) - 0.5) < 0.02
    assert torch.all(tm.s <= tm.u) and torch.all((tm.w >= tm.s) & (tm.w <= tm.u))
    assert abs(float(tm.s_diag.mean()) - 0.5) < 0.01 and abs(float(tm.u.mean()) - 2 / 3) < 0.01
    with pytest.raises(ValueError, match="t_zero_prob"):
        L.sample_times(4, t_zero_prob=1.5)
    with pytest.raises(ValueError, match="gamma"):
        L.sample_times(4, gamma=2.0)


class Recorder(nn.Module):
    """Records the labels it is called with; has a null class like MFMDiT."""

    class config:
        num_classes = 10

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))
        self.seen = []

    def forward(self, s, u, xbar, t, x, y=None):
        self.seen.append(y)
        return self.w * xbar


def test_mfm_loss_combines_terms_and_drops_labels(setup):
    exact, sample = setup
    B = 64
    x1, dr = _x1(sample, B, 5), _draws(B, 5, p_uncond=0.5)
    total, logs = L.mfm_loss(exact, x1, "lsd", draws=dr, n_consistency=16, adaptive=False)
    d, _ = L.diagonal_loss(exact, x1[:48], dr[:48])
    c, _ = L.lsd_loss(exact, x1[48:], dr[48:])
    torch.testing.assert_close(total, (d + c).float() if total.dtype == torch.float32 else d + c)
    assert set(logs) == {"diag", "cons", "loss"}

    rec = Recorder()
    y = torch.randint(0, 10, (B,), generator=torch.Generator().manual_seed(6))
    L.mfm_loss(rec, x1.float(), "semigroup", draws=dr.to(dtype=torch.float32), n_consistency=16, y=y)
    expect = torch.where(dr.drop_label, torch.full_like(y, 10), y)
    assert 0 < int(dr.drop_label.sum()) < B
    assert torch.equal(rec.seen[0], expect[:48])  # the diagonal rows
    assert all(torch.equal(seen, expect[48:]) for seen in rec.seen[1:])


def test_mfm_loss_bad_inputs(setup):
    exact, sample = setup
    x1 = _x1(sample, 8, 0)
    with pytest.raises(ValueError, match="consistency"):
        L.mfm_loss(exact, x1, "eulerian")
    with pytest.raises(ValueError, match="teacher_drift"):
        L.mfm_loss(exact, x1, "esd")
    with pytest.raises(ValueError, match="n_consistency"):
        L.mfm_loss(exact, x1, n_consistency=9)
    with pytest.raises(ValueError, match="draws"):
        L.diagonal_loss(exact, x1, _draws(4, 0))
    with pytest.raises(TypeError, match="teacher_drift"):
        L.esd_teacher_loss(exact, "not a function", x1, _draws(8, 0))
