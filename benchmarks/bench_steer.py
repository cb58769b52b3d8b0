"""W2–W4 (BENCHMARKS.md): value gradient, one steering step, memory — MFM-XL/2, bf16, cheap analytic reward.

- W2: MFM-G value gradient, 8 states × 32 particles (forward + backward to the context x): ms, particles/s,
  TFLOP/s (2× forward) and % of the bf16 matmul peak; the row's peak memory is W4's first number.
- W3: one full steering step (value gradient + drift + Euler update), 1 state × 4 particles: ms/step. The fast
  path replays the step from a CUDA graph (what `steer(graph=True)` does); "fast-eager" is the same step eagerly.
- W4: W2 under an 8 GiB bound (auto chunking, fast path): peak GiB and slowdown against the unbounded fast W2;
  and the largest particle count per state that runs, for the fast path (auto chunks) and the reference.
- FT: one MFM-FT optimizer step as `finetune` runs it (base drift, posterior forward + backward through the SD-VAE
  decode and the reward, trainable drift forward + backward, clip, RAdam, EMA): MFM-XL/2 fp32 weights under bf16
  autocast, 18 rows, cfg 2.5 on the posterior, per-row labels and prompts; the SD-VAE architecture with random
  weights (`build_vae`) and a toy (CLIP-shaped) or HPSv2-shaped (random ViT-H-14, when imscore is installed)
  reward. extra_info: peak GiB, the fixed bytes between steps (weights, EMA, frozen copy, VAE, reward, optimizer
  state, gradients) and peak memory per row = (peak − fixed) / micro-batch rows, beside the planner's estimate.
  Peer: the reference ops ("ref"), no compiled peer.
Peers as in bench_model.py ("ref", "compile", "compile-ro"). On a CPU (--benchmark-disable) a smoke run at tiny
shapes: the reference path and one fast-path call (Triton interpreter); FT at 2 rows in micro-batches of 1, a tiny
VAE and the toy reward.
"""
from __future__ import annotations

import pytest
import torch

from _common import run
from _steering import ON_GPU, PATHS, TINY, report, rounds
from mfm_fast.graphs import GraphedSteerStep, StaticStep
from mfm_fast.interpolant import time_grid
from mfm_fast.memory import activation_bytes_per_row, auto_chunk_size
from mfm_fast.profile import (FT_FORWARDS_PER_ROW, FTStep, build_path, forward_flops, ft_model, ft_reward,
                               steering_problem)
from mfm_fast.steer import make_step
from mfm_fast.value import value_and_grad

GiB = 2 ** 30
W4_BUDGET = 8 * GiB


def w2_shape(device):
    return (8, 32) if device == "cuda" else (2, 2)


def _peak_gib(device):
    return torch.cuda.max_memory_allocated() / GiB if device == "cuda" else None


def _reset_peak(device):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


@pytest.mark.parametrize("path", PATHS)
def test_w2_value_gradient(benchmark, path, dit, device, dtype, peak, device_info, peer_times):
    B, N = w2_shape(device)
    net, impl = build_path(path, dit, device, fast_impl="triton")
    x, t, y, reward, noise = steering_problem(dit, B, device, dtype, particles=N)
    _reset_peak(device)  # before sizing chunks: memory cached by the peers that ran before is not in use
    chunk = auto_chunk_size(dit, B, N, dtype, device) if path == "fast" else None

    def value_grad():
        return value_and_grad(net, reward, t, x, N, noise=noise, chunk_size=chunk, y=y)

    (V, g), seconds = run(benchmark, value_grad, device, **rounds(path, device))
    assert V.shape == (B,) and g.shape == x.shape and torch.isfinite(g.float()).all() and g.abs().max() > 0
    report(benchmark, "W2", path, impl, seconds, 2 * B * N * forward_flops(dit.config), B * N,
           "particles_per_s", peak, device_info, peer_times, states=B, particles=N, chunk_size=chunk,
           peak_mem_gib=_peak_gib(device))


W3_PATHS = PATHS[:-1] + ("fast-eager", "fast") if ON_GPU else PATHS  # on a CPU "fast" runs eagerly anyway


@pytest.mark.parametrize("path", W3_PATHS)
def test_w3_steering_step(benchmark, path, dit, device, dtype, peak, device_info, peer_times):
    """One MFM-G Doob step (ODE), 1 state × 4 particles; the fast path on a GPU replays a captured graph."""
    B, N = 1, 4
    net, impl = build_path("fast" if path.startswith("fast") else path, dit, device, fast_impl="triton")
    x, _, y, reward, _ = steering_problem(dit, B, device, dtype)
    steps = 64
    grid = time_grid(0.01, steps, x)
    step = make_step(net, reward, method="mfm-g", cond={"y": y})
    gen = torch.Generator(device).manual_seed(1)
    graphed = path == "fast" and device == "cuda"
    kind = GraphedSteerStep if graphed else StaticStep
    with torch.no_grad():
        stepper = kind(step, x, grid, n_particles=N, draw_eps=True, draw_xi=False, generator=gen)

    def one_step():
        if stepper.k == stepper.steps:
            stepper.reset(x)
        with torch.no_grad():
            return stepper.run()

    _reset_peak(device)
    out, seconds = run(benchmark, one_step, device, **rounds(path, device))
    assert out.shape == x.shape and torch.isfinite(out.float()).all()
    # a step costs one drift forward plus N particles forward and backward
    report(benchmark, "W3", path, impl, seconds, (1 + 2 * N) * B * forward_flops(dit.config),
           1, "steps_per_s", peak, device_info, peer_times, states=B, particles=N, graph=graphed,
           peak_mem_gib=_peak_gib(device))


def largest_particle_count(net, model, reward, x, y, device, dtype, chunked: bool, limit: int):
    """Largest N ≤ limit (doubling) whose single-state value gradient runs without running out of memory."""
    best, n = None, 1
    while n <= limit:
        chunk = auto_chunk_size(model, 1, n, dtype, device) if chunked else None
        try:
            V, g = value_and_grad(net, reward, 0.5, x[:1], n, chunk_size=chunk, y=y[:1])
            assert torch.isfinite(g.float()).all()
            best = n
        except torch.OutOfMemoryError:
            break
        finally:
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        n *= 2
    return best


def test_w4_memory_bound_and_particle_capacity(benchmark, dit, device, dtype, peak, device_info, peer_times):
    """W2 under an 8 GiB bound (fast path, chunks from free memory and the bound) and the particle capacity."""
    B, N = w2_shape(device)
    net, impl = build_path("fast", dit, device, fast_impl="triton")
    x, t, y, reward, noise = steering_problem(dit, B, device, dtype, particles=N)
    if device == "cuda":
        budget = W4_BUDGET
    else:  # the smoke run bounds memory to two rows per call so that chunking is exercised
        budget = int(2.5 * activation_bytes_per_row(dit, dtype) / 0.8)
    _reset_peak(device)
    chunk = auto_chunk_size(dit, B, N, dtype, device, budget_bytes=budget)
    assert 1 <= chunk < B * N

    def bounded():
        return value_and_grad(net, reward, t, x, N, noise=noise, chunk_size=chunk, y=y)

    (V, g), seconds = run(benchmark, bounded, device, **rounds("fast", device))
    peak_gib = _peak_gib(device)
    reserved_gib = torch.cuda.max_memory_reserved() / GiB if device == "cuda" else None
    assert torch.isfinite(g.float()).all()
    limit = 1024 if device == "cuda" else 2
    fast_capacity = largest_particle_count(net, dit, reward, x, y, device, dtype, True, limit)
    ref, _ = build_path("ref", dit, device)
    ref_capacity = largest_particle_count(ref, dit, reward, x, y, device, dtype, False, limit)
    extra = dict(states=B, particles=N, chunk_size=chunk, budget_gib=budget / GiB, peak_mem_gib=peak_gib,
                 max_particles_fast=fast_capacity, max_particles_ref=ref_capacity, search_limit=limit)
    unbounded = peer_times.get(("W2", "fast"))
    if seconds is not None and unbounded is not None:
        extra["slowdown_vs_unbounded_fast"] = seconds / unbounded
    extra["peak_reserved_gib"] = reserved_gib
    # the row is recorded first, so that a run over the bound still leaves its numbers
    report(benchmark, "W4", "fast", impl, seconds, 2 * B * N * forward_flops(dit.config), B * N,
           "particles_per_s", peak, device_info, peer_times, **extra)
    assert fast_capacity == limit  # auto chunking never runs out of memory
    if device == "cuda":
        assert peak_gib <= W4_BUDGET / GiB, f"peak {peak_gib:.2f} GiB over the 8 GiB bound (chunk {chunk})"


FT_REWARDS = ("toy", "hpsv2") if ON_GPU else ("toy",)
FT_CASES = [(reward, path) for reward in FT_REWARDS for path in ("ref", "fast")]  # the peer first


def ft_shape(device):
    """(rows per step, micro-batch rows; 0 = all): the release's 18 per GPU; 2 in micro-batches of 1 on a CPU."""
    return (18, 0) if device == "cuda" else (2, 1)


@pytest.mark.parametrize("reward, path", FT_CASES, ids=[f"{r}-{p}" for r, p in FT_CASES])
def test_ft_step(benchmark, reward, path, device, peak, device_info, peer_times):
    """One MFM-FT optimizer step; the row carries its peak memory per micro-batch row."""
    if reward == "hpsv2":
        import importlib.util
        if importlib.util.find_spec("imscore") is None:
            pytest.skip("the HPSv2-shaped reward needs imscore (pip install imscore)")
    rows, micro = ft_shape(device)
    name, over = ("MFM-XL/2", {}) if device == "cuda" else ("MFM-T/2", TINY)
    model, impl = ft_model(path, name, device, fast_impl="triton", **over)
    config = model.config
    vae = "sd" if device == "cuda" else "tiny"
    fn, prompts, lam = ft_reward(reward, model, device, vae)
    step = FTStep(model, fn, rows, micro, prompts, lam, device)
    del model
    fixed = None
    if device == "cuda":  # the first step creates the optimizer state: it is part of the fixed bytes
        _reset_peak(device)
        step()
        fixed = step.fixed_bytes()
        torch.cuda.reset_peak_memory_stats()
    logs, seconds = run(benchmark, step, device, **rounds(path, device))
    memory = step.memory(fixed)
    assert torch.isfinite(logs["loss"]) and torch.isfinite(logs["grad_norm"]) and logs["grad_norm"] > 0
    planned = step.planned_bytes_per_row()
    report(benchmark, f"FT-{reward}", path, impl, seconds, rows * FT_FORWARDS_PER_ROW * forward_flops(config), rows,
           "rows_per_s", peak, device_info, peer_times, rows=rows, micro_batch=step.micro, reward=reward, vae=vae,
           lam=lam, autocast="bfloat16" if step.cfg.bf16 and device == "cuda" else None,
           model_gflop_per_row=FT_FORWARDS_PER_ROW * forward_flops(config) / 1e9,
           planned_mib_per_row=None if planned is None else planned / 2 ** 20, **memory)
    if device == "cuda":
        assert memory["peak_mib_per_row"] > 0
