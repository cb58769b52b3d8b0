"""Gated residual x + gate·branch, optionally fused with the next LayerNorm→modulate (two outputs).

`gate_residual` and `gate_residual_ln_modulate` are the fused Triton ops (one kernel family, the LayerNorm switched
by a constexpr flag); the `_ref` functions are their PyTorch twins with the same signatures.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch.library import triton_op

from .adaln import ln_modulate_ref, ln_modulate_tangent_ref
from .launch import (BWD_PROGRAMS, check_groups, check_kernel_inputs, differentiable_by_recompute, filled_or,
                     group_view, launch_rows, new_buffer, present_or, row_plan, sum_partials, tangent_or_zero)

try:
    from csrc_triton import gate_residual as kernels
except ImportError:  # the reference path runs without Triton
    kernels = None


def gate_residual_ref(x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x, branch (R, L, D); gate (G, D) broadcast over the N = R/G rows of a group and over tokens."""
    g = gate.shape[0]
    out = group_view(x, g) + gate[:, None, None, :] * group_view(branch, g)
    return out.reshape(x.shape)


def gate_residual_ln_modulate_ref(x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                                  scale: torch.Tensor, eps: float = 1e-6):
    """Returns (x_new, y): x_new = x + gate·branch (next residual stream), y = LN(x_new)·(1+scale) + shift."""
    x_new = gate_residual_ref(x, branch, gate)
    return x_new, ln_modulate_ref(x_new, shift, scale, eps)


# ---------------------------------------------------------------------------------------------- launchers
def _result_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return functools.reduce(torch.promote_types, [t.dtype for t in tensors])


@triton_op("mfm_fast::gate_residual", mutates_args=())
def _gate_residual_fwd(x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    x_new = new_buffer(x.shape, _result_dtype(x, branch, gate), x.device)
    launch_rows(kernels.gate_residual_fwd_kernel, row_plan(x, gate.shape[0]), (x, branch, gate, gate, gate, x_new,
                x_new), (0.0,), HAS_LN=False)
    return x_new


@triton_op("mfm_fast::gate_residual_ln_modulate", mutates_args=())
def _gate_residual_ln_modulate_fwd(x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                                   scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = _result_dtype(x, branch, gate)
    x_new, y = new_buffer(x.shape, dtype, x.device), new_buffer(x.shape, dtype, x.device)
    launch_rows(kernels.gate_residual_fwd_kernel, row_plan(x, gate.shape[0]),
                (x, branch, gate, shift, scale, x_new, y), (eps,), HAS_LN=True)
    return x_new, y


@triton_op("mfm_fast::gate_residual_bwd", mutates_args=())
def _gate_residual_bwd(x_new: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor, scale: Optional[torch.Tensor],
                       dxo: Optional[torch.Tensor], dy: Optional[torch.Tensor], eps: float, gate_grad: bool,
                       ln_param_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                     torch.Tensor]:
    """-> (dx, dbranch, dgate, dshift, dscale). dx is written only when dy is given (else it equals dxo and comes
    back empty); parameter gradients not asked for come back empty. dy (grad of the LN output) needs scale."""
    G, D = gate.shape
    has_dy = dy is not None
    ln_param_grad = ln_param_grad and has_dy
    plan = row_plan(branch, G, BWD_PROGRAMS)
    dx = new_buffer(x_new.shape if has_dy else (0,), x_new.dtype, x_new.device)
    dbranch = new_buffer(branch.shape, branch.dtype, branch.device)
    parts = [new_buffer((plan.programs if flag else 0, D), torch.float32, branch.device)
             for flag in (gate_grad, ln_param_grad, ln_param_grad)]
    launch_rows(kernels.gate_residual_bwd_kernel, plan,
                (x_new, branch, gate, present_or(scale, gate), present_or(dxo, branch), present_or(dy, branch),
                 filled_or(dx, branch), dbranch, *(filled_or(p, dbranch) for p in parts)), (eps,),
                HAS_DXO=dxo is not None, HAS_DY=has_dy, STORE_DX=has_dy, GATE_GRAD=gate_grad,
                LN_PARAM_GRAD=ln_param_grad)
    dgate = sum_partials(parts[0], G, gate.dtype) if gate_grad else parts[0]
    if not ln_param_grad:
        return dx, dbranch, dgate, parts[1], parts[2]
    return dx, dbranch, dgate, sum_partials(parts[1], G, scale.dtype), sum_partials(parts[2], G, scale.dtype)


@triton_op("mfm_fast::gate_residual_jvp", mutates_args=())
def _gate_residual_jvp(x_new: Optional[torch.Tensor], branch: torch.Tensor, gate: torch.Tensor,
                       scale: Optional[torch.Tensor], tx: Optional[torch.Tensor], tbranch: Optional[torch.Tensor],
                       tgate: Optional[torch.Tensor], tshift: Optional[torch.Tensor], tscale: Optional[torch.Tensor],
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (tangent of x_new, tangent of y); with x_new None (no LayerNorm) the second comes back empty."""
    has_ln = x_new is not None
    dtype = x_new.dtype if has_ln else _result_dtype(branch, gate, tx if tx is not None else branch)
    txo = new_buffer(branch.shape, dtype, branch.device)
    ty = new_buffer(branch.shape if has_ln else (0,), dtype, branch.device)
    launch_rows(kernels.gate_residual_jvp_kernel, row_plan(branch, gate.shape[0]),
                (present_or(x_new, branch), branch, gate, present_or(scale, gate), present_or(tx, branch),
                 present_or(tbranch, branch), present_or(tgate, gate), present_or(tshift, gate),
                 present_or(tscale, gate), txo, filled_or(ty, txo)), (eps,),
                HAS_LN=has_ln, HAS_TX=tx is not None, HAS_TBR=tbranch is not None, HAS_TGATE=tgate is not None,
                HAS_TSHIFT=has_ln and tshift is not None, HAS_TSCALE=has_ln and tscale is not None)
    return txo, ty


def _tangents_ref(x_new, branch, gate, scale, tx, tbranch, tgate, tshift, tscale, eps):
    """PyTorch twin of _gate_residual_jvp (the tangents do not depend on x's value: zero stands in for it)."""
    x = torch.zeros_like(branch)
    tangents = (tangent_or_zero(tx, x), tangent_or_zero(tbranch, branch), tangent_or_zero(tgate, gate))
    _, txo = torch.func.jvp(gate_residual_ref, (x, branch, gate), tangents)
    if x_new is None:
        return txo, txo.new_empty((0,))
    return txo, ln_modulate_tangent_ref(x_new, scale, txo, tshift, tscale, eps)


differentiable_by_recompute(_gate_residual_jvp, _tangents_ref)


# ---------------------------------------------------------------------------------------------- autograd
def _save_branch_if_needed(ctx, branch, gate, *others) -> None:
    """Save (branch, gate, *others) for backward, branch only when the gate's gradient is asked for: it enters
    the backward through dgate = Σ d·branch alone, and a value gradient (frozen weights) never asks for it, so
    one (R, L, D) activation per block is not kept. save_for_forward holds no memory after the forward."""
    ctx.branch_meta = (branch.shape, branch.dtype, branch.device)
    ctx.save_for_backward(branch if ctx.needs_input_grad[2] else None, gate, *others)


def _branch_or_stand_in(ctx, branch):
    """The saved branch, or a stand-in with its shape and dtype that occupies no memory (the kernel reads branch
    only under GATE_GRAD, and the launch needs its shape and dtype)."""
    if branch is not None:
        return branch
    shape, dtype, device = ctx.branch_meta
    return torch.empty((), dtype=dtype, device=device).expand(shape)


class GateResidual(torch.autograd.Function):
    """x_new = x + gate·branch with per-group gate; backward and jvp by fused kernels."""

    @staticmethod
    def forward(x, branch, gate):
        return _gate_residual_fwd(x, branch, gate)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, branch, gate = inputs
        ctx.x_dtype = x.dtype
        _save_branch_if_needed(ctx, branch, gate)
        ctx.save_for_forward(branch, gate)

    @staticmethod
    def backward(ctx, dxo):
        branch, gate = ctx.saved_tensors
        need = ctx.needs_input_grad
        branch = _branch_or_stand_in(ctx, branch)
        _, dbranch, dgate, _, _ = _gate_residual_bwd(branch, branch, gate, None, dxo.contiguous(), None, 0.0,
                                                     need[2], False)
        return dxo.to(ctx.x_dtype), dbranch, (dgate if need[2] else None)

    @staticmethod
    def jvp(ctx, tx, tbranch, tgate):
        branch, gate = ctx.saved_tensors
        return _gate_residual_jvp(None, branch, gate, None, tx, tbranch, tgate, None, None, 0.0)[0]


class GateResidualLnModulate(torch.autograd.Function):
    """(x_new, y) = (x + gate·branch, LN(x_new)·(1+scale) + shift) in one pass; backward and jvp by fused kernels."""

    @staticmethod
    def forward(x, branch, gate, shift, scale, eps):
        return _gate_residual_ln_modulate_fwd(x, branch, gate, shift, scale, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, branch, gate, shift, scale, eps = inputs
        ctx.eps, ctx.x_dtype = eps, x.dtype
        ctx.set_materialize_grads(False)  # an unused output costs no gradient pass
        _save_branch_if_needed(ctx, branch, gate, output[0], scale)
        ctx.save_for_forward(output[0], branch, gate, scale)

    @staticmethod
    def backward(ctx, dxo, dy):
        branch, gate, x_new, scale = ctx.saved_tensors
        need = ctx.needs_input_grad
        if dxo is None and dy is None:
            return None, None, None, None, None, None
        branch = _branch_or_stand_in(ctx, branch)
        dx, dbranch, dgate, dshift, dscale = _gate_residual_bwd(
            x_new, branch, gate, scale, None if dxo is None else dxo.contiguous(),
            None if dy is None else dy.contiguous(), ctx.eps, need[2], need[3] or need[4])
        if dy is None:
            dx = dxo
        return (dx.to(ctx.x_dtype), dbranch, (dgate if need[2] else None),
                (dshift if need[3] and dy is not None else None), (dscale if need[4] and dy is not None else None),
                None)

    @staticmethod
    def jvp(ctx, tx, tbranch, tgate, tshift, tscale, _):
        x_new, branch, gate, scale = ctx.saved_tensors
        return _gate_residual_jvp(x_new, branch, gate, scale, tx, tbranch, tgate, tshift, tscale, ctx.eps)


# torch.compile cannot trace an autograd.Function that defines jvp, so under compile the ops themselves carry the
# backward (forward-mode AD stays eager-only there)
_gate_residual_fwd.register_autograd(GateResidual.backward, setup_context=GateResidual.setup_context)
_gate_residual_ln_modulate_fwd.register_autograd(GateResidualLnModulate.backward,
                                                 setup_context=GateResidualLnModulate.setup_context)


# ---------------------------------------------------------------------------------------------- public ops
def _check(op: str, x, branch, gate, **modulation) -> int:
    check_kernel_inputs(op, x=x, branch=branch, gate=gate, **modulation)
    if branch.shape != x.shape:
        raise ValueError(f"{op}: branch must have x's shape {tuple(x.shape)}, got {tuple(branch.shape)}")
    return check_groups(op, "x", x, dict(gate=gate, **modulation))


def gate_residual(x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Fused Triton twin of `gate_residual_ref`: x, branch (R, L, D); gate (G, D), R = G·N -> x + gate·branch."""
    _check("gate_residual", x, branch, gate)
    if x.numel() == 0:
        return gate_residual_ref(x, branch, gate)
    args = (x.contiguous(), branch.contiguous(), gate.contiguous())
    return _gate_residual_fwd(*args) if torch.compiler.is_compiling() else GateResidual.apply(*args)


def gate_residual_ln_modulate(x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                              scale: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused Triton twin of `gate_residual_ln_modulate_ref` -> (x_new, y), one read of x and branch, two writes.

    The LayerNorm normalises the fp32 x_new (before rounding to the storage dtype); statistics in fp32.
    """
    _check("gate_residual_ln_modulate", x, branch, gate, shift=shift, scale=scale)
    if x.numel() == 0:
        return gate_residual_ln_modulate_ref(x, branch, gate, shift, scale, eps)
    args = (x.contiguous(), branch.contiguous(), gate.contiguous(), shift.contiguous(), scale.contiguous(),
            float(eps))
    if torch.compiler.is_compiling():
        return _gate_residual_ln_modulate_fwd(*args)
    return GateResidualLnModulate.apply(*args)
