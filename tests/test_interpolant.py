"""Interpolant conversions: round trips, and agreement with the Gaussian-mixture oracle."""
import torch

from mfm_fast.data import GaussianMixture
from mfm_fast.interpolant import (bcast, denoiser_from_drift, drift_from_denoiser, drift_from_score, interpolate,
                                  noise_from_drift, score_from_drift, target_velocity)

F64 = torch.float64


def mixture():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 3, generator=g, dtype=F64)
    return GaussianMixture([0.3, 0.7], 2 * torch.randn(2, 3, generator=g, dtype=F64),
                           a @ a.mT / 3 + 0.3 * torch.eye(3, dtype=F64))


def test_bcast_and_interpolate():
    t = torch.rand(3, dtype=F64)
    x0, x1 = torch.randn(6, 2, 4, dtype=F64), torch.randn(6, 2, 4, dtype=F64)
    tb = bcast(t, x1)  # particle groups: 2 rows per time
    assert tb.shape == (6, 1, 1)
    torch.testing.assert_close(tb[:, 0, 0], t.repeat_interleave(2))
    it = interpolate(t, x0, x1)
    torch.testing.assert_close(it, (1 - tb) * x0 + tb * x1)
    torch.testing.assert_close(interpolate(torch.zeros(3, dtype=F64), x0, x1), x0)
    torch.testing.assert_close(interpolate(torch.ones(3, dtype=F64), x0, x1), x1)
    torch.testing.assert_close(target_velocity(x0, x1), x1 - x0)


def test_round_trips():
    B = 16
    t = torch.rand(B, dtype=F64).clamp(0.05, 0.95)
    x, b = torch.randn(B, 2, 3, dtype=F64), torch.randn(B, 2, 3, dtype=F64)
    torch.testing.assert_close(drift_from_denoiser(t, x, denoiser_from_drift(t, x, b)), b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(drift_from_score(t, x, score_from_drift(t, x, b)), b, rtol=1e-12, atol=1e-12)
    # the interpolant identity x = (1−t)·E[I0|x] + t·E[I1|x]
    tb = bcast(t, x)
    torch.testing.assert_close((1 - tb) * noise_from_drift(t, x, b) + tb * denoiser_from_drift(t, x, b), x,
                               rtol=1e-12, atol=1e-12)


def test_conversions_match_oracle():
    mix = mixture()
    B = 32
    t = torch.rand(B, dtype=F64).clamp(0.05, 0.95)
    x = 2 * torch.randn(B, 3, dtype=F64)
    b = mix.drift(t, x)
    torch.testing.assert_close(score_from_drift(t, x, b), mix.score(t, x), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(drift_from_score(t, x, mix.score(t, x)), b, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(denoiser_from_drift(t, x, b), mix.posterior_mean(t, x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(drift_from_denoiser(t, x, mix.posterior_mean(t, x)), b, rtol=1e-9, atol=1e-10)
    # E[I0 | x] = Σ_k π_k·(1−t)·C_k⁻¹(x − t·m_k) = −(1−t)·score
    torch.testing.assert_close(noise_from_drift(t, x, b), -(1 - t)[:, None] * mix.score(t, x), rtol=1e-9,
                               atol=1e-10)
