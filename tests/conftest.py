"""Test tiers: CPU (default), interpret (Triton kernels under TRITON_INTERPRET=1 on CPU tensors), gpu (CUDA only).

Without CUDA the Triton interpreter is switched on here, before anything imports triton.
"""
import os
import shutil

if shutil.which("nvidia-smi") is None and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from mfm_fast._torchvision import ensure_torchvision  # noqa: E402

# test modules import diffusers/transformers directly; with PyPI's torchvision beside a CPU torch they need this first
ensure_torchvision()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    # on a GPU machine the interpreter is off unless asked for (TRITON_INTERPRET=1 pytest tests -m interpret)
    skip_interpret = pytest.mark.skip(reason="needs TRITON_INTERPRET=1 (the kernels run on CPU tensors)")
    interpreter = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "interpret" in item.keywords and not interpreter:
            item.add_marker(skip_interpret)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def sharp_gaussian():
    """(exact meta flow map of Gaussian data, float64 linear reward) with the paper's reward sharpness σ = 0.2:
    the estimator-bias and jackknife oracles' problem (the data distribution is `model.data`)."""
    from mfm_fast.data import ExactGaussianMFM
    from mfm_fast.rewards import LinearInverseReward
    model = ExactGaussianMFM([0.5, -1.0], [[1.0, 0.4], [0.4, 0.7]])
    return model, LinearInverseReward([[1.2, -0.8]], [-1.0], 0.2).to(torch.float64)


@pytest.fixture(scope="module")
def tiny_dit():
    """A small MFM-DiT (MFM-T/2, reference path) in eval mode, one per test module. Its weights are perturbed:
    the zero-initialised output layers would otherwise hide errors behind an all-zero output."""
    from mfm_fast.models.dit import MFMDiT
    torch.manual_seed(0)
    model = MFMDiT("MFM-T/2", impl="torch")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """What `sample`/`steer` read, at toy size, one folder per test module: `vae/` (a diffusers AutoencoderKL,
    factor 4) and `mfm-tiny.pt` (a random MFM-T/2 with release-format keys; 4x8x8 latents -> 32x32 images,
    10 classes). A tiny architecture is not the released one, so its config travels with the weights."""
    import dataclasses

    from diffusers import AutoencoderKL

    from mfm_fast.models.dit import MFMDiT
    root = tmp_path_factory.mktemp("release_files")
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8), layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=32).save_pretrained(root / "vae")
    model = MFMDiT("MFM-T/2", impl="torch")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    torch.save({"model": {"model.model.dit." + k: v for k, v in model.state_dict().items()},
                "config": dataclasses.asdict(model.config)}, root / "mfm-tiny.pt")
    return root
