"""Particle groups: the shared-conditioning path equals the naive repeat path; chunking and its memory planner."""
import math

import pytest
import torch

from mfm_fast.memory import (activation_bytes_per_row, auto_chunk_size, plan_chunks, saved_bytes_per_block,
                             recompute_activations)
from mfm_fast.models.dit import MFMDiT
from mfm_fast.value import value_and_grad

G, N = 2, 3


def tiny(impl="torch", **kw):
    """MFM-T/2 at 4×4 latents (4 tokens), width 72, 2 blocks (one encoder, one decoder), random weights (the
    adaLN-Zero init would gate every block off)."""
    model = MFMDiT("MFM-T/2", impl=impl, input_size=4, hidden_size=72, num_heads=1, depth=2, encoder_depth=1, **kw)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def draw_inputs(model, dtype=torch.float32):
    ev = model.event_shape
    f = dict(dtype=dtype)
    return dict(s=torch.rand(G, **f), u=torch.rand(G, **f), xbar=torch.randn(G * N, *ev, **f), t=torch.rand(G, **f),
                x=torch.randn(G, *ev, **f), y=torch.randint(0, 11, (G,)))


def grads_of(model, inp, repeat: bool):
    """Output and gradients of a random projection w.r.t. the context x, xbar and every weight."""
    x = inp["x"].clone().requires_grad_(True)
    xbar = inp["xbar"].clone().requires_grad_(True)
    s, u, t, y = inp["s"], inp["u"], inp["t"], inp["y"]
    if repeat:  # every conditioning tensor repeated once per particle: the naive path
        rep = lambda z: z.repeat_interleave(N, dim=0)  # noqa: E731
        v = model(rep(s), rep(u), xbar, rep(t), rep(x), y=rep(y))
    else:
        v = model(s, u, xbar, t, x, y=y)
    proj = torch.randn(v.shape, generator=torch.Generator().manual_seed(2), dtype=v.dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((v * proj).sum(), [x, xbar, *params], allow_unused=True)
    return v.detach(), grads


def assert_close_to_scale(a, b, tol, name):
    """max|a − b| ≤ tol · max|b|: the paths differ only in summation order (modulation statistics are fp32)."""
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= tol * scale, f"{name}: max error {err:.3g} vs scale {scale:.3g}"


def assert_groups_equal_repeat(model, tol, dtype=torch.float32):
    model = model.to(dtype)
    inp = draw_inputs(model, dtype)
    v, g = grads_of(model, inp, repeat=False)
    v_rep, g_rep = grads_of(model, inp, repeat=True)
    assert_close_to_scale(v, v_rep, tol, "v")
    names = ["x", "xbar"] + [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(g) == len(names)
    for name, a, b in zip(names, g, g_rep):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_close_to_scale(a, b, tol, f"grad of {name}")
    # the gradients carry signal: the context, the transported state, every block's weights
    assert g[0].abs().max() > 1e-3 and g[1].abs().max() > 1e-3
    assert all(a is not None and a.abs().max() > 0 for name, a in zip(names, g) if name.startswith("blocks."))


def test_groups_equal_repeat_reference_path():
    # float64 inputs and weights; the fp32 modulation statistics bound the agreement at ~1e-7 relative
    assert_groups_equal_repeat(tiny("torch"), tol=1e-6, dtype=torch.float64)


@pytest.mark.interpret
def test_groups_equal_repeat_triton_interpreter():
    fast = tiny("triton")
    assert_groups_equal_repeat(fast, tol=1e-4)
    # and the fused path agrees with the reference ops on the grouped call
    inp = draw_inputs(fast)
    v_fast, g_fast = grads_of(fast, inp, repeat=False)
    v_ref, g_ref = grads_of(tiny("torch"), inp, repeat=False)
    assert_close_to_scale(v_fast, v_ref, 1e-4, "v")
    for name, a, b in zip(["x", "xbar"], g_fast, g_ref):
        assert_close_to_scale(a, b, 1e-4, f"grad of {name}")


def quadratic_reward(target):
    """r(x) = −‖x − target‖²/d: smooth, cheap, with a closed-form gradient."""
    def reward(x1):
        return -(x1 - target).pow(2).flatten(1).mean(1)
    return reward


class NoGroups(torch.nn.Module):
    """The model seen without particle-group support: call_model then repeats the conditioning N times."""

    supports_particle_groups = False

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.event_shape = model.event_shape

    def forward(self, *args, **kw):
        return self.model(*args, **kw)


@pytest.mark.parametrize("estimator", ["mfm-g", "mfm-gf"])
def test_value_and_grad_groups_chunked_equal_naive_unchunked(estimator):
    model = tiny().double().requires_grad_(False)
    B, P, ev = 2, 3, model.event_shape
    f = dict(dtype=torch.float64)
    x = torch.randn(B, *ev, **f)
    t = torch.rand(B, **f) * 0.8 + 0.1
    noise = torch.randn(B, P, *ev, **f)
    y = torch.randint(0, 10, (B,))
    reward = quadratic_reward(torch.randn(*ev, **f))
    V0, g0 = value_and_grad(NoGroups(model), reward, t, x, P, estimator=estimator, lam=2.0, noise=noise, y=y)
    # the value is the log-mean-exp over a state's particles: recompute it from the one-step samples
    with torch.no_grad():
        rep = lambda z: z.repeat_interleave(P, dim=0)  # noqa: E731
        x1 = noise.flatten(0, 1) + model(rep(t * 0), rep(t * 0 + 1), noise.flatten(0, 1), rep(t), rep(x), y=rep(y))
        r = 2.0 * reward(x1).view(B, P)
    assert_close_to_scale(V0, torch.logsumexp(r, 1) - math.log(P), 1e-6, "V")
    assert g0.abs().max() > 1e-3
    # 2: particles split unevenly (2 + 1); 3: one whole state per call; "auto": no memory bound on a CPU
    for chunk in (2, 3, "auto"):
        V, g = value_and_grad(model, reward, t, x, P, estimator=estimator, lam=2.0, noise=noise,
                              chunk_size=chunk, y=y)
        assert_close_to_scale(V, V0, 1e-6, f"V, chunk {chunk}")
        assert_close_to_scale(g, g0, 1e-6, f"grad, chunk {chunk}")


# ---------------------------------------------------------------- memory planning

def saved_bytes_per_row(model, dtype, rows=(2, 6)):
    """Bytes autograd saves per transported row for a value-gradient pass, measured with saved-tensor hooks."""
    ev = model.event_shape
    model = model.to(dtype).requires_grad_(False)
    out = []
    for R in rows:
        storages = {}

        def pack(tensor):
            st = tensor.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
            return tensor

        x = torch.randn(1, *ev, dtype=dtype, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            v = model(torch.zeros(1, dtype=dtype), torch.ones(1, dtype=dtype), torch.randn(R, *ev, dtype=dtype),
                      torch.rand(1, dtype=dtype), x)
        v.sum().backward()
        out.append(sum(storages.values()))
    return (out[1] - out[0]) / (rows[1] - rows[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_estimate_covers_measured_saved_activations(dtype):
    model = MFMDiT("MFM-T/2", impl="torch", input_size=8, depth=2, encoder_depth=1)
    measured = saved_bytes_per_row(model, dtype)
    est = activation_bytes_per_row(model, dtype)
    assert measured <= est <= 3 * measured, (measured, est)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.interpret)])
def test_saved_bytes_per_block_match_the_measurement(impl):
    """The per-block constants behind the estimate, against the saved bytes of one more block (fp32: the Triton
    interpreter runs fp32 only). The fused path saves more per block than the reference path (40 vs 36 bytes per
    token · unit, without the softmax) and its attention keeps a log-sum-exp instead of the probabilities."""
    def model(depth):
        torch.manual_seed(0)
        return MFMDiT("MFM-T/2", impl=impl, input_size=8, depth=depth, encoder_depth=1)

    measured = saved_bytes_per_row(model(2), torch.float32) - saved_bytes_per_row(model(1), torch.float32)
    est = saved_bytes_per_block(model(1), torch.float32)
    assert abs(est - measured) <= 0.02 * measured, (est, measured)


def test_estimate_monotone_in_model_size_and_dtype():
    def est(**kw):
        with torch.device("meta"):
            m = MFMDiT("MFM-XL/2", impl="torch", **kw)
        return activation_bytes_per_row(m, torch.bfloat16)

    assert est(depth=8, encoder_depth=4) < est(depth=16, encoder_depth=8) < est()
    assert est(hidden_size=768, num_heads=12) < est()
    assert est(input_size=16) < est()
    with torch.device("meta"):
        xl = MFMDiT("MFM-XL/2", impl="triton")
    assert activation_bytes_per_row(xl, torch.bfloat16) < activation_bytes_per_row(xl, torch.float32)
    assert activation_bytes_per_row(xl, torch.bfloat16, recompute=True) < activation_bytes_per_row(xl, torch.bfloat16)


def test_auto_chunk_size_bounds_and_monotone_in_budget():
    with torch.device("meta"):
        xl = MFMDiT("MFM-XL/2", impl="triton")
    per_row = activation_bytes_per_row(xl, torch.bfloat16)
    # CPU without a budget: no bound
    assert auto_chunk_size(xl, 8, 32, torch.bfloat16, "cpu") == 256
    prev = 0
    for gib in (0.01, 1, 2, 4, 8, 16, 64, 512):
        c = auto_chunk_size(xl, 8, 32, torch.bfloat16, "cpu", budget_bytes=int(gib * 2**30))
        assert 1 <= c <= 8 * 32 and c >= prev
        if c > 1:
            assert c * per_row <= 0.8 * gib * 2**30  # the chosen chunk fits the budget
        lean = auto_chunk_size(xl, 8, 32, torch.bfloat16, "cpu", budget_bytes=int(gib * 2**30), recompute=True)
        assert lean >= c
        prev = c
    assert prev == 256
    # one state: the chunk never exceeds its particles, and splits them evenly
    c = auto_chunk_size(xl, 1, 1024, torch.bfloat16, "cpu", budget_bytes=16 * 2**30)
    assert 1 <= c < 1024 and math.ceil(1024 / c) * c - 1024 < math.ceil(1024 / c)
    with pytest.raises(ValueError, match="n_particles"):
        auto_chunk_size(xl, 1, 0, torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="safety"):
        auto_chunk_size(xl, 1, 4, torch.bfloat16, "cpu", safety=1.5)


def test_plan_recomputes_only_when_plain_chunks_would_be_tiny():
    with torch.device("meta"):
        xl = MFMDiT("MFM-XL/2", impl="triton")
    roomy = plan_chunks(xl, 8, 32, torch.bfloat16, "cpu", budget_bytes=64 * 2**30)
    assert not roomy.recompute
    tight = plan_chunks(xl, 8, 32, torch.bfloat16, "cpu", budget_bytes=2 * 2**30)
    assert tight.recompute and tight.chunk_size * tight.bytes_per_row <= tight.budget_bytes
    plain_rows = tight.budget_bytes // activation_bytes_per_row(xl, torch.bfloat16)
    assert tight.chunk_size > plain_rows


def test_recompute_activations_same_gradient_fewer_saved_tensors():
    model = tiny().requires_grad_(False).eval()
    inp = draw_inputs(model)
    v, g = grads_of(model, inp, repeat=False)
    plain = saved_bytes_per_row(model, torch.float32)
    with recompute_activations(model):
        assert model.training and model.grad_checkpointing
        v_r, g_r = grads_of(model, inp, repeat=False)
        lean = saved_bytes_per_row(model, torch.float32)
    assert not model.training and not model.grad_checkpointing  # restored
    torch.testing.assert_close(v_r, v)
    torch.testing.assert_close(g_r[0], g[0])
    torch.testing.assert_close(g_r[1], g[1])
    assert lean < plain
