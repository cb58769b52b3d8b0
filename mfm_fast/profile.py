"""Steering-throughput profiler: `python -m mfm_fast profile --model MFM-XL/2 --states 8 --particles 32 ...`.

For each path it times the workloads of BENCHMARKS.md on the given shape and prints a table (JSON with --json):
- W1 one-step posterior samples (states·particles samples, forward only): ms, samples/s, TFLOP/s, % of peak
- W2 value gradient (MFM-G, cheap analytic reward): ms, particles/s, TFLOP/s, % of peak
- W3 one full steering step (value gradient + drift + Euler update): ms/step
- W4 peak memory of W2 (GPU), and the largest particle count per state that runs (GPU, --w4-search)
- FT (--workload ft or all) one MFM-FT optimizer step (`FinetuneRun.train_step`: base drift forward, posterior
  forward + backward to x_t through the decoder and the reward, trainable drift forward + backward, clip, RAdam,
  EMA) at --ft-batch rows in micro-batches of --ft-micro-batch, fp32 weights under bf16 autocast on a GPU (the
  release's recipe): ms, rows/s, model TFLOP/s (6 forward-equivalents per row, reward excluded), peak memory, and
  peak memory per row = (peak allocated − the fixed bytes between steps) / micro-batch rows, beside what the
  micro-batch planner assumes per row. Reward: SD-VAE decode (random weights, `build_vae`) then a toy or an
  HPSv2-shaped (random ViT-H-14) image reward with per-row prompts; a tiny VAE on a CPU.
Paths: "fast" (impl auto → Triton kernels, particle groups, auto chunking, CUDA-graph steps), "ref" (PyTorch
reference ops with SDPA attention, conditioning repeated per particle, eager), "compile" and "compile-ro"
(torch.compile of that reference, default and mode="reduce-overhead"). FLOPs per forward sample:
depth·(2·L·D·(4 + 2·mlp_ratio)·D + 4·L²·D) (BENCHMARKS.md); a value gradient counts 2× forward. The bf16 matmul peak (8192³) is measured in the same
run. With a GPU, NVML (nvidia-ml-py) telemetry — power, SM clock, memory used — is sampled in a background thread.
Timings taken on a CPU exercise the code; they are not performance numbers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from typing import Callable, Optional

import torch
import torch.nn as nn

from .interpolant import time_grid
from .memory import auto_chunk_size
from .models.dit import MFMDiT
from .sampling import posterior_sample
from .steer import make_step
from .value import value_and_grad

PATHS = ("fast", "ref", "compile", "compile-ro")
GiB = 2 ** 30


# ---------------------------------------------------------------------------------------------- building blocks

def forward_flops(config) -> float:
    """FLOPs (multiply and add) of one forward sample of an MFMDiT config (BENCHMARKS.md)."""
    L, D = config.num_tokens, config.hidden_size
    return config.depth * (2 * L * D * (4 + 2 * config.mlp_ratio) * D + 4 * L * L * D)


class NaiveParticles(nn.Module):
    """A model seen without particle-group support: every conditioning tensor is repeated once per particle."""

    supports_particle_groups = False

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.event_shape = model.event_shape

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class QuadraticReward(nn.Module):
    """r(x) = −‖x − target‖²/d: a cheap analytic reward (elementwise work only)."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.register_buffer("target", target)
        self.name = "quadratic"

    def forward(self, x1: torch.Tensor) -> torch.Tensor:
        return -(x1 - self.target).pow(2).flatten(1).mean(1)


def randomize_(model: nn.Module, std: float = 0.02, seed: int = 0) -> nn.Module:
    """Small random weights everywhere (the adaLN-Zero init gates every block off)."""
    with torch.no_grad():
        for p in model.parameters():
            gen = torch.Generator(p.device).manual_seed(seed)
            p.normal_(0.0, std, generator=gen)
            seed += 1
    return model


def throughput(ms: float, flops: float, items: int, unit: str, peak_tflops: Optional[float]) -> dict:
    """{ms, <unit>: items/s, tflops, pct_of_matmul_peak} for work of `flops` FLOPs over `items` items."""
    row = {"ms": ms, unit: items / (ms * 1e-3), "tflops": flops / (ms * 1e-3) / 1e12}
    row["pct_of_matmul_peak"] = 100 * row["tflops"] / peak_tflops if peak_tflops else None
    return row


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable, device: torch.device, warmup: int = 2, repeat: int = 5) -> float:
    """Median milliseconds of fn() (each call synchronised), after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def matmul_peak_tflops(device: torch.device, n: int = 8192) -> Optional[float]:
    """Dense bf16 n³ A @ A TFLOP/s on a GPU; None on a CPU (no meaningful peak)."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ a, device, warmup=3, repeat=10)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


class Telemetry:
    """Background NVML sampling (power W, SM clock MHz, memory used GiB) while the context is open."""

    def __init__(self, device: torch.device, interval_s: float = 0.05):
        self.device, self.interval = device, interval_s
        self.samples: list = []
        self.reason: Optional[str] = None
        self._stop = threading.Event()
        self._thread = None
        self._handle = None
        self._nvml = None
        if device.type != "cuda":
            self.reason = "no GPU: NVML telemetry is not sampled on a CPU run"
            return
        try:
            import pynvml
            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = self._device_handle(pynvml, device)
        except Exception as e:  # NVML missing or unusable: profile without telemetry
            self.reason = f"NVML unavailable ({type(e).__name__}: {e}); pip install nvidia-ml-py"

    @staticmethod
    def _device_handle(pynvml, device):
        props = torch.cuda.get_device_properties(device)
        bus = getattr(props, "pci_bus_id", None)
        if bus is not None:
            pci = f"{getattr(props, 'pci_domain_id', 0):08x}:{bus:02x}:{getattr(props, 'pci_device_id', 0):02x}.0"
            try:
                return pynvml.nvmlDeviceGetHandleByPciBusId(pci)
            except Exception:
                pass
        return pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)

    def _sample(self):
        nv, h = self._nvml, self._handle
        while not self._stop.is_set():
            try:
                self.samples.append((nv.nvmlDeviceGetPowerUsage(h) / 1e3,
                                     nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
                                     nv.nvmlDeviceGetMemoryInfo(h).used / GiB))
            except Exception as e:
                self.reason = f"NVML sampling stopped ({e})"
                return
            self._stop.wait(self.interval)

    def __enter__(self):
        if self._handle is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {"available": False, "reason": self.reason or "no samples were taken"}
        power, clock, mem = zip(*self.samples)
        return {"available": True, "samples": len(self.samples), "power_w_mean": statistics.fmean(power),
                "power_w_max": max(power), "sm_clock_mhz_mean": statistics.fmean(clock),
                "sm_clock_mhz_min": min(clock), "memory_used_gib_max": max(mem)}


# ---------------------------------------------------------------------------------------------- paths

def peer_ops():
    """The peers' op table: the PyTorch reference ops with PyTorch's fused attention (SDPA) in the activation
    dtype — what a user's plain PyTorch DiT runs. The reference attention (explicit fp32 softmax) is the spec for
    the tests; as a peer it would be slower and need several times the memory of any model a user would write."""
    import dataclasses

    import torch.nn.functional as F

    from .ops.table import reference_ops

    def sdpa_attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    return dataclasses.replace(reference_ops(), attention=sdpa_attention, name="torch+sdpa")


def build_path(path: str, model: MFMDiT, device, fast_impl: str = "auto") -> tuple[nn.Module, str]:
    """The model as the path runs it (the module's ops are switched in place), and the implementation in use.

    The compiled peers start from a clean torch.compile state (earlier peers compiled the same code object; their
    cache entries would otherwise count against Dynamo's recompile limit and silently drop later peers to eager)
    and compile with static shapes.
    """
    device = torch.device(device)
    if path == "fast":
        model.set_impl(fast_impl)
        return model, model.ops.name
    model.set_impl("torch")
    model._ops = peer_ops()  # resolved before any tracing: a lazily resolved table would force a recompile
    naive = NaiveParticles(model)
    if path == "ref":
        return naive, model.ops.name
    backend = "inductor" if device.type == "cuda" else "eager"  # CPU: trace only, no C++ toolchain needed
    if path in ("compile", "compile-ro"):
        torch.compiler.reset()
        if path == "compile-ro" and device.type == "cuda":
            return torch.compile(naive, mode="reduce-overhead", dynamic=False), model.ops.name
        return torch.compile(naive, backend=backend, dynamic=False), model.ops.name
    raise ValueError(f"unknown path {path!r}; known: {PATHS}")


def steering_problem(model, states: int, device, dtype, seed: int = 0, particles: Optional[int] = None):
    """Random context x (states,), times t in [0.1, 0.9], labels y, a QuadraticReward and, given `particles`,
    the particle noise (states, particles, *event) drawn last — the profiler's and the benchmarks' inputs."""
    gen = torch.Generator(device).manual_seed(seed)
    ev = model.event_shape
    x = torch.randn(states, *ev, device=device, dtype=dtype, generator=gen)
    t = torch.rand(states, device=device, dtype=dtype, generator=gen) * 0.8 + 0.1
    y = torch.randint(0, model.config.num_classes, (states,), device=device, generator=gen)
    reward = QuadraticReward(torch.randn(*ev, device=device, dtype=dtype, generator=gen))
    noise = None if particles is None else torch.randn(states, particles, *ev, device=device, dtype=dtype,
                                                       generator=gen)
    return x, t, y, reward, noise


def profile_path(path: str, model: MFMDiT, states: int, particles: int, steps: int, device: torch.device,
                 dtype: torch.dtype, repeat: int = 5, peak: Optional[float] = None, w4_search: int = 0) -> dict:
    """W1–W4 of one path on (states × particles); see the module docstring."""
    net, impl = build_path(path, model, device)
    x, t, y, reward, _ = steering_problem(model, states, device, dtype)
    fast = path == "fast"
    chunk = auto_chunk_size(model, states, particles, dtype, device) if fast else None
    flops = forward_flops(model.config)
    rows = states * particles
    warm = (4 if path == "compile-ro" else 2) if device.type == "cuda" else 1
    out = {"impl": impl, "chunk_size": chunk}

    def w1():
        with torch.no_grad():
            return posterior_sample(net, t, x, particles, y=y)

    def w2():
        return value_and_grad(net, reward, t, x, particles, chunk_size=chunk, y=y)

    with Telemetry(device) as tele:
        out["W1"] = throughput(time_ms(w1, device, warm, repeat), rows * flops, rows, "samples_per_s", peak)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        out["W2"] = throughput(time_ms(w2, device, warm, repeat), 2 * rows * flops, rows, "particles_per_s", peak)
        peak_gib = torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None
        out["W3"] = _w3(net, reward, x, y, particles, steps, device, dtype, fast, warm, repeat)
        # compiled peers would recompile for every particle count: the capacity search covers fast and ref
        search = w4_search if path in ("fast", "ref") else 0
        out["W4"] = {"peak_gib": peak_gib,
                     "max_particles_per_state": _w4_search(net, model, reward, x, y, device, dtype, fast, search)}
    out["telemetry"] = tele.summary()
    return out


def _w3(net, reward, x, y, particles, steps, device, dtype, graphed, warm, repeat) -> dict:
    """ms per steering step (MFM-G ODE); the fast path replays a CUDA graph of the step where it can."""
    from .graphs import GraphCaptureError, GraphedSteerStep, StaticStep
    grid = time_grid(0.01, steps, x)
    step = make_step(net, reward, method="mfm-g", cond={"y": y})
    kw = dict(n_particles=particles, draw_eps=True, draw_xi=False, generator=torch.Generator(device).manual_seed(1))
    stepper, reason = None, None
    if graphed and device.type == "cuda":
        try:
            with torch.no_grad():
                stepper = GraphedSteerStep(step, x, grid, **kw)
        except GraphCaptureError as e:
            reason = str(e)
    if stepper is None:
        stepper = StaticStep(step, x, grid, **kw)

    def one_step():
        if stepper.k == stepper.steps:
            stepper.reset(x)
        with torch.no_grad():
            stepper.run()

    return {"ms_per_step": time_ms(one_step, device, warm, repeat), "graph": isinstance(stepper, GraphedSteerStep),
            "graph_error": reason}


def _w4_search(net, model, reward, x, y, device, dtype, fast, limit: int) -> Optional[int]:
    """Largest particle count per state (doubling up to `limit`) whose value gradient runs without OOM."""
    if device.type != "cuda" or limit <= 0:
        return None
    best, n = None, 1
    while n <= limit:
        chunk = auto_chunk_size(model, 1, n, dtype, device) if fast else None
        try:
            value_and_grad(net, reward, 0.5, x[:1], n, chunk_size=chunk, y=y[:1])
            torch.cuda.synchronize(device)
            best = n
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
        n *= 2
    return best


# ---------------------------------------------------------------------------------------------- the MFM-FT step

FT_REWARDS = ("toy", "hpsv2", "quadratic")
FT_VAES = ("sd", "tiny")
FT_FORWARDS_PER_ROW = 6  # base drift fwd (1) + posterior fwd and backward to x_t (2) + trainable fwd and bwd (3)
# the tests' small SD-VAE: the release's block structure at a few channels (a CPU decodes it in milliseconds)
TINY_VAE = {"block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4}
MiB = 2 ** 20


def hpsv2_shaped(device="cpu"):
    """imscore's HPSv2 (OpenCLIP ViT-H-14, the release's reward) with random weights: the real architecture and
    preprocessing, built where it runs, with nothing downloaded (the library asks for a pretrained tag)."""
    from .reward_models import HPSv2Model, _require
    hps = _require("imscore.hps.model", "imscore", "the HPSv2-shaped reward")
    build = hps.create_model_and_transforms

    def random_weights(name, pretrained=None, **kwargs):
        return build(name, None, device=str(device), **kwargs)

    hps.create_model_and_transforms = random_weights
    try:
        with torch.device(device):
            model = hps.HPSv2()
    finally:
        hps.create_model_and_transforms = build
    return HPSv2Model(model.eval().requires_grad_(False), device)


def ft_reward(name: str, model: nn.Module, device, vae: str = "sd", seed: int = 0) -> tuple:
    """(reward, uses prompts, λ) of the FT workload. "toy" / "hpsv2": SD-VAE decode (`build_vae`, random weights,
    unclamped as the release's fine-tuning reward) then `toy_reward` / `hpsv2_shaped`, scored against per-row
    prompts; vae "tiny" is TINY_VAE. "quadratic": the steering workloads' QuadraticReward on the latents.
    λ: the release's 50 for the HPSv2 cosine; 1 for the others, whose scores (toy: ±10) would overflow
    exp(50·r). λ changes no cost."""
    device = torch.device(device)
    if name == "quadratic":
        gen = torch.Generator(device).manual_seed(seed)
        return QuadraticReward(torch.randn(*model.event_shape, device=device, generator=gen)), False, 1.0
    if name not in FT_REWARDS:
        raise ValueError(f"unknown FT reward {name!r}; known: {FT_REWARDS}")
    if vae not in FT_VAES:
        raise ValueError(f"unknown FT VAE {vae!r}; known: {FT_VAES}")
    from .latents import SD_VAE_CONFIG, LatentDecoder, build_vae
    from .reward_models import toy_reward
    from .rewards import DecodeThenScore
    config = SD_VAE_CONFIG if vae == "sd" else {**SD_VAE_CONFIG, **TINY_VAE}
    if model.event_shape[0] != config["latent_channels"]:
        raise ValueError(f"the VAE decodes {config['latent_channels']}-channel latents, the model samples "
                         f"{tuple(model.event_shape)}; use --ft-reward quadratic")
    decoder = LatentDecoder(build_vae(config, device=device, seed=seed), clamp=False)
    scorer = hpsv2_shaped(device) if name == "hpsv2" else toy_reward(32, seed=seed, device=device)
    return DecodeThenScore(decoder, scorer, name=f"decode_then_{name}"), True, 50.0 if name == "hpsv2" else 1.0


class FTStep:
    """One MFM-FT optimizer step as `finetune` runs it (`FinetuneRun.train_step`) on random latents and per-row
    labels: the release's image recipe (λ, σ² = 200 constant, cfg 2.5 on the posterior sample when the model's
    guidance table has it, finetune_prompts, RAdam, clip 1.5, EMA; bf16 autocast on a GPU).

    `model` (fp32, the path's ops already switched) becomes the trainable drift; the run holds a frozen copy
    (base) and the EMA. Call the object for one step (returns the step's logs)."""

    def __init__(self, model: nn.Module, reward: Callable, batch: int, micro_batch: int = 0, prompts: bool = True,
                 lam: float = 1.0, device=None, bf16: Optional[bool] = None, seed: int = 0):
        from .finetune import FinetuneConfig, FinetuneRun
        from .reward_models import FT_PROMPT_PREFIX, finetune_prompts
        device = torch.device(device or next(model.parameters()).device)
        event, classes = tuple(model.event_shape), model.config.num_classes

        def sample_batch(n, generator):
            return torch.randn(n, *event, generator=generator), torch.randint(0, classes, (n,), generator=generator)

        cfg_scale = 2.5 if 2.5 in model.config.class_guidance_ws else None
        self.cfg = FinetuneConfig(steps=1, batch_size=batch, micro_batch=micro_batch, lam=lam, cfg_scale=cfg_scale,
                                  bf16=device.type == "cuda" if bf16 is None else bf16, device=str(device),
                                  seed=seed)
        self.rows = batch
        self.micro = min(micro_batch or batch, batch)
        self.reward, self.prompt_prefix = reward, FT_PROMPT_PREFIX if prompts else None
        model.train().requires_grad_(True)
        self.run = FinetuneRun(model, model, reward, sample_batch, self.cfg,
                               prompts=finetune_prompts if prompts else None)

    def __call__(self) -> dict:
        return self.run.train_step()

    @property
    def activation_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cfg.bf16 and self.run.device.type == "cuda" else torch.float32

    def planned_bytes_per_row(self) -> Optional[int]:
        """What `finetune --micro-batch auto` budgets per row: the drift's and the posterior's activations
        (`activation_bytes_per_row`, each) plus the reward's (`reward_bytes_per_row`, shape-only)."""
        from .memory import activation_bytes_per_row, reward_bytes_per_row
        model, dtype = self.run.model, self.activation_dtype
        reward = self.reward
        if self.prompt_prefix is not None:
            prefix = self.prompt_prefix
            reward = lambda z: self.reward(z, [prefix] * z.shape[0])  # noqa: E731
        extra = reward_bytes_per_row(reward, tuple(model.event_shape), dtype, self.run.device)
        return 2 * activation_bytes_per_row(model, dtype) + (extra or 0)

    def fixed_bytes(self) -> Optional[int]:
        """Bytes allocated between steps (GPU): weights of the trainable drift, its EMA, the frozen MFM, the VAE and
        the reward, the optimizer state and the last step's weight gradients. Call after one step."""
        device = self.run.device
        if device.type != "cuda":
            return None
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)

    def memory(self, fixed: Optional[int]) -> dict:
        """Peak memory since the last reset of the peak statistics, and that peak per micro-batch row."""
        device = self.run.device
        out = {"peak_gib": None, "peak_reserved_gib": None, "fixed_gib": None, "peak_mib_per_row": None}
        if device.type == "cuda" and fixed is not None:
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            out.update(peak_gib=peak / GiB, peak_reserved_gib=torch.cuda.max_memory_reserved(device) / GiB,
                       fixed_gib=fixed / GiB, peak_mib_per_row=(peak - fixed) / self.micro / MiB)
        return out


def ft_model(path: str, model_name: str, device, fast_impl: str = "auto", **overrides) -> tuple[nn.Module, str]:
    """A fresh fp32 MFMDiT (small random weights; `overrides` change its config) running the path's ops: "fast"
    (`fast_impl`) or "ref" (the PyTorch reference ops with SDPA attention, what a plain PyTorch DiT runs)."""
    if path not in ("fast", "ref"):
        raise ValueError(f"the FT workload runs the paths fast and ref, not {path!r}")
    with torch.device(device):
        model = randomize_(MFMDiT(model_name, **overrides))
    if path == "fast":
        model.set_impl(fast_impl)
    else:
        model.set_impl("torch")
        model._ops = peer_ops()
    return model, model.ops.name


def profile_ft(path: str, model_name: str, batch: int, micro_batch: int, reward: str, vae: str,
               device: torch.device, repeat: int = 5, peak: Optional[float] = None) -> dict:
    """The FT row of one path: the optimizer step's time, throughput and peak memory (see the module docstring)."""
    model, impl = ft_model(path, model_name, device)
    flops = FT_FORWARDS_PER_ROW * forward_flops(model.config)
    fn, prompts, lam = ft_reward(reward, model, device, vae)
    step = FTStep(model, fn, batch, micro_batch, prompts, lam, device)
    del model  # the run holds the trainable drift, its EMA and the frozen copy
    out = {"impl": impl, "rows": batch, "micro_batch": step.micro, "micro_batches": -(-batch // step.micro),
           "reward": reward, "vae": vae if reward != "quadratic" else None, "lam": lam}
    warm = 2 if device.type == "cuda" else 1
    for _ in range(warm):  # the first step creates the optimizer state (and autotunes kernels)
        logs = step()
    fixed = step.fixed_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with Telemetry(device) as tele:
        ms = time_ms(step, device, warmup=0, repeat=repeat)
    out.update(throughput(ms, batch * flops, batch, "rows_per_s", peak))
    out["model_gflop_per_row"] = flops / 1e9
    out.update(step.memory(fixed))
    planned = step.planned_bytes_per_row()
    out["planned_mib_per_row"] = None if planned is None else planned / MiB
    out["loss"] = float(logs["loss"])
    out["telemetry"] = tele.summary()
    del step
    return out


# ---------------------------------------------------------------------------------------------- entry point

WORKLOADS = ("steer", "ft", "all")  # steer: W1–W4; ft: the MFM-FT step; all: both


def run_profile(model_name: str = "MFM-XL/2", states: int = 8, particles: int = 32, steps: int = 4,
                paths=("fast", "ref"), device=None, dtype=None, repeat: int = 5, w4_search: int = 0,
                workload: str = "steer", ft_batch: int = 18, ft_micro_batch: int = 0, ft_reward: str = "toy",
                ft_vae: Optional[str] = None) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; known: {WORKLOADS}")
    steer, ft = workload in ("steer", "all"), workload in ("ft", "all")
    for p in paths:
        if p not in PATHS:
            raise ValueError(f"unknown path {p!r}; known: {PATHS}")
        if ft and p not in ("fast", "ref"):
            raise ValueError(f"the FT workload runs the paths fast and ref, not {p!r}")
    ft_vae = ft_vae or ("sd" if device.type == "cuda" else "tiny")
    if ft and (ft_reward not in FT_REWARDS or ft_vae not in FT_VAES):
        raise ValueError(f"FT reward must be one of {FT_REWARDS} and VAE one of {FT_VAES}, got {ft_reward!r}, "
                         f"{ft_vae!r}")
    model = None
    if steer:
        with torch.device(device):
            model = randomize_(MFMDiT(model_name))
        model = model.to(dtype).requires_grad_(False).eval()
    from . import backend
    from .models.dit import make_config
    report = {"config": {"model": model_name, "workload": workload, "states": states, "particles": particles,
                         "steps": steps, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
                         "repeat": repeat, "forward_gflop_per_sample": forward_flops(make_config(model_name)) / 1e9},
              "env": {**backend.info(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
              "matmul_peak_tflops": matmul_peak_tflops(device),
              "note": None if device.type == "cuda" else "CPU run: timings exercise the code, not performance",
              "paths": {}}
    if ft:
        report["config"]["ft"] = {"batch": ft_batch, "micro_batch": ft_micro_batch or ft_batch, "reward": ft_reward,
                                  "vae": None if ft_reward == "quadratic" else ft_vae,
                                  "autocast": "bfloat16" if device.type == "cuda" else None, "weights": "float32"}
    for p in paths:
        row = {}
        if steer:
            try:
                row = profile_path(p, model, states, particles, steps, device, dtype, repeat,
                                   report["matmul_peak_tflops"], w4_search)
            except Exception as e:  # one failing peer (e.g. a compile error) must not lose the others
                row = {"error": f"{type(e).__name__}: {e}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if ft:
            try:
                row["FT"] = profile_ft(p, model_name, ft_batch, ft_micro_batch, ft_reward, ft_vae, device, repeat,
                                       report["matmul_peak_tflops"])
            except Exception as e:
                row["FT"] = {"error": f"{type(e).__name__}: {e}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        report["paths"][p] = row
    ref = report["paths"].get("ref", {})
    for p, row in report["paths"].items():
        if p != "ref" and "W1" in row and "W1" in ref:
            row["speedup_vs_ref"] = {w: ref[w]["ms"] / row[w]["ms"] for w in ("W1", "W2")}
            row["speedup_vs_ref"]["W3"] = ref["W3"]["ms_per_step"] / row["W3"]["ms_per_step"]
        if p != "ref" and "ms" in row.get("FT", {}) and "ms" in ref.get("FT", {}):
            row["FT"]["speedup_vs_ref"] = ref["FT"]["ms"] / row["FT"]["ms"]
    return report


def failed(report: dict) -> bool:
    """Whether any path or any FT row of the report holds an error."""
    return any("error" in r or "error" in r.get("FT", {}) for r in report["paths"].values())


def format_table(report: dict) -> str:
    def f(v, spec=".1f"):
        return "–" if v is None else format(v, spec)

    steer = [p for p, r in report["paths"].items() if "W1" in r or "error" in r]
    ft = [p for p, r in report["paths"].items() if "FT" in r]
    lines = _steer_table(report, f) if steer else []
    if ft:
        lines += ([""] if lines else []) + _ft_table(report, f)
    if report["note"]:
        lines.append(report["note"])
    rows = [r for r in report["paths"].values() if "telemetry" in r]
    rows += [r["FT"] for r in report["paths"].values() if "telemetry" in r.get("FT", {})]
    if rows and not rows[0]["telemetry"]["available"]:
        lines.append(f"telemetry: {rows[0]['telemetry']['reason']}")
    for p, r in report["paths"].items():
        if r.get("W3", {}).get("graph_error"):
            lines.append(f"{p}: W3 ran eagerly, the step could not be captured: {r['W3']['graph_error']}")
    return "\n".join(lines)


def _ft_table(report: dict, f) -> list:
    c, ft = report["config"], report["config"]["ft"]
    head = (f"{'path':<11}{'impl':<11}{'rows':>5}{'micro':>6}{'step ms':>10}{'rows/s':>9}{'TFLOP/s':>9}{'%peak':>7}"
            f"{'peak GiB':>9}{'fixed GiB':>10}{'MiB/row':>9}{'plan MiB/row':>13}{'W':>6}{'MHz':>6}")
    what = ("QuadraticReward on the latents" if ft["reward"] == "quadratic" else
            f"{ft['vae']} VAE decode + {ft['reward']} reward with prompts")
    lines = [f"FT step, {c['model']} fp32 weights, autocast {ft['autocast'] or 'off'}, on {report['env']['gpu']}: "
             f"{ft['batch']} rows in micro-batches of {ft['micro_batch']}, {what}; MiB/row = (peak − fixed) / "
             f"micro-batch rows", head, "-" * len(head)]
    for p, r in report["paths"].items():
        if "FT" not in r:
            continue
        r = r["FT"]
        if "error" in r:
            lines.append(f"{p:<11}error: {r['error']}")
            continue
        tel = r["telemetry"]
        lines.append(f"{p:<11}{r['impl']:<11}{r['rows']:>5}{r['micro_batch']:>6}{f(r['ms']):>10}"
                     f"{f(r['rows_per_s']):>9}{f(r['tflops'], '.2f'):>9}{f(r['pct_of_matmul_peak']):>7}"
                     f"{f(r['peak_gib'], '.2f'):>9}{f(r['fixed_gib'], '.2f'):>10}{f(r['peak_mib_per_row'], '.0f'):>9}"
                     f"{f(r['planned_mib_per_row'], '.1f'):>13}{f(tel.get('power_w_mean'), '.0f'):>6}"
                     f"{f(tel.get('sm_clock_mhz_mean'), '.0f'):>6}")
    return lines


def _steer_table(report: dict, f) -> list:
    head = (f"{'path':<11}{'impl':<8}{'W1 ms':>9}{'samp/s':>10}{'W2 ms':>9}{'part/s':>10}{'TFLOP/s':>9}"
            f"{'%peak':>7}{'W3 ms':>8}{'W4 GiB':>8}{'W4 N':>6}{'W':>6}{'MHz':>6}")
    lines = [head, "-" * len(head)]
    for p, r in report["paths"].items():
        if "error" in r:
            lines.append(f"{p:<11}error: {r['error']}")
            continue
        tel = r["telemetry"]
        lines.append(f"{p:<11}{r['impl']:<8}{f(r['W1']['ms']):>9}{f(r['W1']['samples_per_s'], '.0f'):>10}"
                     f"{f(r['W2']['ms']):>9}{f(r['W2']['particles_per_s'], '.0f'):>10}{f(r['W2']['tflops']):>9}"
                     f"{f(r['W2']['pct_of_matmul_peak']):>7}{f(r['W3']['ms_per_step'], '.2f'):>8}"
                     f"{f(r['W4']['peak_gib'], '.2f'):>8}{f(r['W4']['max_particles_per_state'], 'd'):>6}"
                     f"{f(tel.get('power_w_mean'), '.0f'):>6}{f(tel.get('sm_clock_mhz_mean'), '.0f'):>6}")
    c = report["config"]
    lines.insert(0, f"{c['model']} {c['dtype']} on {report['env']['gpu']}: {c['states']} states × "
                    f"{c['particles']} particles, W3 over {c['steps']} steps; bf16 matmul peak "
                    f"{f(report['matmul_peak_tflops'])} TFLOP/s")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mfm_fast profile", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="MFM-XL/2", help="MFMDiT config name (e.g. MFM-XL/2, MFM-T/2)")
    ap.add_argument("--states", type=int, default=8)
    ap.add_argument("--particles", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4, help="steering steps timed for W3")
    ap.add_argument("--paths", default="fast,ref", help=f"comma-separated subset of {','.join(PATHS)}")
    ap.add_argument("--json", default=None, help="write the report to this file")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                    help="default: bfloat16 on a GPU, float32 on a CPU")
    ap.add_argument("--repeat", type=int, default=5, help="timed repetitions per workload (median reported)")
    ap.add_argument("--w4-search", type=int, default=0, metavar="N",
                    help="W4: the largest particle count per state ≤ N that runs (GPU, doubling; fast and ref)")
    ap.add_argument("--workload", default="steer", choices=WORKLOADS,
                    help="steer: W1–W4; ft: one MFM-FT optimizer step (paths fast and ref); all: both")
    ap.add_argument("--ft-batch", type=int, default=18, help="FT: rows per optimizer step (release: 18 per GPU)")
    ap.add_argument("--ft-micro-batch", type=int, default=0,
                    help="FT: rows per forward/backward (gradient accumulation); 0 = all rows")
    ap.add_argument("--ft-reward", default="toy", choices=FT_REWARDS,
                    help="FT: VAE decode + toy (CLIP-shaped) or hpsv2 (random ViT-H-14, needs imscore) reward with "
                         "prompts, or quadratic (latent space, no VAE)")
    ap.add_argument("--ft-vae", default=None, choices=FT_VAES,
                    help="FT: SD-VAE architecture with random weights (default on a GPU) or a tiny one (CPU default)")
    args = ap.parse_args(argv)
    for name in ("states", "particles", "steps", "repeat", "ft_batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be a positive integer")
    if args.ft_micro_batch < 0:
        ap.error("--ft-micro-batch must be a non-negative integer")
    report = run_profile(args.model, args.states, args.particles, args.steps,
                         tuple(p.strip() for p in args.paths.split(",") if p.strip()), args.device,
                         getattr(torch, args.dtype) if args.dtype else None, args.repeat, args.w4_search,
                         args.workload, args.ft_batch, args.ft_micro_batch, args.ft_reward, args.ft_vae)
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 1 if failed(report) else 0
