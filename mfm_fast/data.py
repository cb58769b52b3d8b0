"""Exact oracles and small data sets.

`GaussianMixture` answers every question of METHOD §1–§3 in closed form for Gaussian-mixture data under the linear
interpolant I_t = (1−t)·I0 + t·I1, I0 ~ N(0, I): marginals, drift, score, denoiser, the posterior p(x1 | x_t), the
GLASS conditional drift, reward tilts, the value V_t and its gradient. `ExactGaussianMFM` is the exact meta flow map
of one Gaussian. Both serve as test oracles and as reference "models" for the samplers.

Each covariance is diagonalised once (S_k = V_k·diag(σ_k)·V_kᵀ). Every matrix in the interpolant algebra of one
component — C_k(t) = t²S_k + (1−t)²I, its inverse, the posterior covariance (1−t)²S_kC_k(t)⁻¹ — is a function of
S_k and shares that eigenbasis, so all of them are diagonal there and nothing is inverted per query.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from einops import rearrange

from ._checks import as_time, check_finite_scalar, check_positive_int, check_state, n_per_group

_LOG_2PI = math.log(2 * math.pi)


def _as_tensor(name: str, value, dtype, device) -> torch.Tensor:
    try:
        out = torch.as_tensor(value, dtype=dtype, device=device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be convertible to a {dtype} tensor: {err}") from None
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name} must be finite")
    return out


def _eigh_spd(name: str, covs: torch.Tensor):
    """Eigendecomposition of a batch of SPD matrices (in float64 for accuracy), with an error naming `name`."""
    scale = covs.abs().amax().clamp_min(torch.finfo(covs.dtype).tiny)
    if float((covs - covs.mT).abs().amax() / scale) > 1e-5:
        raise ValueError(f"{name} must be symmetric")
    sym = 0.5 * (covs + covs.mT)
    evals, evecs = torch.linalg.eigh(sym.double())
    if bool((evals <= 0).any()):
        k = int((evals <= 0).any(-1).nonzero()[0])
        raise ValueError(f"{name} must be positive definite; component {k} has eigenvalue {evals[k].min().item():.3g}")
    return sym, evals.to(covs.dtype), evecs.to(covs.dtype)


def _rot(evecs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """V_kᵀ·v for v (..., K, d): coordinates in each component's eigenbasis."""
    return torch.einsum("kij,...ki->...kj", evecs, v)


def _unrot(evecs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """V_k·z for z (..., K, d)."""
    return torch.einsum("kij,...kj->...ki", evecs, z)


def _reward_args(A, y, sigma, lam, d: int, dtype, device):
    A = _as_tensor("A", A, dtype, device)
    y = _as_tensor("y", y, dtype, device)
    if A.dim() != 2 or A.shape[1] != d:
        raise ValueError(f"A must have shape (m, {d}), got {tuple(A.shape)}")
    if y.shape != (A.shape[0],):
        raise ValueError(f"y must have shape ({A.shape[0]},) to match A, got {tuple(y.shape)}")
    sigma = check_finite_scalar("sigma", sigma)
    lam = check_finite_scalar("lam", lam)
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if lam <= 0:
        raise ValueError(f"lam must be positive, got {lam}")
    # exp(λ·r(x)) = exp(−‖y − A·x‖²/(2·σ²/λ)): a Gaussian likelihood with noise variance σ²/λ
    return A, y, sigma ** 2 / lam


def _gauss_logpdf_chol(r: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """log N(r; 0, cov) for r (..., m), cov (..., m, m)."""
    L = torch.linalg.cholesky(cov)
    sol = torch.linalg.solve_triangular(L, r.unsqueeze(-1), upper=False).squeeze(-1)
    logdet = 2 * torch.diagonal(L, dim1=-2, dim2=-1).log().sum(-1)
    return -0.5 * (sol.pow(2).sum(-1) + logdet + r.shape[-1] * _LOG_2PI)


@dataclass
class PosteriorMixture:
    """A batch of Gaussian mixtures, one per row: weights (B, K), means (B, K, d), covs (B, K, d, d).

    `scales` (B, K, d, d), when given, satisfies scales·scalesᵀ = covs and is used for sampling (it exists even when
    a covariance is singular, e.g. the point mass at t = 1)."""

    weights: torch.Tensor
    means: torch.Tensor
    covs: torch.Tensor
    scales: Optional[torch.Tensor] = None

    def mean(self) -> torch.Tensor:
        """(B, d) mixture means."""
        return torch.einsum("bk,bkd->bd", self.weights, self.means)

    def _scales(self) -> torch.Tensor:
        if self.scales is None:
            evals, evecs = torch.linalg.eigh(self.covs)
            self.scales = evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)
        return self.scales

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(B, n, d) samples; differentiable in the component means (reparameterised), the component draw is not."""
        check_positive_int("n", n)
        B, K, d = self.means.shape
        idx = torch.multinomial(self.weights.detach(), n, replacement=True, generator=generator)  # (B, n)
        eps = torch.randn((B, n, d), generator=generator, device=self.means.device, dtype=self.means.dtype)
        # scale every draw by every component and keep the drawn one: B·n·K·d memory instead of B·n·d·d
        noise = torch.einsum("bkij,bnj->bnki", self._scales(), eps)  # (B, n, K, d)
        pick = idx[:, :, None, None].expand(B, n, 1, d)
        noise = noise.gather(2, pick).squeeze(2)
        mu = self.means.gather(1, idx[:, :, None].expand(B, n, d))
        return mu + noise

    def log_prob(self, x1: torch.Tensor) -> torch.Tensor:
        """log density at x1 (B, n, d) -> (B, n); needs non-singular covariances (t < 1)."""
        B, K, d = self.means.shape
        if x1.dim() != 3 or x1.shape[0] != B or x1.shape[2] != d:
            raise ValueError(f"x1 must have shape ({B}, n, {d}), got {tuple(x1.shape)}")
        r = x1[:, :, None, :] - self.means[:, None]  # (B, n, K, d)
        ll = _gauss_logpdf_chol(r, self.covs[:, None].expand(B, x1.shape[1], K, d, d))
        return torch.logsumexp(ll + self.weights.log()[:, None, :], dim=-1)


class GaussianMixture:
    """Σ_k w_k·N(m_k, S_k) with full covariances, with the interpolant quantities of METHOD §1–§3 in closed form.

    Time arguments `t` (and `s`) may be python floats, 0-dim tensors or (B,) tensors; states `x` are (B, d).
    Results come back in x's dtype; the algebra runs in the mixture's dtype (float64 by default).
    """

    def __init__(self, weights, means, covs, dtype: torch.dtype = torch.float64, device="cpu"):
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        weights = _as_tensor("weights", weights, dtype, device)
        means = _as_tensor("means", means, dtype, device)
        covs = _as_tensor("covs", covs, dtype, device)
        if weights.dim() != 1 or weights.shape[0] < 1:
            raise ValueError(f"weights must have shape (K,) with K >= 1, got {tuple(weights.shape)}")
        K = weights.shape[0]
        if means.dim() != 2 or means.shape[0] != K or means.shape[1] < 1:
            raise ValueError(f"means must have shape ({K}, d) to match weights, got {tuple(means.shape)}")
        d = means.shape[1]
        if covs.shape != (K, d, d):
            raise ValueError(f"covs must have shape ({K}, {d}, {d}), got {tuple(covs.shape)}")
        if bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError("weights must be non-negative with a positive sum")
        self.weights = weights / weights.sum()
        self.means = means
        self.covs, self._evals, self._evecs = _eigh_spd("covs", covs)
        self._logw = self.weights.log()

    # ------------------------------------------------------------------ basics
    def rms(self) -> float:
        """√(E‖x‖²/d): the per-coordinate root mean square, e.g. MFMMLP's sigma_data for centred data."""
        second = (self.covs.diagonal(dim1=-2, dim2=-1).sum(-1) + self.means.pow(2).sum(-1)) * self.weights
        return float(second.sum() / self.dim) ** 0.5

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    @property
    def device(self) -> torch.device:
        return self.means.device

    def __repr__(self) -> str:
        return f"GaussianMixture(n_components={self.n_components}, dim={self.dim}, dtype={self.dtype})"

    def to(self, device=None, dtype=None) -> "GaussianMixture":
        return GaussianMixture(self.weights, self.means, self.covs, dtype=dtype or self.dtype,
                               device=device if device is not None else self.device)

    def _scales(self) -> torch.Tensor:
        return self._evecs * self._evals.sqrt().unsqueeze(-2)  # (K, d, d), scale·scaleᵀ = S_k

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(n, d) i.i.d. samples."""
        check_positive_int("n", n)
        post = PosteriorMixture(self.weights[None], self.means[None], self.covs[None], self._scales()[None])
        return post.sample(n, generator)[0]

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) log density of the data distribution p1."""
        return self.log_prob_t(1.0, x)

    def marginal(self, t) -> "GaussianMixture":
        """Law of I_t: Σ_k w_k·N(t·m_k, t²·S_k + (1−t)²·I)."""
        t = float(as_time("t", t, 1, self.means)[0])
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        return GaussianMixture(self.weights, t * self.means, t ** 2 * self.covs + (1 - t) ** 2 * eye,
                               dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------ per-component algebra
    def _prep(self, t, x: torch.Tensor, name: str = "x"):
        check_state(name, x, (self.dim,))
        if x.device != self.device:
            raise ValueError(f"{name} is on {x.device} but the mixture is on {self.device}")
        xd = x.to(self.dtype)
        return as_time("t", t, x.shape[0], xd), xd

    def _stats(self, t: torch.Tensor, x: torch.Tensor):
        """c = eigenvalues of C_k(t) (B, K, d); z = V_kᵀ(x − t·m_k) (B, K, d); log N(x; t·m_k, C_k(t)) (B, K)."""
        tt = t[:, None, None]
        c = tt ** 2 * self._evals + (1 - tt) ** 2
        z = _rot(self._evecs, x[:, None, :] - tt * self.means)
        ll = -0.5 * ((z ** 2 / c).sum(-1) + c.log().sum(-1) + self.dim * _LOG_2PI)
        return tt, c, z, ll

    def _mix(self, logpi: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bk,bkd->bd", logpi.softmax(-1), comp)

    def log_prob_t(self, t, x: torch.Tensor) -> torch.Tensor:
        """(B,) log p_t(x), the density of I_t."""
        t, xd = self._prep(t, x)
        _, _, _, ll = self._stats(t, xd)
        return torch.logsumexp(self._logw + ll, dim=-1).to(x.dtype)

    def drift(self, t, x: torch.Tensor) -> torch.Tensor:
        """b_t(x) = E[I1 − I0 | I_t = x]; per component m_k + (t·S_k − (1−t)·I)·C_k⁻¹·(x − t·m_k), valid on [0, 1]."""
        t, xd = self._prep(t, x)
        tt, c, z, ll = self._stats(t, xd)
        comp = self.means + _unrot(self._evecs, (tt * self._evals - (1 - tt)) / c * z)
        return self._mix(self._logw + ll, comp).to(x.dtype)

    def denoiser(self, t, x: torch.Tensor) -> torch.Tensor:
        """E[I1 | I_t = x]."""
        return self.posterior_mean(t, x)

    def score(self, t, x: torch.Tensor) -> torch.Tensor:
        """∇_x log p_t(x) = −Σ_k π_k·C_k⁻¹·(x − t·m_k)."""
        t, xd = self._prep(t, x)
        _, c, z, ll = self._stats(t, xd)
        return self._mix(self._logw + ll, _unrot(self._evecs, -z / c)).to(x.dtype)

    def posterior(self, t, x: torch.Tensor) -> PosteriorMixture:
        """p(x1 | I_t = x): per row a mixture with weights π_k ∝ w_k·N(x; t·m_k, C_k), means
        m_k + t·S_k·C_k⁻¹·(x − t·m_k) and covariances (1−t)²·S_k·C_k⁻¹ (= S_k − t²·S_k·C_k⁻¹·S_k)."""
        t, xd = self._prep(t, x)
        tt, c, z, ll = self._stats(t, xd)
        means = (self.means + _unrot(self._evecs, tt * self._evals / c * z)).to(x.dtype)
        var = (1 - tt) ** 2 * self._evals / c  # (B, K, d) eigenvalues of the posterior covariances
        covs = torch.einsum("kij,bkj,klj->bkil", self._evecs, var, self._evecs).to(x.dtype)
        scales = (self._evecs * var.sqrt().unsqueeze(-2)).to(x.dtype)
        return PosteriorMixture((self._logw + ll).softmax(-1).to(x.dtype), means, covs, scales)

    def posterior_sample(self, t, x: torch.Tensor, n: int, generator: Optional[torch.Generator] = None):
        """(B, n, d) exact samples of p(x1 | I_t = x)."""
        return self.posterior(t, x).sample(n, generator)

    def posterior_mean(self, t, x: torch.Tensor) -> torch.Tensor:
        """(B, d) E[I1 | I_t = x] = x + (1−t)·b_t(x)."""
        t, xd = self._prep(t, x)
        tt, c, z, ll = self._stats(t, xd)
        comp = self.means + _unrot(self._evecs, tt * self._evals / c * z)
        return self._mix(self._logw + ll, comp).to(x.dtype)

    # ------------------------------------------------------------------ GLASS oracle
    def glass_drift(self, s, xbar: torch.Tensor, t, x: torch.Tensor) -> torch.Tensor:
        """E[I1 − Ī0 | Ī_s = xbar, I_t = x] by Gaussian conditioning on both observations jointly.

        Ī_s = (1−s)·Ī0 + s·I1 and I_t = (1−t)·I0 + t·I1 are two noisy looks at the same I1 with independent noises;
        per component (Ī_s, I_t) is jointly Gaussian with a 2d×2d covariance, solved directly. This is the oracle
        the closed form of METHOD §2.2 (mfm_fast.glass.glass_drift) is tested against. Singular only at s = t = 1.
        """
        t, xd = self._prep(t, x)
        check_state("xbar", xbar, (self.dim,), batch=x.shape[0])
        xbd = xbar.to(self.dtype)
        s = as_time("s", s, x.shape[0], xd)
        d = self.dim
        S = self.covs
        eye = torch.eye(d, dtype=self.dtype, device=self.device)
        ss, tt = s[:, None, None, None], t[:, None, None, None]
        a11 = ss ** 2 * S + (1 - ss) ** 2 * eye
        a12 = ss * tt * S
        a22 = tt ** 2 * S + (1 - tt) ** 2 * eye
        joint = torch.cat([torch.cat([a11, a12], -1), torch.cat([a12, a22], -1)], -2)  # (B, K, 2d, 2d)
        # Cov(I1 − Ī0, Ī_s) = s·S − (1−s)·I and Cov(I1 − Ī0, I_t) = t·S
        cross = torch.cat([ss * S - (1 - ss) * eye, tt * S.expand_as(a12)], -1)  # (B, K, d, 2d)
        s1, t1 = s[:, None, None], t[:, None, None]
        r = torch.cat([xbd[:, None, :] - s1 * self.means, xd[:, None, :] - t1 * self.means], -1)  # (B, K, 2d)
        L = torch.linalg.cholesky(joint)
        alpha = torch.cholesky_solve(r.unsqueeze(-1), L)  # (B, K, 2d, 1)
        logdet = 2 * torch.diagonal(L, dim1=-2, dim2=-1).log().sum(-1)
        ll = -0.5 * ((r.unsqueeze(-1) * alpha).sum((-1, -2)) + logdet + 2 * d * _LOG_2PI)
        comp = self.means + (cross @ alpha).squeeze(-1)
        return self._mix(self._logw + ll, comp).to(x.dtype)

    # ------------------------------------------------------------------ linear-Gaussian reward
    def tilt(self, A, y, sigma, lam: float = 1.0) -> "GaussianMixture":
        """The normalised tilted target p1(x)·exp(λ·r(x)) / Z, r(x) = −‖y − A·x‖²/(2σ²): again a Gaussian mixture
        (a Kalman update of every component with noise variance σ²/λ, reweighted by its evidence N(y; A·m_k, ·))."""
        A, y, noise = _reward_args(A, y, sigma, lam, self.dim, self.dtype, self.device)
        eye_m = torch.eye(A.shape[0], dtype=self.dtype, device=self.device)
        SA = self.covs @ A.T  # (K, d, m)
        P = A @ SA + noise * eye_m  # (K, m, m)
        gain = torch.linalg.solve(P, SA.mT).mT  # S·Aᵀ·P⁻¹, (K, d, m)
        resid = y - self.means @ A.T  # (K, m)
        means = self.means + (gain @ resid.unsqueeze(-1)).squeeze(-1)
        covs = self.covs - gain @ P @ gain.mT
        logw = self._logw + _gauss_logpdf_chol(resid, P)
        return GaussianMixture((logw - logw.max()).exp(), means, 0.5 * (covs + covs.mT), dtype=self.dtype,
                               device=self.device)

    def value(self, t, x: torch.Tensor, A, y, sigma, lam: float = 1.0) -> torch.Tensor:
        """(B,) V_t(x) = log E[exp(λ·r(X1)) | X_t = x], exact:
        log Σ_k π_k·N(y; A·μ_k, A·Σ_k·Aᵀ + σ²/λ·I) + (m/2)·log(2π·σ²/λ)."""
        A, y, noise = _reward_args(A, y, sigma, lam, self.dim, self.dtype, self.device)
        t, xd = self._prep(t, x)
        tt, c, z, ll = self._stats(t, xd)
        means = self.means + _unrot(self._evecs, tt * self._evals / c * z)  # (B, K, d)
        var = (1 - tt) ** 2 * self._evals / c
        AV = A @ self._evecs  # (K, m, d)
        P = torch.einsum("kmi,bki,kni->bkmn", AV, var, AV) + noise * torch.eye(A.shape[0], dtype=self.dtype,
                                                                             device=self.device)
        resid = y - means @ A.T  # (B, K, m)
        logpi = torch.log_softmax(self._logw + ll, dim=-1)
        v = torch.logsumexp(logpi + _gauss_logpdf_chol(resid, P), dim=-1)
        return (v + 0.5 * A.shape[0] * math.log(2 * math.pi * noise)).to(x.dtype)

    def value_grad(self, t, x: torch.Tensor, A, y, sigma, lam: float = 1.0) -> torch.Tensor:
        """(B, d) ∇_x V_t(x), by autograd of the exact value (differentiable again when x requires grad)."""
        keep_graph = torch.is_grad_enabled() and x.requires_grad
        with torch.enable_grad():
            xg = x if keep_graph else x.detach().requires_grad_(True)
            v = self.value(t, xg, A, y, sigma, lam)
            (g,) = torch.autograd.grad(v.sum(), xg, create_graph=keep_graph)
        return g

    def expected_reward(self, t, x: torch.Tensor, A, y, sigma, lam: float = 1.0) -> torch.Tensor:
        """(B,) E[λ·r(X1) | X_t = x] = −λ·Σ_k π_k·(‖y − A·μ_k‖² + tr(A·Σ_k·Aᵀ))/(2σ²), exact: the N = 1 member
        V_1 of the importance-weighted bounds V_N ≤ V that MFM-G with N particles differentiates in expectation."""
        A, y, noise = _reward_args(A, y, sigma, lam, self.dim, self.dtype, self.device)  # noise = σ²/λ
        post = self.posterior(t, x.to(self.dtype))
        resid = y - post.means @ A.T  # (B, K, m)
        spread = torch.einsum("mi,bkij,mj->bk", A, post.covs, A)
        per_comp = -((resid ** 2).sum(-1) + spread) / (2 * noise)
        return (post.weights * per_comp).sum(-1).to(x.dtype)

    def expected_reward_grad(self, t, x: torch.Tensor, A, y, sigma, lam: float = 1.0) -> torch.Tensor:
        """(B, d) ∇_x E[λ·r(X1) | X_t = x] = ∇V_1, by autograd of `expected_reward`."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.expected_reward(t, xg, A, y, sigma, lam).sum(), xg)
        return g

    def tilted_drift(self, t, x: torch.Tensor, A, y, sigma, lam: float = 1.0) -> torch.Tensor:
        """(B, d) drift of the tilted target's interpolant, b*_t = b_t + ((1−t)/t)·∇V_t (METHOD §3).

        Computed as the exact drift of the tilted mixture, which is also defined at t = 0."""
        return self.tilt(A, y, sigma, lam).drift(t, x)


def paper_gmm(dtype: torch.dtype = torch.float64, device="cpu") -> GaussianMixture:
    """The 2-D mixture of METHOD §6: weights 1/3, means (−3,−3), (0,0), (3,3), covariance 0.5·I."""
    means = [[-3.0, -3.0], [0.0, 0.0], [3.0, 3.0]]
    covs = 0.5 * torch.eye(2, dtype=torch.float64).expand(3, 2, 2)
    return GaussianMixture(torch.full((3,), 1 / 3), means, covs, dtype=dtype, device=device)


# The paper's linear inverse-problem reward r(x) = −(y − A·x)²/(2σ²) on the 2-D mixture (METHOD §6).
PAPER_REWARD = {"A": [[1.2, -0.8]], "y": [-1.0], "sigma": 0.2, "lam": 1.0}


class ExactGaussianMFM(torch.nn.Module):
    """The exact meta flow map of Gaussian data N(m, S), following the model protocol (DESIGN §2).

    Given the context (t, x) the posterior is N(μ, Σ) with C_t = t²S + (1−t)²I, μ = m + t·S·C_t⁻¹·(x − t·m) and
    Σ = (1−t)²·S·C_t⁻¹. The conditional interpolant has covariance C̄_s = (1−s)²I + s²Σ, all of these commute,
    and the conditional flow map is X_{s,u}(x̄) = u·μ + C̄_u^{1/2}·C̄_s^{−1/2}·(x̄ − s·μ). Along an eigenvalue λ of Σ,
    c(s) = (1+λ)s² − 2s + 1, and the average velocity v = (X − x̄)/(u − s) is
        v = μ + [((1+λ)(u+s) − 2) / (√c_s·(√c_u + √c_s))]·(x̄ − s·μ)     (eigenwise),
    an exact rewriting of (√c_u/√c_s − 1)/(u − s) that has no cancellation and equals the drift at u = s.
    """

    supports_particle_groups = True

    def __init__(self, mean, cov, dtype: torch.dtype = torch.float64):
        super().__init__()
        device = mean.device if torch.is_tensor(mean) else "cpu"
        mean = _as_tensor("mean", mean, dtype, device)
        cov = _as_tensor("cov", cov, dtype, device)
        if mean.dim() != 1:
            raise ValueError(f"mean must have shape (d,), got {tuple(mean.shape)}")
        d = mean.shape[0]
        if cov.shape != (d, d):
            raise ValueError(f"cov must have shape ({d}, {d}), got {tuple(cov.shape)}")
        cov, evals, evecs = _eigh_spd("cov", cov[None])
        self.register_buffer("mean", mean)
        self.register_buffer("cov", cov[0])
        self.register_buffer("evals", evals[0])
        self.register_buffer("evecs", evecs[0])
        self._data = None

    @property
    def event_shape(self) -> tuple:
        return (self.mean.shape[0],)

    @property
    def data(self) -> GaussianMixture:
        """The data distribution as a one-component GaussianMixture (on the module's device and dtype)."""
        mean = self.mean
        if self._data is None or self._data.device != mean.device or self._data.dtype != mean.dtype:
            ones = torch.ones(1, dtype=mean.dtype, device=mean.device)
            self._data = GaussianMixture(ones, mean[None], self.cov[None], dtype=mean.dtype, device=mean.device)
        return self._data

    def _context(self, t: torch.Tensor, x: torch.Tensor):
        """Posterior mean μ (G, d) and eigenvalues λ (G, d) of Σ, in the eigenbasis of S."""
        tt = t[:, None]
        c = tt ** 2 * self.evals + (1 - tt) ** 2
        z = (x - tt * self.mean) @ self.evecs
        mu = self.mean + (tt * self.evals / c * z) @ self.evecs.T
        return mu, (1 - tt) ** 2 * self.evals / c

    def forward(self, s, u, xbar: torch.Tensor, t, x: torch.Tensor) -> torch.Tensor:
        """v_{s,u}(xbar; t, x); s, u, t (G,) or scalars, x (G, d), xbar (G·N, d) with N particles per context row."""
        d = self.mean.shape[0]
        check_state("x", x, (d,))
        check_state("xbar", xbar, (d,))
        G = x.shape[0]
        N = n_per_group("xbar", xbar.shape[0], G)
        out_dtype = xbar.dtype
        xd, xbd = x.to(self.mean.dtype), xbar.to(self.mean.dtype)
        s, u, t = (as_time(name, v, G, xd) for name, v in (("s", s), ("u", u), ("t", t)))
        mu, lam = self._context(t, xd)
        rep = (lambda a: a.repeat_interleave(N, dim=0)) if N > 1 else (lambda a: a)  # noqa: E731
        mu, lam, s, u = rep(mu), rep(lam), rep(s)[:, None], rep(u)[:, None]
        a = 1 + lam
        cs = (a * s - 2) * s + 1
        cu = (a * u - 2) * u + 1
        rs, ru = cs.clamp_min(0).sqrt(), cu.clamp_min(0).sqrt()
        # the denominator vanishes only for a point-mass posterior (t = 1) at s = 1, where x̄ = μ
        den = (rs * (ru + rs)).clamp_min(torch.finfo(cs.dtype).tiny)
        coef = (a * (u + s) - 2) / den
        w = (xbd - s * mu) @ self.evecs
        return (mu + (coef * w) @ self.evecs.T).to(out_dtype)

    def flow_map(self, s, u, xbar: torch.Tensor, t, x: torch.Tensor) -> torch.Tensor:
        """X_{s,u}(xbar; t, x) = xbar + (u − s)·v_{s,u}(xbar; t, x)."""
        G = x.shape[0]
        N = n_per_group("xbar", xbar.shape[0], G)
        v = self(s, u, xbar, t, x)
        s = as_time("s", s, G, xbar)
        u = as_time("u", u, G, xbar)
        return xbar + (u - s).repeat_interleave(N)[:, None] * v


class ExactPosteriorMFM(torch.nn.Module):
    """Closed-form posterior samples of a GaussianMixture behind the model protocol, for the one-step call only:
    X_{0,1}(ε; t, x) = m_k(t, x) + L_k(t)·ε with the component k ~ π_k(t, x) drawn from this module's own
    generator. It is exact in law, so feeding it to an estimator in place of a learned MFM separates the
    estimator's error from the model's ("exact posterior" rows of the demo and `experiment gmm`).

    Not a transport map (k does not depend on ε) and differentiable in x only through the component means, so it
    sets `pathwise = False` and the pathwise estimator MFM-G refuses it; use MFM-GF, or `glass.GlassFlowMap`
    with the exact drift for a pathwise exact map. `drift` (the t = 0 diagonal) is the mixture's exact drift."""

    supports_particle_groups = True
    pathwise = False

    def __init__(self, gmm: GaussianMixture, seed: int = 0):
        super().__init__()
        self.gmm = gmm
        self.seed = seed
        self._gen = None

    @property
    def event_shape(self) -> tuple:
        return (self.gmm.dim,)

    def forward(self, s, u, xbar: torch.Tensor, t, x: torch.Tensor) -> torch.Tensor:
        d = self.gmm.dim
        check_state("x", x, (d,))
        check_state("xbar", xbar, (d,))
        G = x.shape[0]
        N = n_per_group("xbar", xbar.shape[0], G)
        s, u, t = (as_time(name, v, G, x) for name, v in (("s", s), ("u", u), ("t", t)))
        if bool(((s == u) & (t == 0)).all()):  # the unconditional drift b_s(x̄)
            return self.gmm.drift(s.repeat_interleave(N), xbar)
        if not bool(((s == 0) & (u == 1)).all()):
            raise ValueError("ExactPosteriorMFM answers the one-step call (s, u) = (0, 1) and the t = 0 diagonal "
                             "only")
        if self._gen is None or self._gen.device != x.device:
            self._gen = torch.Generator(device=x.device).manual_seed(self.seed)
        post = self.gmm.posterior(t, x.to(self.gmm.dtype))
        k = torch.multinomial(post.weights.detach(), N, replacement=True, generator=self._gen)  # (G, N)
        mu = post.means.gather(1, k[:, :, None].expand(G, N, d))  # (G, N, d)
        scale = post.scales.gather(1, k[:, :, None, None].expand(G, N, d, d))  # (G, N, d, d)
        eps = xbar.to(self.gmm.dtype).view(G, N, d)
        x1 = mu + torch.einsum("gnij,gnj->gni", scale, eps)
        return (x1.reshape(G * N, d) - xbar.to(x1.dtype)).to(xbar.dtype)


def load_digits(dtype: torch.dtype = torch.float32):
    """scikit-learn's bundled 8×8 digits (1797 images, offline): images (n, 1, 8, 8) scaled to [−1, 1], labels (n,)."""
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    images = torch.as_tensor(bunch.images, dtype=dtype) / 8.0 - 1.0  # pixel values are 0..16
    return rearrange(images, "n h w -> n 1 h w"), torch.as_tensor(bunch.target, dtype=torch.long)
