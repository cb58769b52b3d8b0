"""Nothing mixed, nothing stale, nothing silent (issue #24, the remaining items): a flipped byte in a checkpoint is
refused (zip CRC-32s; a sha256 in mfm_fast's .safetensors), a read error names the file; a huge λ gives finite
results or an error naming lam, never inf/NaN or an error blaming the reward, and states that run off (~1e10) come
with a warning naming lam; float labels, NaN or 0–255 images and inputs in the wrong dtype are refused by name;
tests write nothing into the checkout's cwd."""
import ast
import errno
import pathlib
import warnings
import zipfile

import pytest
import torch

import mfm_fast
from mfm_fast.__main__ import main as cli_main
from mfm_fast.integrity import DIGEST_KEY, check_zip_crc
from mfm_fast.models import MFMMLP
from mfm_fast.models.checkpoints import CheckpointError, load_official_mfm, read_state_dict, save_safetensors
from mfm_fast.parallel_sample import refine_shard, steer_shard
from mfm_fast.reward_models import class_prompts, score_images
from mfm_fast.rewards import LinearInverseReward
from mfm_fast.runloop import read_checkpoint
from mfm_fast.steer import steer
from mfm_fast.steps import SteeringDivergenceWarning
from mfm_fast.value import value_and_grad

TESTS = pathlib.Path(__file__).parent


# ---------------------------------------------------------------------------------------------- 1. damaged files
def _member_data_offset(path, suffix: str) -> tuple:
    """(offset of the first byte of the zip member whose name ends with `suffix`, its size)."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(suffix) and i.file_size > 64)
    raw = pathlib.Path(path).read_bytes()
    o = info.header_offset
    name_len, extra_len = int.from_bytes(raw[o + 26:o + 28], "little"), int.from_bytes(raw[o + 28:o + 30], "little")
    return o + 30 + name_len + extra_len, info.file_size


def _flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _largest_data_member(path) -> str:
    with zipfile.ZipFile(path) as zf:
        return max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size).filename


def test_a_flipped_byte_in_a_torch_checkpoint_is_refused_not_loaded(tiny_dit, tmp_path):
    path = tmp_path / "mfm.pt"
    torch.save(tiny_dit.state_dict(), path)
    assert check_zip_crc(path) is None
    assert load_official_mfm(path, impl="torch", config=tiny_dit.config) is not None
    start, size = _member_data_offset(path, _largest_data_member(path))
    _flip(path, start + size // 2)  # one bit of one weight: torch.load alone loads it as a different number
    with pytest.raises(CheckpointError, match=rf"cannot read the checkpoint {path}: it is corrupt, a CRC-32 check "
                                              r"failed \(Bad CRC-32 for file '.*/data/\d+'\)"):
        load_official_mfm(path, impl="torch", config=tiny_dit.config)
    with pytest.raises(CheckpointError, match="CRC-32"):
        read_state_dict(path)


def test_a_flipped_byte_in_an_mfm_fast_checkpoint_is_refused(tmp_path):
    path = tmp_path / "gmm.pt"
    mfm_fast.save(MFMMLP(2, 16, 2), str(path))
    mfm_fast.load(str(path))
    start, size = _member_data_offset(path, _largest_data_member(path))
    _flip(path, start + size - 3)
    with pytest.raises(ValueError, match=rf"'{path}' is a corrupt checkpoint: a CRC-32 check failed"):
        read_checkpoint(str(path))
    with pytest.raises(ValueError, match="CRC-32"):
        mfm_fast.load(str(path))


def test_checkpoints_written_without_crcs_still_load(tiny_dit, tmp_path):
    # torch.serialization.set_crc32_options(False) stores CRC 0: nothing to check, nothing refused
    path = tmp_path / "nocrc.pt"
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(tiny_dit.state_dict(), path)
    finally:
        torch.serialization.set_crc32_options(True)
    assert check_zip_crc(path) is None
    load_official_mfm(path, impl="torch", config=tiny_dit.config)
    legacy = tmp_path / "legacy.pt"  # the pre-zip format has no checksums
    torch.save(tiny_dit.state_dict(), legacy, _use_new_zipfile_serialization=False)
    assert check_zip_crc(legacy) is None
    load_official_mfm(legacy, impl="torch", config=tiny_dit.config)


def test_safetensors_files_carry_a_digest_that_the_loader_checks(tiny_dit, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    path = tmp_path / "mfm.safetensors"
    save_safetensors(tiny_dit, path)
    with safe_open(str(path), framework="pt") as f:
        assert len(f.metadata()[DIGEST_KEY]) == 64
    model = load_official_mfm(path, impl="torch")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny_dit.state_dict().values()))
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    _flip(path, header + (len(data) - header) // 2)  # a byte of the tensor data: the header still parses
    with pytest.raises(CheckpointError, match=rf"cannot read the checkpoint {path}: it is corrupt, its tensors do "
                                              r"not match the sha256 digest"):
        load_official_mfm(path, impl="torch")
    # files without the digest (other writers) load as before
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_dit.state_dict().items()}, str(plain))
    load_official_mfm(plain, impl="torch", config=tiny_dit.config)


def test_a_read_error_of_a_checkpoint_names_the_file(tiny_dit, tmp_path, monkeypatch):
    # an OSError without a file name (a failing read or mmap of a cut-short file, e.g. on network storage) used to
    # surface raw, naming nothing
    path = tmp_path / "small.pt"
    torch.save(tiny_dit.state_dict(), path)

    def failing_load(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(torch, "load", failing_load)
    with pytest.raises(CheckpointError, match=rf"cannot read the checkpoint {path}: it is truncated, corrupt or not "
                                              r"a checkpoint \(OSError: \[Errno 5\] Input/output error\)"):
        load_official_mfm(path, impl="torch", config=tiny_dit.config)


# ---------------------------------------------------------------------------------------------- 2. huge λ
def _mlp():
    torch.manual_seed(0)
    return MFMMLP(2, 16, 2).eval()


REWARD = LinearInverseReward([[1.2, -0.8]], [-1.0], 0.5)


@pytest.mark.parametrize("estimator", ["mfm-g", "mfm-gf"])
@pytest.mark.parametrize("jackknife", [False, True])
def test_value_and_grad_never_returns_inf_or_nan_for_a_huge_lam(estimator, jackknife):
    model, x = _mlp(), torch.randn(4, 2, generator=torch.Generator().manual_seed(1))

    def far(x1):  # r ≤ −10: λ·r overflows float32, so V̂ = logsumexp(λ·r) − log N is no float32 number
        return REWARD(x1) - 10

    # it used to come back as −inf (and MFM-G's gradient as NaN), silently
    with pytest.raises(ValueError, match=r"^lam=1e\+38: V \(float32\).* not finite"):
        value_and_grad(model, far, 0.5, x, 4, estimator=estimator, lam=1e38, jackknife=jackknife)
    V, g = value_and_grad(model, far, 0.5, x, 4, estimator=estimator, lam=1e30, jackknife=jackknife)
    assert V.dtype == torch.float32 and bool(torch.isfinite(V).all()) and bool(torch.isfinite(g).all())


@pytest.mark.parametrize("method", ["mfm-g", "mfm-gf", "smc"])
@pytest.mark.parametrize("jackknife", [False, True])
@pytest.mark.parametrize("lam", [1e4, 1e38])
def test_steering_with_a_huge_lam_is_finite_or_names_lam(method, jackknife, lam):
    """Whatever the setting: finite samples, or an error naming lam — never inf/NaN or an error blaming the reward;
    and states that ran off the data's scale (λ = 1e4 without renorm: |x| ~ 1e10 for MFM-G and SMC) never silently."""
    model = _mlp()
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            x = steer(model, REWARD, noise, steps=10, method=method, n_particles=4, lam=lam, jackknife=jackknife,
                      generator=torch.Generator().manual_seed(3), progress=False)
        except ValueError as err:
            assert str(err).startswith("steering diverged") and f"lam={lam:g}" in str(err), err
            assert "renorm='rescale'" in str(err)
            return
    assert bool(torch.isfinite(x).all())
    if float(x.abs().max()) > 1e3:
        assert any(issubclass(w.category, SteeringDivergenceWarning) and f"lam={lam:g}" in str(w.message)
                   for w in caught), [str(w.message) for w in caught]


def test_gradient_free_steering_is_finite_for_any_lam():
    # MFM-GF's steering term is a convex combination of samples: bounded for every λ once the weights are computed
    # without overflow (it used to fail with "reward ... returned non-finite values" at λ = 1e38)
    model = _mlp()
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(2))
    for kw in (dict(method="mfm-gf"), dict(method="mfm-gf", jackknife=True), dict(method="smc", smc_estimator="mfm-gf"),
               dict(method="smc", smc_estimator="mfm-gf", jackknife=True)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", SteeringDivergenceWarning)
            res = steer(model, REWARD, noise, steps=10, n_particles=4, lam=1e38, progress=False,
                        return_result=True, generator=torch.Generator().manual_seed(3), **kw)
        assert bool(torch.isfinite(res.samples).all()) and float(res.samples.abs().max()) < 1e3, kw
        if res.log_normalizer is not None:  # SMC's log Ẑ scales with λ: kept in float64
            assert res.log_normalizer.dtype == torch.float64 and bool(torch.isfinite(res.log_normalizer).all())


def test_diverging_doob_steering_names_lam_and_the_remedies():
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(2))
    kw = dict(method="mfm-g", n_particles=4, lam=1e4, progress=False)
    # states of ~1e7 are finite: returned, but with a warning naming lam
    with pytest.warns(SteeringDivergenceWarning, match=r"steering is diverging at step \d+ of 10 .* With "
                                                        r"method='mfm-g', lam=10000 and renorm=None .* lower lam, "
                                                        r"pass renorm='rescale'"):
        steer(_mlp(), REWARD, noise, steps=10, generator=torch.Generator().manual_seed(3), **kw)
    # longer, they turn non-finite: an error naming lam (the reward's own check used to take the blame)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SteeringDivergenceWarning)
        with pytest.raises(ValueError, match=r"^steering diverged .*lam=10000"):
            steer(_mlp(), REWARD, noise, steps=100, generator=torch.Generator().manual_seed(3), **kw)
    # the release's remedy works
    with warnings.catch_warnings():
        warnings.simplefilter("error", SteeringDivergenceWarning)
        x = steer(_mlp(), REWARD, noise, steps=10, renorm="rescale", **kw)
    assert bool(torch.isfinite(x).all()) and float(x.abs().max()) < 1e3


# ---------------------------------------------------------------------------------------------- 3. silent casts
def test_float_labels_are_refused_not_truncated(tiny_dit):
    with pytest.raises(ValueError, match=r"labels\[1\] must be an integer class label, got 2.7"):
        class_prompts([1, 2.7])
    with pytest.raises(ValueError, match=r"labels\[0\] must be an integer class label, got 2.5"):
        class_prompts(torch.tensor([2.5]))
    assert class_prompts([2.0]) == class_prompts(torch.tensor([2])) == class_prompts([2])
    decode = lambda z: z  # noqa: E731
    for build in (lambda label: refine_shard(tiny_dit, decode, 2, label),
                  lambda label: steer_shard(tiny_dit, decode, REWARD, "r", label, steps=2)):
        with pytest.raises(ValueError, match=r"^label must be an integer class label, got 2.7"):
            build(2.7)
        with pytest.raises(TypeError, match="label must be an integer class label, got bool"):
            build(True)
        build(3)
        build("random")
        build(torch.tensor(3))
    x = torch.randn(2, *tiny_dit.config.event_shape)
    t = torch.rand(2)
    with pytest.raises(TypeError, match=r"y must be an integer tensor of class labels .*got dtype torch.float32"):
        tiny_dit(t, t, x, t, x, y=torch.tensor([2.7, 1.0]))


def test_score_images_refuses_nan_and_images_outside_0_1():
    scorers = {"mean": lambda images: images.mean((1, 2, 3))}
    good = torch.rand(2, 3, 8, 8)
    assert len(score_images(good, scorers)["mean"]) == 2
    score_images((good * (1 + 1e-4)).clamp(max=1 + 1e-4), scorers)  # rounding above 1 is tolerated
    bad = good.clone()
    bad[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^images has 1 non-finite value"):
        score_images(bad, scorers)
    with pytest.raises(ValueError, match=r"^images must lie in \[0, 1\], got values in .*divide them by 255"):
        score_images(good * 255, scorers)
    with pytest.raises(ValueError, match=r"^images must lie in \[0, 1\], got values in .*\(x \+ 1\) / 2"):
        score_images(good * 2 - 1, scorers)


def test_mlp_inputs_in_another_dtype_name_the_argument_and_both_dtypes():
    model = MFMMLP(2, 16, 2)
    t = torch.rand(3)
    x32, x64 = torch.randn(3, 2), torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"^x must be float32 like the model's weights, got float64"):
        model(t, t, x32, t, x64)
    with pytest.raises(TypeError, match=r"^xbar must be float32 like the model's weights, got float64"):
        model(t, t, x64, t, x32)
    assert model.double()(t.double(), t.double(), x64, t.double(), x64).dtype == torch.float64


# ---------------------------------------------------------------------------------------------- 4. no outputs/ in cwd
def test_refused_experiment_runs_with_out_write_nothing_into_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "elsewhere"
    for argv in (["experiment", "posterior", "--quick", "--recipes", "nope", "--out", str(out / "p")],
                 ["experiment", "estimators", "--quick", "--ts", "1.0", "--out", str(out / "e")],
                 ["experiment", "posterior", "--contexts", "0", "--out", str(out / "c")],
                 ["demo", "--quick", "--methods", "nope", "--out", str(out / "d")]):
        with pytest.raises(SystemExit):
            cli_main(argv)
    assert not (tmp_path / "outputs").exists()


def _argv_lists(tree):
    """List literals passed as the first argument of a call that run an experiment entry point: `main([...])` /
    `cli_main([...])` with "demo" or "experiment <known name>" (not the dispatcher's own errors or --help)."""
    from mfm_fast.experiments import EXPERIMENTS
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.List):
            argv = [e.value if isinstance(e, ast.Constant) else None for e in node.args[0].elts]
            runs = argv[:1] == ["demo"] or (argv[:1] == ["experiment"] and len(argv) > 1 and argv[1] in EXPERIMENTS)
            if runs and not {"-h", "--help"} & set(argv):
                yield node.lineno, argv


def test_every_experiment_run_in_the_tests_passes_out():
    # the experiments create their default --out (outputs/<name>, relative to the cwd) before checking the other
    # arguments, so even a run that is meant to be refused must say where to write
    missing = []
    for path in sorted(TESTS.glob("test_*.py")) + sorted((TESTS.parent / "benchmarks").glob("*.py")):
        for line, argv in _argv_lists(ast.parse(path.read_text(), str(path))):
            if "--out" not in argv:
                missing.append(f"{path.name}:{line} {argv}")
    assert not missing, "experiment runs without --out (they write outputs/ into the cwd): " + "; ".join(missing)
