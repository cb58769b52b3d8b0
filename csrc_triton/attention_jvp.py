"""Attention o = softmax(q kᵀ·scale) v with its forward-mode tangent (jvp), flash-style, and its backward.

Layout: q, k, v and their tangents are (R, H, L, Dh) tensors with unit stride over Dh and any strides over
(R, H, L), so the per-head views the model slices out of its fused qkv projection are read in place. Outputs
(o, its tangent, the gradients) are contiguous (R, H, L, Dh); the log-sum-exp and the backward's δ are (R, H, L)
fp32. A program owns one block of rows (queries, or keys in the dk/dv kernel) of one (r, h) head: grid
(R·H, cdiv(L, BLOCK)), the many heads on the axis without CUDA's 65535 limit. Softmax statistics and every
accumulator are fp32 whatever the storage dtype; the score tiles go back to the storage dtype only as operands of
the next matmul (as in flash-attention). Backward (from the saved log-sum-exp, P = exp(S − lse)): the dq kernel
also writes δ = rowsum(dO ∘ O), then the dk/dv kernel loops over query blocks; no atomics, deterministic.

Tangent (S = q kᵀ·scale, P = softmax(S), Ṡ = (q̇ kᵀ + q k̇ᵀ)·scale, μ_i = Σ_j P_ij Ṡ_ij):
    ȯ = Σ_j P_ij (Ṡ_ij − μ_i) v_j + Σ_j P_ij v̇_j
accumulated in one pass over key blocks with the online-softmax rescaling of l = Σ p, Σ p v, Σ p Ṡ and
Σ p ((Ṡ − c) v + v̇). c_i is the running estimate of μ_i: centring Ṡ before it is rounded to the storage dtype keeps
a large row-constant part of Ṡ (which cancels exactly in ȯ) from costing bf16 precision. Moving the centre from c
to c' changes the accumulated Σ p (Ṡ − c) v by −(c' − c)·Σ p v, an exact fp32 correction; after the last block
c = μ, so ȯ = Σ p ((Ṡ − μ) v + v̇) / l with no final cancellation.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # softmax in base 2: exp(x) = exp2(x·log2 e)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def head_base(r, h, s_r, s_h):
    """Element offset (int64: the streams can exceed 2³¹ elements) of head (r, h) of a strided (R, H, L, Dh)."""
    return r.to(tl.int64) * s_r + h.to(tl.int64) * s_h


@triton.jit
def load_rows(PTR, base, s_l, rows, cols, L, D):
    """(len(rows), len(cols)) tile: tokens `rows`, head-dim `cols` of one head; zero outside (L, D)."""
    mask = (rows < L)[:, None] & (cols < D)[None, :]
    return tl.load(PTR + base + rows[:, None] * s_l + cols[None, :], mask=mask, other=0.0)


@triton.jit
def load_cols(PTR, base, s_l, rows, cols, L, D):
    """The transposed tile (len(cols), len(rows)): head-dim down, tokens across; zero outside (L, D)."""
    mask = (cols < D)[:, None] & (rows < L)[None, :]
    return tl.load(PTR + base + rows[None, :] * s_l + cols[:, None], mask=mask, other=0.0)


@triton.jit
def store_rows(PTR, base, rows, cols, L, D, value):
    """Store a (len(rows), len(cols)) fp32 tile into a contiguous (…, L, D) head at base."""
    mask = (rows < L)[:, None] & (cols < D)[None, :]
    tl.store(PTR + base + rows[:, None] * D + cols[None, :], value.to(PTR.dtype.element_ty), mask=mask)


@triton.jit
def attention_fwd_kernel(Q, K, V, TQ, TK, TV, O, TO, LSE,
                         sq_r, sq_h, sq_l, sk_r, sk_h, sk_l, sv_r, sv_h, sv_l,
                         stq_r, stq_h, stq_l, stk_r, stk_h, stk_l, stv_r, stv_h, stv_l,
                         H, Lq, Lk, Dh, sm_scale,
                         HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr, STORE_O: tl.constexpr,
                         PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """o and lse (STORE_O) and/or the tangent ȯ (any HAS_T*; absent tangents are zero) of BLOCK_M queries."""
    HAS_DS: tl.constexpr = HAS_TQ or HAS_TK
    TANGENT: tl.constexpr = HAS_DS or HAS_TV
    rh = tl.program_id(0)
    pid_m = tl.program_id(1)
    r = rh // H
    h = rh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    k_base = head_base(r, h, sk_r, sk_h)
    v_base = head_base(r, h, sv_r, sv_h)
    tk_base = head_base(r, h, stk_r, stk_h)
    tv_base = head_base(r, h, stv_r, stv_h)
    q = load_rows(Q, head_base(r, h, sq_r, sq_h), sq_l, rows, cols, Lq, Dh)
    if HAS_TQ:
        tq = load_rows(TQ, head_base(r, h, stq_r, stq_h), stq_l, rows, cols, Lq, Dh)
    qk_scale = sm_scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of S·log2 e
    l_i = tl.zeros([BLOCK_M], tl.float32)  # Σ p
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # Σ p v
    acc_t = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # Σ p ((Ṡ − c) v + v̇)
    mu = tl.zeros([BLOCK_M], tl.float32)  # Σ p Ṡ
    c = tl.zeros([BLOCK_M], tl.float32)  # centre of Ṡ: the running μ
    for start_n in range(0, Lk, BLOCK_N):
        keys = start_n + offs_n
        kt = load_cols(K, k_base, sk_l, keys, cols, Lk, Dh)  # (BLOCK_D, BLOCK_N)
        v = load_rows(V, v_base, sv_l, keys, cols, Lk, Dh)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        s = tl.where((keys < Lk)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]  # Σ p v over the earlier blocks, at the new max
        if TANGENT:
            acc_t = acc_t * alpha[:, None]
        if HAS_DS:
            ds = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            if HAS_TQ:
                ds += tl.dot(tq, kt, input_precision=PRECISION)
            if HAS_TK:
                tkt = load_cols(TK, tk_base, stk_l, keys, cols, Lk, Dh)
                ds += tl.dot(q, tkt, input_precision=PRECISION)
            ds = ds * sm_scale
            mu = mu * alpha + tl.sum(p * ds, 1)
            c_new = mu / l_i
            acc_t -= (c_new - c)[:, None] * acc
            c = c_new
            pds = p * (ds - c[:, None])
            acc_t += tl.dot(pds.to(v.dtype), v, input_precision=PRECISION)
        if HAS_TV:
            tv = load_rows(TV, tv_base, stv_l, keys, cols, Lk, Dh)
            acc_t += tl.dot(p.to(tv.dtype), tv, input_precision=PRECISION)
        acc += tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    inv_l = 1.0 / l_i
    out_base = rh.to(tl.int64) * Lq * Dh
    if STORE_O:
        store_rows(O, out_base, rows, cols, Lq, Dh, acc * inv_l[:, None])
        tl.store(LSE + rh.to(tl.int64) * Lq + rows, (m_i + tl.log2(l_i)) * LN2, mask=rows < Lq)
    if TANGENT:
        store_rows(TO, out_base, rows, cols, Lq, Dh, acc_t * inv_l[:, None])


@triton.jit
def attention_bwd_dq_kernel(Q, K, V, O, DO, LSE, DELTA, DQ,
                            sq_r, sq_h, sq_l, sk_r, sk_h, sk_l, sv_r, sv_h, sv_l, sdo_r, sdo_h, sdo_l,
                            H, Lq, Lk, Dh, sm_scale,
                            PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr):
    """δ = rowsum(dO ∘ O) (written for the dk/dv kernel) and dq = scale·Σ_j P (dP − δ) k_j, P = exp(S − lse)."""
    rh = tl.program_id(0)
    pid_m = tl.program_id(1)
    r = rh // H
    h = rh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    k_base = head_base(r, h, sk_r, sk_h)
    v_base = head_base(r, h, sv_r, sv_h)
    out_base = rh.to(tl.int64) * Lq * Dh
    q = load_rows(Q, head_base(r, h, sq_r, sq_h), sq_l, rows, cols, Lq, Dh)
    do = load_rows(DO, head_base(r, h, sdo_r, sdo_h), sdo_l, rows, cols, Lq, Dh)
    o = load_rows(O, out_base, Dh, rows, cols, Lq, Dh)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    row_mask = rows < Lq
    tl.store(DELTA + rh.to(tl.int64) * Lq + rows, delta, mask=row_mask)
    lse2 = tl.load(LSE + rh.to(tl.int64) * Lq + rows, mask=row_mask, other=0.0) * LOG2E
    qk_scale = sm_scale * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        keys = start_n + offs_n
        kt = load_cols(K, k_base, sk_l, keys, cols, Lk, Dh)  # (BLOCK_D, BLOCK_N)
        vt = load_cols(V, v_base, sv_l, keys, cols, Lk, Dh)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        p = tl.where((keys < Lk)[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
    store_rows(DQ, out_base, rows, cols, Lq, Dh, dq * sm_scale)


@triton.jit
def attention_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                              sq_r, sq_h, sq_l, sk_r, sk_h, sk_l, sv_r, sv_h, sv_l, sdo_r, sdo_h, sdo_l,
                              H, Lq, Lk, Dh, sm_scale,
                              PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_D: tl.constexpr):
    """For BLOCK_N keys: dv = Σ_i Pᵀ dO_i and dk = scale·Σ_i Pᵀ (dPᵀ − δ_i) q_i, looping over query blocks."""
    rh = tl.program_id(0)
    pid_n = tl.program_id(1)
    r = rh // H
    h = rh % H
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    q_base = head_base(r, h, sq_r, sq_h)
    do_base = head_base(r, h, sdo_r, sdo_h)
    k = load_rows(K, head_base(r, h, sk_r, sk_h), sk_l, keys, cols, Lk, Dh)  # (BLOCK_N, BLOCK_D)
    v = load_rows(V, head_base(r, h, sv_r, sv_h), sv_l, keys, cols, Lk, Dh)
    qk_scale = sm_scale * LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, Lq, BLOCK_M):
        rows = start_m + offs_m
        row_mask = rows < Lq
        qt = load_cols(Q, q_base, sq_l, rows, cols, Lq, Dh)  # (BLOCK_D, BLOCK_M)
        do = load_rows(DO, do_base, sdo_l, rows, cols, Lq, Dh)  # (BLOCK_M, BLOCK_D)
        lse2 = tl.load(LSE + rh.to(tl.int64) * Lq + rows, mask=row_mask, other=0.0) * LOG2E
        delta = tl.load(DELTA + rh.to(tl.int64) * Lq + rows, mask=row_mask, other=0.0)
        st = tl.dot(k, qt, input_precision=PRECISION) * qk_scale  # Sᵀ (BLOCK_N, BLOCK_M)
        pt = tl.where(row_mask[None, :], tl.exp2(st - lse2[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PRECISION)
    out_base = rh.to(tl.int64) * Lk * Dh
    store_rows(DK, out_base, keys, cols, Lk, Dh, dk * sm_scale)
    store_rows(DV, out_base, keys, cols, Lk, Dh, dv)
