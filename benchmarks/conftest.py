"""Benchmark fixtures: bf16 at real shapes on a GPU; fp32 at tiny shapes on the CPU (smoke run, Triton
interpreter). `pytest benchmarks --benchmark-only` on a GPU; `--benchmark-disable` as a CPU smoke test."""
import os
import shutil

if shutil.which("nvidia-smi") is None and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

from _common import copy_bandwidth, gpu_name, versions  # noqa: E402


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def dtype(device) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


@pytest.fixture(scope="session")
def shapes(device) -> dict:
    """Problem sizes: W5 (256·256 tokens × 1152, BENCHMARKS.md) on a GPU, tiny odd shapes on the CPU."""
    if device == "cuda":
        return dict(rows=256, tokens=256, dim=1152, groups=64, mlp=4608, times=(256, 5, 256))
    return dict(rows=4, tokens=5, dim=72, groups=2, mlp=300, times=(3, 5, 32))


@pytest.fixture(scope="session")
def device_info(device) -> dict:
    """Facts every benchmark row carries, copy bandwidth measured once in this run."""
    return dict(gpu=gpu_name(), copy_gbps=copy_bandwidth(device), **versions())


@pytest.fixture(scope="session")
def peer_times() -> dict:
    """(case, pass, impl) -> median seconds, so later rows can report ratios against peers of the same run."""
    return {}


# the MFM-XL/2 (GPU) or tiny (CPU) model and the measured bf16 matmul peak, shared by bench_model and bench_steer
@pytest.fixture(scope="module")
def dit(device, dtype):
    from _steering import build_model
    return build_model(device, dtype)


@pytest.fixture(scope="module")
def peak(device):
    from _common import matmul_peak_tflops
    return matmul_peak_tflops(device)
