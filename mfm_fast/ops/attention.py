"""Attention for MFMDiT: softmax(q kᵀ/√d) v, no mask.

`attention_ref` is the explicit-softmax spec (supports every autograd transform, incl. torch.func.jvp).
`attention` dispatches FA3 → FA2 → xformers → PyTorch SDPA → the explicit-softmax path ("math"), taking the first
backend whose declared capabilities (device, dtype, head dim, forward-mode AD) fit the inputs. flash-attn and
xformers are optional and imported lazily. MFM_FAST_ATTENTION=name[,name...] restricts the candidates; when none
fits, the error lists every backend's reasons.
"""
from __future__ import annotations

import functools
import importlib
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

_HALF = (torch.float16, torch.bfloat16)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v (R, H, L, Dh) -> (R, H, L, Dh); statistics in fp32, or in q's dtype where that is wider."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    acc = torch.promote_types(q.dtype, torch.float32)
    logits = torch.einsum("rhld,rhmd->rhlm", q.to(acc), k.to(acc)) * scale
    return torch.einsum("rhlm,rhmd->rhld", logits.softmax(-1), v.to(acc)).to(q.dtype)


@functools.lru_cache(maxsize=None)
def _import(module: str):
    """The module, or None when it is not installed or fails to import (an optional dependency)."""
    try:
        return importlib.import_module(module)
    except Exception:  # a broken optional install (ABI mismatch, missing CUDA libs) must not break attention
        return None


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _pad_head_dim(x: torch.Tensor, dims: tuple) -> torch.Tensor:
    target = next(d for d in dims if d >= x.shape[-1])
    return x if target == x.shape[-1] else F.pad(x, (0, target - x.shape[-1]))


# ---------------------------------------------------------------- backends: capabilities, then the call
_FA3_DIMS = (64, 96, 128, 192, 256)  # head dims with compiled FA3 kernels; others are zero-padded up to these
_FA2_DIMS = (32, 64, 96, 128, 160, 192, 224, 256)


def _flash_reasons(module: str, extra: str, min_major: int, max_major: int, device, dtype, head_dim, need_jvp):
    reasons = []
    if _import(module) is None:
        reasons.append(f"the {module} package is not installed ({extra})")
    if device.type != "cuda":
        reasons.append(f"needs a CUDA device, inputs are on {device}")
    else:
        major, minor = _cuda_capability(device)
        if not min_major <= major <= max_major:
            reasons.append(f"needs compute capability {min_major}.x–{max_major}.x, this GPU is {major}.{minor}")
    if dtype not in _HALF:
        reasons.append(f"needs float16/bfloat16, inputs are {dtype}")
    if head_dim > 256:
        reasons.append(f"head dim {head_dim} > 256")
    if need_jvp:
        reasons.append("no forward-mode AD (jvp) rule")
    return reasons


def _run_flash(fn, q, k, v, dims):
    dh = q.shape[-1]
    # (R, H, L, Dh) -> (R, L, H, Dh'), zero-padded: padding q, k leaves q·k unchanged and padded v columns give 0
    q, k, v = (_pad_head_dim(t.transpose(1, 2), dims) for t in (q, k, v))
    out = fn(q, k, v, softmax_scale=1.0 / math.sqrt(dh))
    out = out[0] if isinstance(out, tuple) else out  # some FA3 releases also return the log-sum-exp
    return out[..., :dh].transpose(1, 2)


def _fa3_reasons(device, dtype, head_dim, need_jvp):
    return _flash_reasons("flash_attn_interface", "flash-attention's hopper/ package", 9, 9, device, dtype, head_dim,
                          need_jvp)


def _fa3(q, k, v):
    return _run_flash(_import("flash_attn_interface").flash_attn_func, q, k, v, _FA3_DIMS)


def _fa2_reasons(device, dtype, head_dim, need_jvp):
    return _flash_reasons("flash_attn", "pip install mfm_fast[flash]", 8, 12, device, dtype, head_dim, need_jvp)


def _fa2(q, k, v):
    return _run_flash(_import("flash_attn").flash_attn_func, q, k, v, _FA2_DIMS)


def _xformers_reasons(device, dtype, head_dim, need_jvp):
    reasons = []
    if _import("xformers.ops") is None:
        reasons.append("the xformers package is not installed (pip install mfm_fast[xformers])")
    if device.type != "cuda":
        reasons.append(f"needs a CUDA device, inputs are on {device}")
    if dtype not in (*_HALF, torch.float32):
        reasons.append(f"needs float16/bfloat16/float32, inputs are {dtype}")
    if head_dim > 128 or head_dim % 8:
        reasons.append(f"head dim {head_dim} is not a multiple of 8 up to 128")
    if need_jvp:
        reasons.append("no forward-mode AD (jvp) rule")
    return reasons


def _xformers(q, k, v):
    xops = _import("xformers.ops")
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          scale=1.0 / math.sqrt(q.shape[-1]))
    return out.transpose(1, 2)


def _sdpa_reasons(device, dtype, head_dim, need_jvp):
    reasons = []
    if not dtype.is_floating_point:
        reasons.append(f"needs a floating-point dtype, inputs are {dtype}")
    if need_jvp:
        reasons.append("its fused kernels have no forward-mode AD (jvp) rule")
    return reasons


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def _math_reasons(device, dtype, head_dim, need_jvp):
    return [] if dtype.is_floating_point else [f"needs a floating-point dtype, inputs are {dtype}"]


@dataclass(frozen=True)
class _Backend:
    name: str
    reasons: Callable  # (device, dtype, head_dim, need_jvp) -> list of reasons it cannot run; [] = it can
    run: Callable


BACKENDS = (
    _Backend("fa3", _fa3_reasons, _fa3),
    _Backend("fa2", _fa2_reasons, _fa2),
    _Backend("xformers", _xformers_reasons, _xformers),
    _Backend("sdpa", _sdpa_reasons, _sdpa),
    _Backend("math", _math_reasons, attention_ref),  # explicit softmax: every autograd transform, incl. jvp
)
BACKEND_NAMES = tuple(b.name for b in BACKENDS)


def _allowed() -> tuple:
    raw = os.environ.get("MFM_FAST_ATTENTION", "").strip()
    if not raw:
        return BACKEND_NAMES
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    unknown = [n for n in names if n not in BACKEND_NAMES]
    if unknown:
        raise ValueError(f"MFM_FAST_ATTENTION names unknown backends {unknown}; known: {list(BACKEND_NAMES)}")
    return names


def needs_jvp(*tensors: torch.Tensor) -> bool:
    """True when forward-mode tangents are attached or the call runs inside a torch.func transform.

    Inside torch.func (jvp, grad, vmap) tensors are wrapped and which transform wraps them is not cheaply
    observable, so the jvp-capable path is taken there. Under torch.compile no transform is active.
    """
    if torch.compiler.is_compiling():
        return False
    for t in tensors:
        if torch._C._functorch.is_functorch_wrapped_tensor(t):
            return True
        if forward_ad.unpack_dual(t).tangent is not None:
            return True
    return False


def backend_table(device, dtype, head_dim: int, need_jvp: bool) -> list:
    """[(name, ok, reasons)] in dispatch order for inputs of this device/dtype/head dim (nothing allocated)."""
    device = torch.device(device)
    allowed = _allowed()
    table = []
    for b in BACKENDS:
        reasons = list(b.reasons(device, dtype, head_dim, need_jvp))
        if b.name not in allowed:
            reasons.append(f"excluded by MFM_FAST_ATTENTION={os.environ.get('MFM_FAST_ATTENTION')}")
        table.append((b.name, not reasons, reasons))
    return table


def attention_backends(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       need_jvp: Optional[bool] = None) -> list:
    """[(name, ok, reasons)] for these inputs in dispatch order; need_jvp defaults to what the inputs say."""
    if need_jvp is None:
        need_jvp = needs_jvp(q, k, v)
    return backend_table(q.device, q.dtype, q.shape[-1], need_jvp)


def _check(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not torch.is_tensor(t) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (R, H, L, Dh), got "
                             f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q (R, H, Lq, Dh), k and v (R, H, Lk, Dh) do not fit: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


_BY_NAME = {b.name: b for b in BACKENDS}


@functools.lru_cache(maxsize=None)
def _choose(device: torch.device, dtype: torch.dtype, head_dim: int, need_jvp: bool, allowed_env: str) -> str:
    """Name of the first capable backend, or an error listing every backend's reasons (decided once per key)."""
    table = backend_table(device, dtype, head_dim, need_jvp)
    chosen = next((name for name, ok, _ in table if ok), None)
    if chosen is None:
        lines = "\n".join(f"  {name}: {'; '.join(reasons)}" for name, _, reasons in table)
        raise RuntimeError(f"no attention backend fits head dim {head_dim}, {dtype} on {device}"
                           f"{' (jvp needed)' if need_jvp else ''}:\n{lines}")
    return chosen


# Under torch.compile the choice is evaluated once while tracing and baked in as a constant: probing optional
# packages (imports) and device properties inside the traced region would break the graph.
@torch.compiler.assume_constant_result
def _choose_constant(device: torch.device, dtype: torch.dtype, head_dim: int, need_jvp: bool, allowed_env: str) -> str:
    return _choose(device, dtype, head_dim, need_jvp, allowed_env)


def select_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> _Backend:
    _check(q, k, v)
    key = (q.device, q.dtype, q.shape[-1], needs_jvp(q, k, v), os.environ.get("MFM_FAST_ATTENTION", ""))
    return _BY_NAME[_choose_constant(*key) if torch.compiler.is_compiling() else _choose(*key)]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (R, H, Lq, Dh), k, v (R, H, Lk, Dh) -> (R, H, Lq, Dh) = softmax(q kᵀ/√Dh) v, first capable backend."""
    return select_backend(q, k, v).run(q, k, v)
