"""Input validation shared by the public API: every error names the offending argument."""
from __future__ import annotations

import math

import torch


def as_time(name: str, t, batch: int, like: torch.Tensor) -> torch.Tensor:
    """Return `t` as a float tensor of shape (batch,) on like's device/dtype; scalars broadcast. Checks [0, 1]."""
    if not torch.is_tensor(t):
        if not isinstance(t, (int, float)):
            raise TypeError(f"{name} must be a float or a tensor, got {type(t).__name__}")
        t = torch.full((batch,), float(t), device=like.device, dtype=like.dtype)
    if t.is_complex() or not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the state is on {like.device}")
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) or be a scalar, got {tuple(t.shape)}")
    if host_checks_allowed(t):
        bad = ~torch.isfinite(t) | (t < 0) | (t > 1)
        if bool(bad.any()):
            raise ValueError(f"{name} must lie in [0, 1]; got values such as {t[bad][0].item():.4g}")
    return t.to(like.dtype)


def host_checks_allowed(t: torch.Tensor) -> bool:
    """Data-dependent checks read values back to the host: skip them while compiling, inside torch.func transforms
    and during CUDA-graph capture (where a host read is illegal); the eager call has validated the same inputs.
    Meta tensors (shape-only runs) have no values to check."""
    if t.is_meta or torch.compiler.is_compiling() or _in_functorch(t):
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _in_functorch(t: torch.Tensor) -> bool:
    # Inside torch.func transforms tensors are wrapped; data-dependent checks still work on the primal but cost a
    # sync per call, so they are skipped there (the outer call has already validated its inputs).
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def check_state(name: str, x: torch.Tensor, event_shape=None, batch=None) -> None:
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {x.dtype}")
    if event_shape is not None and tuple(x.shape[1:]) != tuple(event_shape):
        raise ValueError(f"{name} must have shape (B, {', '.join(map(str, event_shape))}), got {tuple(x.shape)}")
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"{name} must have batch size {batch}, got {x.shape[0]}")


def check_same_device(**tensors) -> None:
    devices = {k: v.device for k, v in tensors.items() if torch.is_tensor(v)}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"all inputs must be on one device: {desc}")


def check_positive_int(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be a positive integer, got {n!r}")
    return n


def check_finite_scalar(name: str, value) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def n_per_group(name: str, rows: int, groups: int) -> int:
    """Rows of the transported state per context row (the particles sharing one conditioning)."""
    if groups < 1 or rows % groups:
        raise ValueError(f"{name} has {rows} rows, which is not a multiple of the {groups} context rows")
    return rows // groups
