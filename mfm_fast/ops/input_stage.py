"""Input stage of MFMDiT: tokens = PE(x̄) + pos + (1+scale)·PE'(x) + shift after the two patch projections.

The context embedding PE'(x) and its modulation exist once per group (state) and broadcast over its particles.

`input_stage` is the fused Triton op (forward, backward, jvp); `input_stage_ref` its PyTorch twin.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch.library import triton_op, wrap_triton

from .launch import (BWD_PROGRAMS, cdiv, check_kernel_inputs, differentiable_by_recompute, filled_or, group_view,
                     launch_rows, new_buffer, present_or, row_config, row_plan, sum_partials, tangent_or_zero)

try:
    from csrc_triton import input_stage as kernels
except ImportError:  # the reference path runs without Triton
    kernels = None


def input_stage_ref(h: torch.Tensor, pos: torch.Tensor, hc: torch.Tensor, shift: torch.Tensor,
                    scale: torch.Tensor) -> torch.Tensor:
    """h (R, L, D) embedded x̄; pos (L, D); hc (G, L, D) embedded context x; shift, scale (G, D) -> (R, L, D)."""
    g = hc.shape[0]
    ctx = hc * (1 + scale[:, None, :]) + shift[:, None, :]  # (G, L, D)
    out = group_view(h, g) + pos + ctx[:, None]
    return out.reshape(h.shape)


# ---------------------------------------------------------------------------------------------- launchers
def _launch_sum(rows: int, groups: int, L: int, a, p, c1, s1, c2, s2, b, dtype: torch.dtype) -> torch.Tensor:
    """out (rows, L, D) = a + p + c1·(1+s1) + c2·s2 + b, absent terms None (one kernel for forward and jvp)."""
    like = next(t for t in (a, p, c1, c2, b) if t is not None)
    rows, groups, L, D = int(rows), int(groups), int(L), int(like.shape[-1])
    out = new_buffer((rows, L, D), dtype, like.device)
    launch_rows(kernels.input_stage_kernel, row_plan(out, groups),
                (present_or(a, out), present_or(p, out), present_or(c1, out), present_or(s1, out),
                 present_or(c2, out), present_or(s2, out), present_or(b, out), out), (L,),
                HAS_A=a is not None, HAS_P=p is not None, HAS_C1=c1 is not None, HAS_C2=c2 is not None,
                HAS_B=b is not None)
    return out


@triton_op("mfm_fast::input_stage", mutates_args=())
def _input_stage_fwd(h: torch.Tensor, pos: torch.Tensor, hc: torch.Tensor, shift: torch.Tensor,
                     scale: torch.Tensor) -> torch.Tensor:
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in (h, pos, hc, shift, scale)])
    return _launch_sum(h.shape[0], hc.shape[0], hc.shape[1], h, pos, hc, scale, None, None, shift, dtype)


@triton_op("mfm_fast::input_stage_jvp", mutates_args=())
def _input_stage_jvp(rows: int, hc: torch.Tensor, scale: torch.Tensor, th: Optional[torch.Tensor],
                     tpos: Optional[torch.Tensor], thc: Optional[torch.Tensor], tshift: Optional[torch.Tensor],
                     tscale: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Tangent th + tpos + thc·(1+scale) + hc·tscale + tshift of the (rows, L, D) output."""
    return _launch_sum(rows, hc.shape[0], hc.shape[1], th, tpos, thc, scale, None if tscale is None else hc, tscale,
                       tshift, dtype)


@triton_op("mfm_fast::input_stage_bwd", mutates_args=())
def _input_stage_bwd(dout: torch.Tensor, hc: torch.Tensor, scale: torch.Tensor, pos_grad: bool,
                     param_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dpos fp32, dhc, dshift, dscale); dpos and the parameter gradients come back empty when not asked for."""
    def empty():  # a fresh one each time: outputs must not alias each other
        return hc.new_empty((0,), dtype=torch.float32)

    G, L, D = (int(n) for n in hc.shape)  # concrete: the launch configuration depends on them
    N = int(dout.shape[0]) // G
    block_d, block_m, num_warps = row_config(D)
    token_blocks = cdiv(L, block_m)
    # split the particle sum over several programs only when groups × token blocks leave the GPU idle
    per_chunk = cdiv(N, max(1, BWD_PROGRAMS // (G * token_blocks)))
    chunks = cdiv(N, per_chunk)
    split = chunks > 1
    programs = G * token_blocks
    dhc = new_buffer((0,) if split else hc.shape, hc.dtype, hc.device)
    ctx_part = new_buffer((G, chunks, L, D) if split else (G, L, D) if pos_grad else (0,), torch.float32, hc.device)
    parts = [new_buffer((programs, D) if param_grad and not split else (0,), torch.float32, hc.device)
             for _ in range(2)]
    wrap_triton(kernels.input_stage_bwd_kernel)[(programs * chunks,)](
        dout, hc, scale, filled_or(dhc, hc), filled_or(ctx_part, hc), *(filled_or(p, hc) for p in parts), N, L, D,
        token_blocks, chunks, per_chunk, SPLIT=split, PARAM_GRAD=param_grad, POS_GRAD=pos_grad, BLOCK_M=block_m,
        BLOCK_D=block_d, num_warps=num_warps)

    if split:
        ctx = ctx_part.sum(1)  # (G, L, D): fixed-order sum over the particle chunks
        dhc = (ctx * (1 + scale.float()[:, None])).to(hc.dtype)
        dpos = ctx.sum(0) if pos_grad else empty()
        if not param_grad:
            return dpos, dhc, empty(), empty()
        return dpos, dhc, ctx.sum(1).to(scale.dtype), (ctx * hc.float()).sum(1).to(scale.dtype)
    dpos = ctx_part.sum(0) if pos_grad else empty()
    if not param_grad:
        return dpos, dhc, empty(), empty()
    return dpos, dhc, sum_partials(parts[0], G, scale.dtype), sum_partials(parts[1], G, scale.dtype)


def _tangent_ref(rows, hc, scale, th, tpos, thc, tshift, tscale, dtype):
    """PyTorch twin of _input_stage_jvp (the tangent does not depend on h, pos, shift: zeros stand in for them)."""
    G, L, D = hc.shape
    primals = (hc.new_zeros(rows, L, D), hc.new_zeros(L, D), hc, torch.zeros_like(scale), scale)
    tangents = tuple(tangent_or_zero(t, p) for t, p in zip((th, tpos, thc, tshift, tscale), primals))
    return torch.func.jvp(input_stage_ref, primals, tangents)[1].to(dtype)


differentiable_by_recompute(_input_stage_jvp, _tangent_ref)


# ---------------------------------------------------------------------------------------------- autograd
class InputStage(torch.autograd.Function):
    """out = h + pos + (1+scale)·hc + shift with group broadcast; backward and jvp by fused kernels."""

    @staticmethod
    def forward(h, pos, hc, shift, scale):
        return _input_stage_fwd(h, pos, hc, shift, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        h, pos, hc, shift, scale = inputs
        ctx.dtypes = (h.dtype, pos.dtype, output.dtype)
        ctx.rows = h.shape[0]
        ctx.save_for_backward(hc, scale)
        ctx.save_for_forward(hc, scale)

    @staticmethod
    def backward(ctx, dout):
        hc, scale = ctx.saved_tensors
        need = ctx.needs_input_grad
        dpos, dhc, dshift, dscale = _input_stage_bwd(dout.contiguous(), hc, scale, need[1], need[3] or need[4])
        return (dout.to(ctx.dtypes[0]) if need[0] else None, dpos.to(ctx.dtypes[1]) if need[1] else None,
                dhc if need[2] else None, dshift if need[3] else None, dscale if need[4] else None)

    @staticmethod
    def jvp(ctx, th, tpos, thc, tshift, tscale):
        hc, scale = ctx.saved_tensors
        return _input_stage_jvp(ctx.rows, hc, scale, th, tpos, thc, tshift, tscale, ctx.dtypes[2])


# torch.compile cannot trace an autograd.Function that defines jvp, so under compile the op itself carries the
# backward (forward-mode AD stays eager-only there)
_input_stage_fwd.register_autograd(InputStage.backward, setup_context=InputStage.setup_context)


def input_stage(h: torch.Tensor, pos: torch.Tensor, hc: torch.Tensor, shift: torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
    """Fused Triton twin of `input_stage_ref`: h (R, L, D), pos (L, D), hc (G, L, D), shift, scale (G, D), R = G·N.

    One pass over the (R, L, D) stream; hc and its modulation broadcast over the N particles of a group, and their
    gradients are summed over them (deterministically). pos gets its gradient too when it requires one.
    """
    op = "input_stage"
    check_kernel_inputs(op, h=h, pos=pos, hc=hc, shift=shift, scale=scale)
    if h.dim() != 3:
        raise ValueError(f"{op}: h must have shape (R, L, D), got {tuple(h.shape)}")
    R, L, D = h.shape
    if hc.dim() != 3 or hc.shape[1:] != (L, D):
        raise ValueError(f"{op}: hc must have shape (G, {L}, {D}), got {tuple(hc.shape)}")
    G = hc.shape[0]
    if G == 0 or R % G:
        raise ValueError(f"{op}: h has {R} rows, not a multiple of the {G} rows of hc")
    if pos.shape != (L, D):
        raise ValueError(f"{op}: pos must have shape ({L}, {D}), got {tuple(pos.shape)}")
    for name, t in (("shift", shift), ("scale", scale)):
        if t.shape != (G, D):
            raise ValueError(f"{op}: {name} must have shape ({G}, {D}), got {tuple(t.shape)}")
    if h.numel() == 0:
        return input_stage_ref(h, pos, hc, shift, scale)
    args = tuple(t.contiguous() for t in (h, pos, hc, shift, scale))
    return _input_stage_fwd(*args) if torch.compiler.is_compiling() else InputStage.apply(*args)
