"""W1 (BENCHMARKS.md): one-step posterior samples X_{0,1}(ε; t, x), batch 256, forward only — MFM-XL/2, bf16.

Paths measured in one process so that ratios come from one run: "ref" (PyTorch reference ops with SDPA attention,
eager), "compile" and "compile-ro" (torch.compile of it, default and mode="reduce-overhead"), "fast" (Triton kernels).
Rows carry ms, samples/s, TFLOP/s (28·(2·L·D·12D + 4·L²·D) per sample) and % of the bf16 matmul peak measured
in the same run, peak memory, the GPU name and versions. On a CPU (--benchmark-disable) this is a smoke run: a
tiny model in fp32, the reference path and one fast-path call under the Triton interpreter.
"""
from __future__ import annotations

import pytest
import torch

from _common import run
from _steering import PATHS, report, rounds
from mfm_fast.profile import build_path, forward_flops
from mfm_fast.sampling import posterior_sample

@pytest.mark.parametrize("path", PATHS)
def test_w1_posterior_samples(benchmark, path, dit, device, dtype, peak, device_info, peer_times):
    B = 256 if device == "cuda" else 3
    net, impl = build_path(path, dit, device, fast_impl="triton")
    gen = torch.Generator(device).manual_seed(0)
    ev = dit.event_shape
    x = torch.randn(B, *ev, device=device, dtype=dtype, generator=gen)
    t = torch.rand(B, device=device, dtype=dtype, generator=gen) * 0.8 + 0.1
    y = torch.randint(0, dit.config.num_classes, (B,), device=device, generator=gen)
    noise = torch.randn(B, *ev, device=device, dtype=dtype, generator=gen)

    def sample():
        with torch.no_grad():
            return posterior_sample(net, t, x, 1, noise=noise, y=y)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out, seconds = run(benchmark, sample, device, **rounds(path, device))
    assert out.shape == (B, 1, *ev) and torch.isfinite(out.float()).all()
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    report(benchmark, "W1", path, impl, seconds, B * forward_flops(dit.config), B,
           "samples_per_s", peak, device_info, peer_times, batch=B, peak_mem_gib=peak_gib)
