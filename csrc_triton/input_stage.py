"""Input stage of MFMDiT: out = h + pos + (1+scale)·hc + shift in one pass; backward and jvp.

h has R = G·N rows of L tokens; pos (L, D) is shared by all rows; hc (G, L, D), shift and scale (G, D) belong to a
group (state) and broadcast over its N particles. The forward and the jvp share one kernel, a sum of optional terms
A + P + C1·(1+S1) + C2·S2 + B (forward: A = h, P = pos, C1 = hc, S1 = scale, B = shift; jvp: the tangents, with
C2 = hc, S2 = tscale). The backward reduces the upstream gradient over the particles of each (group, token) in a
fixed order; its parameter-gradient partials are summed by the launcher (deterministic, no atomics).
"""
import triton
import triton.language as tl

from .adaln import group_chunk, load_row


@triton.jit
def input_stage_kernel(A, P, C1, S1, C2, S2, B, OUT, rows_per_group, chunks, chunk_rows, D, L,
                       HAS_A: tl.constexpr, HAS_P: tl.constexpr, HAS_C1: tl.constexpr, HAS_C2: tl.constexpr,
                       HAS_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid, g, start, end = group_chunk(rows_per_group, chunks, chunk_rows)
    cols = tl.arange(0, BLOCK_D)
    local = start + tl.arange(0, BLOCK_M)  # row inside the group: particle · L + token
    mask = (local < end)[:, None] & (cols < D)[None, :]
    offs = (g.to(tl.int64) * rows_per_group + local)[:, None] * D + cols[None, :]
    tok = local % L
    out = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if HAS_A:
        out += tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_P:
        out += tl.load(P + tok[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    ctx_offs = (g.to(tl.int64) * L + tok)[:, None] * D + cols[None, :]
    if HAS_C1:
        c1 = tl.load(C1 + ctx_offs, mask=mask, other=0.0).to(tl.float32)
        out += c1 * (1.0 + load_row(S1, g, D, BLOCK_D))
    if HAS_C2:
        out += tl.load(C2 + ctx_offs, mask=mask, other=0.0).to(tl.float32) * load_row(S2, g, D, BLOCK_D)
    if HAS_B:
        out += load_row(B, g, D, BLOCK_D)
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def input_stage_bwd_kernel(DOUT, HC, SCALE, DHC, CTX_PART, DSHIFT_PART, DSCALE_PART, N, L, D, token_blocks,
                           particle_chunks, particles_per_chunk,
                           SPLIT: tl.constexpr, PARAM_GRAD: tl.constexpr, POS_GRAD: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (g, token block, particle chunk): S = Σ_particles dout over its rows.

    SPLIT (several particle chunks per group): S goes to CTX_PART (G, chunks, L, D) fp32 and the launcher finishes.
    Otherwise: dhc = S·(1+scale); S to CTX_PART (G, L, D) if POS_GRAD; partials Σ_tokens S and Σ_tokens S·hc.
    """
    pid = tl.program_id(0)
    c = pid % particle_chunks
    gt = pid // particle_chunks
    g = gt // token_blocks
    tok = (gt % token_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (tok < L)[:, None] & (cols < D)[None, :]
    tile = tok[:, None] * D + cols[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    n0 = c * particles_per_chunk
    for n in range(n0, tl.minimum(n0 + particles_per_chunk, N)):
        row0 = (g.to(tl.int64) * N + n) * L
        acc += tl.load(DOUT + row0 * D + tile, mask=mask, other=0.0).to(tl.float32)
    ctx_offs = g.to(tl.int64) * L * D + tile
    if SPLIT:
        tl.store(CTX_PART + (g.to(tl.int64) * particle_chunks + c) * L * D + tile, acc, mask=mask)
    else:
        tl.store(DHC + ctx_offs, (acc * (1.0 + load_row(SCALE, g, D, BLOCK_D))).to(DHC.dtype.element_ty), mask=mask)
        if POS_GRAD:
            tl.store(CTX_PART + ctx_offs, acc, mask=mask)
        if PARAM_GRAD:
            hc = tl.load(HC + ctx_offs, mask=mask, other=0.0).to(tl.float32)
            part = gt.to(tl.int64) * D + cols
            tl.store(DSHIFT_PART + part, tl.sum(acc, axis=0), mask=cols < D)
            tl.store(DSCALE_PART + part, tl.sum(acc * hc, axis=0), mask=cols < D)
