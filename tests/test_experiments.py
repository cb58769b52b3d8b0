"""End-to-end smoke tests of the main job and the experiments (--quick budgets), with sanity checks on the numbers
against the exact tilted target of the paper's GMM."""
import csv

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
    for method in ("MFM-G", "MFM-GF", "SMC (MFM-G twist)", "Best-of-N"):
        assert w2[method] < base, (method, w2)
        assert reward[method] > reward["base (no steering)"], (method, reward)
    assert int(rows["MFM-G"]["paper NFE"]) == 20 + 4 * 4 * 20  # K + 4NK, K = 20, N = 4


def test_experiment_gmm_quick(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("MFM_FAST_CACHE", str(cache))
    assert main(["experiment", "gmm", "--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0
    for name in ("gmm_steering.md", "gmm_steering.csv", "gmm_gradV.csv", "gmm.png"):
        assert (tmp_path / name).stat().st_size > 0
    with open(tmp_path / "gmm_gradV.csv") as f:
        grads = list(csv.DictReader(f))
    # the MFM-G value gradient from a trained model points along the exact one at moderate t
    late = [float(r["corr"]) for r in grads if r["estimator"] == "MFM-G" and r["N"] == "4" and float(r["t"]) >= 0.5]
    assert late and min(late) > 0.5, grads


def test_experiment_finetune_gmm_quick(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("MFM_FAST_CACHE", str(cache))
    assert main(["experiment", "finetune-gmm", "--quick", "--out", str(tmp_path), "--device", "cpu",
                 "--schedules", "(1-t)/t"]) == 0
    for name in ("finetune_gmm.md", "finetune_gmm.csv", "finetune_gmm.png"):
        assert (tmp_path / name).stat().st_size > 0
    rows = read_rows(tmp_path / "finetune_gmm.csv")
    start, end = float(rows["(1-t)/t@0"]["sliced-W2"]), float(rows["(1-t)/t@40"]["sliced-W2"])
    assert end < start, (start, end)


def test_experiment_dispatch_errors(capsys):
    assert main(["experiment", "nope"]) == 2
    assert main(["experiment", "--help"]) == 0
    assert "finetune-gmm" in capsys.readouterr().out
