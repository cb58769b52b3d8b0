"""Value / value-gradient engine against the exact Gaussian oracle (mfm_fast.data): Monte-Carlo rate, unbiased
exp(V̂), exact chunking, particle groups, counted cost and input validation."""
import math

import pytest
import torch
import torch.nn as nn

from mfm_fast.data import ExactGaussianMFM
from mfm_fast.models.dit import MFMDiT
from mfm_fast.models.mlp import MFMMLP
from mfm_fast.rewards import LinearInverseReward
from mfm_fast.value import value_and_grad

F64 = torch.float64


def gaussian_case(sigma=1.0):
    """Data N(m, S) with its exact meta flow map, and a linear inverse-problem reward."""
    m = torch.tensor([0.8, -0.4], dtype=F64)
    S = torch.tensor([[1.0, 0.3], [0.3, 0.6]], dtype=F64)
    model = ExactGaussianMFM(m, S)
    return model, model.data, LinearInverseReward([[1.2, -0.8]], [-1.0], sigma)


def exact_grad(oracle, reward, t, x, lam=1.0):
    return oracle.value_grad(t, x, reward.A, reward.y, reward.sigma, lam)


@pytest.mark.parametrize("estimator", ["mfm-g", "mfm-gf"])
@pytest.mark.parametrize("t", [0.3, 0.6])
def test_estimators_converge_at_monte_carlo_rate(estimator, t):
    model, oracle, reward = gaussian_case()
    # 2 states × 64 independent replicas: the RMSE over replicas is the average over seeds
    x = oracle.marginal(t).sample(2, generator=torch.Generator().manual_seed(1)).repeat_interleave(64, 0)
    g_exact = exact_grad(oracle, reward, t, x)
    Ns = [4, 16, 64, 256]
    rmse = []
    for N in Ns:
        _, g = value_and_grad(model, reward, t, x, N, estimator=estimator,
                              generator=torch.Generator().manual_seed(N))
        rmse.append((g - g_exact).norm(dim=1).pow(2).mean().sqrt())
    logn = torch.log(torch.tensor(Ns, dtype=F64))
    design = torch.stack([logn, torch.ones_like(logn)], 1)
    slope = torch.linalg.lstsq(design, torch.log(torch.stack(rmse))[:, None]).solution[0, 0]
    assert -0.7 < slope < -0.35, f"error ∝ N^{slope:.2f}, expected ≈ N^-0.5 ({[f'{e:.3g}' for e in rmse]})"
    assert rmse[-1] < 0.15 * g_exact.norm(dim=1).mean()


def test_exp_value_estimate_is_unbiased():
    model, oracle, reward = gaussian_case(sigma=0.5)
    t = 0.4
    x = oracle.marginal(t).sample(1, generator=torch.Generator().manual_seed(3)).expand(4000, 2)
    V, _ = value_and_grad(model, reward, t, x, 8, estimator="mfm-gf", generator=torch.Generator().manual_seed(0))
    ratio = torch.exp(V - oracle.value(t, x[:1], reward.A, reward.y, reward.sigma))  # E[exp V̂] = exp V
    se = ratio.std() / math.sqrt(len(ratio))
    assert abs(ratio.mean() - 1) < 4 * se + 1e-3, (ratio.mean(), se)


@pytest.mark.parametrize("estimator", ["mfm-g", "mfm-gf"])
def test_chunking_does_not_change_the_result(estimator):
    model, oracle, reward = gaussian_case(sigma=0.4)
    x = oracle.marginal(0.5).sample(5, generator=torch.Generator().manual_seed(2))
    t = torch.rand(5, dtype=F64) * 0.9
    V0, g0 = value_and_grad(model, reward, t, x, 8, estimator=estimator, generator=torch.Generator().manual_seed(7))
    for chunk in (1, 3, 7, 8, 17, 39):  # particle blocks, state blocks and ragged ends
        V, g = value_and_grad(model, reward, t, x, 8, estimator=estimator, chunk_size=chunk,
                              generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(V, V0, rtol=0, atol=1e-12)
        torch.testing.assert_close(g, g0, rtol=0, atol=1e-12)
    # float32 on the same noise agrees with float64
    noise = torch.randn(5, 8, 2, dtype=F64)
    V64, g64 = value_and_grad(model, reward, t, x, 8, estimator=estimator, noise=noise)
    V32, g32 = value_and_grad(model, reward, t.float(), x.float(), 8, estimator=estimator, noise=noise.float(),
                              chunk_size=6)
    assert V32.dtype == g32.dtype == torch.float32
    torch.testing.assert_close(V32.double(), V64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g32.double(), g64, rtol=1e-4, atol=1e-4)


class NoGroups(nn.Module):
    """The same network without particle-group support: the engine must repeat the context itself."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, s, u, xbar, t, x, **cond):
        assert xbar.shape[0] == x.shape[0]
        return self.inner(s, u, xbar, t, x, **cond)


def test_particle_groups_match_repeated_contexts_and_chunks_slice_conditioning():
    torch.manual_seed(4)
    mlp = MFMMLP(3, hidden=32, depth=2).double()
    reward = LinearInverseReward(torch.randn(2, 3), torch.randn(2), 0.7)
    x = torch.randn(4, 3, dtype=F64)
    noise = torch.randn(4, 5, 3, dtype=F64)
    for est in ("mfm-g", "mfm-gf"):
        a = value_and_grad(mlp, reward, 0.35, x, 5, estimator=est, noise=noise)
        b = value_and_grad(NoGroups(mlp), reward, 0.35, x, 5, estimator=est, noise=noise, chunk_size=3)
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)
    # class labels are per state: state blocks must carry their own labels
    dit = MFMDiT("MFM-T/2", impl="torch").double()
    with torch.no_grad():  # open the x-context branch (zero-initialised) so the gradient is not trivially zero
        for p in dit.parameters():
            p.add_(0.02 * torch.randn_like(p))
    xi = torch.randn(3, 4, 8, 8, dtype=F64)
    y = torch.tensor([1, 7, 3])
    img_reward = lambda z: -z.pow(2).flatten(1).mean(1)  # noqa: E731
    V0, g0 = value_and_grad(dit, img_reward, 0.5, xi, 2, generator=torch.Generator().manual_seed(0), y=y)
    V1, g1 = value_and_grad(dit, img_reward, 0.5, xi, 2, generator=torch.Generator().manual_seed(0), y=y,
                            chunk_size=2)
    assert g0.abs().sum() > 0
    torch.testing.assert_close(V1, V0, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g1, g0, rtol=1e-9, atol=1e-12)


class CallCounter(nn.Module):
    """Counts network calls, rows evaluated and rows back-propagated, independently of the engine's own counter."""

    supports_particle_groups = True

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = self.rows = self.backward_rows = 0

    @property
    def event_shape(self):
        return self.inner.event_shape

    def forward(self, s, u, xbar, t, x, **cond):
        self.calls += 1
        self.rows += xbar.shape[0]
        out = self.inner(s, u, xbar, t, x, **cond)
        if out.requires_grad:
            n = xbar.shape[0]

            def hook(g):
                self.backward_rows += n

            out.register_hook(hook)
        return out


@pytest.mark.parametrize("estimator,chunk,calls", [("mfm-g", None, 1), ("mfm-g", 5, 6), ("mfm-gf", 12, 2),
                                                    ("mfm-gf", 2, 9)])
def test_reported_cost_equals_counted_model_calls(estimator, chunk, calls):
    model, oracle, reward = gaussian_case()
    counter = CallCounter(model)
    x = torch.randn(3, 2, dtype=F64)
    info = value_and_grad(counter, reward, 0.5, x, 6, estimator=estimator, chunk_size=chunk, return_info=True)
    assert info.value.shape == (3,) and info.grad.shape == x.shape
    # blocks: chunk 5 -> 3 states × particles {5, 1}; 12 -> 2 states × 6 particles, then 1 state; 2 -> 3 × 3
    assert info.cost.forward_calls == counter.calls == calls
    assert info.forward_evals == counter.rows == 18
    assert info.backward_evals == counter.backward_rows == (18 if estimator == "mfm-g" else 0)
    assert info.cost.reward_evals == 18 and info.cost.batch == 3


def test_mfm_gf_is_finite_at_t_one():
    model, oracle, reward = gaussian_case()
    x = torch.randn(4, 2, dtype=F64)
    V, g = value_and_grad(model, reward, 1.0, x, 16, estimator="mfm-gf")
    # at t = 1 the posterior is the point mass at x: V = λ·r(x) and every particle equals x
    torch.testing.assert_close(V, reward(x), rtol=1e-9, atol=1e-9)
    assert torch.isfinite(g).all() and g.abs().max() < 1e-6


def test_invalid_inputs_raise_clear_errors():
    model, oracle, reward = gaussian_case()
    x = torch.randn(3, 2, dtype=F64)
    with pytest.raises(ValueError, match="t must lie in"):
        value_and_grad(model, reward, 1.5, x, 4)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2\)"):
        value_and_grad(model, reward, 0.5, torch.randn(3, 3, dtype=F64), 4)
    with pytest.raises(ValueError, match="n_particles"):
        value_and_grad(model, reward, 0.5, x, 0)
    with pytest.raises(ValueError, match="lam must be finite"):
        value_and_grad(model, reward, 0.5, x, 4, lam=float("nan"))
    with pytest.raises(ValueError, match="estimator must be one of"):
        value_and_grad(model, reward, 0.5, x, 4, estimator="mfm")
    with pytest.raises(ValueError, match="chunk_size"):
        value_and_grad(model, reward, 0.5, x, 4, chunk_size=0)
    with pytest.raises(ValueError, match=r"noise must have shape \(B, 4, 2\)"):
        value_and_grad(model, reward, 0.5, x, 4, noise=torch.randn(3, 5, 2, dtype=F64))

    def poisoned(z):
        r = reward(z)
        return torch.where(torch.arange(len(r)) % 5 == 0, torch.full_like(r, float("nan")), r)

    with pytest.raises(ValueError, match=r"reward 'poisoned' returned 3 non-finite"):
        value_and_grad(model, poisoned, 0.5, x, 4)

    def detached(z):
        return reward(z).detach()

    with pytest.raises(ValueError, match="reward 'detached': no gradient reaches"):
        value_and_grad(model, detached, 0.5, x, 4)
    value_and_grad(model, detached, 0.5, x, 4, estimator="mfm-gf")  # needs no reward gradient
