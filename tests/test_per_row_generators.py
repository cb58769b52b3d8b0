"""Per-row generators (`generator=[g_0, ..., g_{B-1}]`) in steer, best_of_n, refine_sample and posterior_sample: a
row's random numbers come from its own generator only, so changing one row's generator leaves every other row
bitwise unchanged; a one-row batch gives the same bits as the single-generator API (its behaviour is unchanged)."""
import pytest
import torch

from mfm_fast.models import MFMMLP
from mfm_fast.rewards import LinearInverseReward
from mfm_fast.sampling import posterior_sample, refine_sample
from mfm_fast.steer import best_of_n, steer

B = 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    return MFMMLP(2, 16, 2)


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def noise():
    return torch.randn(B, 2, generator=torch.Generator().manual_seed(0))


CASES = {
    "mfm-g-sde": lambda m, x, g: steer(m, LinearInverseReward.paper(), x, steps=4, method="mfm-g", n_particles=3,
                                       sde=True, renorm="rescale", generator=g),
    "mfm-gf": lambda m, x, g: steer(m, LinearInverseReward.paper(), x, steps=4, method="mfm-gf", n_particles=3,
                                    generator=g, chunk_size=2),
    "search": lambda m, x, g: steer(m, LinearInverseReward.paper(), x, steps=3, method="search", n_particles=3,
                                    generator=g),
    "best-of-n": lambda m, x, g: best_of_n(m, LinearInverseReward.paper(), x, n=3, steps=3, sde=True, generator=g),
    "refine": lambda m, x, g: refine_sample(m, x, steps=3, generator=g),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_row_depends_only_on_its_own_generator(model, case):
    run = CASES[case]
    a = run(model, noise(), gens([10, 11, 12, 13]))
    b = run(model, noise(), gens([99, 11, 12, 13]))  # only row 0's stream changes
    assert not torch.equal(a[0], b[0])
    assert torch.equal(a[1:], b[1:])
    # and the per-row streams are independent of each other: equal noise rows with other seeds differ
    same = noise()[:1].expand(B, 2).contiguous()
    c = run(model, same, gens([10, 11, 12, 13]))
    assert not torch.equal(c[0], c[1])


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_row_with_a_list_equals_the_single_generator_api(model, case):
    run = CASES[case]
    x = noise()[:1]
    assert torch.equal(run(model, x, torch.Generator().manual_seed(5)), run(model, x, gens([5])))


def test_smc_populations_draw_from_their_own_rows(model):
    def run(seeds):
        return steer(model, LinearInverseReward.paper(), noise(), steps=3, method="smc", n_particles=2,
                     population=2, smc_estimator="mfm-gf", ess_threshold=1.0, generator=gens(seeds))
    a, b = run([1, 2, 3, 4]), run([7, 8, 3, 4])
    assert torch.equal(a[2:], b[2:]) and not torch.equal(a[:2], b[:2])


def test_posterior_sample_per_row(model):
    x, t = noise(), torch.full((B,), 0.5)
    a = posterior_sample(model, t, x, n=3, generator=gens([1, 2, 3, 4]))
    b = posterior_sample(model, t, x, n=3, generator=gens([9, 2, 3, 4]))
    assert a.shape == (B, 3, 2) and torch.equal(a[1:], b[1:]) and not torch.equal(a[0], b[0])
    one = posterior_sample(model, t[:1], x[:1], n=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(one, posterior_sample(model, t[:1], x[:1], n=3, generator=gens([1])))


def test_bad_generator_lists_are_refused(model):
    reward = LinearInverseReward.paper()
    with pytest.raises(ValueError, match=r"generator: a list of per-row generators needs one per row \(4\), got 3"):
        steer(model, reward, noise(), steps=2, generator=gens([1, 2, 3]))
    with pytest.raises(TypeError, match=r"generator\[1\] must be a torch.Generator, got int"):
        refine_sample(model, noise(), steps=2, generator=[torch.Generator(), 3, torch.Generator(),
                                                           torch.Generator()])
    with pytest.raises(TypeError, match="generator must be None, a torch.Generator or a list"):
        best_of_n(model, reward, noise(), n=2, steps=2, generator="seed")
