"""Property tests of every fused op against its `_ref` twin (interpreter tier, fp32 on CPU): values, every
gradient, and the jvp tangent, over drawn shapes — odd feature widths and token counts, groups G × particles N,
strided (non-contiguous) inputs — plus `torch.library.opcheck` on every registered `mfm_fast::` op.

Hypothesis draws the shapes and a seed; the tensors come from that seed. Examples are few and derandomised, so the
file runs in a bounded time and the same cases every run. Under the interpreter opcheck checks the schema and the
autograd registration; its fake-tensor and AOT-dispatch checks need real Triton launches (the interpreter reads
tensor data, which fake tensors do not have) and run in the gpu tier.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mfm_fast.ops.adaln import ln_modulate, ln_modulate_ref
from mfm_fast.ops.attention import attention, attention_ref
from mfm_fast.ops.bias_gelu import bias_gelu, bias_gelu_ref
from mfm_fast.ops.gate_residual import gate_residual, gate_residual_ln_modulate, gate_residual_ln_modulate_ref, \
    gate_residual_ref
from mfm_fast.ops.input_stage import input_stage, input_stage_ref
from mfm_fast.ops.launch import poisoned_outputs
from mfm_fast.ops.time_embed import time_embed, time_embed_ref

# the interpreter evaluates σ with numpy, whose exp overflows (harmlessly, to σ = 0) for large negative inputs
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

FUZZ = settings(max_examples=10, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
TOL = dict(rtol=2e-4, atol=2e-5)

groups = st.integers(1, 3)
particles = st.integers(1, 3)
tokens = st.sampled_from([1, 2, 5, 7, 9])
widths = st.sampled_from([1, 3, 17, 33, 72, 131])
seeds = st.integers(0, 2 ** 31 - 1)


def randn(gen, *shape, strided=False, scale=1.0, shift=0.0):
    """A fresh normal tensor; `strided` makes it a non-contiguous view (every other column of a wider tensor)."""
    if strided:
        wide = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen) * scale + shift
        out = wide[..., ::2]
        assert not out.is_contiguous() or shape[-1] == 1
        return out
    return torch.randn(*shape, generator=gen) * scale + shift


def check_all(fused, ref, inputs, name):
    """Outputs, the gradient of every input (random upstream gradients on every output) and the jvp tangent of
    every output for random tangents of every input."""
    gen = torch.Generator().manual_seed(1234)
    ins = [t.detach().requires_grad_() for t in inputs]  # detach keeps a strided view strided
    with poisoned_outputs():
        out = fused(*ins)
    want = ref(*ins)
    outs, wants = (out, want) if isinstance(out, tuple) else ((out,), (want,))
    for i, (o, w) in enumerate(zip(outs, wants)):
        assert o.shape == w.shape and o.dtype == w.dtype, (name, i)
        torch.testing.assert_close(o, w, **TOL, msg=lambda m: f"{name} output {i}: {m}")
    ups = [torch.randn(o.shape, generator=gen) for o in outs]
    diff = [t for t in ins if t.requires_grad]
    got = torch.autograd.grad(outs, diff, ups, allow_unused=True)
    exp = torch.autograd.grad(wants, diff, ups, allow_unused=True)
    for i, (g, e) in enumerate(zip(got, exp)):
        assert e is not None, (name, i)
        torch.testing.assert_close(g, e, **TOL, msg=lambda m: f"{name} gradient of input {i}: {m}")
    primals = [t.detach() for t in ins]
    tangents = [torch.randn(t.shape, generator=gen) for t in primals]
    with poisoned_outputs():
        _, t_got = torch.func.jvp(fused, tuple(primals), tuple(tangents))
    _, t_exp = torch.func.jvp(ref, tuple(primals), tuple(tangents))
    t_got, t_exp = (t_got, t_exp) if isinstance(t_got, tuple) else ((t_got,), (t_exp,))
    for i, (a, b) in enumerate(zip(t_got, t_exp)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{name} jvp tangent {i}: {m}")


# ---------------------------------------------------------------------------------------------- values, grads, jvp
@pytest.mark.interpret
@FUZZ
@given(G=groups, N=particles, L=tokens, D=widths, strided=st.booleans(), seed=seeds)
def test_ln_modulate_matches_its_reference(G, N, L, D, strided, seed):
    g = torch.Generator().manual_seed(seed)
    ins = (randn(g, G * N, L, D, strided=strided, scale=2, shift=1), randn(g, G, D, strided=strided),
           randn(g, G, D))
    check_all(ln_modulate, ln_modulate_ref, ins, "ln_modulate")


@pytest.mark.interpret
@FUZZ
@given(G=groups, N=particles, L=tokens, D=widths, strided=st.booleans(), seed=seeds)
def test_gate_residual_matches_its_reference(G, N, L, D, strided, seed):
    g = torch.Generator().manual_seed(seed)
    ins = (randn(g, G * N, L, D), randn(g, G * N, L, D, strided=strided), randn(g, G, D, strided=strided))
    check_all(gate_residual, gate_residual_ref, ins, "gate_residual")


@pytest.mark.interpret
@FUZZ
@given(G=groups, N=particles, L=tokens, D=widths, strided=st.booleans(), seed=seeds)
def test_gate_residual_ln_modulate_matches_its_reference(G, N, L, D, strided, seed):
    g = torch.Generator().manual_seed(seed)
    ins = (randn(g, G * N, L, D, strided=strided, scale=2, shift=1), randn(g, G * N, L, D), randn(g, G, D),
           randn(g, G, D, strided=strided), randn(g, G, D))
    check_all(gate_residual_ln_modulate, gate_residual_ln_modulate_ref, ins, "gate_residual_ln_modulate")


@pytest.mark.interpret
@FUZZ
@given(G=groups, N=particles, L=tokens, D=widths, strided=st.booleans(), seed=seeds)
def test_input_stage_matches_its_reference(G, N, L, D, strided, seed):
    g = torch.Generator().manual_seed(seed)
    ins = (randn(g, G * N, L, D, strided=strided), randn(g, L, D), randn(g, G, L, D, strided=strided),
           randn(g, G, D), randn(g, G, D, strided=strided))
    check_all(input_stage, input_stage_ref, ins, "input_stage")


@pytest.mark.interpret
@FUZZ
@given(lead=st.lists(st.integers(1, 5), min_size=0, max_size=2), F=widths, strided=st.booleans(), seed=seeds)
def test_bias_gelu_matches_its_reference(lead, F, strided, seed):
    g = torch.Generator().manual_seed(seed)
    ins = (randn(g, *lead, F, strided=strided, scale=2), randn(g, F))
    check_all(bias_gelu, bias_gelu_ref, ins, "bias_gelu")


@pytest.mark.interpret
@FUZZ
@given(G=st.integers(1, 19), K=st.integers(1, 5), D=st.sampled_from([3, 17, 40]), F=st.sampled_from([2, 34, 64]),
       strided=st.booleans(), seed=seeds)
def test_time_embed_matches_its_reference(G, K, D, F, strided, seed):
    g = torch.Generator().manual_seed(seed)
    ins = (torch.rand(G, K, generator=g), randn(g, K, D, F, strided=strided, scale=F ** -0.5), randn(g, K, D),
           randn(g, K, D, D, strided=strided, scale=D ** -0.5), randn(g, K, D))
    check_all(time_embed, time_embed_ref, ins, "time_embed")


@pytest.mark.interpret
@FUZZ
@given(R=st.integers(1, 3), H=st.integers(1, 3), L=tokens, Dh=st.sampled_from([3, 16, 72]), strided=st.booleans(),
       seed=seeds)
def test_attention_dispatch_matches_its_reference(R, H, L, Dh, strided, seed):
    g = torch.Generator().manual_seed(seed)
    ins = tuple(randn(g, R, H, L, Dh, strided=strided) for _ in range(3))
    check_all(attention, attention_ref, ins, "attention")


# ---------------------------------------------------------------------------------------------- opcheck
def _req(*ts):
    return tuple(t.requires_grad_() for t in ts)


def _opcheck_cases():
    """(op, args) for every mfm_fast:: op, small odd shapes; inputs of ops with a registered autograd require grad
    so the autograd registration and the traced backward are checked too."""
    g = torch.Generator().manual_seed(0)
    G, N, L, D = 2, 3, 5, 17
    x, br = randn(g, G * N, L, D), randn(g, G * N, L, D)
    gate, shift, scale = randn(g, G, D), randn(g, G, D), randn(g, G, D)
    h, pos, hc = randn(g, G * N, L, D), randn(g, L, D), randn(g, G, L, D)
    times, w1, b1 = torch.rand(3, 2, generator=g), randn(g, 2, D, 34, scale=0.2), randn(g, 2, D)
    m = torch.ops.mfm_fast
    c = lambda t: t.clone()  # noqa: E731
    q, k, v = randn(g, 2, 2, 5, 16), randn(g, 2, 2, 7, 16), randn(g, 2, 2, 7, 16)
    scores = torch.einsum("rhld,rhmd->rhlm", q, k) / 4.0
    o, lse = scores.softmax(-1) @ v, torch.logsumexp(scores, -1)  # no kernel at collection time
    return {
        "attention": (m.attention.default, _req(c(q), c(k), c(v))),
        "attention_bwd": (m.attention_bwd.default, (randn(g, 2, 2, 5, 16), q, k, v, o, lse)),
        "attention_jvp": (m.attention_jvp.default, (*_req(c(q), c(k), c(v)), randn(g, 2, 2, 5, 16), None,
                                                    randn(g, 2, 2, 7, 16))),
        "ln_modulate": (m.ln_modulate.default, (*_req(c(x), c(shift), c(scale)), 1e-6)),
        "ln_modulate_bwd": (m.ln_modulate_bwd.default, (randn(g, G * N, L, D), x, scale, 1e-6, True)),
        "ln_modulate_jvp": (m.ln_modulate_jvp.default, (*_req(c(x), c(scale)), randn(g, G * N, L, D), None,
                                                        randn(g, G, D), 1e-6)),
        "gate_residual": (m.gate_residual.default, _req(c(x), c(br), c(gate))),
        "gate_residual_ln_modulate": (m.gate_residual_ln_modulate.default,
                                      (*_req(c(x), c(br), c(gate), c(shift), c(scale)), 1e-6)),
        "gate_residual_bwd": (m.gate_residual_bwd.default, (x, br, gate, scale, randn(g, G * N, L, D),
                                                            randn(g, G * N, L, D), 1e-6, True, True)),
        "gate_residual_jvp": (m.gate_residual_jvp.default, (*_req(c(x), c(br), c(gate), c(scale)),
                                                            randn(g, G * N, L, D), None, randn(g, G, D),
                                                            randn(g, G, D), None, 1e-6)),
        "input_stage": (m.input_stage.default, _req(c(h), c(pos), c(hc), c(shift), c(scale))),
        "input_stage_bwd": (m.input_stage_bwd.default, (randn(g, G * N, L, D), hc, scale, True, True)),
        "input_stage_jvp": (m.input_stage_jvp.default, (G * N, *_req(c(hc), c(scale)), randn(g, G * N, L, D), None,
                                                        randn(g, G, L, D), randn(g, G, D), None, torch.float32)),
        "bias_gelu_fwd": (m.bias_gelu_fwd.default, _req(randn(g, 7, D), randn(g, D))),
        "bias_gelu_bwd": (m.bias_gelu_bwd.default, (randn(g, 7, D), randn(g, 7, D), randn(g, D), True)),
        "bias_gelu_jvp": (m.bias_gelu_jvp.default, (*_req(randn(g, 7, D), randn(g, D)), randn(g, 7, D), None)),
        "time_embed_hidden": (m.time_embed_hidden.default, (*_req(c(times), c(w1), c(b1)), 10000.0)),
        "time_embed_hidden_bwd": (m.time_embed_hidden_bwd.default, (randn(g, 3, 2, D), times, w1, b1, 10000.0,
                                                                    True, True)),
        "time_embed_hidden_jvp": (m.time_embed_hidden_jvp.default, (*_req(c(times), c(w1), c(b1)), 10000.0,
                                                                    torch.rand(3, 2, generator=g), None,
                                                                    randn(g, 2, D))),
    }


def _registered_ops() -> set:
    """Every mfm_fast:: op (importing the op modules above registered them all)."""
    return {name.split("::")[1].split(".")[0] for name in torch._C._dispatch_get_all_op_names()
            if name.startswith("mfm_fast::")}


def test_opcheck_covers_every_registered_op():
    assert _registered_ops() == set(_opcheck_cases())


@pytest.mark.interpret
@pytest.mark.parametrize("name", sorted(_opcheck_cases()))
def test_opcheck_schema_and_autograd_registration(name):
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration"))


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(_opcheck_cases()))
def test_opcheck_every_utility_on_cuda(name):
    op, args = _opcheck_cases()[name]
    args = tuple(a.detach().cuda().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a for a in args)
    torch.library.opcheck(op, args)
