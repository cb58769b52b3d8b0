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
