"""LayerNorm (no affine, eps 1e-6) followed by adaLN modulation x·(1+scale) + shift.

Modulation rows are per *group*: x has R = G·N rows (N particles share one conditioning), shift/scale have G rows
and broadcast over the N particles and all tokens without materialised copies.

`ln_modulate` is the fused Triton op (forward, backward, jvp); `ln_modulate_ref` the PyTorch reference with the same
signature. The launch helpers it shares with the other LayerNorm-family ops live in `mfm_fast.ops.launch`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.library import triton_op

from .launch import (BWD_PROGRAMS, check_groups, check_kernel_inputs, differentiable_by_recompute, filled_or,
                     group_view, launch_rows, new_buffer, present_or, row_plan, sum_partials, tangent_or_zero)

try:
    from csrc_triton import adaln as kernels
except ImportError:  # the reference path runs without Triton
    kernels = None


def ln_modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x (R, L, D); shift, scale (G, D) with R = G·N -> LN(x)·(1+scale) + shift, shape (R, L, D).

    Statistics in fp32, or in x's dtype where that is wider (float64 in, float64 math); the result has x's dtype.
    """
    g = shift.shape[0]
    acc = torch.promote_types(x.dtype, torch.float32)
    xn = F.layer_norm(x.to(acc), x.shape[-1:], eps=eps)
    y = group_view(xn, g) * (1 + scale.to(acc)[:, None, None, :]) + shift.to(acc)[:, None, None, :]
    return y.reshape(x.shape).to(x.dtype)


# ---------------------------------------------------------------------------------------------- ln_modulate
@triton_op("mfm_fast::ln_modulate", mutates_args=())
def _ln_modulate_fwd(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    y = new_buffer(x.shape, x.dtype, x.device)
    launch_rows(kernels.ln_modulate_fwd_kernel, row_plan(x, shift.shape[0]), (x, shift, scale, y), (eps,))
    return y


@triton_op("mfm_fast::ln_modulate_bwd", mutates_args=())
def _ln_modulate_bwd(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, eps: float,
                     param_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx, dshift, dscale); dshift/dscale are empty when not param_grad."""
    G, D = scale.shape
    plan = row_plan(x, G, BWD_PROGRAMS)
    dx = new_buffer(x.shape, x.dtype, x.device)
    parts = [new_buffer((plan.programs if param_grad else 0, D), torch.float32, x.device) for _ in range(2)]
    launch_rows(kernels.ln_modulate_bwd_kernel, plan, (x, scale, dy, dx, *(filled_or(p, dx) for p in parts)), (eps,),
                PARAM_GRAD=param_grad)
    if not param_grad:
        return dx, parts[0], parts[1]
    return dx, sum_partials(parts[0], G, scale.dtype), sum_partials(parts[1], G, scale.dtype)


@triton_op("mfm_fast::ln_modulate_jvp", mutates_args=())
def _ln_modulate_jvp(x: torch.Tensor, scale: torch.Tensor, tx: Optional[torch.Tensor], tshift: Optional[torch.Tensor],
                     tscale: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    ty = new_buffer(x.shape, x.dtype, x.device)
    launch_rows(kernels.ln_modulate_jvp_kernel, row_plan(x, scale.shape[0]),
                (x, scale, present_or(tx, x), present_or(tshift, scale), present_or(tscale, scale), ty), (eps,),
                HAS_TX=tx is not None, HAS_TSHIFT=tshift is not None, HAS_TSCALE=tscale is not None)
    return ty


def ln_modulate_tangent_ref(x, scale, tx, tshift, tscale, eps):
    """PyTorch twin of _ln_modulate_jvp (the tangent does not depend on shift's value: zero stands in for it)."""
    shift = torch.zeros_like(scale)
    tangents = (tangent_or_zero(tx, x), tangent_or_zero(tshift, shift), tangent_or_zero(tscale, scale))
    return torch.func.jvp(lambda a, b, c: ln_modulate_ref(a, b, c, eps), (x, shift, scale), tangents)[1]


differentiable_by_recompute(_ln_modulate_jvp, ln_modulate_tangent_ref)


class LnModulate(torch.autograd.Function):
    """y = LN(x)·(1+scale) + shift with per-group modulation; backward and jvp by fused kernels."""

    @staticmethod
    def forward(x, shift, scale, eps):
        return _ln_modulate_fwd(x, shift, scale, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, shift, scale, eps = inputs
        ctx.eps = eps
        ctx.save_for_backward(x, scale)
        ctx.save_for_forward(x, scale)

    @staticmethod
    def backward(ctx, dy):
        x, scale = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dshift, dscale = _ln_modulate_bwd(dy.contiguous(), x, scale, ctx.eps, need[1] or need[2])
        return dx, (dshift if need[1] else None), (dscale if need[2] else None), None

    @staticmethod
    def jvp(ctx, tx, tshift, tscale, _):
        x, scale = ctx.saved_tensors
        return _ln_modulate_jvp(x, scale, tx, tshift, tscale, ctx.eps)


# torch.compile cannot trace an autograd.Function that defines jvp, so under compile the op itself carries the
# backward (forward-mode AD stays eager-only there)
_ln_modulate_fwd.register_autograd(LnModulate.backward, setup_context=LnModulate.setup_context)


def ln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Fused Triton twin of `ln_modulate_ref`: x (R, L, D); shift, scale (G, D), R = G·N -> (R, L, D) in x's dtype.

    One read of x and one write of y; fp32 statistics. Differentiable (backward and forward mode: torch.func.jvp).
    """
    check_kernel_inputs("ln_modulate", x=x, shift=shift, scale=scale)
    check_groups("ln_modulate", "x", x, dict(shift=shift, scale=scale))
    if x.numel() == 0:
        return ln_modulate_ref(x, shift, scale, eps)
    args = (x.contiguous(), shift.contiguous(), scale.contiguous(), float(eps))
    return _ln_modulate_fwd(*args) if torch.compiler.is_compiling() else LnModulate.apply(*args)
