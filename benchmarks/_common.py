"""Helpers shared by the benchmark suites: device facts, peer measurements and synchronised timing.

Numbers measured on a CPU (the smoke run) exercise the code only; they are not performance numbers.
"""
from __future__ import annotations

import functools
import statistics
import time

import torch


def on_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    if on_cuda(device):
        torch.cuda.synchronize(device)


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke run, not a performance number)"


@functools.lru_cache(maxsize=None)
def versions() -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda or "none"}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "not installed"
    return out


def timed(fn, device, warmup: int = 3, iters: int = 10) -> float:
    """Seconds per fn() call (CUDA events on GPU, perf_counter on CPU). On a GPU the iters calls run back to back
    between two events (the sustained rate); on the CPU the median of single synchronised calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    if on_cuda(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def copy_bandwidth(device: str = "cuda", nbytes: int | None = None) -> float:
    """Device copy bandwidth in GB/s: a large tensor clone counts one read and one write of every byte."""
    if nbytes is None:
        nbytes = (1 << 30) if on_cuda(device) else (16 << 20)
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    seconds = timed(x.clone, device, warmup=3, iters=20 if on_cuda(device) else 5)
    return 2 * nbytes / seconds / 1e9


@functools.lru_cache(maxsize=None)
def matmul_peak_tflops(device: str = "cuda", n: int | None = None) -> float:
    """Achievable dense matmul TFLOP/s: n³ A @ A (bf16, n = 8192 on GPU; fp32, n = 256 on the CPU smoke run)."""
    if n is None:
        n = 8192 if on_cuda(device) else 256
    dtype = torch.bfloat16 if on_cuda(device) else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    # ~100 ms of back-to-back GEMMs on a GPU: the clock the long workloads run at, not a short boost burst
    seconds = timed(lambda: a @ a, device, warmup=3, iters=64 if on_cuda(device) else 3)
    return 2 * n ** 3 / seconds / 1e12


def run(benchmark, fn, device, rounds: int = 20, warmup_rounds: int = 3):
    """pytest-benchmark pedantic run of fn, each round ending with a device synchronisation.

    Returns (fn's last result, seconds): the median over the measured rounds of the device time (CUDA events
    around fn on a GPU, so Python and launch overhead outside fn do not count; perf_counter on the CPU). With
    --benchmark-disable (one call, no statistics) that call's time. Only the last result is kept alive, so a
    round never pays for allocating around the outputs of earlier rounds.
    """
    result, times = [None], []
    cuda = on_cuda(device)

    def target():
        result[0] = None  # free the previous round's output before this round allocates its own
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result[0] = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            result[0] = fn()
            times.append(time.perf_counter() - t0)

    benchmark.pedantic(target, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    stats = getattr(benchmark, "stats", None)
    measured = times[-rounds:] if stats is not None and getattr(stats, "stats", None) is not None \
        and stats.stats.data else times[-1:]
    return result[0], statistics.median(measured)
