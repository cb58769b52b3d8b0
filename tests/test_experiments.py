"""End-to-end smoke tests of the main job and the experiments (--quick budgets), with sanity checks on the numbers
against the exact tilted target of the paper's GMM."""
import csv

import torch

import pytest

from mfm_fast.__main__ import main


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # one quick GMM MFM shared by the three runs (trained by the first, reused by the others)
    return tmp_path_factory.mktemp("cache")


def read_rows(path):
    with open(path) as f:
        return {r["method"] if "method" in r else r["schedule"] + "@" + r["step"]: r for r in csv.DictReader(f)}


def test_demo_quick(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("MFM_FAST_CACHE", str(cache))
    assert main(["demo", "--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0
    for name in ("demo.md", "demo.csv", "demo.png"):
        assert (tmp_path / name).stat().st_size > 0
    rows = read_rows(tmp_path / "demo.csv")
    w2 = {k: float(r["sliced-W2"]) for k, r in rows.items()}
    reward = {k: float(r["mean reward"]) for k, r in rows.items()}
    base, floor = w2["base (no steering)"], w2["exact target (2nd draw: noise floor)"]
    assert base > 3 * floor  # the untilted samples are far from the tilted target
    # the quick model is trained for seconds: every sampler must raise the reward and get closer to the target.
    # MFM-G is left out: at N = 4 its pathwise gradient through a seconds-trained network can throw states far
    # off (the exact-posterior MFM-G row below must still raise the reward)
    for method in ("MFM-GF", "SMC (MFM-G twist)", "Best-of-N"):
        assert reward[method] > reward["base (no steering)"] + 10, (method, reward)
        assert w2[method] < base, (method, w2)
    for method in ("MFM-GF", "Best-of-N"):
        assert w2[method] < 0.7 * base, (method, w2)
    assert int(rows["MFM-G"]["paper NFE"]) == 50 + 4 * 4 * 50  # K + 4NK, K = 50, N = 4
    # the exact-posterior rows: the same estimators on exact samples must steer towards the target
    assert w2["MFM-GF, exact posterior"] < 0.7 * base, w2
    assert reward["MFM-G, exact posterior"] > reward["base (no steering)"] + 10, reward
    assert rows["MFM-G"]["paper NFE"] == rows["MFM-G, exact posterior"]["paper NFE"]
    assert w2["MFM-GF, jackknife, exact posterior"] < 0.7 * base, w2
    assert reward["MFM-GF, jackknife"] > reward["base (no steering)"] + 10, reward
    for oracle in ("exact ∇V (oracle), unclamped", "exact ∇V (oracle), (1−t)/t ≤ 25"):
        assert w2[oracle] < 0.5 * base and reward[oracle] > reward["base (no steering)"] + 10, (oracle, w2, reward)


def test_demo_methods_subset(tmp_path, cache, monkeypatch):
    """--methods runs a subset; each row has its own random stream, so a row is the same whatever else ran."""
    monkeypatch.setenv("MFM_FAST_CACHE", str(cache))
    both, one = tmp_path / "both", tmp_path / "one"
    assert main(["demo", "--quick", "--out", str(both), "--device", "cpu", "--methods", "mfm-gf,best-of-n"]) == 0
    assert main(["demo", "--quick", "--out", str(one), "--device", "cpu", "--methods", "best-of-n"]) == 0
    rows_both, rows_one = read_rows(both / "demo.csv"), read_rows(one / "demo.csv")
    floor = "exact target (2nd draw: noise floor)"
    assert sorted(rows_both) == sorted(["MFM-GF", "Best-of-N", floor]) and sorted(rows_one) == ["Best-of-N", floor]
    for key in ("sliced-W2", "mean reward"):
        assert rows_both["Best-of-N"][key] == rows_one["Best-of-N"][key]
    for bad in ("nope", "mfm-g,nope", ""):
        with pytest.raises(SystemExit):
            main(["demo", "--quick", "--out", str(tmp_path), "--methods", bad])
    with pytest.raises(SystemExit):  # the exact MFM-G row is refused above its N limit
        main(["demo", "--quick", "--out", str(tmp_path), "--methods", "mfm-g-exact", "--particles", "64"])
    with pytest.raises(SystemExit):  # the jackknife needs two particles
        main(["demo", "--quick", "--out", str(tmp_path), "--methods", "mfm-gf-jk", "--particles", "1"])


def test_experiment_posterior_quick(tmp_path, cache, monkeypatch):
    from mfm_fast.experiments.posterior import recipes
    assert not any("," in name for name in recipes())  # --recipes is comma-separated
    monkeypatch.setenv("MFM_FAST_CACHE", str(cache))
    assert main(["experiment", "posterior", "--quick", "--out", str(tmp_path), "--device", "cpu",
                 "--recipes", "earlier defaults,+ teacher rollouts (exact drift)"]) == 0
    for name in ("posterior.md", "posterior.csv", "posterior.png"):
        assert (tmp_path / name).stat().st_size > 0
    with open(tmp_path / "posterior.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["recipe"], r["K"]) for r in rows) == sorted(
        (name, k) for name in ("earlier defaults", "+ teacher rollouts (exact drift)") for k in ("1", "2", "4"))
    for r in rows:
        ratios = [float(r[f"t={t}"]) for t in (0.05, 0.2, 0.5, 0.8, 0.95)]
        assert all(0.5 < v < 1e4 for v in ratios), r
        assert float(r["max"]) == max(ratios) and float(r["train s"]) > 0
    with pytest.raises(SystemExit):
        main(["experiment", "posterior", "--quick", "--recipes", "nope", "--out", str(tmp_path / "refused")])


def test_experiment_gmm_quick(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("MFM_FAST_CACHE", str(cache))
    assert main(["experiment", "gmm", "--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0
    for name in ("gmm_steering.md", "gmm_steering.csv", "gmm_gradV.csv", "gmm.png"):
        assert (tmp_path / name).stat().st_size > 0
    with open(tmp_path / "gmm_gradV.csv") as f:
        grads = list(csv.DictReader(f))
    corr = {(r["estimator"], r["N"], float(r["t"])): float(r["corr"]) for r in grads}
    # near t = 1 the posterior is a point: DPS and the one-step estimators must agree with the exact ∇V
    assert corr[("DPS", "–", 0.9)] > 0.95, corr
    assert corr[("MFM-G", "4", 0.9)] > 0.5, corr


def test_experiment_finetune_gmm_quick(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("MFM_FAST_CACHE", str(cache))
    assert main(["experiment", "finetune-gmm", "--quick", "--out", str(tmp_path), "--device", "cpu",
                 "--schedules", "(1-t)/t"]) == 0
    for name in ("finetune_gmm.md", "finetune_gmm.csv", "finetune_gmm.png"):
        assert (tmp_path / name).stat().st_size > 0
    rows = read_rows(tmp_path / "finetune_gmm.csv")
    start, end = float(rows["(1-t)/t@0"]["sliced-W2"]), float(rows["(1-t)/t@40"]["sliced-W2"])
    assert end < start, (start, end)


def test_experiment_estimators_quick(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("MFM_FAST_CACHE", str(cache))
    assert main(["experiment", "estimators", "--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0
    for name in ("estimators.md", "estimators.csv", "estimators.png"):
        assert (tmp_path / name).stat().st_size > 0
    with open(tmp_path / "estimators.csv") as f:
        rows = {(r["estimator"], r["states"], r["N"]): r for r in csv.DictReader(f)}
    # MFM-G / MFM-GF × p*_t / p_t × N ∈ {1, 8}, and their jackknifed versions at N = 8
    assert len(rows) == 2 * 2 * 2 + 2 * 2 and ("MFM-GF, jackknife", "p_t", "8") in rows
    for law in ("p*_t", "p_t"):
        # the exact-posterior expectations are model-free: MFM-G at N = 1 is ∇E[λ·r], far above ∇V on this
        # sharp reward, and closer at N = 8; MFM-GF's two terms cancel at N = 1
        g1, g8 = (float(rows[("MFM-G", law, n)]["|E g|/|∇V| exact post."]) for n in ("1", "8"))
        assert g1 > 5 and 1 < g8 < g1, (law, g1, g8)
        assert float(rows[("MFM-GF", law, "1")]["|E g|/|∇V| exact post."]) == 0.0
        assert 0.2 < float(rows[("MFM-GF", law, "8")]["|E g|/|∇V| exact post."]) < 1.2
        assert all(float(v) >= 0 for r in rows.values() for k, v in r.items()
                   if k not in ("estimator", "states") and v != "–")
        assert rows[("MFM-G, jackknife", law, "8")]["bias exact post."] == "–"
        assert float(rows[("MFM-G, jackknife", law, "8")]["bias learned"]) > 0
    with pytest.raises(SystemExit):
        main(["experiment", "estimators", "--quick", "--ts", "1.0", "--out", str(tmp_path / "refused")])


def test_experiment_dispatch_errors(capsys):
    assert main(["experiment", "nope"]) == 2
    assert main(["experiment", "--help"]) == 0
    assert "finetune-gmm" in capsys.readouterr().out


def test_steering_pipeline_with_the_exact_gaussian_mfm():
    """With the exact meta flow map of a Gaussian the pipeline behind every table (run_method, costs, distances)
    meets closed-form answers: MFM-G is consistent — biased at small N for this sharp reward, it approaches the
    exact tilted target as N grows — and MFM-GF lands near it."""
    import torch

    from mfm_fast.data import ExactGaussianMFM
    from mfm_fast.experiments.common import MethodSpec, distances, run_method
    from mfm_fast.rewards import LinearInverseReward

    model = ExactGaussianMFM([0.5, -1.0], [[1.0, 0.4], [0.4, 0.7]])
    reward = LinearInverseReward([[1.2, -0.8]], [-1.0], 0.3)
    tilted = model.data.tilt(reward.A, reward.y, reward.sigma, 1.0)
    target = tilted.sample(512, torch.Generator().manual_seed(1))
    floor = distances(tilted.sample(512, torch.Generator().manual_seed(2)), target)["sliced-W2"]
    noise = torch.randn(512, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    gen = torch.Generator().manual_seed(4)
    w2 = {}
    for spec in (MethodSpec("none", "none"), MethodSpec("mfm-g 2", "mfm-g", 2), MethodSpec("mfm-g 64", "mfm-g", 64),
                 MethodSpec("mfm-gf 16", "mfm-gf", 16)):
        res, wall = run_method(model, reward, noise, spec, 50, 1.0, gen)
        w2[spec.label] = distances(res.samples, target)["sliced-W2"]
        assert res.cost.forward_evals > 0 and wall > 0
    assert w2["none"] > 10 * floor, (w2, floor)
    assert w2["mfm-g 64"] < 0.5 * w2["mfm-g 2"], w2
    assert w2["mfm-g 64"] < 0.2 * w2["none"], w2
    assert w2["mfm-gf 16"] < 0.2 * w2["none"], w2


class _Blend(torch.nn.Module):
    """X_{0,1}(ε; t, x) = a·ε + (1 − a)·x: noisy copies of the context, a stand-in posterior for the oracle test."""

    def __init__(self, a):
        super().__init__()
        self.a = a

    def forward(self, s, u, xbar, t, x):
        return (1 - self.a) * (x - xbar)


class _NearestMean(torch.nn.Module):
    """A deterministic digit classifier: logits = −‖x − class mean‖²."""

    def __init__(self, images, labels):
        super().__init__()
        self.register_buffer("means", torch.stack([images[labels == c].mean(0) for c in range(10)]).flatten(1))

    def forward(self, x):
        return -torch.cdist(x.flatten(1), self.means) ** 2


def test_posterior_histograms_oracle():
    from mfm_fast.data import load_digits
    from mfm_fast.experiments.digits import posterior_histograms
    images, labels = load_digits()
    clf = _NearestMean(images, labels)
    kw = dict(ts=(0.5,), contexts=6, n=128, steps=(1,), seed=3)
    same = posterior_histograms(_Blend(0.6), _Blend(0.6), clf, images, **kw)[0]
    other = posterior_histograms(_Blend(0.05), _Blend(0.6), clf, images, **kw)[0]
    assert same["TV floor (ref vs ref)"] > 0
    assert same["ratio K=1"] < 1.6, same  # the reference against itself: at the floor
    assert other["ratio K=1"] > 2.5, other  # a posterior of the wrong spread: far above it


def test_experiment_digits_quick(tmp_path, monkeypatch):
    monkeypatch.setenv("MFM_FAST_CACHE", str(tmp_path / "cache"))
    assert main(["experiment", "digits", "--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0
    for name in ("digits.md", "digits.csv", "digits_cost.csv", "digits_posterior.csv", "digits.png"):
        assert (tmp_path / name).stat().st_size > 0
    with open(tmp_path / "digits_posterior.csv") as f:
        post = list(csv.DictReader(f))
    assert [float(r["t"]) for r in post] == [0.2, 0.5, 0.8]
    assert all(float(r["TV K=1"]) >= 0 and float(r["TV floor (ref vs ref)"]) >= 0 for r in post)
    with open(tmp_path / "digits_cost.csv") as f:
        claim = list(csv.DictReader(f))
    # the release's settings: single-particle MFM-G at λ = 1, 2.5, 5 with renorm "rescale"; the exact tilt without
    assert {float(r["λ"]) for r in claim if r["method"] == "MFM-G N=1" and r["renorm"] == "rescale"} == {1.0, 2.5, 5.0}
    assert {float(r["λ"]) for r in claim if r["method"] == "MFM-G N=1" and r["renorm"] == "none"} == {1.0}
    assert (tmp_path / "cache").is_dir() and any((tmp_path / "cache").glob("digits_mfm_*.teacher.pt"))


def test_exact_doob_oracle_reaches_the_tilted_target():
    """The demo's oracle rows: the Doob ODE with the closed-form ∇V lands on the exact tilted target (its
    sliced-W2 near the floor of a second exact draw), so the rows measure what a perfect estimator reaches."""
    from mfm_fast.experiments.common import distances, paper_problem
    from mfm_fast.experiments.demo import exact_doob
    prob = paper_problem("cpu")
    gen = torch.Generator().manual_seed(0)
    target = prob.tilted.sample(2048, generator=gen)
    noise = torch.randn(2048, 2, generator=gen)
    floor = distances(prob.tilted.sample(2048, generator=gen), target)["sliced-W2"]
    base = distances(noise, target)["sliced-W2"]
    x = exact_doob(prob, noise, 200)
    assert distances(x, target)["sliced-W2"] < 1.5 * floor < 0.2 * base
    assert abs(prob.reward(x).mean() - prob.reward(target).mean()) < 0.1
    clamped = exact_doob(prob, noise, 200, clamp_ratio=25.0)
    assert (clamped - x).abs().max() > 1e-3  # the clamp acts (early, where (1−t)/t > 25)
