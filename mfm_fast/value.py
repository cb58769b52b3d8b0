"""N-particle value and value-gradient engine (METHOD §3).

V_t(x) = log E[exp(λ·r(X1)) | X_t = x] is estimated from N one-step posterior samples x̂_i = X_{0,1}(ε_i; t, x):
V̂ = logsumexp_i λ·r(x̂_i) − log N. Its gradient:
- "mfm-g":  ∇̂V = ∇_x V̂ = Σ_i w_i ∇_x λ·r(X_{0,1}(ε_i; t, x)), w = softmax_i(λ·r_i): autograd through the
            network's context input x with ε fixed.
- "mfm-gf": ∇̂V = t/(1−t)²·(Σ_i w_i x̂_i − (1/N)·Σ_i x̂_i), no reward gradient (Tweedie-type identity).

Both are consistent as N → ∞, not unbiased at a finite N. "mfm-g" is unbiased for ∇V_N, the gradient of the
importance-weighted bound V_N = E[V̂] ≤ V (V_1 = E[λ·r]); for a reward sharp against the posterior's spread it
over-steers until N is large. That expectation depends only on the law of the samples, so no posterior model,
learned or exact, removes it (`python -m mfm_fast experiment estimators` measures both estimators' expectations).
`jackknife=True` replaces w by the jackknifed weights c = N·w − (N−1)·mean_j w^(−j) (`jackknife_weights`), for
either estimator, with the same samples: it cancels the O(1/N) term of that bias, at the price of more variance
(a clear gain for MFM-GF, whose terms are bounded; not for MFM-G on a sharp reward, whose are not).

All particles of all states run as one batch of B·N rows (particle groups: B context rows, B·N transported rows).
`chunk_size` bounds the rows per network call without changing the result: the noise is drawn once up front, the
(state, particle) grid is cut into blocks, and the per-block log-sum-exps and gradients are combined exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ._checks import as_time, check_cond_rows, check_finite, check_finite_scalar, check_input, check_model_output, \
    check_positive_int, check_state, host_checks_allowed
from .interpolant import bcast
from .rewards import CheckedReward, as_reward, reward_name
from .sampling import compose_flow_map

ESTIMATORS = ("mfm-g", "mfm-gf")
# 1 − t is clamped below by this in the MFM-GF prefactor t/(1−t)² (the release clamps 1 − t ≥ 1e-3).
ONE_MINUS_T_MIN = 1e-3


@dataclass
class Cost:
    """Work actually done, counted as it runs. Rows are (state, particle) pairs through the network."""

    forward_calls: int = 0  # batched network invocations
    forward_evals: int = 0  # network rows evaluated (a call on B·N transported rows counts B·N)
    backward_evals: int = 0  # network rows back-propagated through
    reward_evals: int = 0  # samples scored by the reward
    batch: int = 0  # output samples (states) the work was spent on
    nfe: Optional[int] = None  # the paper's NFE accounting per output sample (METHOD §3), where it defines one

    def add(self, other: "Cost") -> None:
        self.forward_calls += other.forward_calls
        self.forward_evals += other.forward_evals
        self.backward_evals += other.backward_evals
        self.reward_evals += other.reward_evals

    @property
    def evals_per_sample(self) -> float:
        """Counted network passes per output sample, a backward pass counting as one."""
        return (self.forward_evals + self.backward_evals) / max(self.batch, 1)


class CountedModel:
    """Calls the model and records forward rows, and backward rows when a gradient flows through its output."""

    def __init__(self, model, cost: Cost):
        self.model, self.cost = model, cost

    def __getattr__(self, attr):
        if attr in ("model", "cost"):
            raise AttributeError(attr)
        return getattr(self.model, attr)

    def __call__(self, s, u, xbar, t, x, **cond):
        out = check_model_output(self.model(s, u, xbar, t, x, **cond), xbar, self.model)
        rows = xbar.shape[0]
        self.cost.forward_calls += 1
        self.cost.forward_evals += rows
        if out.requires_grad:
            cost = self.cost

            def _count(grad):
                cost.backward_evals += rows

            out.register_hook(_count)
        return out


class CountedReward:
    """Calls the reward and records how many samples it scored."""

    def __init__(self, reward, cost: Cost):
        self.reward, self.cost = reward, cost
        self.name = reward_name(reward)
        self.dtype = None  # of the reward's last output

    def __getattr__(self, attr):
        if attr in ("reward", "cost"):
            raise AttributeError(attr)
        return getattr(self.reward, attr)

    def __call__(self, x1):
        self.cost.reward_evals += x1.shape[0]
        r = self.reward(x1)
        self.dtype = getattr(r, "dtype", None)
        return r


@dataclass
class ValueResult:
    value: torch.Tensor  # (B,)  V̂_t(x)
    grad: torch.Tensor  # x's shape  ∇̂V_t(x)
    cost: Cost

    @property
    def forward_evals(self) -> int:
        return self.cost.forward_evals

    @property
    def backward_evals(self) -> int:
        return self.cost.backward_evals


def _slice_cond(cond: dict, B: int, rows: slice) -> dict:
    return {k: (v[rows] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == B else v) for k, v in cond.items()}


def _blocks(B: int, N: int, chunk_size: Optional[int]):
    """(state slice, particle slice) blocks of at most chunk_size rows; particles are split first."""
    if chunk_size is None or chunk_size >= B * N:
        return [(slice(0, B), slice(0, N))]
    p = min(N, chunk_size)
    b = max(1, chunk_size // p)
    return [(slice(i, min(i + b, B)), slice(j, min(j + p, N))) for i in range(0, B, b) for j in range(0, N, p)]


def mfmgf_prefactor(t: torch.Tensor) -> torch.Tensor:
    """t/(1−t)² with both factors 1 − t clamped below at ONE_MINUS_T_MIN (finite at t = 1)."""
    return t / (1 - t).clamp_min(ONE_MINUS_T_MIN) ** 2


def mfmgf_release_ratio(t: torch.Tensor) -> torch.Tensor:
    """max(1−t, ONE_MINUS_T_MIN)/t: times the MFM-GF ∇̂V (`mfmgf_prefactor`) it gives the release's correction
    (Σ w_i x̂_i − mean x̂)/max(1−t, 1e-3), the term its ODE adds to the drift whatever σ²(t) is (the release divides
    its correction by σ²/2 and multiplies back, so neither the clamp of (1−t)/t nor the t > 0.999 clamp enters)."""
    return (1 - t).clamp_min(ONE_MINUS_T_MIN) / t


def log_weights(lam: float, r: torch.Tensor) -> torch.Tensor:
    """The log-weights λ·r, detached, in float64 (float32 on devices without it): a float32 λ·r overflows to ±inf
    for |λ·r| > 3.4e38 (then the softmax weights turn NaN and V̂ infinite); in float64 it stays finite for any λ
    and float32 reward. The weights, V̂ and the seeds of the backward pass are all computed from these."""
    wide = torch.float32 if r.device.type == "mps" else torch.promote_types(r.dtype, torch.float64)
    return lam * r.detach().to(wide)


def _seed(lam: float, weights: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """∂V̂/∂r = λ·(weights) in r's dtype: the backward of r (the reward, without λ) from the log-weight seeds."""
    return (lam * weights).to(r.dtype)


def _leave_one_out_lse(a: torch.Tensor) -> torch.Tensor:
    """(B, N): entry j is logsumexp_{k≠j} a_k. From the full logsumexp by log1p(−share_j), which is accurate for
    every entry whose share is ≤ 1/2; the one entry that may exceed it (the largest) is summed directly."""
    lse = torch.logsumexp(a, dim=1, keepdim=True)
    out = lse + torch.log1p(-(a - lse).exp().clamp(max=0.5))
    top = a.argmax(dim=1, keepdim=True)
    rest = torch.logsumexp(a.scatter(1, top, float("-inf")), dim=1, keepdim=True)
    return out.scatter(1, top, rest)


def jackknife_weights(r: torch.Tensor) -> torch.Tensor:
    """(B, N) weights c of the jackknifed estimators from the log-weights r (B, N), N ≥ 2.

    The softmax weights w of the N-sample self-normalised estimate are biased at O(1/N); the jackknife
    N·(N-sample estimate) − (N−1)·(mean of the N leave-one-out estimates) cancels that order. For an estimate
    Σ_i w_i f_i it is Σ_i c_i f_i with c_i = N·w_i − ((N−1)/N)·Σ_{j≠i} w_i^(−j), w^(−j) the softmax without
    particle j; Σ_i c_i = 1, and c_i can be negative. w_i^(−j) = w_i·q_j with q_j = 1/(1 − w_j), computed in log
    space so that a dominant particle (q_j huge, w_i tiny) stays finite. Computed in at least float32."""
    N = r.shape[1]
    rf = r.to(torch.promote_types(r.dtype, torch.float32))
    lse = torch.logsumexp(rf, dim=1, keepdim=True)
    log_w = rf - lse
    log_q = lse - _leave_one_out_lse(rf)  # log 1/(1 − w_j)
    return (N * log_w.exp() - (N - 1) / N * (log_w + _leave_one_out_lse(log_q)).exp()).to(r.dtype)


def jackknife_value(r: torch.Tensor) -> torch.Tensor:
    """(B,) jackknifed log-mean-exp of r (B, N), N ≥ 2: N·V̂_N − (N−1)·mean_j V̂_{N−1}^(−j). Its gradient with
    respect to the r_i is `jackknife_weights(r)`, so MFM-G seeded with those weights differentiates this value."""
    N = r.shape[1]
    if N < 2:
        raise ValueError(f"jackknife_value needs n_particles >= 2 (it leaves one particle out), got n_particles={N}")
    rf = r.to(torch.promote_types(r.dtype, torch.float32))
    full = torch.logsumexp(rf, dim=1) - math.log(N)
    loo = _leave_one_out_lse(rf) - math.log(N - 1)
    return (N * full - (N - 1) * loo.mean(dim=1)).to(r.dtype)


def estimate(model, reward, t: torch.Tensor, x: torch.Tensor, noise: torch.Tensor, estimator: str = "mfm-g",
             lam: float = 1.0, chunk_size: Optional[int] = None, cond: Optional[dict] = None,
             posterior_steps: int = 1, jackknife: bool = False):
    """Unvalidated core of `value_and_grad`: t (B,), x (B, *event), noise (B, N, *event) already drawn.

    Performs no host synchronisation, so a steering step built on it can be captured in a CUDA graph.
    Returns (V (B,), ∇V (x's shape)); V in the dtype of `log_weights` (float64: V̂ scales with λ, which may take
    it beyond float32), ∇V in x's dtype.
    """
    cond = cond or {}
    B, N = noise.shape[:2]
    ev = x.shape[1:]
    blocks = _blocks(B, N, chunk_size)
    by_states: dict = {}
    for sb, pb in blocks:
        by_states.setdefault((sb.start, sb.stop), []).append(pb)
    values, grads = [], []
    for (i0, i1), pbs in by_states.items():
        sb = slice(i0, i1)
        xs, ts, cs = x[sb].detach(), t[sb], _slice_cond(cond, B, sb)
        if jackknife:
            V, g = _jackknife_block(model, reward, ts, xs, noise[sb], pbs, estimator, lam, cs, posterior_steps)
            values.append(V)
            grads.append(g)
            continue
        lse, part = [], []  # per particle block: logsumexp of λr, and its gradient (or weighted/plain sums)
        for pb in pbs:
            eps = noise[sb, pb].reshape(-1, *ev)
            b, p = i1 - i0, pb.stop - pb.start
            if estimator == "mfm-g":
                with torch.enable_grad():
                    xc = xs.clone().requires_grad_(True)
                    x1 = compose_flow_map(model, eps, ts, xc, posterior_steps, **cs)
                    r = reward(x1).view(b, p)
                    _require_grad(r, reward)
                    # The backward starts from the log-mean-exp seed ∂V̂/∂r_i = λ·softmax_i(λ·r): one backward
                    # pass through reward and network for all particles of all states at once (the states are
                    # independent rows, so each state's gradient lands in its own row of x).
                    a = log_weights(lam, r)
                    (g,) = torch.autograd.grad(r, xc, grad_outputs=_seed(lam, torch.softmax(a, dim=1), r),
                                               allow_unused=True)
                lse.append(torch.logsumexp(a, dim=1))
                part.append(torch.zeros_like(xs) if g is None else g)
            else:
                with torch.no_grad():
                    x1 = compose_flow_map(model, eps, ts, xs, posterior_steps, **cs).view(b, p, *ev)
                    a = log_weights(lam, reward(x1.reshape(b * p, *ev)).view(b, p))
                    w = torch.softmax(a, dim=1).to(_acc(x1)).view(b, p, *([1] * len(ev)))
                    lse.append(torch.logsumexp(a, dim=1))
                    part.append(((w * x1).sum(1), x1.sum(1)))
        L = torch.stack(lse)  # (chunks, b)
        V = torch.logsumexp(L, dim=0)
        wc = torch.softmax(L, dim=0).to(_acc(xs))  # weight of each particle block within each state
        if estimator == "mfm-g":
            g = sum(bcast(wc[k], part[k]) * part[k] for k in range(len(part)))
        else:
            weighted = sum(bcast(wc[k], part[k][0]) * part[k][0] for k in range(len(part)))
            mean = sum(q[1] for q in part) / N
            g = bcast(mfmgf_prefactor(ts), mean) * (weighted - mean)
        values.append(V - math.log(N))
        grads.append(g)
    return torch.cat(values), torch.cat(grads).to(x.dtype)


def _jackknife_block(model, reward, ts, xs, noise, pbs, estimator, lam, cond, posterior_steps):
    """(V, ∇V) of one block of states with the jackknifed weights, which need every particle's reward of a state
    before any gradient: MFM-GF keeps the samples of all particle blocks; MFM-G seeds its backward with the
    weights directly when one block holds all particles, and otherwise scores the particles in a forward-only
    pass first (counted in the cost) and then back-propagates each block with its share of the weights."""
    b, N = noise.shape[:2]
    ev = xs.shape[1:]

    def sample(pb, xc):
        return compose_flow_map(model, noise[:, pb].reshape(-1, *ev), ts, xc, posterior_steps, **cond)

    if estimator == "mfm-gf":
        with torch.no_grad():
            x1 = torch.cat([sample(pb, xs).view(b, pb.stop - pb.start, *ev) for pb in pbs], dim=1)
            a = log_weights(lam, reward(x1.reshape(b * N, *ev)).view(b, N))
            c = jackknife_weights(a).to(_acc(x1)).view(b, N, *([1] * len(ev)))
            g = bcast(mfmgf_prefactor(ts), xs) * ((c * x1).sum(1) - x1.mean(1))
        return jackknife_value(a), g
    if len(pbs) == 1:
        with torch.enable_grad():
            xc = xs.clone().requires_grad_(True)
            r = reward(sample(pbs[0], xc)).view(b, N)
            _require_grad(r, reward)
            a = log_weights(lam, r)
            (g,) = torch.autograd.grad(r, xc, grad_outputs=_seed(lam, jackknife_weights(a), r), allow_unused=True)
        return jackknife_value(a), torch.zeros_like(xs) if g is None else g
    with torch.no_grad():
        a = log_weights(lam, torch.cat([reward(sample(pb, xs)).view(b, -1) for pb in pbs], dim=1))
    c = jackknife_weights(a)
    g = torch.zeros_like(xs)
    for pb in pbs:
        with torch.enable_grad():
            xc = xs.clone().requires_grad_(True)
            rb = reward(sample(pb, xc)).view(b, -1)
            _require_grad(rb, reward)
            (gb,) = torch.autograd.grad(rb, xc, grad_outputs=_seed(lam, c[:, pb], rb), allow_unused=True)
        if gb is not None:
            g = g + gb
    return jackknife_value(a), g


def _acc(x: torch.Tensor) -> torch.dtype:
    """The dtype weighted sums of samples accumulate in: x's, at least float32."""
    return torch.promote_types(x.dtype, torch.float32)


def _require_grad(r: torch.Tensor, reward) -> None:
    if not r.requires_grad:
        raise ValueError(f"reward {reward_name(reward)!r}: no gradient reaches the context x; estimator 'mfm-g' needs "
                         f"a reward differentiable in its input (or use estimator='mfm-gf')")


def check_representable(lam: float, **tensors) -> None:
    """V̂ and ∇̂V are finite for every finite λ in the weights' float64 arithmetic; what can still overflow is the
    cast of V̂ (which scales with λ) to the reward's dtype, and ∇̂V = λ·Σ w_i ∇r_i in x's dtype. Where that happens
    no finite result exists in those dtypes: say so, naming λ, instead of returning inf/NaN."""
    tensors = {k: v for k, v in tensors.items() if torch.is_tensor(v) and v.is_floating_point()}
    if not tensors or not host_checks_allowed(next(iter(tensors.values()))):
        return
    flags = torch.stack([torch.isfinite(v.detach()).all() for v in tensors.values()])
    if bool(flags.all()):
        return
    bad = [f"{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in tensors.items()
           if not bool(torch.isfinite(v.detach()).all())]
    raise ValueError(f"lam={lam:g}: {' and '.join(bad)} not finite in that dtype: V̂ scales with lam·r and the value "
                     f"gradient with lam·∇r, beyond the dtype's range for this lam (else the reward's own gradient is "
                     f"not finite); lower lam, or run in float64")


def check_estimator(name: str, estimator) -> str:
    if estimator not in ESTIMATORS:
        raise ValueError(f"{name} must be one of {ESTIMATORS}, got {estimator!r}")
    return estimator


def check_jackknife(jackknife, n_particles: int) -> bool:
    if not isinstance(jackknife, bool):
        raise ValueError(f"jackknife must be True or False, got {jackknife!r}")
    if jackknife and n_particles < 2:
        raise ValueError(f"jackknife=True needs n_particles >= 2 (it leaves one particle out), got {n_particles}")
    return jackknife


def check_pathwise(model, estimator: str) -> None:
    """MFM-G differentiates the samples through the map ε ↦ X_{0,1}(ε; t, x); a sampler that is exact only in law
    (`pathwise = False`, e.g. data.ExactPosteriorMFM) would give a biased gradient."""
    if estimator == "mfm-g" and getattr(model, "pathwise", True) is False:
        raise ValueError(f"estimator 'mfm-g' needs a pathwise sampler; {type(model).__name__} is exact only in law "
                         "(use estimator='mfm-gf', or glass.GlassFlowMap for an exact pathwise map)")


def check_chunk_size(chunk_size) -> Optional[int]:
    return None if chunk_size is None else check_positive_int("chunk_size", chunk_size)


def value_and_grad(model, reward, t, x: torch.Tensor, n_particles: int, estimator: str = "mfm-g", lam: float = 1.0,
                   chunk_size: Optional[int] = None, generator: Optional[torch.Generator] = None,
                   noise: Optional[torch.Tensor] = None, return_info: bool = False, posterior_steps: int = 1,
                   jackknife: bool = False, **cond):
    """Value V̂_t(x) and value gradient ∇̂V_t(x) from `n_particles` one-step posterior samples per state.

    t: scalar or (B,) in [0, 1]; x: (B, *event). `estimator`: "mfm-g" (reward gradients through the network's
    context input) or "mfm-gf" (gradient-free; in t/(1−t)² both factors 1 − t are clamped at 1e-3, so it stays
    finite at t = 1 — the release clamps only the one 1 − t of its correction; `steer` reproduces that term).
    `chunk_size`: the most (state, particle) rows per network call — particles are split into blocks first, then
    states; the result equals the unchunked one up to rounding (the noise is drawn once, the
    per-block log-sum-exps and softmax-weighted gradients are merged exactly). `noise`: (B, N, *event) or
    (B·N, *event) with the particles of a state contiguous, used instead of drawing from `generator`.
    `posterior_steps` = m > 1 draws each sample with the m-step composed flow map (m network calls per particle,
    counted in the cost) instead of one jump.
    `jackknife=True` (N ≥ 2) replaces the softmax weights by `jackknife_weights`, for either estimator: the same
    samples and network work (plus one forward-only pass when `chunk_size` splits a state's particles), the
    O(1/N) bias of the self-normalised weights removed; V̂ becomes `jackknife_value`.
    The weights are computed from λ·r in float64 (`log_weights`), so any finite λ gives finite weights; where V̂
    (in the reward's dtype) or ∇̂V (in x's) still does not fit its dtype, a ValueError names lam.
    Returns (V (B,), ∇V (x's shape)), or a `ValueResult` with the counted cost if `return_info`.
    """
    check_input("x", x, model)
    B, ev = x.shape[0], tuple(x.shape[1:])
    check_cond_rows(cond, B, "x")
    t = as_time("t", t, B, x)
    N = check_positive_int("n_particles", n_particles)
    check_jackknife(jackknife, N)
    lam = check_finite_scalar("lam", lam)
    check_estimator("estimator", estimator)
    check_pathwise(model, estimator)
    posterior_steps = check_positive_int("posterior_steps", posterior_steps)
    recompute = False
    if isinstance(chunk_size, str) and chunk_size == "auto":  # the rows that fit the free device memory
        from .memory import plan_chunks
        plan = plan_chunks(model, B, N, x.dtype, x.device, reward=reward)
        chunk_size, recompute = plan.chunk_size, plan.recompute
    chunk_size = check_chunk_size(chunk_size)
    if noise is None:
        noise = torch.randn((B, N, *ev), generator=generator, device=x.device, dtype=x.dtype)
    elif noise.dim() == x.dim():  # (B·N, *event), the layout of sampling.posterior_sample
        check_state("noise", noise, ev, batch=B * N)
        noise = noise.view(B, N, *ev).to(x.dtype)
    else:
        check_state("noise", noise, (N, *ev), batch=B)
        noise = noise.to(x.dtype)
    check_finite(noise=noise)
    cost = Cost(batch=B)
    reward = reward if isinstance(reward, CheckedReward) else as_reward(reward)
    from .memory import recompute_activations
    counted = CountedReward(reward, cost)
    with recompute_activations(model, enabled=recompute):  # block-level recomputation when chunks would be tiny
        V, g = estimate(CountedModel(model, cost), counted, t, x, noise, estimator, lam, chunk_size, cond,
                        posterior_steps, jackknife)
    V = V.to(counted.dtype or V.dtype)  # the reward's dtype, as V̂ = log-mean-exp of λ·r
    check_representable(lam, V=V, grad_V=g)
    if return_info:
        return ValueResult(V, g, cost)
    return V, g
