"""LayerNorm (no affine, eps 1e-6) followed by adaLN modulation x·(1+scale) + shift.

Modulation rows are per *group*: x has R = G·N rows (N particles share one conditioning), shift/scale have G rows
and broadcast over the N particles and all tokens without materialised copies.

`ln_modulate` is the fused Triton op (forward, backward, jvp); `ln_modulate_ref` the PyTorch reference with the same
signature. This module also holds the launch helpers shared by the LayerNorm-family ops (gate_residual,
input_stage).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.library import triton_op, wrap_triton

from .. import backend

try:
    from csrc_triton import adaln as kernels
except ImportError:  # the reference path runs without Triton
    kernels = None

def group_view(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(R, L, D) -> (G, N, L, D) view."""
    return x.view(groups, x.shape[0] // groups, *x.shape[1:])


def ln_modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x (R, L, D); shift, scale (G, D) with R = G·N -> LN(x)·(1+scale) + shift, shape (R, L, D).

    Statistics in fp32, or in x's dtype where that is wider (float64 in, float64 math); the result has x's dtype.
    """
    g = shift.shape[0]
    acc = torch.promote_types(x.dtype, torch.float32)
    xn = F.layer_norm(x.to(acc), x.shape[-1:], eps=eps)
    y = group_view(xn, g) * (1 + scale.to(acc)[:, None, None, :]) + shift.to(acc)[:, None, None, :]
    return y.reshape(x.shape).to(x.dtype)


# ---------------------------------------------------------------------------------------------- launch helpers
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
    if kernels is None:
        raise RuntimeError(f"{op}: the triton package is not installed; use {op}_ref")
    if device.type == "cpu":
        if not backend.interpreter_on():
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
