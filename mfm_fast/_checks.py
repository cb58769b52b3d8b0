"""Input validation shared by the public API: every error names the offending argument."""
from __future__ import annotations

import math
from typing import Optional

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
    Meta and fake tensors (shape-only runs, e.g. memory measurements) have no values to check."""
    from torch._subclasses.fake_tensor import FakeTensor
    if t.is_meta or isinstance(t, FakeTensor) or torch.compiler.is_compiling() or _in_functorch(t):
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


def check_finite(**tensors) -> None:
    """Refuse NaN/±inf in input tensors (they would run through every later step silently, or surface as a
    non-finite reward and blame it). One fused isfinite().all() per tensor and a single host read for all of them;
    skipped where host reads are not allowed (`host_checks_allowed`: CUDA-graph capture, compile, functorch)."""
    tensors = {k: v for k, v in tensors.items() if torch.is_tensor(v) and v.is_floating_point()}
    if not tensors or not host_checks_allowed(next(iter(tensors.values()))):
        return
    flags = [torch.isfinite(v.detach()).all() for v in tensors.values()]
    if bool(flags[0] if len(flags) == 1 else torch.stack(flags).all()):
        return
    for name, v in tensors.items():
        bad = int((~torch.isfinite(v.detach())).sum())
        if bad:
            raise ValueError(f"{name} has {bad} non-finite value(s) (NaN or ±inf) out of {v.numel()}")


def check_nonempty(name: str, x: torch.Tensor) -> None:
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}): pass at least one sample")


def model_dtype(model) -> Optional[torch.dtype]:
    """The dtype of the model's (first floating-point) weights; None for a model without floating parameters."""
    params = getattr(model, "parameters", None)
    if not callable(params):
        return None
    return next((p.dtype for p in params() if p.is_floating_point()), None)


def check_dtype(name: str, x: torch.Tensor, dtype: Optional[torch.dtype]) -> None:
    """x must have the weights' dtype (the model computes in it); under autocast the ops cast, so anything goes."""
    if dtype is None or x.dtype == dtype or _autocast_on(x.device.type):
        return
    want, got = str(dtype).removeprefix("torch."), str(x.dtype).removeprefix("torch.")
    raise TypeError(f"{name} must be {want} like the model's weights, got {got} "
                    f"(cast {name} with .to(torch.{want}), or the model with .to(torch.{got}))")


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta): no autocast there
        return False


def check_input(name: str, x, model, batch=None) -> None:
    """An entry point's state or noise: a non-empty floating tensor with the model's event shape, in the model's
    dtype, all finite. The errors name the argument (the model itself would name its own `xbar` or `x`)."""
    check_state(name, x, getattr(model, "event_shape", None), batch)
    check_nonempty(name, x)
    check_dtype(name, x, model_dtype(model))
    check_finite(**{name: x})


def check_cond_rows(cond: dict, batch: int, of: str) -> None:
    """Per-sample conditioning tensors (y, cfg, ...) hold one row per sample of `of`, or one row shared by all."""
    for k, v in cond.items():
        if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] not in (1, batch):
            raise ValueError(f"{k} has {v.shape[0]} rows but {of} has {batch} samples: pass one row per sample "
                             f"(shape ({batch}, ...)), a single row or a scalar")


def check_model_output(v, xbar: torch.Tensor, model) -> torch.Tensor:
    """The model protocol returns the average velocity, a tensor of xbar's shape."""
    if not torch.is_tensor(v):
        raise TypeError(f"the model {type(model).__name__} must return a tensor (the average velocity, shaped like "
                        f"xbar {tuple(xbar.shape)}), got {type(v).__name__}")
    if v.shape != xbar.shape:
        raise ValueError(f"the model {type(model).__name__} returned shape {tuple(v.shape)}; the average velocity "
                         f"must have xbar's shape {tuple(xbar.shape)}")
    return v


def check_same_device(**tensors) -> None:
    devices = {k: v.device for k, v in tensors.items() if torch.is_tensor(v)}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"all inputs must be on one device: {desc}")


def check_positive_int(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be a positive integer, got {n!r}")
    return n


def check_label(name: str, value) -> int:
    """A class label as an int: Python/numpy integers, 0-dim integer tensors, and floats or 0-dim float tensors
    holding a whole number; 2.7 is refused (int() would truncate it to another class silently), as are bools."""
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a single integer class label, got a tensor of shape "
                             f"{tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an integer class label, got {type(value).__name__} {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{name} must be an integer class label, got {value!r} (it would be truncated to "
                             f"another class)")
        return int(value)
    return int(value.__index__()) if not isinstance(value, int) else value


def check_finite_scalar(name: str, value) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def n_per_group(name: str, rows: int, groups: int) -> int:
    """Rows of the transported state per context row (the particles sharing one conditioning)."""
    if groups < 1:
        raise ValueError(f"the batch is empty ({name} has {rows} rows, the context 0): pass at least one sample")
    if rows % groups:
        raise ValueError(f"{name} has {rows} rows, which is not a multiple of the {groups} context rows")
    return rows // groups
