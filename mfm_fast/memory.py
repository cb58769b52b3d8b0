"""Activation memory of the value gradient, and the chunk size that fits the free GPU memory.

A value-gradient pass (MFM-G) runs forward and backward through the network's context input with frozen weights,
so what lives at once is: the weights (already allocated), the tensors autograd saves for the input gradient of
every block (per (state, particle) row), and the transients of one block. `activation_bytes_per_row` estimates the
per-row part of that from an MFMDiT config; `auto_chunk_size` divides the free memory by it; `recompute_activations`
trades one extra forward per chunk for keeping only each block's inputs, which pays when the plain chunk would be
too small for the GEMMs to run efficiently.

The reward is part of the same backward: for latent models every row is decoded (SD-VAE) and scored by an image
model, which at the release's configs keeps several times the DiT's bytes per row. `reward_bytes_per_row`
measures what a reward saves on fake tensors (shapes only, nothing allocated), once per reward, and `plan_chunks`
(value_and_grad's chunk_size="auto") budgets it with the model.
"""
from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
    reward_bytes_per_row: int = 0  # of bytes_per_row, what the reward (decoder, reward model) keeps


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
                    safety: float = 0.8, budget_bytes: Optional[int] = None, recompute: bool = False,
                    extra_bytes_per_row: int = 0) -> int:
    """Rows per network call for value_and_grad so that the activations fit `safety` × the free GPU memory.

    The free memory is read with torch.cuda.mem_get_info; `budget_bytes` further caps the whole process's
    allocation (e.g. 8 GiB). Returns a value in [1, n_states·n_particles], as even as value_and_grad's blocking
    allows; every row (no bound) on CPU unless `budget_bytes` is given. `recompute=True` sizes chunks for blocks
    run under `recompute_activations`. `extra_bytes_per_row` adds what the reward keeps per row (e.g. a decoder
    and an image reward: `reward_bytes_per_row`); a model without an MFMDiT-style config is budgeted by that alone.
    """
    check_positive_int("n_states", n_states)
    check_positive_int("n_particles", n_particles)
    budget = _budget(torch.device(device), safety, budget_bytes)
    rows = n_states * n_particles
    per_row = int(extra_bytes_per_row)
    if _config(model) is not None:
        per_row += activation_bytes_per_row(model, dtype, recompute)
    if budget is None or per_row <= 0:
        return rows
    return _balanced(max(1, budget // per_row), n_states, n_particles)


def plan_chunks(model, n_states: int, n_particles: int, dtype: torch.dtype = torch.bfloat16,
                device="cuda", safety: float = 0.8, budget_bytes: Optional[int] = None,
                reward: Optional[Callable] = None) -> ChunkPlan:
    """Chunk size and whether to recompute activations: recomputation is chosen only when plain chunks would
    hold fewer than MIN_EFFICIENT_TOKENS tokens (GEMMs too small) and recomputation allows larger ones.

    With `reward`, what it keeps per row for the value gradient is budgeted too (`reward_bytes_per_row`, measured
    once per reward, shape and dtype); at small N the decoder and the reward model dominate."""
    budget = _budget(torch.device(device), safety, budget_bytes)
    if budget is None:
        return ChunkPlan(n_states * n_particles, False, 0, None)
    extra = 0
    if reward is not None and hasattr(model, "event_shape"):
        extra = reward_bytes_per_row(reward, tuple(model.event_shape), dtype, device) or 0
    args = (model, n_states, n_particles, dtype, device, safety, budget_bytes)
    plain = auto_chunk_size(*args, extra_bytes_per_row=extra)
    if _config(model) is None:
        return ChunkPlan(plain, False, extra, budget, extra)
    plain_bytes = activation_bytes_per_row(model, dtype) + extra
    if plain < n_states * n_particles and plain * _config(model).num_tokens < MIN_EFFICIENT_TOKENS:
        lean = auto_chunk_size(*args, recompute=True, extra_bytes_per_row=extra)
        if lean > plain:
            return ChunkPlan(lean, True, activation_bytes_per_row(model, dtype, recompute=True) + extra, budget,
                             extra)
    return ChunkPlan(plain, False, plain_bytes, budget, extra)


# ---------------------------------------------------------------------------------------------- reward activations
class _ZeroScalarReads(TorchDispatchMode):
    """Fake tensors have no values: a data-dependent read (`t.item()`, `bool(t)`) answers zero instead of failing.
    In reward code such reads are input checks (e.g. torchvision's `(std == 0).any()`, a `max() > 2.5` rescale
    test), for which zero takes the ordinary path; the shapes of the models measured never depend on them."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            return False if t.dtype == torch.bool else (0.0 if t.is_floating_point() else 0)
        return func(*args, **(kwargs or {}))


def saved_bytes_per_row(fn: Callable, row_shape: Sequence[int], dtype: torch.dtype = torch.float32,
                        device="cpu", rows: tuple[int, int] = (1, 2)) -> tuple[int, int]:
    """-> (bytes autograd saves per row, largest single saved tensor per row) while `fn` runs on an input that
    requires grad, measured on fake tensors: shapes only, nothing is allocated or computed, and fn's weights stay
    where they are. Weights and other per-call tensors cancel in the difference between `rows`."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    totals, largest = [], []
    for n in rows:
        storages = {}

        def pack(t):
            st = t.untyped_storage()
            storages[st._cdata] = st.nbytes()  # views share a storage: count it once
            return t

        with FakeTensorMode(allow_non_fake_inputs=True), _ZeroScalarReads():
            x = torch.empty((n, *row_shape), dtype=dtype, device=device).requires_grad_(True)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                fn(x)
        totals.append(sum(storages.values()))
        largest.append(max(storages.values(), default=0))
    per_row = (totals[1] - totals[0]) // (rows[1] - rows[0])
    return max(per_row, 0), largest[1] // rows[1]


# a reward's measurement is reused for the whole run: value_and_grad plans every step
_REWARD_BYTES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def reward_bytes_per_row(reward: Callable, event_shape: Sequence[int], dtype: torch.dtype = torch.float32,
                         device="cpu") -> Optional[int]:
    """Activation bytes per row that a value gradient keeps in `reward` (e.g. SD-VAE decode, then an image reward):
    its saved tensors per row (`saved_bytes_per_row`) plus twice its largest one, for the gradients that the
    backward holds at once. None (with a warning) when the reward cannot run on fake tensors."""
    key = (tuple(event_shape), dtype, str(torch.device(device)))
    try:
        cache = _REWARD_BYTES.setdefault(reward, {})
    except TypeError:  # not weakly referenceable: measured every time
        cache = {}
    if key not in cache:
        try:
            saved, largest = saved_bytes_per_row(reward, event_shape, dtype, device)
            cache[key] = saved + 2 * largest
        except Exception as err:  # noqa: BLE001 - any failure only loses the estimate, never the run
            warnings.warn(f"could not measure the activations of reward {type(reward).__name__} on fake tensors "
                          f"({type(err).__name__}: {err}); chunk_size='auto' budgets the model alone")
            cache[key] = None
    return cache[key]


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
