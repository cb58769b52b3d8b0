"""Model-level primitives on any model following the protocol forward(s, u, xbar, t, x, **cond) -> v.

flow_map, one-step posterior sampling, the unconditional drift, and the K-step refinement sampler (METHOD §2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

from ._checks import as_time, check_cond_rows, check_dtype, check_finite, check_finite_scalar, check_input, \
    check_model_output, check_positive_int, check_state, model_dtype, n_per_group
from .interpolant import bcast, time_grid


# one torch.Generator for the whole batch, or one per row (row i then draws from its own stream only, so its random
# numbers do not depend on which other rows share the batch: `mfm_fast.parallel_sample` relies on this)
Generators = Union[None, torch.Generator, Sequence[torch.Generator]]


def check_generators(name: str, generator, rows: int, device) -> None:
    """None, a torch.Generator, or a sequence of exactly `rows` torch.Generators on `device`'s type."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, (list, tuple)):
        raise TypeError(f"{name} must be None, a torch.Generator or a list of one torch.Generator per row, got "
                        f"{type(generator).__name__}")
    if len(generator) != rows:
        raise ValueError(f"{name}: a list of per-row generators needs one per row ({rows}), got {len(generator)}")
    dev = torch.device(device).type
    for i, g in enumerate(generator):
        if not isinstance(g, torch.Generator):
            raise TypeError(f"{name}[{i}] must be a torch.Generator, got {type(g).__name__}")
        if g.device.type != dev:
            raise ValueError(f"{name}[{i}] is a {g.device.type} generator but the samples are on {dev}")


def randn_rows(shape, like: torch.Tensor, generator: Generators) -> torch.Tensor:
    """torch.randn(shape) on like's device and dtype; with per-row generators, row i (of shape[0]) comes from
    generator[i] alone."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=like.device, dtype=like.dtype)
                        for g in generator])


def rand_groups(groups: int, like: torch.Tensor, generator: Generators) -> torch.Tensor:
    """One uniform per group of consecutive rows, (groups,); with per-row generators, group p draws from the
    generator of its first row."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(groups, generator=generator, device=like.device, dtype=like.dtype)
    per = len(generator) // groups
    return torch.stack([torch.rand((), generator=generator[p * per], device=like.device, dtype=like.dtype)
                        for p in range(groups)])


def event_shape_of(model, x: torch.Tensor) -> tuple:
    return tuple(getattr(model, "event_shape", x.shape[1:]))


def expand_cond(cond: dict, groups: int, n: int) -> dict:
    """Repeat per-context conditioning tensors n times per row (for models without particle-group support)."""
    out = {}
    for k, v in cond.items():
        if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == groups:
            v = v.repeat_interleave(n, dim=0)
        out[k] = v
    return out


def call_model(model, s, u, xbar, t, x, **cond) -> torch.Tensor:
    """v_{s,u}(xbar; t, x) where xbar may hold N particles per context row (rows grouped contiguously)."""
    G = x.shape[0]
    N = n_per_group("xbar", xbar.shape[0], G)
    if N == 1 or getattr(model, "supports_particle_groups", False):
        return check_model_output(model(s, u, xbar, t, x, **cond), xbar, model)
    rep = lambda z: z.repeat_interleave(N, dim=0)  # noqa: E731
    return check_model_output(model(rep(s), rep(u), xbar, rep(t), rep(x), **expand_cond(cond, G, N)), xbar, model)


def flow_map(model, s, u, xbar, t, x, **cond) -> torch.Tensor:
    """X_{s,u}(xbar; t, x) = xbar + (u - s)·v_{s,u}(xbar; t, x)."""
    check_input("x", x, model)
    check_state("xbar", xbar, x.shape[1:])
    check_dtype("xbar", xbar, model_dtype(model))
    check_finite(xbar=xbar)
    G = x.shape[0]
    check_cond_rows(cond, G, "x")
    s = as_time("s", s, G, x)
    u = as_time("u", u, G, x)
    t = as_time("t", t, G, x)
    v = call_model(model, s, u, xbar, t, x, **cond)
    return xbar + bcast(u - s, xbar) * v


def posterior_sample(model, t, x, n: int = 1, generator: Generators = None, noise=None,
                     steps: int = 1, **cond) -> torch.Tensor:
    """Samples of p(x1 | x_t = x): X_{0,1}(ε; t, x), ε ~ N(0, I). Returns (B, n, *event).

    steps = K > 1 composes the flow map on the uniform grid 0 = s_0 < … < s_K = 1 at the fixed context (t, x),
    X_{s_{K−1},1} ∘ … ∘ X_{0,s_1}(ε): K network calls per sample, less distillation error per jump.
    Differentiable in x (the value-gradient estimators backpropagate through this). `noise` (B·n, *event) may be
    given instead of drawing ε. `generator`: one for the batch, or a list of one per row of x.
    """
    check_input("x", x, model)
    check_positive_int("n", n)
    check_positive_int("steps", steps)
    B = x.shape[0]
    check_cond_rows(cond, B, "x")
    check_generators("generator", generator, B, x.device)
    t = as_time("t", t, B, x)
    if noise is None:
        noise = randn_rows((B, n, *x.shape[1:]), x, generator).view(B * n, *x.shape[1:])
    else:
        check_state("noise", noise, x.shape[1:], batch=B * n)
        check_input("noise", noise, model)
    return compose_flow_map(model, noise, t, x, steps, **cond).view(B, n, *x.shape[1:])


def compose_flow_map(model, noise: torch.Tensor, t: torch.Tensor, x: torch.Tensor, steps: int = 1,
                     **cond) -> torch.Tensor:
    """Unvalidated core of `posterior_sample`: X_{(K−1)/K,1} ∘ … ∘ X_{0,1/K}(noise; t, x), K = steps network calls.
    t (G,), x (G, *event), noise (G·N, *event). No host synchronisation (CUDA-graph safe)."""
    x1 = noise
    zeros = torch.zeros_like(t)
    for k in range(steps):
        x1 = x1 + (1.0 / steps) * call_model(model, zeros + k / steps, zeros + (k + 1) / steps, x1, t, x, **cond)
    return x1


def drift(model, t, x, **cond) -> torch.Tensor:
    """Unconditional drift b_t(x) = v_{t,t}(x; 0, 0): the t = 0 context carries no information."""
    check_input("x", x, model)
    check_cond_rows(cond, x.shape[0], "x")
    t = as_time("t", t, x.shape[0], x)
    return check_model_output(model(t, t, x, torch.zeros_like(t), torch.zeros_like(x), **cond), x, model)


@dataclass
class SampleResult:
    samples: torch.Tensor
    nfe: int


@torch.no_grad()
def refine_sample(model, noise: torch.Tensor, steps: int = 1, generator: Generators = None,
                  return_result: bool = False, **cond):
    """K-step refinement sampler (K NFE): x = ε; for each grid point s_j, x̂1 = X_{0,1}(ε'; s_j, x), then
    x = (1 - s_{j+1})·ξ + s_{j+1}·x̂1 with fresh ε', ξ. Grid 0 = s_0 < ... < s_K = 1.
    `generator`: one for the batch, or a list of one per row (each row's ε', ξ then come from its own stream)."""
    check_input("noise", noise, model)
    check_cond_rows(cond, noise.shape[0], "noise")
    check_positive_int("steps", steps)
    check_generators("generator", generator, noise.shape[0], noise.device)
    x = noise
    grid = time_grid(0.0, steps, x)
    x1 = x
    for j in range(steps):
        x1 = posterior_sample(model, grid[j], x, 1, generator=generator, **cond)[:, 0]
        if j + 1 < steps:
            xi = randn_rows(x.shape, x, generator)
            x = (1 - grid[j + 1]) * xi + grid[j + 1] * x1
    return SampleResult(x1, steps) if return_result else x1


@torch.no_grad()
def ode_sample(model, noise: torch.Tensor, steps: int = 100, t_start: float = 0.0, **cond) -> torch.Tensor:
    """Euler integration of the unconditional drift b_t from t_start to 1 (the base flow-model sampler)."""
    check_input("noise", noise, model)
    check_cond_rows(cond, noise.shape[0], "noise")
    check_positive_int("steps", steps)
    t_start = check_finite_scalar("t_start", t_start)
    if not 0 <= t_start < 1:
        raise ValueError(f"t_start must lie in [0, 1), got {t_start}")
    x = noise
    grid = time_grid(t_start, steps, x)
    for j in range(steps):
        x = x + (grid[j + 1] - grid[j]) * drift(model, grid[j], x, **cond)
    return x
