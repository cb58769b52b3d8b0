"""Activation memory of the value gradient, and the chunk size that fits the free GPU memory.

A value-gradient pass (MFM-G) runs forward and backward through the network's context input with frozen weights,
so what lives at once is: the weights (already allocated), the tensors autograd saves for the input gradient of
every block (per (state, particle) row), and the transients of one block. `activation_bytes_per_row` estimates the
per-row part of that from an MFMDiT config; `auto_chunk_size` divides the free memory by it; `recompute_activations`
trades one extra forward per chunk for keeping only each block's inputs, which pays when the plain chunk would be
too small for the GEMMs to run efficiently.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch

from ._checks import check_positive_int

# Saved bytes per (token · hidden unit) of one block, measured with torch.autograd.graph.saved_tensors_hooks
# (weights frozen, gradient to the context only; tests/test_particles.py measures them again), keyed by the
# activation dtype's size. Reference path: LayerNorm inputs in fp32, q/k/v/out and the GELU pre-activation in the
# activation dtype; its attention additionally keeps the fp32 softmax (and a copy in the activation dtype for half
# precision): `_ATTN_PROB_BYTES` per head · token². Fused path (fp32 measured under the Triton interpreter at
# MFM-T/2, S/2 and XL/2 widths: 40 exactly, plus the attention's fp32 log-sum-exp, 4 bytes per head · token);
# its half-precision value cannot be measured without a GPU and keeps the reference path's, which the gpu test
# `test_activation_estimate_covers_measured_gpu_peak` bounds.
_SAVED_PER_TOKEN_UNIT = {4: 36, 2: 28}
_FUSED_SAVED_PER_TOKEN_UNIT = {4: 40, 2: 28}
_ATTN_PROB_BYTES = {4: 4, 2: 6}
_ATTN_LSE_BYTES = 4
# Transients of one block on top of what is saved (fc1/GELU outputs and their gradients, fp32 statistics).
_TRANSIENT_PER_TOKEN_UNIT = 64
# Below this many tokens per network call the GEMMs of a DiT block lose efficiency; recomputation that allows
# larger chunks then pays for its extra forward.
MIN_EFFICIENT_TOKENS = 2048


@dataclass
class ChunkPlan:
    chunk_size: int  # (state, particle) rows per network call, the `chunk_size` of value_and_grad
    recompute: bool  # run blocks under activation recomputation (see recompute_activations)
    bytes_per_row: int  # estimated activation bytes per row under this plan
    budget_bytes: Optional[int]  # the memory the plan was sized for; None = unbounded (CPU)


def _config(model):
    cfg = getattr(model, "config", None)
    needed = ("hidden_size", "depth", "num_heads", "num_tokens")
    if cfg is None or not all(hasattr(cfg, k) for k in needed):
        return None
    return cfg


def _uses_reference_attention(model) -> bool:
    """The reference ops keep the explicit softmax; the fused path's attention backends do not."""
    impl = getattr(model, "impl", "torch")
    if impl == "auto":
        from .backend import resolve_impl
        impl = resolve_impl(impl)
    return impl == "torch"


def saved_bytes_per_block(model, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes one MFMDiT block saves for backward per (state, particle) row in a value-gradient pass."""
    cfg = _config(model)
    if cfg is None:
        raise TypeError(f"cannot estimate activations of {type(model).__name__}: it has no MFMDiT-style config "
                        "(hidden_size, depth, num_heads, num_tokens)")
    b = dtype.itemsize
    key = 4 if b >= 4 else 2
    wide = max(1, b // 4)  # float64 doubles everything measured in float32
    L, D, H = cfg.num_tokens, cfg.hidden_size, cfg.num_heads
    if _uses_reference_attention(model):
        return wide * (_SAVED_PER_TOKEN_UNIT[key] * L * D + _ATTN_PROB_BYTES[key] * H * L * L)
    return wide * (_FUSED_SAVED_PER_TOKEN_UNIT[key] * L * D + _ATTN_LSE_BYTES * H * L)


def activation_bytes_per_row(model, dtype: torch.dtype = torch.bfloat16, recompute: bool = False) -> int:
    """Estimated peak activation bytes per (state, particle) row of a value-gradient pass through an MFMDiT.

    recompute=True: only each block's inputs (stream and modulated stream) are kept, plus one block's saved
    tensors while it is recomputed during the backward pass.
    """
    cfg = _config(model)
    if cfg is None:
        raise TypeError(f"cannot estimate activations of {type(model).__name__}: it has no MFMDiT-style config "
                        "(hidden_size, depth, num_heads, num_tokens)")
    b = dtype.itemsize
    L, D, H, depth = cfg.num_tokens, cfg.hidden_size, cfg.num_heads, cfg.depth
    block = saved_bytes_per_block(model, dtype)
    transient = _TRANSIENT_PER_TOKEN_UNIT * L * D + (3 * 4 * H * L * L if _uses_reference_attention(model) else 0)
    io = 4 * L * D * 4  # patch embeddings, output image and their gradients
    if recompute:
        return depth * 2 * L * D * b + block + transient + io
    return depth * block + transient + io


def _free_bytes(device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def _balanced(max_rows: int, n_states: int, n_particles: int) -> int:
    """The most even chunk no larger than max_rows, in value_and_grad's blocking (particles split first)."""
    if max_rows >= n_states * n_particles:
        return n_states * n_particles
    if max_rows < n_particles:
        pieces = math.ceil(n_particles / max_rows)
        return math.ceil(n_particles / pieces)
    states_per_chunk = max_rows // n_particles
    pieces = math.ceil(n_states / states_per_chunk)
    return math.ceil(n_states / pieces) * n_particles


def _budget(device, safety: float, budget_bytes: Optional[int]) -> Optional[int]:
    if not 0 < safety <= 1:
        raise ValueError(f"safety must lie in (0, 1], got {safety}")
    free = _free_bytes(device)
    if budget_bytes is not None:
        check_positive_int("budget_bytes", int(budget_bytes))
        in_use = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        cap = max(int(budget_bytes) - in_use, 0)
        free = cap if free is None else min(free, cap)
    return None if free is None else int(free * safety)


def auto_chunk_size(model, n_states: int, n_particles: int, dtype: torch.dtype = torch.bfloat16, device="cuda",
                    safety: float = 0.8, budget_bytes: Optional[int] = None, recompute: bool = False) -> int:
    """Rows per network call for value_and_grad so that the activations fit `safety` × the free GPU memory.

    The free memory is read with torch.cuda.mem_get_info; `budget_bytes` further caps the whole process's
    allocation (e.g. 8 GiB). Returns a value in [1, n_states·n_particles], as even as value_and_grad's blocking
    allows; every row (no bound) on CPU unless `budget_bytes` is given, and for models without an MFMDiT-style
    config. `recompute=True` sizes chunks for blocks run under `recompute_activations`.
    """
    check_positive_int("n_states", n_states)
    check_positive_int("n_particles", n_particles)
    budget = _budget(torch.device(device), safety, budget_bytes)
    rows = n_states * n_particles
    if budget is None or _config(model) is None:
        return rows
    max_rows = budget // activation_bytes_per_row(model, dtype, recompute)
    return _balanced(max(1, max_rows), n_states, n_particles)


def plan_chunks(model, n_states: int, n_particles: int, dtype: torch.dtype = torch.bfloat16,
                device="cuda", safety: float = 0.8, budget_bytes: Optional[int] = None) -> ChunkPlan:
    """Chunk size and whether to recompute activations: recomputation is chosen only when plain chunks would
    hold fewer than MIN_EFFICIENT_TOKENS tokens (GEMMs too small) and recomputation allows larger ones."""
    args = (model, n_states, n_particles, dtype, device, safety, budget_bytes)
    budget = _budget(torch.device(device), safety, budget_bytes)
    plain = auto_chunk_size(*args)
    if budget is None or _config(model) is None:
        return ChunkPlan(plain, False, 0, None)
    plain_bytes = activation_bytes_per_row(model, dtype)
    if plain < n_states * n_particles and plain * _config(model).num_tokens < MIN_EFFICIENT_TOKENS:
        lean = auto_chunk_size(*args, recompute=True)
        if lean > plain:
            return ChunkPlan(lean, True, activation_bytes_per_row(model, dtype, recompute=True), budget)
    return ChunkPlan(plain, False, plain_bytes, budget)


@contextlib.contextmanager
def recompute_activations(model, enabled: bool = True):
    """Run MFMDiT blocks under torch.utils.checkpoint even in eval mode (value gradients are computed in eval).

    MFMDiT checkpoints its blocks when `grad_checkpointing` is set and the module is training; it has no dropout or
    batch statistics, so switching it to training mode here changes memory, not results.
    """
    if not enabled or not hasattr(model, "grad_checkpointing"):
        yield model
        return
    flag, training = model.grad_checkpointing, model.training
    model.grad_checkpointing = True
    model.train(True)
    try:
        yield model
    finally:
        model.grad_checkpointing = flag
        model.train(training)
