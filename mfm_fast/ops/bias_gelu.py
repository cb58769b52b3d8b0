"""Bias add + tanh-approximated GELU (the MLP's fc1 epilogue).

`bias_gelu(x, bias)` runs the Triton kernels of csrc_triton/bias_gelu.py (one read of x, one write of y; backward
and jvp in one fused pass each); `bias_gelu_ref` is the PyTorch spec with the same signature.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.library import triton_op, wrap_triton

from .launch import cdiv, check_kernel_inputs, new_buffer, tangent_needs_grad

try:
    from csrc_triton import bias_gelu as kernels
except ImportError:  # the reference path runs without Triton
    kernels = None


def bias_gelu_ref(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (..., F), bias (F,) -> gelu_tanh(x + bias)."""
    return F.gelu(x + bias, approximate="tanh")


def _blocks(n: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): 32 rows × up to 128 columns per tile."""
    return 32, min(128, 1 << max(n - 1, 0).bit_length())


@triton_op("mfm_fast::bias_gelu_fwd", mutates_args=())
def bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    m = x.numel() // n
    y = new_buffer(x.shape, x.dtype, x.device)
    bm, bn = _blocks(n)
    wrap_triton(kernels.bias_gelu_fwd_kernel)[(cdiv(m, bm), cdiv(n, bn))](x, bias, y, m, n, BLOCK_M=bm, BLOCK_N=bn)
    return y


def _grad(x, bias, g, gb, reduce: bool):
    n = x.shape[-1]
    m = x.numel() // n
    bm, bn = _blocks(n)
    parts = min(cdiv(m, bm), 256)  # partial bias-gradient rows, summed in a fixed order below
    out = new_buffer(x.shape, x.dtype, x.device)
    partial = new_buffer((parts, n) if reduce else (1,), torch.float32, x.device)
    wrap_triton(kernels.bias_gelu_grad_kernel)[(parts, cdiv(n, bn))](
        x, bias, x if g is None else g, bias if gb is None else gb, out, partial, m, n,
        HAS_G=g is not None, HAS_GB=gb is not None, REDUCE=reduce, BLOCK_M=bm, BLOCK_N=bn)
    return out, partial


@triton_op("mfm_fast::bias_gelu_bwd", mutates_args=())
def bias_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor,
                  bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dx, dbias); dbias is empty when not bias_grad (frozen weights skip the reduction)."""
    dx, partial = _grad(x, bias, dy, None, reduce=bias_grad)
    return dx, (partial.sum(0).to(bias.dtype) if bias_grad else bias.new_empty(0))


@triton_op("mfm_fast::bias_gelu_jvp", mutates_args=())
def bias_gelu_jvp(x: torch.Tensor, bias: torch.Tensor, tx: Optional[torch.Tensor],
                  tbias: Optional[torch.Tensor]) -> torch.Tensor:
    return _grad(x, bias, tx, tbias, reduce=False)[0]


def _setup_backward(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, dbias = bias_gelu_bwd(dy.contiguous(), x, bias, ctx.needs_input_grad[1])
    return dx, (dbias if ctx.needs_input_grad[1] else None)


# Dynamo cannot trace an autograd.Function that defines jvp, so under torch.compile the op itself carries the
# backward (forward-mode AD stays eager-only there)
bias_gelu_fwd.register_autograd(_backward, setup_context=_setup_backward)


def _jvp_differentiable(x, bias, tx, tbias):
    """The jvp tangent from differentiable torch ops, for losses that backpropagate through a tangent (LSD)."""
    z = (x + bias).float()
    s = torch.sigmoid(1.5957691216057308 * (z + 0.044715 * z ** 3))
    dgelu = s + z * s * (1 - s) * 1.5957691216057308 * (1 + 3 * 0.044715 * z * z)
    t = (0 if tx is None else tx.float()) + (0 if tbias is None else tbias.float())
    return (dgelu * t).to(x.dtype)


class BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(x, bias):
        return bias_gelu_fwd(x, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_backward(ctx, inputs, output)
        ctx.save_for_forward(*inputs)

    backward = staticmethod(_backward)

    @staticmethod
    def jvp(ctx, tx, tbias):
        if tx is None and tbias is None:
            return None
        x, bias = ctx.saved_tensors
        if tangent_needs_grad(x, bias, tx, tbias):
            return _jvp_differentiable(x, bias, tx, tbias)
        tx = None if tx is None else tx.contiguous()
        tbias = None if tbias is None else tbias.contiguous()
        return bias_gelu_jvp(x, bias, tx, tbias)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (..., F), bias (F,) -> gelu_tanh(x + bias) in x's dtype (fp32 arithmetic); grads wrt x and bias, jvp."""
    if bias.dim() != 1 or x.dim() < 1 or x.shape[-1] != bias.shape[0]:
        raise ValueError(f"bias must have shape (F,) with F = x.shape[-1]; got x {tuple(x.shape)}, "
                         f"bias {tuple(bias.shape)}")
    check_kernel_inputs("bias_gelu", x=x, bias=bias)
    if x.numel() == 0:
        return bias_gelu_ref(x, bias)
    args = (x.contiguous(), bias.contiguous())
    return bias_gelu_fwd(*args) if torch.compiler.is_compiling() else BiasGelu.apply(*args)
