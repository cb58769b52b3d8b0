"""The one place that decides which implementation runs: Triton kernels or the PyTorch reference.

MFM_FAST_IMPL=auto|triton|torch (default auto). auto uses Triton when it can run (CUDA + triton importable, or the
interpreter TRITON_INTERPRET=1 when asked explicitly) and otherwise falls back to the reference with one warning.
Nothing here touches CUDA at import time.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings

from .ops.launch import interpreter_on

IMPLS = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    """(can_run, reason). Triton runs on CUDA GPUs, or on CPU tensors under TRITON_INTERPRET=1."""
    if importlib.util.find_spec("triton") is None:
        return False, "the triton package is not installed"
    if interpreter_on():
        return True, "Triton interpreter (TRITON_INTERPRET=1, fp32 on CPU)"
    import torch
    if not torch.cuda.is_available():
        return False, "no CUDA device is available (set TRITON_INTERPRET=1 to run the kernels on the CPU)"
    major, _ = torch.cuda.get_device_capability()
    if major < 7:
        return False, f"GPU compute capability {major}.x is below 7.0"
    return True, f"CUDA ({torch.cuda.get_device_name()})"


_warned = False


def resolve_impl(impl: str | None = None) -> str:
    """'auto' | 'triton' | 'torch' -> 'triton' or 'torch'. An explicit 'triton' that cannot run raises."""
    global _warned
    impl = impl or "auto"
    if impl == "auto":
        impl = os.environ.get("MFM_FAST_IMPL", "auto")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r} (check MFM_FAST_IMPL)")
    ok, reason = triton_status()
    if impl == "triton":
        if not ok:
            raise RuntimeError(f"impl='triton' cannot run: {reason}")
        return "triton"
    if impl == "auto":
        # the interpreter is a correctness tool, far too slow to be chosen implicitly
        if ok and not interpreter_on():
            return "triton"
        if not ok and not _warned:
            warnings.warn(f"mfm_fast: using the PyTorch reference path ({reason})", stacklevel=3)
            _warned = True
        return "torch"
    return "torch"


def op_kernels(impl: str) -> dict:
    """op name -> 'triton' or 'ref' for the op table MFMDiT(impl=...) would use (impl already resolved)."""
    from .ops.table import op_kernels as kinds, reference_ops, triton_ops
    return kinds(triton_ops() if impl == "triton" else reference_ops())


def info() -> dict:
    import platform

    import torch

    from .ops.attention import backend_table
    out = {"mfm_fast": __import__("mfm_fast").__version__, "python": platform.python_version(),
           "torch": torch.__version__}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "not installed"
    out["cuda"] = torch.version.cuda or "none"
    out["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    ok, reason = triton_status()
    out["triton_runs"] = f"{ok} ({reason})"
    out["MFM_FAST_IMPL"] = os.environ.get("MFM_FAST_IMPL", "auto")
    try:
        with warnings.catch_warnings():  # the fallback is reported in this table, not as a warning
            warnings.simplefilter("ignore")
            impl = resolve_impl("auto")
        out["impl"] = impl
        for op, kind in op_kernels(impl).items():
            out[f"op {op}"] = kind
    except RuntimeError as e:
        out["impl"] = f"error: {e}"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    head_dim = 72  # MFM-XL/2
    for need_jvp in (False, True):
        table = backend_table(device, torch.bfloat16, head_dim, need_jvp)
        chosen = next((name for name, good, _ in table if good), "none")
        key = "attention (jvp)" if need_jvp else "attention"
        out[key] = f"{chosen} (bf16, head dim {head_dim}, {device})"
        if not need_jvp:
            for name, good, reasons in table:
                out[f"  {name}"] = "ok" if good else "; ".join(reasons)
    return out


def info_main(argv=None) -> int:
    import argparse
    argparse.ArgumentParser(prog="python -m mfm_fast info",
                            description="Print versions, the GPU, the chosen kernels and attention backends."
                            ).parse_args(argv)
    for k, v in info().items():
        print(f"{k:>28}: {v}")
    return 0
