"""LayerNorm (no affine) → adaLN modulate y = LN(x)·(1+scale) + shift: forward, backward, jvp.

Layout: x is M = G·rows_per_group contiguous rows of D values (rows_per_group = N particles × L tokens share one
modulation row). Programs are group-major: program p owns rows [c·chunk_rows, min((c+1)·chunk_rows,
rows_per_group)) of group g = p // chunks, c = p % chunks. Its modulation row is then one vector, and its
parameter-gradient partial sums belong to a single group: written to a (G·chunks, D) buffer that the launcher sums
in a fixed order, so the reduction is deterministic (no atomics).
Statistics and arithmetic in fp32 whatever the storage dtype.
"""
import triton
import triton.language as tl


@triton.jit
def group_chunk(rows_per_group, chunks, chunk_rows):
    """-> (program id, group, first row, end row) of this program; rows counted inside the group."""
    pid = tl.program_id(0)
    g = pid // chunks
    start = (pid % chunks) * chunk_rows
    end = tl.minimum(start + chunk_rows, rows_per_group)
    return pid, g, start, end


@triton.jit
def row_tile(g, r0, end, rows_per_group, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Element offsets (int64, the streams can exceed 2³¹ elements) and mask of rows r0 .. r0+BLOCK_M of group g."""
    local = r0 + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    rows = g.to(tl.int64) * rows_per_group + local
    offs = rows[:, None] * D + cols[None, :]
    mask = (local < end)[:, None] & (cols < D)[None, :]
    return offs, mask


@triton.jit
def load_row(PTR, g, D, BLOCK_D: tl.constexpr):
    """Row g of a (G, D) modulation tensor as fp32 (1, BLOCK_D), zero past D."""
    cols = tl.arange(0, BLOCK_D)
    return tl.load(PTR + g * D + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]


@triton.jit
def ln_normalize(x, mask, D, eps):
    """x fp32 (BLOCK_M, BLOCK_D), zero where masked -> (xn, rstd); xn is zero where masked."""
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / D + eps)
    return xc * rstd[:, None], rstd


@triton.jit
def ln_jacobian(u, xn, rstd, mask, D):
    """LayerNorm's Jacobian applied to u: rstd·(u − mean(u) − xn·mean(u·xn)).

    The Jacobian is symmetric, so this one formula is both the vjp (u = upstream grad) and the jvp (u = tangent).
    """
    mu = tl.sum(u, axis=1) / D
    mux = tl.sum(u * xn, axis=1) / D
    return tl.where(mask, rstd[:, None] * (u - mu[:, None] - xn * mux[:, None]), 0.0)


@triton.jit
def ln_modulate_fwd_kernel(X, SHIFT, SCALE, Y, rows_per_group, chunks, chunk_rows, D, eps,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid, g, start, end = group_chunk(rows_per_group, chunks, chunk_rows)
    shift = load_row(SHIFT, g, D, BLOCK_D)
    scale1 = 1.0 + load_row(SCALE, g, D, BLOCK_D)
    for r0 in range(start, end, BLOCK_M):
        offs, mask = row_tile(g, r0, end, rows_per_group, D, BLOCK_M, BLOCK_D)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        xn, rstd = ln_normalize(x, mask, D, eps)
        tl.store(Y + offs, (xn * scale1 + shift).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def ln_modulate_bwd_kernel(X, SCALE, DY, DX, DSHIFT_PART, DSCALE_PART, rows_per_group, chunks, chunk_rows, D, eps,
                           PARAM_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx = J_LN·(dy·(1+scale)); per-program partials of dshift = Σ dy and dscale = Σ dy·xn (if PARAM_GRAD)."""
    pid, g, start, end = group_chunk(rows_per_group, chunks, chunk_rows)
    scale1 = 1.0 + load_row(SCALE, g, D, BLOCK_D)
    acc_shift = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc_scale = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        offs, mask = row_tile(g, r0, end, rows_per_group, D, BLOCK_M, BLOCK_D)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        xn, rstd = ln_normalize(x, mask, D, eps)
        if PARAM_GRAD:
            acc_shift += dy
            acc_scale += dy * xn
        dx = ln_jacobian(dy * scale1, xn, rstd, mask, D)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    if PARAM_GRAD:
        cols = tl.arange(0, BLOCK_D)
        part = pid.to(tl.int64) * D + cols
        tl.store(DSHIFT_PART + part, tl.sum(acc_shift, axis=0), mask=cols < D)
        tl.store(DSCALE_PART + part, tl.sum(acc_scale, axis=0), mask=cols < D)


@triton.jit
def ln_modulate_jvp_kernel(X, SCALE, TX, TSHIFT, TSCALE, TY, rows_per_group, chunks, chunk_rows, D, eps,
                           HAS_TX: tl.constexpr, HAS_TSHIFT: tl.constexpr, HAS_TSCALE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """ty = J_LN·tx·(1+scale) + xn·tscale + tshift; absent tangents are zero."""
    pid, g, start, end = group_chunk(rows_per_group, chunks, chunk_rows)
    scale1 = 1.0 + load_row(SCALE, g, D, BLOCK_D)
    if HAS_TSHIFT:
        tshift = load_row(TSHIFT, g, D, BLOCK_D)
    if HAS_TSCALE:
        tscale = load_row(TSCALE, g, D, BLOCK_D)
    for r0 in range(start, end, BLOCK_M):
        offs, mask = row_tile(g, r0, end, rows_per_group, D, BLOCK_M, BLOCK_D)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        xn, rstd = ln_normalize(x, mask, D, eps)
        ty = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        if HAS_TX:
            tx = tl.load(TX + offs, mask=mask, other=0.0).to(tl.float32)
            ty += ln_jacobian(tx, xn, rstd, mask, D) * scale1
        if HAS_TSCALE:
            ty += xn * tscale
        if HAS_TSHIFT:
            ty += tshift
        tl.store(TY + offs, ty.to(TY.dtype.element_ty), mask=mask)
