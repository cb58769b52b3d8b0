"""Steering-throughput profiler: `python -m mfm_fast profile --model MFM-XL/2 --states 8 --particles 32 ...`.

For each path it times the workloads of BENCHMARKS.md on the given shape and prints a table (JSON with --json):
- W1 one-step posterior samples (states·particles samples, forward only): ms, samples/s, TFLOP/s, % of peak
- W2 value gradient (MFM-G, cheap analytic reward): ms, particles/s, TFLOP/s, % of peak
- W3 one full steering step (value gradient + drift + Euler update): ms/step
- W4 peak memory of W2 (GPU), and the largest particle count per state that runs (GPU, --w4-search)
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


# ---------------------------------------------------------------------------------------------- entry point

def run_profile(model_name: str = "MFM-XL/2", states: int = 8, particles: int = 32, steps: int = 4,
                paths=("fast", "ref"), device=None, dtype=None, repeat: int = 5, w4_search: int = 0) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    for p in paths:
        if p not in PATHS:
            raise ValueError(f"unknown path {p!r}; known: {PATHS}")
    with torch.device(device):
        model = randomize_(MFMDiT(model_name))
    model = model.to(dtype).requires_grad_(False).eval()
    from . import backend
    report = {"config": {"model": model_name, "states": states, "particles": particles, "steps": steps,
                         "dtype": str(dtype).replace("torch.", ""), "device": str(device), "repeat": repeat,
                         "forward_gflop_per_sample": forward_flops(model.config) / 1e9},
              "env": {**backend.info(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
              "matmul_peak_tflops": matmul_peak_tflops(device),
              "note": None if device.type == "cuda" else "CPU run: timings exercise the code, not performance",
              "paths": {}}
    for p in paths:
        try:
            report["paths"][p] = profile_path(p, model, states, particles, steps, device, dtype, repeat,
                                              report["matmul_peak_tflops"], w4_search)
        except Exception as e:  # one failing peer (e.g. a compile error) must not lose the others
            report["paths"][p] = {"error": f"{type(e).__name__}: {e}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ref = report["paths"].get("ref", {})
    for p, row in report["paths"].items():
        if p != "ref" and "error" not in row and "error" not in ref and ref:
            row["speedup_vs_ref"] = {w: ref[w]["ms"] / row[w]["ms"] for w in ("W1", "W2")}
            row["speedup_vs_ref"]["W3"] = ref["W3"]["ms_per_step"] / row["W3"]["ms_per_step"]
    return report


def format_table(report: dict) -> str:
    def f(v, spec=".1f"):
        return "–" if v is None else format(v, spec)

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
    if report["note"]:
        lines.append(report["note"])
    first = next((r["telemetry"] for r in report["paths"].values() if "telemetry" in r), None)
    if first is not None and not first["available"]:
        lines.append(f"telemetry: {first['reason']}")
    for p, r in report["paths"].items():
        if r.get("W3", {}).get("graph_error"):
            lines.append(f"{p}: W3 ran eagerly, the step could not be captured: {r['W3']['graph_error']}")
    return "\n".join(lines)


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
    args = ap.parse_args(argv)
    for name in ("states", "particles", "steps", "repeat"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be a positive integer")
    report = run_profile(args.model, args.states, args.particles, args.steps,
                         tuple(p.strip() for p in args.paths.split(",") if p.strip()), args.device,
                         getattr(torch, args.dtype) if args.dtype else None, args.repeat, args.w4_search)
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 1 if any("error" in r for r in report["paths"].values()) else 0
