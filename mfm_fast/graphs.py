"""CUDA-graph capture of a whole steering step: posterior samples, rewards, value gradient, drift, Doob update.

One step of `steer` (methods "none", "mfm-g", "mfm-gf", "dps") is a function of tensors only
(`steer.make_step`), so it is captured once for static shapes and replayed K times. What changes per step lives
in device memory the graph reads: the step index (the time t and the step dt are gathered from the grid inside the
graph) and the state x (updated in place). The step noise is drawn inside the graph from the caller's CUDA
generator, registered with the graph (`CUDAGraph.register_generator_state`; the default generator is registered by
torch itself): replay k consumes exactly the random numbers eager step k would, in the same order (ε, then the SDE
noise ξ), so graphed and eager steering give the same samples for the same seed.

Capture is impossible with CPU tensors, for the search/SMC samplers (their control flow reads values on the host),
and when anything in the step synchronises with the host (e.g. a reward calling `.item()`); those raise
`GraphCaptureError` with the reason, and `steer(graph=True)` then falls back to eager with a warning.
"""
from __future__ import annotations

import contextlib
import os
import traceback
from typing import Callable, Optional

import torch

from .interpolant import time_grid
from .rewards import CheckedReward, as_reward
from .steps import check_steer_args, finish, make_step, paper_nfe, progress_bar
from .value import Cost, CountedModel, CountedReward

GRAPH_METHODS = ("none", "mfm-g", "mfm-gf", "dps")


class GraphCaptureError(RuntimeError):
    """A steering step cannot be captured as a CUDA graph; the message says why."""


def _origin(exc: BaseException) -> str:
    """'file:line in function' of the innermost frame outside torch, where the offending call was made."""
    torch_dir = os.path.dirname(torch.__file__)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(torch_dir)]
    if not frames:
        return ""
    f = frames[-1]
    where = os.path.join(*f.filename.split(os.sep)[-2:])
    return f" at {where}:{f.lineno} in {f.name}"


def _reason(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    low = str(exc).lower()
    if "capturing" in low or "capture" in low or "synchroniz" in low:
        return f"the step synchronises with the host or calls a CUDA API that graphs forbid{_origin(exc)} ({msg})"
    return f"the step raised {type(exc).__name__}{_origin(exc)}: {msg}"


def _generator_states(generators):
    return [g.get_state() for g in generators]


def _restore_generators(generators, states):
    for g, s in zip(generators, states):
        g.set_state(s)


def _reset_after_failed_capture(graph_pool, generators, device):
    """A capture aborted inside CUDA leaves the allocator routing to its pool and the registered generators in
    capture mode (their eager draws would then fail); end both so eager work can go on."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with contextlib.suppress(Exception):  # private allocator hooks: best effort, absent on some builds
        torch._C._cuda_endAllocateToPool(index, graph_pool)
        torch._C._cuda_releasePool(index, graph_pool)
    repair = torch.cuda.CUDAGraph()
    for g in generators:
        repair.register_generator_state(g)
    buf = torch.zeros(1, device=device)
    with torch.cuda.stream(torch.cuda.Stream(device)):
        repair.capture_begin()  # a trivial capture whose epilogue takes the generators out of capture mode
        buf.add_(1)
        repair.capture_end()


class StaticStep:
    """A steering step on static buffers, the form a CUDA graph captures; `run()` advances `x` in place.

    step: `steer.make_step(...)` output, `step(x, t, dt, eps, xi) -> x_next`. grid: (K+1,) times on x's device;
    t = grid[k] and dt = grid[k+1] − grid[k] are gathered on the device from the step index `idx`, so nothing on
    the host changes between steps. `eps` (B, n_particles, *event) is drawn when `draw_eps`, then `xi` (B, *event)
    when `draw_xi`, both from `generator` — the order and shapes of steer's eager loop, so both consume the same
    random numbers.
    """

    def __init__(self, step, x0: torch.Tensor, grid: torch.Tensor, *, n_particles: int, draw_eps: bool,
                 draw_xi: bool, generator: Optional[torch.Generator] = None):
        self.device = x0.device
        self.steps = grid.shape[0] - 1
        self._step, self._gen = step, generator
        self._eps_shape = (x0.shape[0], n_particles, *x0.shape[1:]) if draw_eps else None
        self._draw_xi = draw_xi
        self.x = x0.detach().clone()  # the state, advanced in place
        self.grid = grid.detach()
        self.dts = self.grid[1:] - self.grid[:-1]  # the same values as eager's grid[k+1] - grid[k]
        self.idx = torch.zeros(1, dtype=torch.long, device=self.device)  # step index, incremented on the device
        self.k = 0  # host count of completed steps

    def _body(self):
        t = self.grid.index_select(0, self.idx).squeeze(0)
        dt = self.dts.index_select(0, self.idx).squeeze(0)
        eps = None
        if self._eps_shape is not None:
            eps = torch.randn(self._eps_shape, generator=self._gen, device=self.device, dtype=self.x.dtype)
        xi = torch.randn(self.x.shape, generator=self._gen, device=self.device, dtype=self.x.dtype) \
            if self._draw_xi else None
        self.x.copy_(self._step(self.x, t, dt, eps, xi))
        self.idx.add_(1)

    def warm_up(self, runs: int) -> None:
        """`runs` eager steps, each from the first grid point (never past the grid's end, whatever `runs` is);
        the caller resets the state and the generators afterwards."""
        for _ in range(max(1, runs)):
            self.idx.zero_()
            self._body()

    def _check_left(self):
        if self.k >= self.steps:
            raise RuntimeError(f"all {self.steps} steps of the grid have run; call reset(x0) first")

    def run(self) -> torch.Tensor:
        """One step, eagerly; returns the state (updated in place by the next step)."""
        self._check_left()
        self._body()
        self.k += 1
        return self.x

    def reset(self, x0: torch.Tensor) -> None:
        """Start again from x0 at the first grid point (the generator is left where it is)."""
        self.x.copy_(x0)
        self.idx.zero_()
        self.k = 0


class GraphedSteerStep(StaticStep):
    """A `StaticStep` captured once as a CUDA graph; `replay()` runs one step (one graph launch).

    `warmup` eager runs on a side stream precede the capture (lazy initialisation, kernel autotuning); the state
    and the generators are then rewound, so the first replay is step 0 with the caller's random numbers.
    `before_capture()` is called right before the capture. Raises GraphCaptureError when capture is impossible.
    """

    def __init__(self, step, x0: torch.Tensor, grid: torch.Tensor, *, n_particles: int, draw_eps: bool,
                 draw_xi: bool, generator: Optional[torch.Generator] = None, warmup: int = 2,
                 before_capture: Optional[Callable[[], None]] = None):
        if not torch.cuda.is_available():
            raise GraphCaptureError("CUDA graphs need a CUDA device; none is available")
        if x0.device.type != "cuda" or grid.device != x0.device:
            raise GraphCaptureError(f"CUDA graphs need CUDA tensors; the state is on {x0.device}")
        if generator is not None and generator.device.type != "cuda":
            raise GraphCaptureError(f"the generator is on {generator.device}; in-graph noise needs a CUDA generator")
        super().__init__(step, x0, grid, n_particles=n_particles, draw_eps=draw_eps, draw_xi=draw_xi,
                         generator=generator)
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        default = torch.cuda.default_generators[index]
        gens = [default] if generator is None or generator is default else [default, generator]
        saved = _generator_states(gens)

        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(side):
                self.warm_up(warmup)
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            # what the warm-up cached stays out of the graph's private pool and cannot be freed while capturing:
            # hand it back first, or the capture needs twice a step's memory
            torch.cuda.empty_cache()
        except Exception as e:
            _restore_generators(gens, saved)
            raise GraphCaptureError(f"the eager warm-up of the step failed: {_reason(e)}") from e
        self.reset(x0)
        _restore_generators(gens, saved)
        if before_capture is not None:
            before_capture()

        self.graph = torch.cuda.CUDAGraph()
        if generator is not None and generator is not default:
            self.graph.register_generator_state(generator)  # the default generator is registered by torch
        pool = torch.cuda.graph_pool_handle()
        error, ended = None, False
        with torch.cuda.stream(side):
            try:
                self.graph.capture_begin(pool=pool)
            except Exception as e:
                _restore_generators(gens, saved)
                raise GraphCaptureError(f"capture could not begin: {_reason(e)}") from e
            try:
                self._body()
            except Exception as e:
                error = e
            finally:
                try:
                    self.graph.capture_end()
                    ended = True
                except Exception as e:
                    error = error or e
        torch.cuda.current_stream(self.device).wait_stream(side)
        if error is not None:
            if not ended:
                try:
                    _reset_after_failed_capture(pool, gens, self.device)
                except Exception as e:  # still a capture failure to the caller, with both reasons
                    error = RuntimeError(f"{_reason(error)}; resetting after it failed too: {_reason(e)}")
            _restore_generators(gens, saved)
            self.graph = None
            reason, error = _reason(error), None  # drop the traceback's references to the pool's tensors
            raise GraphCaptureError(reason)
        torch.cuda.synchronize(self.device)
        self.reset(x0)
        _restore_generators(gens, saved)

    def replay(self) -> torch.Tensor:
        """One step (one graph launch); returns the static state (clone it to keep it past the next replay)."""
        self._check_left()
        self.graph.replay()
        self.k += 1
        return self.x

    run = replay


def steer_graphed(model, reward, noise: torch.Tensor, steps: int = 250, method: str = "mfm-g",
                  n_particles: int = 1, lam: float = 1.0, sde: bool = False, renorm: Optional[str] = None,
                  t_start: float = 0.01, generator: Optional[torch.Generator] = None, return_result: bool = False, *,
                  renorm_scale: float = 1.0, clamp_ratio: Optional[float] = 25.0, chunk_size: Optional[int] = None,
                  progress: Optional[bool] = None, warmup: int = 2, posterior_steps: int = 1,
                  jackknife: bool = False, **kwargs):
    """`steer` with each step replayed from one CUDA graph; same arguments, same results for the same seed.

    Supports methods "none", "mfm-g", "mfm-gf", "dps" (ODE or SDE, with renorm). Raises GraphCaptureError when
    the step cannot be captured (CPU tensors, search/SMC, host synchronisation in the model or the reward).
    `search_mode`, `population`, `smc_estimator`, `ess_threshold` are accepted for signature parity with `steer`
    (they concern only the samplers that are not captured).
    """
    sampler_only = {"search_mode", "population", "smc_estimator", "ess_threshold"}
    cond = {k: v for k, v in kwargs.items() if k not in sampler_only}
    t_start, lam, renorm_scale, chunk_size = check_steer_args(model, noise, steps, t_start, method, n_particles,
                                                              lam, renorm, renorm_scale, clamp_ratio, chunk_size,
                                                              jackknife=jackknife)
    if method not in GRAPH_METHODS:
        raise GraphCaptureError(f"method {method!r} is not captured (its sampler reads values on the host); "
                                f"graphed methods: {GRAPH_METHODS}")
    if noise.device.type != "cuda":
        raise GraphCaptureError(f"CUDA graphs need CUDA tensors; noise is on {noise.device}")
    reward = reward if isinstance(reward, CheckedReward) else as_reward(reward)
    B = noise.shape[0]
    grid = time_grid(t_start, steps, noise)
    step_kw = dict(method=method, sde=sde, lam=lam, renorm=renorm, renorm_scale=renorm_scale,
                   clamp_ratio=clamp_ratio, chunk_size=chunk_size, cond=cond, posterior_steps=posterior_steps,
                   jackknife=jackknife)
    # one step's work is counted while it is captured; every replay repeats exactly that work
    per_step = Cost()

    def count_capture_only():
        for field in ("forward_calls", "forward_evals", "backward_evals", "reward_evals"):
            setattr(per_step, field, 0)

    step = make_step(CountedModel(model, per_step), CountedReward(reward, per_step), **step_kw)
    with torch.no_grad():
        graphed = GraphedSteerStep(step, noise, grid, n_particles=n_particles,
                                   draw_eps=method in ("mfm-g", "mfm-gf"), draw_xi=sde, generator=generator,
                                   warmup=warmup, before_capture=count_capture_only)
    cost = Cost(batch=B, nfe=paper_nfe(method, steps, n_particles, posterior_steps=posterior_steps))
    for field in ("forward_calls", "forward_evals", "backward_evals", "reward_evals"):
        setattr(cost, field, getattr(per_step, field) * steps)
    for _ in progress_bar(range(steps), progress, f"steer[{method}, graph]"):
        graphed.replay()
    # inside the graph the reward's finite-value check cannot run (a host read); check the result once instead
    if not bool(torch.isfinite(graphed.x).all()):
        raise ValueError(f"graphed steering produced non-finite samples (reward {reward.name!r} or the model "
                         f"returned NaN/inf inside the captured step; run eagerly to locate it)")
    return finish(graphed.x.clone(), cost, reward, return_result)
