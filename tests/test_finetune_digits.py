"""`experiment finetune-digits`: MFM-FT of the class-conditional digits DiT with per-row labels, against the exact
tilt (self-normalised importance weights over real digits / base samples)."""
import csv

import torch

from mfm_fast.__main__ import main


class _Calls(list):
    """Shared by every deep copy of the spy (finetune copies the frozen and the trainable model)."""

    def __deepcopy__(self, memo):
        return self


class _Spy(torch.nn.Module):
    """A DiT that records the conditioning of every call."""

    def __init__(self, dit, calls):
        super().__init__()
        self.dit, self.calls = dit, calls

    @property
    def config(self):
        return self.dit.config

    @property
    def event_shape(self):
        return self.dit.event_shape

    def forward(self, s, u, xbar, t, x, **cond):
        self.calls.append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in cond.items()})
        return self.dit(s, u, xbar, t, x, **cond)


def test_labels_condition_every_call_per_row():
    """The experiment's fine-tuning passes each data row's own label to the trainable drift, the frozen drift and
    the posterior sample, and no guidance weight."""
    from mfm_fast.data import load_digits
    from mfm_fast.experiments.finetune_digits import finetune_config, run_finetune
    from mfm_fast.models import MFMDiT
    from mfm_fast.runloop import step_generator
    from mfm_fast.train import dataset_sampler
    images, labels = load_digits()
    torch.manual_seed(0)
    dit = MFMDiT("MFM-Digits", impl="torch")
    with torch.no_grad():  # adaLN-Zero outputs would hide the context; the reward needs a gradient through x_t
        for p in dit.parameters():
            p.add_(0.02 * torch.randn_like(p))
    calls = _Calls()
    reward = lambda x: -x.flatten(1).pow(2).mean(1)  # noqa: E731  (label-free)
    cfg = finetune_config(steps=1, batch=16, seed=3)
    run_finetune(_Spy(dit, calls), reward, images, labels, cfg, progress=False)
    _, want = dataset_sampler(images, labels)(16, step_generator(3, 0))
    assert len(set(want.tolist())) > 3  # the check below sees distinct labels per row
    assert len(calls) == 3, len(calls)  # b^θ, b^base, the posterior sample
    for c in calls:
        assert set(c) == {"y"}, c  # no cfg: MFM-Digits has no trained guidance weight
        assert torch.equal(c["y"].cpu(), want), (c["y"], want)


def test_reward_and_references():
    from mfm_fast.experiments.finetune_digits import EvenDigitReward, ess, snis, wasserstein1

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :10]
    x = torch.randn(5, 1, 8, 8)
    r = EvenDigitReward(Fixed())(x)
    want = torch.log(torch.softmax(x.flatten(1)[:, :10], -1)[:, ::2].sum(-1))
    torch.testing.assert_close(r, want)
    assert bool((r <= 0).all())
    w = snis(torch.tensor([0.0, 0.0, 0.0, 0.0]), 0.5)
    assert abs(ess(w) - 4) < 1e-9
    assert ess(snis(torch.tensor([0.0, -50.0, -50.0]), 1.0)) < 1.01
    a = torch.tensor([0.0, 1.0])
    assert abs(wasserstein1(a, a)) < 1e-12
    assert abs(wasserstein1(a, a + 2) - 2) < 1e-9
    # weights move the reference's mass: b = {0, 1} with all the weight on 1 is a point mass at 1
    assert abs(wasserstein1(torch.tensor([1.0]), a, torch.tensor([0.0, 1.0]))) < 1e-12
    assert abs(wasserstein1(torch.tensor([1.0]), a, torch.tensor([1.0, 1.0])) - 0.5) < 1e-9


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_experiment_finetune_digits_quick(tmp_path, monkeypatch):
    monkeypatch.setenv("MFM_FAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["experiment", "finetune-digits", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    for name in ("finetune_digits.md", "finetune_digits.csv", "finetune_digits_curve.csv", "finetune_digits.png"):
        assert (out / name).stat().st_size > 0, name
    assert any((tmp_path / "cache").glob("digits_cond_mfm_*.pt"))
    rows = _rows(out / "finetune_digits.csv")
    assert [int(r["label"]) for r in rows] == list(range(10))
    f = {k: [float(r[k]) for r in rows] for k in rows[0] if k != "label"}
    # a tilt by exp(λ·r) raises the mean reward (a weighted mean with weights increasing in r ≥ the plain mean)
    assert all(t >= d - 1e-6 for t, d in zip(f["data tilt"], f["data reward"])), (f["data tilt"], f["data reward"])
    assert all(0 < e <= 12 + 1e-6 for e in f["ESS model"]), f["ESS model"]  # 12 base samples per label (quick)
    assert all(0 < e <= 200 for e in f["ESS data"]) and all(r <= 0 for r in f["data tilt"])
    for k in ("P(pred=y) base", "P(pred=y) fine-tuned", "P(pred=y) model tilt", "P(pred=y) data tilt"):
        assert all(0 <= v <= 1 for v in f[k]), k
    # the fine-tuned drift moved towards the tilt: the reference lies above the base, and so does the fine-tuned
    # mean reward, over all labels and over the odd labels (where r(x) = log P(even | x) has room to move)
    mean = lambda v, ys=range(10): sum(v[y] for y in ys) / len(ys)  # noqa: E731
    for ys in (range(10), (1, 3, 5, 7, 9)):
        base, tuned, ref = mean(f["base reward"], ys), mean(f["fine-tuned reward"], ys), mean(f["model tilt"], ys)
        assert ref >= base - 1e-6, (ys, base, ref)
        assert tuned > base + 0.05, (ys, base, tuned, ref)
    curve = _rows(out / "finetune_digits_curve.csv")
    assert [int(r["step"]) for r in curve] == [0, 10, 20]
    assert float(curve[-1]["mean reward, odd labels"]) > float(curve[0]["mean reward, odd labels"])
