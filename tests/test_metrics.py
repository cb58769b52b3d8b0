"""Sliced W2 and MMD² against population values of simple Gaussian pairs."""
import math

import pytest
import torch

from mfm_fast.metrics import mmd, noise_floor, sliced_w2

F64 = torch.float64


def test_sliced_w2_identical_and_translated():
    x = torch.randn(500, 3, dtype=F64)
    assert float(sliced_w2(x, x)) == 0.0
    assert float(sliced_w2(x, x[torch.randperm(500)])) < 1e-12
    # in 1-D every projection is ±1: a translate is at distance |c| exactly
    z = torch.randn(300, 1, dtype=F64)
    torch.testing.assert_close(sliced_w2(z, z + 0.7), torch.tensor(0.7, dtype=F64), rtol=1e-12, atol=1e-12)


def test_sliced_w2_shifted_gaussians():
    g = torch.Generator().manual_seed(0)
    n = 2000
    x = torch.randn(n, 1, generator=g, dtype=F64)
    y = torch.randn(n, 1, generator=g, dtype=F64) + 1.5
    # the empirical W2 between two n-samples of N(0,1) is O(n^-1/2·log) — well under 0.1 here
    assert abs(float(sliced_w2(x, y)) - 1.5) < 0.1
    # unequal sizes through quantile interpolation
    assert abs(float(sliced_w2(x[:1500], y[:900])) - 1.5) < 0.1
    # in d dimensions a shift Δ gives SW2² = E_θ (θᵀΔ)² = ‖Δ‖²/d
    shift = torch.tensor([2.0, -1.0, 2.0], dtype=F64)
    x3, y3 = torch.randn(n, 3, generator=g, dtype=F64), torch.randn(n, 3, generator=g, dtype=F64) + shift
    sw = float(sliced_w2(x3, y3, n_projections=1000, generator=g))
    assert abs(sw - 3.0 / math.sqrt(3)) < 0.1


def test_sliced_w2_bad_inputs():
    with pytest.raises(ValueError, match="event shape"):
        sliced_w2(torch.randn(5, 2), torch.randn(5, 3))
    with pytest.raises(ValueError, match="n_projections"):
        sliced_w2(torch.randn(5, 2), torch.randn(5, 2), n_projections=0)
    with pytest.raises(ValueError, match="x"):
        sliced_w2(torch.randn(5), torch.randn(5, 1))


def test_mmd_matches_explicit_formula():
    x, y = torch.randn(6, 2, dtype=F64), torch.randn(4, 2, dtype=F64) + 0.3
    hs = [0.5, 2.0]

    def k(a, b):
        return sum(math.exp(-float(((a - b) ** 2).sum()) / (2 * h * h)) for h in hs)

    xx = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
    yy = sum(k(y[i], y[j]) for i in range(4) for j in range(4) if i != j) / 12
    xy = sum(k(x[i], y[j]) for i in range(6) for j in range(4)) / 24
    torch.testing.assert_close(mmd(x, y, bandwidths=hs), torch.tensor(xx + yy - 2 * xy, dtype=F64),
                               rtol=1e-10, atol=1e-12)


def test_mmd_unbiased_against_population_value():
    # 1-D N(0,1) vs N(Δ,1), RBF bandwidth h: MMD² = 2·√(h²/(h²+2))·(1 − exp(−Δ²/(2(h²+2))))
    g = torch.Generator().manual_seed(1)
    h, n, reps = 1.0, 100, 40

    def population(delta):
        return 2 * math.sqrt(h * h / (h * h + 2)) * (1 - math.exp(-delta ** 2 / (2 * (h * h + 2))))

    for delta in (0.0, 0.5):
        vals = torch.stack([mmd(torch.randn(n, 1, generator=g, dtype=F64),
                                torch.randn(n, 1, generator=g, dtype=F64) + delta, bandwidths=[h])
                            for _ in range(reps)])
        se = float(vals.std()) / math.sqrt(reps)
        assert abs(float(vals.mean()) - population(delta)) < 4 * se, (delta, vals.mean(), se)
    null = torch.stack([mmd(torch.randn(n, 2, generator=g, dtype=F64), torch.randn(n, 2, generator=g, dtype=F64))
                        for _ in range(reps)])
    assert bool((null < 0).any())  # unbiased: the null estimates straddle zero
    far = mmd(torch.randn(n, 2, generator=g, dtype=F64), torch.randn(n, 2, generator=g, dtype=F64) + 1.0)
    assert float(far) > float(null.mean()) + 10 * float(null.std())


def test_mmd_bad_inputs():
    with pytest.raises(ValueError, match="bandwidths"):
        mmd(torch.randn(5, 2), torch.randn(5, 2), bandwidths=[0.0])
    with pytest.raises(ValueError, match="y"):
        mmd(torch.randn(5, 2), torch.randn(1, 2))


def test_noise_floor():
    g = torch.Generator().manual_seed(2)
    vals = noise_floor(lambda n: torch.randn(n, 1, generator=g, dtype=F64), sliced_w2, 500, repeats=4)
    assert vals.shape == (4,) and (vals > 0).all() and (vals < 0.2).all()
