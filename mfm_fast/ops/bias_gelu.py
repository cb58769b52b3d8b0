"""Bias add + tanh-approximated GELU (the MLP's fc1 epilogue)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bias_gelu_ref(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (..., F), bias (F,) -> gelu_tanh(x + bias)."""
    return F.gelu(x + bias, approximate="tanh")
