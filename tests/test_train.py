"""Training loop, checkpoints and CLI. The GMM test trains an MFM and compares its one-step posterior samples with
exact posterior samples of the mixture (closed form), relative to the exact-vs-exact noise floor."""
import dataclasses
import os

import pytest
import torch

from mfm_fast import train as T
from mfm_fast.data import paper_gmm
from mfm_fast.metrics import sliced_w2
from mfm_fast.models import MFMDiT, MFMMLP
from mfm_fast.sampling import posterior_sample

# The from-data GMM recipe (teacher "none") at a CI budget (2500 of the 8000 steps; the slow test of this file).
GMM_TEST = dict(steps=2500, batch=512)
# Stated tolerance: mean over contexts of SW2(model, exact) ≤ FACTOR × SW2(exact, exact') + ABS. The floor is
# ≈ 0.11 / 0.04 / 0.012 at t = 0.2 / 0.5 / 0.8 (2048 samples); measured after training: 0.38 / 0.24 / 0.040.
# The tight regression guard of the shipped (distilled) recipe is in test_posterior_fidelity.py.
FACTOR, ABS = 8.0, 0.1


def _posterior_report(model, gmm, n_ctx=6, n=2048, seed=11):
    """{t: (mean SW2(model, exact), mean SW2(exact, exact'))} over contexts x ~ p_t."""
    gen = torch.Generator().manual_seed(seed)
    report = {}
    for t in (0.2, 0.5, 0.8):
        x1 = gmm.sample(n_ctx, gen)
        x = t * x1 + (1 - t) * torch.randn(x1.shape, generator=gen, dtype=x1.dtype)
        with torch.no_grad():
            got = posterior_sample(model, t, x.float(), n, generator=gen).double()
        ref_a = gmm.posterior_sample(t, x, n, gen)
        ref_b = gmm.posterior_sample(t, x, n, gen)
        sw = sum(float(sliced_w2(got[i], ref_a[i], generator=gen)) for i in range(n_ctx)) / n_ctx
        floor = sum(float(sliced_w2(ref_b[i], ref_a[i], generator=gen)) for i in range(n_ctx)) / n_ctx
        report[t] = (sw, floor)
    return report


def test_gmm_one_step_posterior_close_to_exact():
    gmm = paper_gmm()
    recipe = T.gmm_defaults("none")
    model_kw, cfg = recipe.model, recipe.train
    cfg = dataclasses.replace(cfg, **GMM_TEST, log_every=500)
    torch.manual_seed(0)
    untrained = MFMMLP(**model_kw)
    result = T.train(MFMMLP(**model_kw), gmm.sample, cfg, progress=False)
    report = _posterior_report(result.ema, gmm)
    print("GMM one-step posterior sliced-W2 (model, floor):", report)
    before = _posterior_report(untrained, gmm)
    print("untrained:", before)
    for t, (sw, floor) in report.items():
        assert sw <= FACTOR * floor + ABS, (t, sw, floor)
        # the preconditioned model starts as the Gaussian meta flow map, which is already fair at large t (≈ 7×
        # the floor at t = 0.8, where training reaches ≈ 3.4×): training must at least halve the distance there
        assert sw <= 0.6 * before[t][0], (t, sw, before[t])


def _tiny_cfg(**kw):
    base = dict(steps=12, batch=32, lr=1e-3, log_every=5, checkpoint_every=4, ema_decay=0.9, seed=3)
    return T.TrainConfig(**{**base, **kw})


def _sampler(n, gen):
    return paper_gmm().sample(n, gen)


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_equals_uninterrupted_run(tmp_path):
    cfg = _tiny_cfg(consistency="lsd")
    torch.manual_seed(1)
    full = T.train(MFMMLP(2, 16, 2), _sampler, cfg, out=str(tmp_path / "full.pt"), progress=False)

    class Killed(Exception):
        pass

    def die(step, logs):
        if step == 7:
            raise Killed

    path = str(tmp_path / "part.pt")
    torch.manual_seed(1)
    with pytest.raises(Killed):
        T.train(MFMMLP(2, 16, 2), _sampler, cfg, out=path, progress=False, callback=die)
    assert torch.load(path, weights_only=True)["step"] == 4  # the last checkpoint before the kill
    torch.manual_seed(99)  # a different initialisation: resume must overwrite it
    resumed = T.train(MFMMLP(2, 16, 2), _sampler, cfg, out=path, progress=False)
    assert resumed.step == full.step == 12
    assert _same_state(resumed.model, full.model) and _same_state(resumed.ema, full.ema)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 12 and [h["step"] for h in ckpt["history"]] == list(range(1, 13))
    # a finished run resumes to a no-op; a different seed is refused
    again = T.train(MFMMLP(2, 16, 2), _sampler, cfg, out=path, progress=False)
    assert _same_state(again.model, full.model)
    with pytest.raises(ValueError, match="seed"):
        T.train(MFMMLP(2, 16, 2), _sampler, dataclasses.replace(cfg, seed=4), out=path, progress=False)


def test_save_load_round_trip(tmp_path):
    mlp = MFMMLP(2, 24, 3)
    ema = MFMMLP(2, 24, 3)
    T.save(mlp, str(tmp_path / "mlp.pt"), ema=ema, note="gmm", steps=3)
    raw = torch.load(str(tmp_path / "mlp.pt"), weights_only=True)
    assert raw["extra"] == {"note": "gmm", "steps": 3}
    loaded = T.load(str(tmp_path / "mlp.pt"))
    assert not loaded.training and loaded.config_dict() == mlp.config_dict()
    assert _same_state(loaded, ema)  # EMA weights by default
    assert _same_state(T.load(str(tmp_path / "mlp.pt"), ema=False), mlp)

    dit = MFMDiT("MFM-T/2", impl="torch")
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.01 * torch.randn_like(p))
    T.save(dit, str(tmp_path / "dit.pt"))
    back = T.load(str(tmp_path / "dit.pt"), impl="torch")
    assert back.config == dit.config and _same_state(back, dit)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    xb = torch.randn(3, 4, 8, 8, generator=gen)
    s, u, t = torch.rand(3, 3, generator=gen)
    y = torch.tensor([1, 4, 10])
    with torch.no_grad():
        torch.testing.assert_close(back(s, u, xb, t, x, y=y), dit.eval()(s, u, xb, t, x, y=y), rtol=0, atol=0)
    with pytest.raises(TypeError, match="extra"):
        T.save(mlp, str(tmp_path / "x.pt"), bad=object())


def test_bad_checkpoints_raise(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="not a readable mfm_fast checkpoint"):
        T.load(str(junk))
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, str(foreign))
    with pytest.raises(ValueError, match="not an mfm_fast checkpoint"):
        T.load(str(foreign))
    with pytest.raises(FileNotFoundError):
        T.load(str(tmp_path / "missing.pt"))
    # a model file cannot be resumed; a checkpoint of another architecture neither
    T.save(MFMMLP(2, 16, 2), str(tmp_path / "model.pt"))
    with pytest.raises(ValueError, match="training state"):
        T.train(MFMMLP(2, 16, 2), _sampler, _tiny_cfg(), out=str(tmp_path / "model.pt"), progress=False)
    with pytest.raises(ValueError, match="not this MFMMLP"):
        T.train(MFMMLP(2, 8, 2), _sampler, _tiny_cfg(), out=str(tmp_path / "model.pt"), progress=False)


def test_dit_training_steps_with_labels(tmp_path):
    torch.manual_seed(0)
    model = MFMDiT("MFM-T/2", impl="torch")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def sample_batch(n, gen):
        return torch.randn(n, 4, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)

    # adaLN-Zero: labels reach the output from the second step on, once the modulation weights are non-zero
    for consistency, optimizer, steps in (("meanflow", "adamw", 3), ("semigroup", "radam", 2)):
        cfg = T.TrainConfig(steps=steps, batch=8, lr=1e-3, log_every=1, consistency=consistency, p_uncond=0.5,
                            optimizer=optimizer, grad_checkpointing=consistency == "semigroup")
        res = T.train(model, sample_batch, cfg, progress=False)
        assert len(res.history) == steps and all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)
        assert res.history[0]["cons"] > 0 and res.history[0]["grad_norm"] > 0
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "y_embedder.embedding_table.weight" in changed and "final_layer.linear.weight" in changed
    assert model.grad_checkpointing


def test_train_config_validation():
    with pytest.raises(ValueError, match="optimizer"):
        T.TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="consistency"):
        T.TrainConfig(consistency="foo")
    with pytest.raises(ValueError, match="steps"):
        T.TrainConfig(steps=0)
    with pytest.raises(ValueError, match="ema_decay"):
        T.TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="out"):
        T.train(MFMMLP(2, 8, 1), _sampler, T.TrainConfig(checkpoint_every=5), progress=False)
    cfg = T.TrainConfig(steps=100, lr=1.0, warmup=10)
    assert cfg.lr_at(0) == pytest.approx(0.1) and cfg.lr_at(9) == pytest.approx(1.0)
    assert cfg.lr_at(10) == pytest.approx(1.0) and cfg.lr_at(100) == pytest.approx(0.0, abs=1e-12)


def test_cli_gmm_and_digits(tmp_path, capsys):
    out = str(tmp_path / "gmm.pt")
    assert T.main(["--data", "gmm", "--out", out, "--steps", "30", "--batch", "64", "--teacher-steps", "20",
                   "--quiet", "--no-eval"]) == 0
    assert "trained teacher 20 steps + MFM 30 steps" in capsys.readouterr().out
    model = T.load(out)
    assert isinstance(model, MFMMLP) and model.config_dict() == T.gmm_defaults().model
    assert isinstance(T.load(T.teacher_path(out)), MFMMLP)
    report = T.gmm_posterior_sw2(model, paper_gmm(), n_contexts=2, n=256)
    assert sorted(report) == [0.05, 0.2, 0.5, 0.8, 0.95] and all(sw > 0 and fl > 0 for sw, fl in report.values())
    out = str(tmp_path / "digits.pt")
    assert T.main(["--data", "digits", "--out", out, "--steps", "2", "--batch", "8", "--teacher-steps", "3",
                   "--rollout-bank", "8", "--quiet", "--impl", "torch"]) == 0
    assert "trained teacher 3 steps + MFM 2 steps" in capsys.readouterr().out
    dit = T.load(out)
    assert isinstance(dit, MFMDiT) and dit.config.in_channels == 1 and dit.config.num_classes == 10
    assert isinstance(T.load(T.teacher_path(out)), MFMDiT)
    out = str(tmp_path / "digits_data.pt")
    assert T.main(["--data", "digits", "--teacher", "none", "--out", out, "--steps", "2", "--batch", "8",
                   "--quiet", "--impl", "torch"]) == 0
    assert "trained 2 steps" in capsys.readouterr().out and not os.path.exists(T.teacher_path(out))
    with pytest.raises(SystemExit, match="gmm"):
        T.main(["--data", "digits", "--teacher", "exact", "--out", out, "--quiet"])
