"""Multi-time embedding, first layer: a = feat(t)·W1ᵀ + b1, h = SiLU(a), for K time inputs in one launch.

Features feat(t)_j = cos(t·f_j) for j < F/2 and sin(t·f_{j−F/2}) otherwise, f_i = max_period^(−i/(F/2)), are
generated in registers tile by tile and never written to memory. Layouts: times (G, K), W1 (K, D, F), b1 (K, D),
per-(g, k) outputs (G, K, D). All arithmetic in fp32.
"""
import triton
import triton.language as tl


@triton.jit
def _features(t, j, half, neg_log_period):
    """(cos|sin)(t·f_j) and its t-derivative for t (BG,) and feature indices j (BF,) -> two (BG, BF) tiles."""
    i = tl.where(j < half, j, j - half).to(tl.float32)
    freq = tl.exp(i * (neg_log_period / half))
    arg = t[:, None] * freq[None, :]
    c = tl.cos(arg)
    s = tl.sin(arg)
    is_cos = (j < half)[None, :]
    return tl.where(is_cos, c, s), tl.where(is_cos, -s, c) * freq[None, :]


@triton.jit
def time_embed_fwd_kernel(T, W1, B1, OUT, DH, TT, TW1, TB1, G, K, D, F, neg_log_period,
                          MODE: tl.constexpr, HAS_TT: tl.constexpr, HAS_TW1: tl.constexpr, HAS_TB1: tl.constexpr,
                          BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr):
    """Grid (cdiv(G, BG), K, cdiv(D, BD)). MODE 0: OUT = SiLU(a). MODE 1 (backward): OUT = DH·SiLU'(a).
    MODE 2 (jvp): OUT = SiLU'(a)·ȧ, ȧ = TT·∂feat/∂t·W1ᵀ + feat·TW1ᵀ + TB1 (each term optional)."""
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    k = tl.program_id(1)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    gmask = g < G
    dmask = d < D
    half = F // 2
    t = tl.load(T + g * K + k, mask=gmask, other=0.0).to(tl.float32)
    if MODE == 2:
        if HAS_TT:
            tt = tl.load(TT + g * K + k, mask=gmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    adot = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    w_base = k.to(tl.int64) * D * F + d[:, None] * F
    for f0 in range(0, F, BLOCK_F):
        j = f0 + tl.arange(0, BLOCK_F)
        fmask = j < F
        feat, dfeat = _features(t, j, half, neg_log_period)
        wmask = dmask[:, None] & fmask[None, :]
        w = tl.load(W1 + w_base + j[None, :], mask=wmask, other=0.0).to(tl.float32)  # (BD, BF)
        acc += tl.sum(feat[:, None, :] * w[None, :, :], axis=2)
        if MODE == 2:
            if HAS_TT:
                adot += tl.sum((tt[:, None] * dfeat)[:, None, :] * w[None, :, :], axis=2)
            if HAS_TW1:
                tw = tl.load(TW1 + w_base + j[None, :], mask=wmask, other=0.0).to(tl.float32)
                adot += tl.sum(feat[:, None, :] * tw[None, :, :], axis=2)
    a = acc + tl.load(B1 + k * D + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    sig = tl.sigmoid(a)
    omask = gmask[:, None] & dmask[None, :]
    o_offs = (g[:, None] * K + k) * D + d[None, :]
    if MODE == 0:
        out = a * sig
    else:
        dsilu = sig * (1.0 + a * (1.0 - sig))
        if MODE == 1:
            out = dsilu * tl.load(DH + o_offs, mask=omask, other=0.0).to(tl.float32)
        else:
            if HAS_TB1:
                adot += tl.load(TB1 + k * D + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
            out = dsilu * adot
    tl.store(OUT + o_offs, out.to(OUT.dtype.element_ty), mask=omask)


@triton.jit
def time_embed_bwd_times_kernel(T, W1, DA, DT, G, K, D, F, neg_log_period,
                                BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr):
    """Grid (cdiv(G, BG), K): DT[g, k] = Σ_f ∂feat/∂t[g, f] · Σ_d DA[g, k, d]·W1[k, d, f]."""
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    k = tl.program_id(1)
    gmask = g < G
    half = F // 2
    t = tl.load(T + g * K + k, mask=gmask, other=0.0).to(tl.float32)
    dt = tl.zeros([BLOCK_G], dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        j = f0 + tl.arange(0, BLOCK_F)
        fmask = j < F
        _, dfeat = _features(t, j, half, neg_log_period)
        proj = tl.zeros([BLOCK_G, BLOCK_F], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dmask = d < D
            da = tl.load(DA + (g[:, None] * K + k) * D + d[None, :], mask=gmask[:, None] & dmask[None, :],
                         other=0.0)  # (BG, BD)
            w = tl.load(W1 + k.to(tl.int64) * D * F + d[:, None] * F + j[None, :],
                        mask=dmask[:, None] & fmask[None, :], other=0.0).to(tl.float32)  # (BD, BF)
            proj += tl.sum(da[:, :, None] * w[None, :, :], axis=1)
        dt += tl.sum(tl.where(fmask[None, :], proj * dfeat, 0.0), axis=1)
    tl.store(DT + g * K + k, dt.to(DT.dtype.element_ty), mask=gmask)


@triton.jit
def time_embed_bwd_w1_kernel(T, DA, DW1, G, K, D, F, neg_log_period,
                             BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr):
    """Grid (K, cdiv(D, BD), cdiv(F, BF)): DW1[k, d, f] = Σ_g DA[g, k, d]·feat[g, k, f] (fixed order over g)."""
    k = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    j = tl.program_id(2) * BLOCK_F + tl.arange(0, BLOCK_F)
    dmask = d < D
    fmask = j < F
    half = F // 2
    acc = tl.zeros([BLOCK_D, BLOCK_F], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        gmask = g < G
        t = tl.load(T + g * K + k, mask=gmask, other=0.0).to(tl.float32)
        feat, _ = _features(t, j, half, neg_log_period)
        da = tl.load(DA + (g[:, None] * K + k) * D + d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0)
        acc += tl.sum(da[:, :, None] * feat[:, None, :], axis=0)
    tl.store(DW1 + k.to(tl.int64) * D * F + d[:, None] * F + j[None, :], acc.to(DW1.dtype.element_ty),
             mask=dmask[:, None] & fmask[None, :])
