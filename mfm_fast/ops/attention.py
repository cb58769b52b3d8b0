"""Attention for MFMDiT: softmax(q kᵀ/√d) v, no mask.

`attention_ref` is the explicit-softmax spec (supports every autograd transform, incl. torch.func.jvp).
`attention_jvp` is the fused Triton twin with a forward-mode rule: flash-style kernels (csrc_triton/attention_jvp.py)
for the output, its jvp tangent and the backward, never an L×L matrix in memory.
`attention` dispatches FA3 → FA2 → xformers → PyTorch SDPA → Triton ("triton", `attention_jvp`) → the
explicit-softmax path ("math"), taking the first backend whose declared capabilities (device, dtype, head dim,
forward-mode AD) fit the inputs: under torch.func.jvp (the flow-map losses) only "triton" and "math" declare a jvp
rule. flash-attn and xformers are optional and imported lazily. MFM_FAST_ATTENTION=name[,name...] restricts the
candidates; when none fits, the error lists every backend's reasons.
"""
from __future__ import annotations

import functools
import importlib
import math
import os
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.library import triton_op, wrap_triton

from .launch import (cdiv, check_kernel_inputs, differentiable_by_recompute, interpreter_on, new_buffer,
                     tangent_needs_grad, tangent_or_zero)

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


def _triton_reasons(device, dtype, head_dim, need_jvp):
    reasons = []
    if _import("triton") is None:
        reasons.append("the triton package is not installed")
    if dtype not in (*_HALF, torch.float32):
        reasons.append(f"needs float16/bfloat16/float32, inputs are {dtype}")
    if device.type == "cuda":
        major, minor = _cuda_capability(device)
        need = 8 if dtype == torch.bfloat16 else 7
        if major < need:
            reasons.append(f"needs compute capability {need}.0 or newer for {dtype}, this GPU is {major}.{minor}")
    elif device.type == "cpu":
        if not interpreter_on():
            reasons.append("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)")
        elif dtype in _HALF:
            reasons.append(f"the Triton interpreter runs float32 only, inputs are {dtype}")
    else:
        reasons.append(f"needs a CUDA device (or CPU tensors under TRITON_INTERPRET=1), inputs are on {device}")
    if head_dim > _MAX_HEAD_DIM:
        reasons.append(f"head dim {head_dim} > {_MAX_HEAD_DIM}")
    return reasons


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
    _Backend("triton", _triton_reasons, lambda q, k, v: attention_jvp(q, k, v)),  # fused, with a jvp rule
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


# ---------------------------------------------------------------------------------------------- attention_jvp
# The fused Triton op: o and the log-sum-exp in one flash-style pass; backward from the saved log-sum-exp (δ and dq,
# then dk and dv, no atomics); the jvp tangent by the same forward kernel run with tangents.
_MAX_HEAD_DIM = 256  # one head row is a single register tile (padded to a power of two)

attention_jvp_ref = attention_ref  # the spec, under the fused op's name (same signature)


class AttentionTiles(NamedTuple):
    block_m: int  # query rows per program (forward, jvp, dq); query rows per inner step of dk/dv
    block_n: int  # key rows per inner step (forward, jvp, dq); key rows per program of dk/dv
    block_d: int  # the head dim rounded up to a power of two, at least 16 (tl.dot's minimum)
    num_warps: int
    num_stages: int


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per pass, picked from sm_90 compiles (`python -m mfm_fast kernels`;
# triton 3.6 and 3.9) to use no local memory: 16-bit at head dims 16-256, fp32 at 72 (XL/2, 128-wide tiles), except
# the fp32 jvp (~1 KB of spills at every size tried: four fp32 operand tiles on the FMA units). Not timed on a GPU.
_TILES_16BIT = {64: dict(fwd=(128, 64, 4, 3), jvp=(64, 64, 4, 3), bwd=(64, 64, 4, 3)),
                128: dict(fwd=(128, 64, 8, 3), jvp=(64, 32, 8, 3), bwd=(64, 32, 8, 3)),
                256: dict(fwd=(64, 32, 8, 3), jvp=(16, 32, 4, 3), bwd=(32, 32, 8, 3))}
_TILES_FP32 = dict(fwd=(32, 32, 8, 3), jvp=(16, 16, 4, 1), bwd=(32, 32, 8, 3))  # fp32 matmuls on the FMA units


def attention_tiles(head_dim: int, kind: str, dtype: torch.dtype) -> AttentionTiles:
    """Tiles for kind "fwd" (o, lse), "jvp" (the tangent: twice the accumulators) or "bwd" (dq; dk, dv)."""
    if kind not in ("fwd", "jvp", "bwd"):
        raise ValueError(f"kind must be 'fwd', 'jvp' or 'bwd', got {kind!r}")
    block_d = max(16, 1 << max(head_dim - 1, 0).bit_length())
    table = _TILES_FP32 if dtype == torch.float32 else _TILES_16BIT[max(64, block_d)]
    m, n, warps, stages = table[kind]
    return AttentionTiles(m, n, block_d, warps, stages)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any strides over (R, H, L) but read the head dim with unit stride."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> tuple:
    return t.stride(0), t.stride(1), t.stride(2)


def _kernels():
    return _import("csrc_triton.attention_jvp")


def _precision(dtype: torch.dtype) -> str:
    # fp32 stays fp32 through the matmuls (no silent TF32); 16-bit operands use the tensor cores either way
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch_fwd(q, k, v, tq, tk, tv, o, lse, to, kind: str) -> None:
    """The forward kernel: (o, lse) when o is given, the tangent `to` when any of tq, tk, tv is given."""
    R, H, Lq, Dh = q.shape
    tiles = attention_tiles(Dh, kind, q.dtype)
    placeholder = to if o is None else o
    tangent_strides = [_strides(t if t is not None else p) for t, p in ((tq, q), (tk, k), (tv, v))]
    wrap_triton(_kernels().attention_fwd_kernel)[(R * H, cdiv(Lq, tiles.block_m))](
        q, k, v, *(t if t is not None else p for t, p in ((tq, q), (tk, k), (tv, v))),
        placeholder, to if to is not None else placeholder, lse if lse is not None else placeholder,
        *_strides(q), *_strides(k), *_strides(v), *(s for st in tangent_strides for s in st),
        H, Lq, k.shape[2], Dh, 1.0 / math.sqrt(Dh),
        HAS_TQ=tq is not None, HAS_TK=tk is not None, HAS_TV=tv is not None, STORE_O=o is not None,
        PRECISION=_precision(q.dtype), BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=tiles.block_d,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)


@triton_op("mfm_fast::attention", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (o (R, H, Lq, Dh) contiguous, lse (R, H, Lq) fp32: the natural log-sum-exp of each score row)."""
    o = new_buffer(q.shape, q.dtype, q.device)
    lse = new_buffer(q.shape[:3], torch.float32, q.device)
    _launch_fwd(q, k, v, None, None, None, o, lse, None, "fwd")
    return o, lse


@triton_op("mfm_fast::attention_bwd", mutates_args=())
def _attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv), contiguous; o contiguous (the forward's output), do with a unit head-dim stride."""
    R, H, Lq, Dh = q.shape
    Lk = k.shape[2]
    tiles = attention_tiles(Dh, "bwd", q.dtype)
    kern = _kernels()
    dq = new_buffer(q.shape, q.dtype, q.device)
    dk = new_buffer(k.shape, k.dtype, k.device)
    dv = new_buffer(v.shape, v.dtype, v.device)
    delta = new_buffer(q.shape[:3], torch.float32, q.device)  # rowsum(do ∘ o), written by the dq kernel
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    meta = dict(PRECISION=_precision(q.dtype), BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
                BLOCK_D=tiles.block_d, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    scalars = (H, Lq, Lk, Dh, 1.0 / math.sqrt(Dh))
    wrap_triton(kern.attention_bwd_dq_kernel)[(R * H, cdiv(Lq, tiles.block_m))](
        q, k, v, o, do, lse, delta, dq, *strides, *scalars, **meta)
    wrap_triton(kern.attention_bwd_dkdv_kernel)[(R * H, cdiv(Lk, tiles.block_n))](
        q, k, v, do, lse, delta, dk, dv, *strides, *scalars, **meta)
    return dq, dk, dv


def attention_bwd_ref(do, q, k, v):
    """PyTorch twin of _attention_bwd, differentiable: the vjp of `attention_ref` -> (dq, dk, dv)."""
    return torch.func.vjp(attention_ref, q, k, v)[1](do)


@triton_op("mfm_fast::attention_jvp", mutates_args=())
def _attention_jvp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: Optional[torch.Tensor],
                   tk: Optional[torch.Tensor], tv: Optional[torch.Tensor]) -> torch.Tensor:
    """The jvp tangent of o for tangents (tq, tk, tv) of (q, k, v); an absent tangent is zero."""
    if tq is None and tk is None and tv is None:
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    to = new_buffer(q.shape, q.dtype, q.device)
    _launch_fwd(q, k, v, tq, tk, tv, None, None, to, "jvp")
    return to


def attention_tangent_ref(q, k, v, tq, tk, tv):
    """PyTorch twin of _attention_jvp: the tangent of `attention_ref` (explicit L×L softmax)."""
    tangents = tuple(tangent_or_zero(t, p) for t, p in ((tq, q), (tk, k), (tv, v)))
    return torch.func.jvp(attention_ref, (q, k, v), tangents)[1]


# A loss on the tangent itself (LSD differentiates ∂_u X_{s,u} w.r.t. the weights) backpropagates through the jvp by
# recomputing attention_tangent_ref in the backward: the forward keeps the fused kernel and holds no L×L matrix until
# the backward, which pays for the explicit softmax one layer at a time.
differentiable_by_recompute(_attention_jvp, attention_tangent_ref)


def _fold_batch(t: torch.Tensor, dim: Optional[int], size: int) -> torch.Tensor:
    """A vmapped (R, H, L, Dh) argument -> (B·R, H, L, Dh): the vmap batch is more rows."""
    t = t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)
    return t.reshape(size * t.shape[1], *t.shape[2:])


class Attention(torch.autograd.Function):
    """o = softmax(q kᵀ/√Dh) v by the fused kernels: forward (also returns the non-differentiable log-sum-exp),
    backward from the saved log-sum-exp, jvp by the dual kernel, vmap by folding the batch into the rows."""

    @staticmethod
    def forward(q, k, v):
        return _attention_fwd(q, k, v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        o, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # an absent tangent stays None: its matmuls are compiled out
        ctx.save_for_backward(*inputs, o, lse)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, do, _dlse):
        if do is None:
            return None, None, None
        q, k, v, o, lse = ctx.saved_tensors
        if tangent_needs_grad(do, q, k, v):
            # a backward that is itself differentiated (create_graph=True, torch.func.grad, whose backward always
            # builds a graph): the reference's vjp, from differentiable torch ops (second order, rare)
            dq, dk, dv = attention_bwd_ref(do, q, k, v)
        else:
            dq, dk, dv = _attention_bwd(_unit_last(do), q, k, v, o, lse)
        need = ctx.needs_input_grad
        return (dq if need[0] else None), (dk if need[1] else None), (dv if need[2] else None)

    @staticmethod
    def jvp(ctx, tq, tk, tv):
        q, k, v = ctx.saved_tensors
        tq, tk, tv = (None if t is None else _unit_last(t) for t in (tq, tk, tv))
        return _attention_jvp(q, k, v, tq, tk, tv), None

    @staticmethod
    def vmap(info, in_dims, q, k, v):
        B = info.batch_size
        o, lse = Attention.apply(*(_unit_last(_fold_batch(t, d, B)) for t, d in zip((q, k, v), in_dims)))
        return (o.view(B, -1, *o.shape[1:]), lse.view(B, -1, *lse.shape[1:])), (0, 0)


# torch.compile cannot trace an autograd.Function that defines jvp, so under compile the op itself carries the
# backward (forward-mode AD stays eager-only there)
_attention_fwd.register_autograd(Attention.backward, setup_context=Attention.setup_context)


def attention_jvp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Fused Triton twin of `attention_ref`: q (R, H, Lq, Dh), k, v (R, H, Lk, Dh) -> (R, H, Lq, Dh), q's dtype.

    Flash-style (online softmax, fp32 statistics): no L×L matrix in memory, in any pass. Differentiable in reverse
    mode (fused backward from the saved log-sum-exp) and forward mode (torch.func.jvp, forward_ad: the dual kernel
    computes the tangent); reverse mode through a jvp tangent recomputes `attention_tangent_ref` in the backward.
    Inputs may be strided over (R, H, L) (e.g. slices of a fused qkv projection); head dims up to 256.
    """
    _check(q, k, v)
    check_kernel_inputs("attention_jvp", q=q, k=k, v=v)
    if q.shape[-1] > _MAX_HEAD_DIM:
        raise ValueError(f"attention_jvp: head dim {q.shape[-1]} > {_MAX_HEAD_DIM}; use attention_ref")
    if q.numel() == 0 or k.numel() == 0:
        return attention_ref(q, k, v)
    args = tuple(_unit_last(t) for t in (q, k, v))
    return (_attention_fwd(*args) if torch.compiler.is_compiling() else Attention.apply(*args))[0]
