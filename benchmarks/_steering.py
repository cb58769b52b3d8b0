"""Helpers of the model and steering benchmarks (bench_model.py, bench_steer.py): the model under test, round
counts, and the row every benchmark reports (throughput, peak fraction, ratios to the peers of the same run)."""
from __future__ import annotations

import torch

from mfm_fast.models.dit import MFMDiT
from mfm_fast.profile import randomize_, throughput

ON_GPU = torch.cuda.is_available()
# peers first, so that the fast path's row can carry its speedup over each
PATHS = ("ref", "compile", "compile-ro", "fast") if ON_GPU else ("ref", "fast")
TINY = dict(input_size=4, hidden_size=72, num_heads=1, depth=2, encoder_depth=1)  # CPU smoke shape


def build_model(device, dtype) -> MFMDiT:
    """MFM-XL/2 with small random weights on a GPU, a tiny MFM-T/2 on the CPU."""
    name, over = ("MFM-XL/2", {}) if device == "cuda" else ("MFM-T/2", TINY)
    with torch.device(device):
        model = randomize_(MFMDiT(name, **over))
    return model.to(dtype).requires_grad_(False).eval()


def rounds(path: str, device: str) -> dict:
    # reduce-overhead records its CUDA graphs during the first calls: keep them out of the statistics
    if device != "cuda":
        return dict(rounds=1, warmup_rounds=0)
    return dict(rounds=10, warmup_rounds=4 if path == "compile-ro" else 2)


def report(benchmark, workload, path, impl, seconds, flops, items, unit, peak, device_info, peer_times, **extra):
    info = dict(workload=workload, path=path, impl=impl, matmul_peak_tflops=peak, **device_info, **extra)
    if seconds is not None:
        info.update(throughput(seconds * 1e3, flops, items, unit, peak))
        peer_times[(workload, path)] = seconds
        if path == "fast":
            for peer in ("ref", "compile", "compile-ro"):
                if (workload, peer) in peer_times:
                    info[f"speedup_vs_{peer}"] = peer_times[(workload, peer)] / seconds
    benchmark.extra_info.update(info)
