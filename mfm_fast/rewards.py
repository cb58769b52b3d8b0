"""Rewards: any callable `reward(x1) -> (B,)` scoring a batch of clean samples (t = 1), higher is better.

`as_reward` wraps a callable with the checks every steering method relies on (shape (B,), floating dtype, finite
values), so that a bad reward fails loudly with its name instead of silently poisoning a run. Built-ins:
`LinearInverseReward` (the paper's GMM inverse problem, closed-form oracles exist), `ClassifierReward`
(log Σ_c w_c p(c|x), the digits experiment) and `DecodeThenScore` (latent models: decode, then score).
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol, Sequence

import torch
import torch.nn as nn

from ._checks import check_finite_scalar, host_checks_allowed


class Reward(Protocol):
    def __call__(self, x1: torch.Tensor) -> torch.Tensor:  # (B, *event) -> (B,)
        ...


def reward_name(fn) -> str:
    name = getattr(fn, "name", None)
    if isinstance(name, str) and name:
        return name
    return getattr(fn, "__name__", None) or type(fn).__name__


class CheckedReward:
    """A reward whose every output is validated: a tensor of shape (B,), floating point, all finite.

    Attributes of the wrapped reward (e.g. `A`, `y`, `sigma` of a `LinearInverseReward`) stay reachable.
    """

    def __init__(self, fn: Callable, name: Optional[str] = None):
        if isinstance(fn, CheckedReward):
            fn = fn.fn
        if not callable(fn):
            raise TypeError(f"reward must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or reward_name(fn)

    def __getattr__(self, attr):
        if attr == "fn":  # not yet set (e.g. during unpickling): avoid recursing into __getattr__
            raise AttributeError(attr)
        return getattr(self.fn, attr)

    def __call__(self, x1: torch.Tensor) -> torch.Tensor:
        r = self.fn(x1)
        B = x1.shape[0]
        if not torch.is_tensor(r):
            raise TypeError(f"reward {self.name!r} must return a tensor of shape ({B},), got {type(r).__name__}")
        if r.shape != (B,):
            raise ValueError(f"reward {self.name!r} must return shape ({B},) for a batch of {B} samples, "
                             f"got {tuple(r.shape)}")
        if not r.is_floating_point():
            raise TypeError(f"reward {self.name!r} must return a floating-point tensor, got dtype {r.dtype}")
        # a value check reads back to the host: skipped inside CUDA-graph capture, compiled or functorch code,
        # whose callers check the finished samples instead
        if host_checks_allowed(r):
            bad = int((~torch.isfinite(r.detach())).sum())
            if bad:
                raise ValueError(f"reward {self.name!r} returned {bad} non-finite value(s) (NaN or ±inf) "
                                 f"out of {B}")
        return r

    def __repr__(self) -> str:
        return f"CheckedReward({self.name!r})"


def as_reward(fn: Callable, name: Optional[str] = None) -> CheckedReward:
    """Validating wrapper around a reward callable; errors name the reward (`name`, else its own name)."""
    return CheckedReward(fn, name)


def _as_matrix(name: str, value, ndim: int) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float64) if not torch.is_tensor(value) else value.detach().clone()
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite")
    return t


class LinearInverseReward(nn.Module):
    """r(x) = −‖y − A·x‖² / (2σ²): the log-likelihood of a linear measurement y = A·x + σ·noise (up to a constant).

    x (B, *event) is flattened to (B, d); A is (m, d), y is (m,). `A`, `y`, `sigma` are public so that exact
    Gaussian-mixture oracles (value, ∇value, tilted target) can be built from the same reward.
    """

    def __init__(self, A, y, sigma: float, name: str = "linear_inverse"):
        super().__init__()
        A = _as_matrix("A", A, 2)
        y = _as_matrix("y", y, 1)
        if y.shape[0] != A.shape[0]:
            raise ValueError(f"y has {y.shape[0]} entries but A has {A.shape[0]} rows")
        sigma = check_finite_scalar("sigma", sigma)
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.register_buffer("A", A)
        self.register_buffer("y", y)
        self.sigma = sigma
        self.name = name

    @classmethod
    def paper(cls) -> "LinearInverseReward":
        """The 2-D GMM reward of the paper (METHOD §6): a = [1.2, −0.8], y_obs = −1, σ = 0.2."""
        return cls([[1.2, -0.8]], [-1.0], 0.2, name="paper_linear_inverse")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.A.shape[1]:
            raise ValueError(f"reward {self.name!r}: samples have {x.shape[1]} features but A has "
                             f"{self.A.shape[1]} columns")
        A, y = self.A.to(x), self.y.to(x)
        res = y - x @ A.T  # (B, m)
        return -res.pow(2).sum(-1) / (2 * self.sigma ** 2)


class ClassifierReward(nn.Module):
    """r(x) = log Σ_c w_c·p(c|x), p = softmax(classifier(x)); w is normalised to sum to one.

    `classifier` is any module (or callable) returning logits (B, C). Zero weights are allowed (classes that
    should not appear); at least one weight must be positive.
    """

    def __init__(self, classifier: Callable, weights: Sequence[float], name: str = "classifier"):
        super().__init__()
        if not callable(classifier):
            raise TypeError(f"classifier must be callable, got {type(classifier).__name__}")
        w = _as_matrix("weights", weights, 1)
        if bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError("weights must be non-negative with a positive sum")
        self.classifier = classifier
        self.register_buffer("log_weights", torch.log(w / w.sum()))
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(x)
        C = self.log_weights.shape[0]
        if not torch.is_tensor(logits) or logits.shape != (x.shape[0], C):
            shape = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
            raise ValueError(f"reward {self.name!r}: classifier must return logits of shape ({x.shape[0]}, {C}), "
                             f"got {shape}")
        return torch.logsumexp(torch.log_softmax(logits, dim=-1) + self.log_weights.to(logits), dim=-1)


class DecodeThenScore(nn.Module):
    """r(z) = reward(decoder(z)) for models that sample latents (e.g. SD-VAE decode, then an image reward)."""

    def __init__(self, decoder: Callable, reward: Callable, name: Optional[str] = None):
        super().__init__()
        if not callable(decoder):
            raise TypeError(f"decoder must be callable, got {type(decoder).__name__}")
        if not callable(reward):
            raise TypeError(f"reward must be callable, got {type(reward).__name__}")
        self.decoder = decoder
        self.reward = reward
        self.name = name or f"decode_then_{reward_name(reward)}"

    def forward(self, z: torch.Tensor, *args) -> torch.Tensor:
        """r(z); extra arguments (e.g. one prompt per row for a text-image reward) go to the reward."""
        return self.reward(self.decoder(z), *args)
