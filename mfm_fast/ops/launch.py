"""Launch helpers shared by the fused ops, chiefly the LayerNorm family (ln_modulate, gate_residual,
input_stage): output buffers, row-kernel launch plans, input checks, parameter-gradient partials, and the reverse
mode of a jvp op by recomputation. Nothing here imports the rest of mfm_fast.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import NamedTuple, Optional

import torch
from torch.library import wrap_triton

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def interpreter_on() -> bool:
    """TRITON_INTERPRET is set: Triton kernels run on CPU tensors (fp32 only)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tangent_needs_grad(*tensors) -> bool:
    """Inside an autograd.Function's jvp: will reverse mode differentiate the tangent (e.g. a loss on ∂_u X)?

    Under torch.func.jvp the tensors are wrapped and report requires_grad=False at the transform's level, so every
    wrapped level is inspected. When True, ops compute the tangent from differentiable torch ops instead of the
    (forward-only) jvp kernel.
    """
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        while t is not None:
            if t.requires_grad:
                return True
            t = torch._C._functorch.get_unwrapped(t) if torch._C._functorch.is_functorch_wrapped_tensor(t) else None
    return False


def group_view(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(R, L, D) -> (G, N, L, D) view."""
    return x.view(groups, x.shape[0] // groups, *x.shape[1:])


_poison = False


@contextlib.contextmanager
def poisoned_outputs():
    """Test hook: kernel output buffers start as NaN, so an element a kernel fails to write shows up."""
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous


def new_buffer(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An output buffer every element of which the kernel writes (NaN-filled under `poisoned_outputs`)."""
    if _poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


ROW_WARPS_ENV = "MFM_FAST_ROW_WARPS"  # tuning hook: warps of every row-kernel launch (1, 2, 4, 8, 16 or 32)


def row_warps_override() -> Optional[int]:
    raw = os.environ.get(ROW_WARPS_ENV, "").strip()
    if not raw:
        return None
    if raw not in ("1", "2", "4", "8", "16", "32"):
        raise ValueError(f"{ROW_WARPS_ENV} must be one of 1, 2, 4, 8, 16, 32, got {raw!r}")
    return int(raw)


@functools.lru_cache(maxsize=None)
def _row_config(D: int, warps: Optional[int]) -> tuple[int, int, int]:
    block_d = 1 << max(D - 1, 0).bit_length()
    block_m = max(1, min(16, 4096 // block_d))
    num_warps = warps or (4 if block_d <= 1024 else 8)
    return block_d, block_m, num_warps


def row_config(D: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_M, num_warps) for rows of D values: a whole row per tile, ~4K fp32 values per operand tile.

    num_warps is 4 up to 1024-wide tiles, else 8, unless MFM_FAST_ROW_WARPS says otherwise (for timing other
    choices on a GPU; the values computed do not depend on it)."""
    return _row_config(D, row_warps_override())


# backward programs accumulate parameter-gradient partials over several rows; aim for about this many programs
# (a few waves on a large GPU) so the (programs, D) partial buffer stays small next to the activations
BWD_PROGRAMS = 1024


def chunking(rows_per_group: int, groups: int, block_m: int, programs: Optional[int]) -> tuple[int, int]:
    """(chunk_rows, chunks per group): each program handles chunk_rows rows (a multiple of block_m) of one group."""
    chunk = block_m if programs is None else max(block_m, cdiv(groups * rows_per_group, programs))
    chunk = min(cdiv(chunk, block_m), cdiv(rows_per_group, block_m)) * block_m
    return chunk, cdiv(rows_per_group, chunk)


def sum_partials(part: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """(G·chunks, D) fp32 per-program partials -> (G, D), summed in a fixed order."""
    return part.view(groups, -1, part.shape[-1]).sum(1).to(dtype)


def check_kernel_inputs(op: str, **tensors: torch.Tensor) -> None:
    """Device and dtype checks shared by the Triton ops; the error names the argument."""
    device = None
    for name, t in tensors.items():
        if not torch.is_tensor(t):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be floating point, got dtype {t.dtype}")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but {next(iter(tensors))} is on {device}")
    if not TRITON_INSTALLED:
        raise RuntimeError(f"{op}: the triton package is not installed; use {op}_ref")
    if device.type == "cpu":
        if not interpreter_on():
            raise RuntimeError(f"{op}: CPU tensors need the Triton interpreter (TRITON_INTERPRET=1); use {op}_ref")
        bad = [n for n, t in tensors.items() if t.dtype != torch.float32]
        if bad:
            raise TypeError(f"{op}: the Triton interpreter runs fp32 only; {', '.join(bad)} not float32")


def check_groups(op: str, name: str, x: torch.Tensor, mods: dict) -> int:
    """x (R, L, D) and modulation tensors (G, D) with R a multiple of G -> G; errors name the argument."""
    if x.dim() != 3:
        raise ValueError(f"{op}: {name} must have shape (R, L, D), got {tuple(x.shape)}")
    first = next(iter(mods.values()))
    G, D = (first.shape[0] if first.dim() == 2 else -1), x.shape[-1]
    for mod_name, t in mods.items():
        if t.shape != (G, D):
            raise ValueError(f"{op}: {mod_name} must have shape (G, {D}) with G = {G} (groups, features), "
                             f"got {tuple(t.shape)}")
    if G < 1 or x.shape[0] % G:
        raise ValueError(f"{op}: {name} has {x.shape[0]} rows, not a multiple of the {G} modulation rows")
    return G


def present_or(t: Optional[torch.Tensor], placeholder: torch.Tensor) -> torch.Tensor:
    """An absent tensor's pointer slot gets any valid tensor (the kernel's HAS_ flag for it is off)."""
    return placeholder if t is None else t.contiguous()


def filled_or(t: torch.Tensor, placeholder: torch.Tensor) -> torch.Tensor:
    """An output the kernel does not write (empty, its flag off) passes a valid pointer, never a null one."""
    return placeholder if t.numel() == 0 else t


class RowPlan(NamedTuple):
    """How a group-major row kernel (csrc_triton/adaln.py) covers M = groups·rows_per_group rows of D values."""
    groups: int
    rows_per_group: int
    D: int
    chunk_rows: int
    chunks: int
    block_m: int
    block_d: int
    num_warps: int

    @property
    def programs(self) -> int:
        return self.groups * self.chunks


def row_plan(x: torch.Tensor, groups: int, programs: Optional[int] = None) -> RowPlan:
    """`programs=None`: one BLOCK_M tile per program (no cross-row reduction); else about that many programs.

    Sizes are made concrete ints: the launch configuration depends on them (under torch.compile with dynamic shapes
    this specialises, i.e. guards on, the op's shapes).
    """
    groups, D = int(groups), int(x.shape[-1])
    rows_per_group = int(x.numel()) // (D * groups)
    block_d, block_m, num_warps = row_config(D)
    chunk, chunks = chunking(rows_per_group, groups, block_m, programs)
    return RowPlan(groups, rows_per_group, D, chunk, chunks, block_m, block_d, num_warps)


def differentiable_by_recompute(op, reference) -> None:
    """Give a fused custom op (a jvp) its reverse mode by recomputing `reference`, a PyTorch function of the same
    arguments, in the backward.

    A loss on a tangent (e.g. Lagrangian self-distillation differentiates ∂_u X_{s,u} w.r.t. the weights) needs the
    gradient of the jvp; it is rare and second order, so one PyTorch recomputation is the right price, and a tangent
    that is never differentiated costs nothing extra.
    """

    def setup_context(ctx, inputs, output):
        ctx.args = [None if torch.is_tensor(a) else a for a in inputs]
        ctx.tensor_at = [i for i, a in enumerate(inputs) if torch.is_tensor(a)]
        ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_at))

    def backward(ctx, *grads):
        args, wrt = list(ctx.args), []
        for i, t in zip(ctx.tensor_at, ctx.saved_tensors):
            args[i] = t.detach().requires_grad_(ctx.needs_input_grad[i])
            if ctx.needs_input_grad[i]:
                wrt.append(i)
        with torch.enable_grad():
            outs = reference(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        result = [None] * len(args)
        if pairs and wrt:
            got = torch.autograd.grad([o for o, _ in pairs], [args[i] for i in wrt], [g for _, g in pairs],
                                      allow_unused=True)
            for i, g in zip(wrt, got):
                result[i] = g
        return tuple(result)

    op.register_autograd(backward, setup_context=setup_context)


def tangent_or_zero(t: Optional[torch.Tensor], primal: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(primal) if t is None else t.to(primal.dtype)


def launch_rows(kernel, plan: RowPlan, tensors: tuple, scalars: tuple = (), **flags) -> None:
    """kernel(*tensors, rows_per_group, chunks, chunk_rows, D, *scalars, **flags, BLOCK_M, BLOCK_D)."""
    wrap_triton(kernel)[(plan.programs,)](*tensors, plan.rows_per_group, plan.chunks, plan.chunk_rows, plan.D,
                                          *scalars, **flags, BLOCK_M=plan.block_m, BLOCK_D=plan.block_d,
                                          num_warps=plan.num_warps)
