"""Bias add + tanh-GELU over a (M, N) row-major view: forward, and one kernel for backward and jvp.

gelu_tanh(z) = z·σ(2y), y = √(2/π)(z + 0.044715 z³)  (0.5(1 + tanh y) = σ(2y), so no tanh is needed);
gelu'(z) = σ + z·σ(1−σ)·2√(2/π)(1 + 3·0.044715 z²). All arithmetic in fp32.
"""
import triton
import triton.language as tl

@triton.jit
def _gelu_and_grad(z):
    # literals, not module globals: compiled Triton only reads constexpr globals, which the interpreter mishandles
    k0 = 1.5957691216057308  # 2·sqrt(2/pi)
    k1 = 0.044715
    s = tl.sigmoid(k0 * (z + k1 * z * z * z))
    return z * s, s + z * s * (1.0 - s) * k0 * (1.0 + 3.0 * k1 * z * z)


@triton.jit
def bias_gelu_fwd_kernel(X, B, Y, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    mask = (rows[:, None] < M) & cmask[None, :]
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    z += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    y, _ = _gelu_and_grad(z)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def bias_gelu_grad_kernel(X, B, G, GB, OUT, PARTIAL, M, N, HAS_G: tl.constexpr, HAS_GB: tl.constexpr,
                          REDUCE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT = gelu'(X + B)·(G + GB) with G (M, N) and GB (N,) each optional.

    backward: G = dy, REDUCE writes this program's column sums of OUT (the bias gradient) to PARTIAL[pid_m];
    jvp: G = x tangent, GB = bias tangent. Each program walks row blocks pid_m, pid_m + P, ... so the number of
    partial rows P (the grid's first axis) stays small and the final sum over them is deterministic.
    """
    pid_m = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_GB:
        gb = tl.load(GB + cols, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(pid_m * BLOCK_M, M, n_prog * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < M) & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) + b[None, :]
        _, dgelu = _gelu_and_grad(z)
        if HAS_G:
            g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_GB:
                g += gb[None, :]
        else:
            g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32) + gb[None, :]
        out = tl.where(mask, dgelu * g, 0.0)
        tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)
        if REDUCE:
            acc += tl.sum(out, axis=0)
    if REDUCE:
        tl.store(PARTIAL + pid_m * N + cols, acc, mask=cmask)
