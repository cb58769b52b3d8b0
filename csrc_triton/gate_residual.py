"""Gated residual x_new = x + gate·branch, optionally fused with the next LN → modulate (HAS_LN: two outputs,
y = LN(x_new)·(1+scale) + shift): forward, backward, jvp.

Group-major row layout and deterministic partial sums as in csrc_triton/adaln.py. With HAS_LN the LayerNorm reads
the fp32 x_new, before it is rounded to the storage dtype.
"""
import triton
import triton.language as tl

from .adaln import group_chunk, ln_jacobian, ln_normalize, load_row, row_tile


@triton.jit
def gate_residual_fwd_kernel(X, BR, GATE, SHIFT, SCALE, XO, Y, rows_per_group, chunks, chunk_rows, D, eps,
                             HAS_LN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid, g, start, end = group_chunk(rows_per_group, chunks, chunk_rows)
    gate = load_row(GATE, g, D, BLOCK_D)
    if HAS_LN:
        shift = load_row(SHIFT, g, D, BLOCK_D)
        scale1 = 1.0 + load_row(SCALE, g, D, BLOCK_D)
    for r0 in range(start, end, BLOCK_M):
        offs, mask = row_tile(g, r0, end, rows_per_group, D, BLOCK_M, BLOCK_D)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        br = tl.load(BR + offs, mask=mask, other=0.0).to(tl.float32)
        xo = x + gate * br
        tl.store(XO + offs, xo.to(XO.dtype.element_ty), mask=mask)
        if HAS_LN:
            xn, rstd = ln_normalize(xo, mask, D, eps)
            tl.store(Y + offs, (xn * scale1 + shift).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def gate_residual_bwd_kernel(XO, BR, GATE, SCALE, DXO, DY, DX, DBR, DGATE_PART, DSHIFT_PART, DSCALE_PART,
                             rows_per_group, chunks, chunk_rows, D, eps,
                             HAS_DXO: tl.constexpr, HAS_DY: tl.constexpr, STORE_DX: tl.constexpr,
                             GATE_GRAD: tl.constexpr, LN_PARAM_GRAD: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """d = dxo + J_LN·(dy·(1+scale)) (the total gradient of x_new) -> dx = d (if STORE_DX), dbranch = gate·d;
    per-program partials of dgate = Σ d·branch, dshift = Σ dy, dscale = Σ dy·xn. HAS_DY: the LN output's grad."""
    pid, g, start, end = group_chunk(rows_per_group, chunks, chunk_rows)
    gate = load_row(GATE, g, D, BLOCK_D)
    if HAS_DY:
        scale1 = 1.0 + load_row(SCALE, g, D, BLOCK_D)
    acc_gate = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc_shift = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc_scale = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        offs, mask = row_tile(g, r0, end, rows_per_group, D, BLOCK_M, BLOCK_D)
        d = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        if HAS_DXO:
            d += tl.load(DXO + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_DY:
            xo = tl.load(XO + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            xn, rstd = ln_normalize(xo, mask, D, eps)
            if LN_PARAM_GRAD:
                acc_shift += dy
                acc_scale += dy * xn
            d += ln_jacobian(dy * scale1, xn, rstd, mask, D)
        if STORE_DX:
            tl.store(DX + offs, d.to(DX.dtype.element_ty), mask=mask)
        tl.store(DBR + offs, (d * gate).to(DBR.dtype.element_ty), mask=mask)
        if GATE_GRAD:
            acc_gate += d * tl.load(BR + offs, mask=mask, other=0.0).to(tl.float32)
    cols = tl.arange(0, BLOCK_D)
    part = pid.to(tl.int64) * D + cols
    if GATE_GRAD:
        tl.store(DGATE_PART + part, tl.sum(acc_gate, axis=0), mask=cols < D)
    if LN_PARAM_GRAD:
        tl.store(DSHIFT_PART + part, tl.sum(acc_shift, axis=0), mask=cols < D)
        tl.store(DSCALE_PART + part, tl.sum(acc_scale, axis=0), mask=cols < D)


@triton.jit
def gate_residual_jvp_kernel(XO, BR, GATE, SCALE, TX, TBR, TGATE, TSHIFT, TSCALE, TXO, TY,
                             rows_per_group, chunks, chunk_rows, D, eps,
                             HAS_LN: tl.constexpr, HAS_TX: tl.constexpr, HAS_TBR: tl.constexpr,
                             HAS_TGATE: tl.constexpr, HAS_TSHIFT: tl.constexpr, HAS_TSCALE: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """txo = tx + gate·tbranch + tgate·branch; ty = J_LN·txo·(1+scale) + xn·tscale + tshift; absent tangent = 0."""
    pid, g, start, end = group_chunk(rows_per_group, chunks, chunk_rows)
    gate = load_row(GATE, g, D, BLOCK_D)
    if HAS_TGATE:
        tgate = load_row(TGATE, g, D, BLOCK_D)
    if HAS_LN:
        scale1 = 1.0 + load_row(SCALE, g, D, BLOCK_D)
        if HAS_TSHIFT:
            tshift = load_row(TSHIFT, g, D, BLOCK_D)
        if HAS_TSCALE:
            tscale = load_row(TSCALE, g, D, BLOCK_D)
    for r0 in range(start, end, BLOCK_M):
        offs, mask = row_tile(g, r0, end, rows_per_group, D, BLOCK_M, BLOCK_D)
        txo = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        if HAS_TX:
            txo += tl.load(TX + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_TBR:
            txo += gate * tl.load(TBR + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_TGATE:
            txo += tgate * tl.load(BR + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(TXO + offs, txo.to(TXO.dtype.element_ty), mask=mask)
        if HAS_LN:
            xo = tl.load(XO + offs, mask=mask, other=0.0).to(tl.float32)
            xn, rstd = ln_normalize(xo, mask, D, eps)
            ty = ln_jacobian(txo, xn, rstd, mask, D) * scale1
            if HAS_TSCALE:
                ty += xn * tscale
            if HAS_TSHIFT:
                ty += tshift
            tl.store(TY + offs, ty.to(TY.dtype.element_ty), mask=mask)
