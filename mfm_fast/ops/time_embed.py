"""Multi-time embedding: sinusoidal features of K time inputs, each through its own Linear→SiLU→Linear MLP.

`time_embed` runs all K feature sets, the first Linear, its bias and the SiLU in one Triton launch (features
never reach memory), then the second Linear as one batched matmul over K; `time_embed_ref` is the spec.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.library import triton_op, wrap_triton

from .launch import cdiv, check_kernel_inputs, new_buffer, tangent_needs_grad

try:
    from csrc_triton import time_embed as kernels
except ImportError:  # the reference path runs without Triton
    kernels = None


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t·f_i), sin(t·f_i)] with f_i = max_period^(-i/half), computed in fp32 (cos first; t used as given)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def time_embed_ref(times: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                   max_period: float = 10000.0) -> torch.Tensor:
    """times (G, K); w1 (K, D, F); b1 (K, D); w2 (K, D, D); b2 (K, D) -> (G, K, D).

    Embedder k maps times[:, k] through features(F) -> Linear(w1[k], b1[k]) -> SiLU -> Linear(w2[k], b2[k]).
    """
    feats = timestep_features(times, w1.shape[-1], max_period).to(w1.dtype)  # (G, K, F)
    h = F.silu(torch.einsum("gkf,kdf->gkd", feats, w1) + b1)  # (G, K, D)
    return torch.einsum("gkd,ked->gke", h, w2) + b2


_BD, _BF = 32, 16  # hidden-dim and feature-dim tiles; the (BLOCK_G, BD, BF) products stay in registers


def _block_g(G: int) -> int:
    return min(16, 1 << max(G - 1, 0).bit_length())


def _launch_first_layer(times, w1, b1, max_period, mode, out_dtype, dh=None, tt=None, tw1=None, tb1=None):
    G, K = times.shape
    _, D, F_ = w1.shape
    bg = _block_g(G)
    out = new_buffer((G, K, D), out_dtype, times.device)
    wrap_triton(kernels.time_embed_fwd_kernel)[(cdiv(G, bg), K, cdiv(D, _BD))](
        times, w1, b1, out, out if dh is None else dh, times if tt is None else tt, w1 if tw1 is None else tw1,
        b1 if tb1 is None else tb1, G, K, D, F_, -math.log(max_period), MODE=mode, HAS_TT=tt is not None,
        HAS_TW1=tw1 is not None, HAS_TB1=tb1 is not None, BLOCK_G=bg, BLOCK_D=_BD, BLOCK_F=_BF)
    return out


@triton_op("mfm_fast::time_embed_hidden", mutates_args=())
def time_embed_hidden(times: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, max_period: float) -> torch.Tensor:
    """SiLU(features(times)·W1ᵀ + b1): (G, K) -> (G, K, D) in w1's dtype."""
    return _launch_first_layer(times, w1, b1, max_period, 0, w1.dtype)


@triton_op("mfm_fast::time_embed_hidden_bwd", mutates_args=())
def time_embed_hidden_bwd(dh: torch.Tensor, times: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                          max_period: float, times_grad: bool,
                          weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (d times, d w1, d b1), the unrequested ones empty. The SiLU input is recomputed, never saved."""
    G, K = times.shape
    _, D, F_ = w1.shape
    da = _launch_first_layer(times, w1, b1, max_period, 1, torch.float32, dh=dh)  # (G, K, D) fp32
    bg = _block_g(G)
    dt, dw1, db1 = times.new_empty(0), w1.new_empty(0), b1.new_empty(0)
    if times_grad:
        dt = new_buffer(times.shape, times.dtype, times.device)
        wrap_triton(kernels.time_embed_bwd_times_kernel)[(cdiv(G, bg), K)](
            times, w1, da, dt, G, K, D, F_, -math.log(max_period), BLOCK_G=bg, BLOCK_D=_BD, BLOCK_F=_BF)
    if weight_grad:
        dw1 = new_buffer(w1.shape, w1.dtype, w1.device)
        wrap_triton(kernels.time_embed_bwd_w1_kernel)[(K, cdiv(D, _BD), cdiv(F_, _BF))](
            times, da, dw1, G, K, D, F_, -math.log(max_period), BLOCK_G=bg, BLOCK_D=_BD, BLOCK_F=_BF)
        db1 = da.sum(0).to(b1.dtype)
    return dt, dw1, db1


@triton_op("mfm_fast::time_embed_hidden_jvp", mutates_args=())
def time_embed_hidden_jvp(times: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, max_period: float,
                          ttimes: Optional[torch.Tensor], tw1: Optional[torch.Tensor],
                          tb1: Optional[torch.Tensor]) -> torch.Tensor:
    return _launch_first_layer(times, w1, b1, max_period, 2, w1.dtype, tt=ttimes, tw1=tw1, tb1=tb1)


def _contig(t):
    return None if t is None else t.contiguous()


def _setup_backward(ctx, inputs, output):
    times, w1, b1, ctx.max_period = inputs
    ctx.save_for_backward(times, w1, b1)


def _backward(ctx, dh):
    times, w1, b1 = ctx.saved_tensors
    need = ctx.needs_input_grad
    dt, dw1, db1 = time_embed_hidden_bwd(dh.contiguous(), times, w1, b1, ctx.max_period, need[0], need[1] or need[2])
    return (dt if need[0] else None), (dw1 if need[1] else None), (db1 if need[2] else None), None


# Dynamo cannot trace an autograd.Function that defines jvp, so under torch.compile the op itself carries the
# backward (forward-mode AD stays eager-only there)
time_embed_hidden.register_autograd(_backward, setup_context=_setup_backward)


def _hidden_jvp_differentiable(times, w1, b1, max_period, ttimes, tw1, tb1):
    """The first layer's jvp tangent from differentiable torch ops, for losses that backpropagate through a
    tangent (LSD): SiLU'(a)·(ṫ·∂feat/∂t·W1ᵀ + feat·Ẇ1ᵀ + ḃ1)."""
    half = w1.shape[-1] // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=times.device, dtype=torch.float32) / half)
    args = times.float()[..., None] * freqs  # (G, K, F/2)
    feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    a = torch.einsum("gkf,kdf->gkd", feats, w1.float()) + b1.float()
    adot = torch.zeros_like(a)
    if ttimes is not None:
        dfeats = torch.cat([-torch.sin(args) * freqs, torch.cos(args) * freqs], dim=-1)
        adot = adot + ttimes.float()[..., None] * torch.einsum("gkf,kdf->gkd", dfeats, w1.float())
    if tw1 is not None:
        adot = adot + torch.einsum("gkf,kdf->gkd", feats, tw1.float())
    if tb1 is not None:
        adot = adot + tb1.float()
    sig = torch.sigmoid(a)
    return (sig * (1 + a * (1 - sig)) * adot).to(w1.dtype)


class TimeEmbedHidden(torch.autograd.Function):
    @staticmethod
    def forward(times, w1, b1, max_period):
        return time_embed_hidden(times, w1, b1, max_period)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_backward(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:3])

    backward = staticmethod(_backward)

    @staticmethod
    def jvp(ctx, ttimes, tw1, tb1, _):
        if ttimes is None and tw1 is None and tb1 is None:
            return None
        times, w1, b1 = ctx.saved_tensors
        if tangent_needs_grad(times, w1, b1, ttimes, tw1, tb1):
            return _hidden_jvp_differentiable(times, w1, b1, ctx.max_period, ttimes, tw1, tb1)
        return time_embed_hidden_jvp(times, w1, b1, ctx.max_period, _contig(ttimes), _contig(tw1), _contig(tb1))


def time_embed(times: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
               max_period: float = 10000.0) -> torch.Tensor:
    """times (G, K); w1 (K, D, F); b1 (K, D); w2 (K, D, D); b2 (K, D) -> (G, K, D), like `time_embed_ref`.

    Gradients flow to times, w1, b1, w2, b2; torch.func.jvp works (explicit jvp rule for the fused layer).
    """
    if times.dim() != 2:
        raise ValueError(f"times must have shape (G, K), got {tuple(times.shape)}")
    K = times.shape[1]
    if w1.dim() != 3 or w1.shape[0] != K or w1.shape[2] % 2:
        raise ValueError(f"w1 must have shape (K={K}, D, F) with F even, got {tuple(w1.shape)}")
    D = w1.shape[1]
    for name, t, shape in (("b1", b1, (K, D)), ("w2", w2, (K, D, D)), ("b2", b2, (K, D))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if not max_period > 1:
        raise ValueError(f"max_period must be > 1, got {max_period}")
    check_kernel_inputs("time_embed", times=times, w1=w1, b1=b1, w2=w2, b2=b2)
    if times.numel() == 0:
        return time_embed_ref(times, w1, b1, w2, b2, max_period)
    args = (times.contiguous(), w1.contiguous(), b1.contiguous(), float(max_period))
    h = time_embed_hidden(*args) if torch.compiler.is_compiling() else TimeEmbedHidden.apply(*args)  # (G, K, D)
    # second Linear of all K embedders as one batched matmul: (K, G, D) @ (K, D, D)ᵀ + b2
    return torch.baddbmm(b2[:, None, :], h.transpose(0, 1), w2.transpose(1, 2)).transpose(0, 1)
