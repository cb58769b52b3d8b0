"""Fused ops vs their eager PyTorch reference and torch.compile of that reference, forward and backward.

Each row reports the op's minimal memory traffic as GB/s and as % of the device copy bandwidth measured in the
same run (W5 in BENCHMARKS.md is ln_modulate at 256·256 tokens × 1152). Fast-path rows also carry their speedup
over the peers measured just before them. On the CPU this is a smoke run at tiny shapes (fast path under the
Triton interpreter; torch.compile with the "eager" backend so that only the tracing is exercised). The jvp
attention rows (`test_attention_jvp`) compare the fused dual kernel with the explicit-softmax path in TFLOP/s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from _common import on_cuda, run
from mfm_fast.ops.adaln import ln_modulate, ln_modulate_ref
from mfm_fast.ops.attention import attention_jvp, attention_ref
from mfm_fast.ops.bias_gelu import bias_gelu, bias_gelu_ref
from mfm_fast.ops.gate_residual import gate_residual_ln_modulate, gate_residual_ln_modulate_ref
from mfm_fast.ops.input_stage import input_stage, input_stage_ref
from mfm_fast.ops.time_embed import time_embed, time_embed_ref


@dataclass(frozen=True)
class Case:
    make: Callable  # (shapes, device, dtype) -> tuple of inputs; pos-like constants do not require grad
    fast: Callable
    ref: Callable
    traffic: Callable  # (inputs, pass) -> bytes a single fused pass must move (one read / write per tensor)


def _stream(s, device, dtype, *names):
    R, L, D = s["rows"], s["tokens"], s["dim"]
    return [torch.randn(R, L, D, device=device, dtype=dtype) for _ in names]


def _mods(s, device, dtype, n):
    return [torch.randn(s["groups"], s["dim"], device=device, dtype=dtype) * 0.5 for _ in range(n)]


def _ln_modulate(s, device, dtype):
    return (*_stream(s, device, dtype, "x"), *_mods(s, device, dtype, 2))


def _gate_residual_ln_modulate(s, device, dtype):
    return (*_stream(s, device, dtype, "x", "branch"), *_mods(s, device, dtype, 3))


def _input_stage(s, device, dtype):
    L, D = s["tokens"], s["dim"]
    return (*_stream(s, device, dtype, "h"), torch.randn(L, D, device=device, dtype=dtype),
            torch.randn(s["groups"], L, D, device=device, dtype=dtype), *_mods(s, device, dtype, 2))


def _bias_gelu(s, device, dtype):
    M, F = s["rows"] * s["tokens"], s["mlp"]
    return torch.randn(M, F, device=device, dtype=dtype), torch.randn(F, device=device, dtype=dtype)


def _time_embed(s, device, dtype):
    G, K, F = s["times"]
    D = s["dim"]
    return (torch.rand(G, K, device=device, dtype=dtype), torch.randn(K, D, F, device=device, dtype=dtype) * F ** -0.5,
            torch.randn(K, D, device=device, dtype=dtype), torch.randn(K, D, D, device=device, dtype=dtype) * D ** -0.5,
            torch.randn(K, D, device=device, dtype=dtype))


def _nbytes(t):
    return t.numel() * t.element_size()


CASES = {
    # fwd: read x, write y; bwd: read x, dy, write dx
    "ln_modulate": Case(_ln_modulate, ln_modulate, ln_modulate_ref,
                        lambda a, p: (2 if p == "fwd" else 3) * _nbytes(a[0])),
    # fwd: read x, branch, write x_new, y; bwd: read dx_new, dy, x_new, branch, write dx, dbranch
    "gate_residual_ln_modulate": Case(_gate_residual_ln_modulate, gate_residual_ln_modulate,
                                      gate_residual_ln_modulate_ref,
                                      lambda a, p: (4 if p == "fwd" else 6) * _nbytes(a[0])),
    # fwd: read h, hc, write out; bwd: read dout, write dh, dhc
    "input_stage": Case(_input_stage, input_stage, input_stage_ref,
                        lambda a, p: 2 * _nbytes(a[0]) + _nbytes(a[2])),
    # fwd: read x, write y; bwd: read x, dy, write dx
    "bias_gelu": Case(_bias_gelu, bias_gelu, bias_gelu_ref, lambda a, p: (2 if p == "fwd" else 3) * _nbytes(a[0])),
    # weight-bound: read W1, W2, write the (G, K, D) output (backward: weight gradients written too, the output's
    # gradient read)
    "time_embed": Case(_time_embed, time_embed, time_embed_ref,
                       lambda a, p: (1 if p == "fwd" else 2) * (_nbytes(a[1]) + _nbytes(a[3]))
                       + a[0].shape[0] * a[2].numel() * a[2].element_size()),
}
IMPLS = ("eager", "compile", "fast")  # peers first, so the fast row can report its speedup over both
PARAMS = [(c, p, i) for c in CASES for p in ("fwd", "bwd") for i in IMPLS]


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _fn(case: Case, impl: str, device: str):
    if impl == "fast":
        return case.fast
    if impl == "eager":
        return case.ref
    # on the CPU only Dynamo's tracing is smoke-tested: inductor's C++ compile would dominate the run
    return torch.compile(case.ref, backend="inductor" if on_cuda(device) else "eager")


def _assert_close(actual, expected, dtype):
    rel = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.float(), e.float(), rtol=rel, atol=rel * e.float().abs().max().item())


@pytest.mark.parametrize("name, pass_, impl", PARAMS, ids=["-".join(p) for p in PARAMS])
def test_op(benchmark, name, pass_, impl, device, dtype, shapes, device_info, peer_times):
    case = CASES[name]
    torch.manual_seed(0)
    inputs = case.make(shapes, device, dtype)
    fn = _fn(case, impl, device)
    if pass_ == "fwd":
        with torch.no_grad():
            target = lambda: fn(*inputs)  # noqa: E731
            out, seconds = run(benchmark, target, device)
            expected = case.ref(*inputs)
        _assert_close(_tuple(out), _tuple(expected), dtype)
    else:
        diff = [t.requires_grad_() for i, t in enumerate(inputs) if not (name == "input_stage" and i == 1)]
        outs = _tuple(fn(*inputs))
        grads = [torch.randn_like(o) for o in outs]
        target = lambda: torch.autograd.grad(outs, diff, grads, retain_graph=True)  # noqa: E731
        got, seconds = run(benchmark, target, device)
        expected = torch.autograd.grad(_tuple(case.ref(*inputs)), diff, grads)
        _assert_close(got, expected, dtype)
    peer_times[(name, pass_, impl)] = seconds
    gbps = case.traffic(inputs, pass_) / seconds / 1e9
    benchmark.extra_info.update(device_info, op=name, pass_=pass_, impl=impl, dtype=str(dtype),
                                shape=[tuple(t.shape) for t in inputs], gbps=gbps,
                                pct_copy_bw=100 * gbps / device_info["copy_gbps"])
    if impl == "compile":
        benchmark.extra_info["compile_backend"] = "inductor" if on_cuda(device) else "eager (CPU smoke)"
    if impl == "fast":
        for peer in ("eager", "compile"):
            if (name, pass_, peer) in peer_times:
                benchmark.extra_info[f"speedup_vs_{peer}"] = peer_times[(name, pass_, peer)] / seconds


ATTENTION_IMPLS = ("math", "fused")  # the peer first, so the fused row can report its speedup


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
def test_attention_jvp(benchmark, impl, device, dtype, device_info, peer_times):
    """torch.func.jvp of attention (output and tangent: the flow-map losses' forward) at MFM-XL/2's attention shape
    (32 rows, 16 heads, 256 tokens, head dim 72): the fused dual kernel (`attention_jvp`) against the explicit-
    softmax path ("math", `attention_ref`) that the dispatch used under jvp before it. On the CPU a smoke run at
    (2, 2, 17, 72) under the Triton interpreter."""
    R, H, L, Dh = (32, 16, 256, 72) if on_cuda(device) else (2, 2, 17, 72)
    torch.manual_seed(0)
    primals = tuple(torch.randn(R, H, L, Dh, device=device, dtype=dtype) for _ in range(3))
    tangents = tuple(torch.randn_like(t) for t in primals)
    fn = attention_jvp if impl == "fused" else attention_ref
    with torch.no_grad():
        out, seconds = run(benchmark, lambda: torch.func.jvp(fn, primals, tangents), device)
        expected = torch.func.jvp(attention_ref, primals, tangents)
    _assert_close(out, expected, dtype)
    peer_times[("attention_jvp", "jvp", impl)] = seconds
    # the six L×L×Dh matmuls of the output and its tangent (S, Ṡ from q̇ and from k̇, P v, (P∘Ṡ) v, P v̇)
    tflops = 12 * R * H * L * L * Dh / seconds / 1e12
    # keyed "attention", not "op": results_table.py lays out the W5 "op" rows as GB/s against eager/compile peers
    benchmark.extra_info.update(device_info, attention="jvp", impl=impl, dtype=str(dtype), shape=[(R, H, L, Dh)] * 3,
                                tflops=tflops)
    if impl == "fused" and ("attention_jvp", "jvp", "math") in peer_times:
        benchmark.extra_info["speedup_vs_math"] = peer_times[("attention_jvp", "jvp", "math")] / seconds


def test_copy_bandwidth(benchmark, device, device_info):
    """The roofline the kernel rows are measured against: clone of a large tensor (one read + one write)."""
    x = torch.randn((1 << 28) if on_cuda(device) else (1 << 20), device=device)
    y, _ = run(benchmark, x.clone, device)
    assert torch.equal(y, x)
    benchmark.extra_info.update(device_info)
    assert device_info["copy_gbps"] > 0
