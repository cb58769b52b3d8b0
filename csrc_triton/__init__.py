"""Triton kernels of mfm_fast: @triton.jit bodies and constexpr helpers only (launchers live in mfm_fast.ops)."""
