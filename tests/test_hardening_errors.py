"""Hardening (issue #12, items 7 and 8): NaN/inf inputs are refused at the entry points (and never blamed on the
reward), and misuse fails with an error naming the argument instead of an internal one: empty batches, a
non-differentiable reward for DPS, unreadable checkpoint files, inputs in the wrong dtype or shape, conditioning of
the wrong length, ode_sample's arguments, models returning non-tensors, unknown CLI flags and compile targets."""
import re

import pytest
import torch

from mfm_fast import aot, backend
from mfm_fast.__main__ import main as cli_main
from mfm_fast.data import ExactGaussianMFM
from mfm_fast.models import MFMMLP
from mfm_fast.models.checkpoints import CheckpointError, load_official_mfm, save_safetensors
from mfm_fast.rewards import LinearInverseReward
from mfm_fast.sampling import drift, flow_map, ode_sample, posterior_sample, refine_sample
from mfm_fast.steer import best_of_n, steer
from mfm_fast.value import value_and_grad

F64 = torch.float64
STEER_METHODS = ("none", "mfm-g", "mfm-gf", "dps", "search", "smc")


def mlp():
    return MFMMLP(2, 16, 2).eval()


def gaussian():
    m = torch.tensor([0.8, -0.4], dtype=F64)
    S = torch.tensor([[1.0, 0.3], [0.3, 0.6]], dtype=F64)
    return ExactGaussianMFM(m, S, dtype=torch.float32), LinearInverseReward([[1.2, -0.8]], [-1.0], 0.5)


def poisoned(shape, value=float("nan"), at=(1, 0)):
    x = torch.randn(shape)
    x[at] = value
    return x


def image_reward(x):
    return -x.pow(2).flatten(1).mean(1)


def steer_kw(**kw):
    return dict(steps=2, n_particles=2, progress=False, **kw)


# ---------------------------------------------------------------------------------------------- item 7: NaN/inf
def test_nonfinite_inputs_are_refused_at_the_sampling_entry_points():
    model = mlp()
    bad = poisoned((4, 2))
    with pytest.raises(ValueError, match=r"^x has 1 non-finite value\(s\)"):
        posterior_sample(model, 0.5, bad, 2)
    with pytest.raises(ValueError, match=r"^noise has 1 non-finite"):
        posterior_sample(model, 0.5, torch.randn(4, 2), 2, noise=poisoned((8, 2), float("inf")))
    with pytest.raises(ValueError, match=r"^x has 1 non-finite"):
        drift(model, 0.5, bad)
    with pytest.raises(ValueError, match=r"^noise has 1 non-finite"):
        refine_sample(model, bad, steps=2)
    with pytest.raises(ValueError, match=r"^noise has 1 non-finite"):
        ode_sample(model, bad, steps=2)
    with pytest.raises(ValueError, match=r"^xbar has 1 non-finite"):
        flow_map(model, 0.0, 1.0, poisoned((4, 2), -float("inf")), 0.5, torch.randn(4, 2))
    # finite inputs still go through
    assert bool(torch.isfinite(posterior_sample(model, 0.5, torch.randn(4, 2), 2)).all())


def test_nonfinite_noise_is_blamed_on_the_noise_not_the_reward():
    model, reward = gaussian()
    bad = poisoned((4, 2))
    for method in STEER_METHODS:
        with pytest.raises(ValueError, match=r"^noise has 1 non-finite") as info:
            steer(model, reward, bad, method=method, **steer_kw())
        assert "reward" not in str(info.value), method
    with pytest.raises(ValueError, match=r"^noise has 1 non-finite"):
        best_of_n(model, reward, bad, 2, steps=2)
    with pytest.raises(ValueError, match=r"^x has 1 non-finite"):
        value_and_grad(model, reward, 0.5, bad, 2)
    with pytest.raises(ValueError, match=r"^noise has 1 non-finite"):
        value_and_grad(model, reward, 0.5, torch.randn(4, 2), 2, noise=poisoned((4, 2, 2), at=(0, 1, 0)))


def test_dit_forward_refuses_nonfinite_inputs_eagerly_but_not_inside_transforms(tiny_dit):
    t = torch.rand(3)
    x, xbar = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"^x has 1 non-finite"):
            tiny_dit(t, t, xbar, t, poisoned((3, 4, 8, 8), float("inf"), at=(2, 0, 0, 0)))
        with pytest.raises(ValueError, match=r"^xbar has 1 non-finite"):
            tiny_dit(t, t, poisoned((3, 4, 8, 8), at=(0, 3, 7, 7)), t, x)
    # inside torch.func transforms (as in the training losses' jvp) no host read is made: the values pass through
    out, _ = torch.func.jvp(lambda xb: tiny_dit(t, t, xb, t, x), (poisoned((3, 4, 8, 8)),), (torch.randn(3, 4, 8, 8),))
    assert not bool(torch.isfinite(out).all())


# ---------------------------------------------------------------------------------------------- item 8
def test_empty_batches_raise_a_clear_error(tiny_dit):
    model, reward = gaussian()
    empty = torch.randn(0, 2)
    for method in STEER_METHODS:  # SMC raised ZeroDivisionError, the others blamed "xbar"
        with pytest.raises(ValueError, match=r"^noise is an empty batch \(shape \(0, 2\)\)"):
            steer(model, reward, empty, method=method, **steer_kw())
    with pytest.raises(ValueError, match="^noise is an empty batch"):
        best_of_n(model, reward, empty, 2, steps=2)
    with pytest.raises(ValueError, match="^x is an empty batch"):
        posterior_sample(mlp(), 0.5, empty, 2)
    with pytest.raises(ValueError, match="^x is an empty batch"):
        drift(mlp(), 0.5, empty)
    with pytest.raises(ValueError, match="^x is an empty batch"):
        value_and_grad(model, reward, 0.5, empty, 2)
    e = torch.rand(0)
    with torch.no_grad(), pytest.raises(ValueError, match="batch is empty"):
        tiny_dit(e, e, torch.randn(0, 4, 8, 8), e, torch.randn(0, 4, 8, 8))


def test_dps_with_a_non_differentiable_reward_names_the_reward():
    model, _ = gaussian()

    def detached(x):
        return -(x.detach() ** 2).sum(1)

    with pytest.raises(ValueError, match=r"reward 'detached': no gradient reaches the state; method 'dps'"):
        steer(model, detached, torch.randn(4, 2), method="dps", **steer_kw())
    # the gradient-free methods still run with it
    x = steer(model, detached, torch.randn(4, 2), method="mfm-gf", **steer_kw())
    assert bool(torch.isfinite(x).all())


@pytest.mark.parametrize("kind", ["empty", "truncated", "random"])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_unreadable_checkpoint_files_name_the_path(tiny_dit, tmp_path, kind, suffix):
    good = tmp_path / f"good{suffix}"
    if suffix == ".pt":
        torch.save(tiny_dit.state_dict(), good)
    else:
        save_safetensors(tiny_dit, good)
    data = good.read_bytes()
    path = tmp_path / f"{kind}{suffix}"
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                      "random": torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes()}[kind])
    with pytest.raises(CheckpointError, match=rf"cannot read the checkpoint {re.escape(str(path))}: "
                                              r"(the file is empty|it is truncated, corrupt or not a checkpoint)"):
        load_official_mfm(path, impl="torch")
    assert load_official_mfm(good, impl="torch", config=tiny_dit.config).config == tiny_dit.config


def test_inputs_in_another_dtype_than_the_model_name_the_argument(tiny_dit):
    t = torch.rand(2)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        with pytest.raises(TypeError, match=r"^x must be float32 like the model's weights, got float16"):
            tiny_dit(t, t, x, t, x.half())
        with pytest.raises(TypeError, match=r"^xbar must be float32 like the model's weights, got float64"):
            tiny_dit(t, t, x.double(), t, x)
        with pytest.raises(TypeError, match=r"^x must be float32 .* got float64"):
            drift(tiny_dit, 0.5, x.double())  # the model sees x as its xbar; the entry point names it
        with pytest.raises(TypeError, match=r"^x must be float32 .* got float16"):
            posterior_sample(tiny_dit, 0.5, x.half())
        with pytest.raises(TypeError, match=r"^noise must be float32 .* got float16"):
            steer(tiny_dit, image_reward, x.half(), steps=1, method="none", progress=False)
        with pytest.raises(TypeError, match=r"^x must be float32 .* got float64"):
            posterior_sample(mlp(), 0.5, torch.randn(4, 2, dtype=F64))
        # under autocast the ops cast their inputs themselves
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert tiny_dit(t, t, x.bfloat16(), t, x.bfloat16()).shape == x.shape


def test_wrong_shape_x_is_reported_as_x(tiny_dit):
    with torch.no_grad():
        for call in (lambda: drift(tiny_dit, 0.5, torch.randn(2, 4, 6, 6)),
                     lambda: posterior_sample(tiny_dit, 0.5, torch.randn(2, 4, 6, 6)),
                     lambda: flow_map(tiny_dit, 0.0, 1.0, torch.randn(2, 4, 8, 8), 0.5, torch.randn(2, 4, 6, 6))):
            with pytest.raises(ValueError, match=r"^x must have shape \(B, 4, 8, 8\), got \(2, 4, 6, 6\)"):
                call()
        with pytest.raises(ValueError, match=r"^x must have shape \(B, 2\), got \(4, 3\)"):
            drift(mlp(), 0.5, torch.randn(4, 3))
        with pytest.raises(ValueError, match=r"^noise must have shape \(B, 4, 8, 8\)"):
            refine_sample(tiny_dit, torch.randn(2, 4, 6, 6))


def test_cfg_and_y_of_the_wrong_length_are_refused(tiny_dit):
    t = torch.rand(4)
    x, xbar = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    with torch.no_grad():
        for cfg in (torch.tensor([1.0, 2.5]), torch.full((5,), 2.5), torch.full((4, 1), 2.5)):
            with pytest.raises(ValueError, match=r"^cfg must be a number or a tensor of shape \(\) or \(4,\)"):
                tiny_dit(t, t, xbar, t, x, cfg=cfg)
        with pytest.raises(ValueError, match=r"^x_cond_scale must be .* \(4,\)"):
            tiny_dit(t, t, xbar, t, x, x_cond_scale=torch.ones(3))
        # one weight per row, or one for all, still work
        a = tiny_dit(t, t, xbar, t, x, cfg=torch.full((4,), 2.5))
        b = tiny_dit(t, t, xbar, t, x, cfg=torch.full((1,), 2.5))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        noise = torch.randn(2, 4, 8, 8)
        kw = dict(steps=1, progress=False)
        with pytest.raises(ValueError, match=r"^y has 3 rows but noise has 2 samples"):
            steer(tiny_dit, image_reward, noise, method="none", y=torch.tensor([1, 2, 3]), **kw)
        with pytest.raises(ValueError, match=r"^cfg has 3 rows but noise has 2 samples"):
            steer(tiny_dit, image_reward, noise, method="none", cfg=torch.full((3,), 2.5), **kw)
        # best_of_n repeats per-row conditioning n times: a wrong length was reported against B·n rows
        with pytest.raises(ValueError, match=r"^y has 3 rows but noise has 2 samples"):
            best_of_n(tiny_dit, image_reward, noise, 4, y=torch.tensor([1, 2, 3]), steps=1)
        with pytest.raises(ValueError, match=r"^y has 5 rows but x has 2 samples"):
            posterior_sample(tiny_dit, 0.5, noise, 2, y=torch.arange(5))


def test_ode_sample_checks_its_arguments():
    model = mlp()
    noise = torch.randn(4, 2)
    for steps in (0, -1, 1.5):  # 0 and -1 returned the noise unchanged
        with pytest.raises(ValueError, match=rf"^steps must be a positive integer, got {steps}"):
            ode_sample(model, noise, steps=steps)
    for t_start in (1.0, -0.1, 2.0):  # 1.0 returned the noise unchanged; the others blamed "t"
        with pytest.raises(ValueError, match=r"^t_start must lie in \[0, 1\)"):
            ode_sample(model, noise, steps=2, t_start=t_start)
    with pytest.raises(ValueError, match="^t_start must be finite"):
        ode_sample(model, noise, steps=2, t_start=float("nan"))
    with pytest.raises(TypeError, match="^noise must be a tensor, got list"):
        ode_sample(model, [[0.0, 1.0]], steps=2)
    with pytest.raises(ValueError, match=r"^noise must have shape \(B, 2\)"):
        ode_sample(model, torch.randn(4, 3), steps=2)
    x = ode_sample(model, noise, steps=3, t_start=0.25)
    assert x.shape == noise.shape and not torch.equal(x, noise)


class TupleModel(torch.nn.Module):
    def forward(self, s, u, xbar, t, x):
        return (xbar,)


class NumpyModel(torch.nn.Module):
    def forward(self, s, u, xbar, t, x):
        return xbar.detach().numpy()


class NarrowModel(torch.nn.Module):
    def forward(self, s, u, xbar, t, x):
        return xbar[:, :1]


def test_a_model_returning_a_non_tensor_or_a_wrong_shape_is_named():
    _, reward = gaussian()
    x = torch.randn(4, 2)
    calls = {
        "drift": lambda m: drift(m, 0.5, x),
        "posterior_sample": lambda m: posterior_sample(m, 0.5, x, 2),
        "ode_sample": lambda m: ode_sample(m, x, steps=1),
        "refine_sample": lambda m: refine_sample(m, x, steps=1),
        "steer none": lambda m: steer(m, reward, x, method="none", steps=1, progress=False),
        "steer mfm-g": lambda m: steer(m, reward, x, method="mfm-g", steps=1, progress=False),
        "value_and_grad": lambda m: value_and_grad(m, reward, 0.5, x, 2),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=r"^the model TupleModel must return a tensor .* got tuple"):
            call(TupleModel())
        with pytest.raises(TypeError, match=r"^the model NumpyModel must return a tensor .* got ndarray"):
            call(NumpyModel())
        with pytest.raises(ValueError, match=r"^the model NarrowModel returned shape \(\d+, 1\); .* xbar's shape"):
            call(NarrowModel())


# ---------------------------------------------------------------------------------------------- command line
def test_info_rejects_unknown_flags(capsys):
    for argv in (["--bogus"], ["extra"]):
        with pytest.raises(SystemExit) as info:
            backend.info_main(argv)
        assert info.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["info", "--json"])


def test_kernels_refuses_an_unknown_capability_before_compiling(capsys):
    for cap in ("0", "91", "130"):  # each aborted the process inside LLVM ("Cannot select: intrinsic")
        with pytest.raises(SystemExit) as info:
            aot.main(["--model", "MFM-T/2", "--dtype", "fp32", "--shapes", "1x1", "--capability", cap])
        assert info.value.code == 2
        assert "--capability must be a CUDA compute capability" in capsys.readouterr().err
    for cap in (0, 91, 9.0, True):
        with pytest.raises(ValueError, match="capability must be a CUDA compute capability"):
            aot.check(("MFM-T/2",), (torch.float32,), cap, ((1, 1),))
        with pytest.raises(ValueError, match="capability must be a CUDA compute capability"):
            aot.compile_launch(None, cap)
    assert aot.check_capability(90) == 90 and aot.check_capability(120) == 120


@pytest.mark.parametrize("argv", [["demo", "--samples", "0"], ["demo", "--particles", "0"], ["demo", "--steps", "-3"],
                                  ["demo", "--train-steps", "0"], ["experiment", "gmm", "--samples", "0"],
                                  ["experiment", "posterior", "--contexts", "0"]])
def test_counts_of_zero_are_refused_not_replaced_by_defaults(argv, capsys):
    # `demo --samples 0` used to run with the default 1024 samples
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    assert info.value.code == 2
    assert "must be a positive integer" in capsys.readouterr().err
