"""input_stage: the fused Triton input stage against input_stage_ref (output, every gradient, jvp tangent)."""
import pytest
import torch

import mfm_fast.ops.input_stage as input_stage_module
from mfm_fast.ops.input_stage import input_stage, input_stage_ref
from mfm_fast.ops.launch import poisoned_outputs

# (G groups, N particles per group, L tokens, D features): D not a power of two, N > 1, and the XL width
SHAPES = [(3, 1, 7, 300), (2, 3, 5, 300), (1, 3, 1, 1152)]
TOL = dict(rtol=1e-4, atol=1e-5)
NAMES = ("h", "pos", "hc", "shift", "scale")


def make_inputs(G, N, L, D):
    """h (G·N, L, D), pos (L, D), hc (G, L, D), shift, scale (G, D)."""
    return (torch.randn(G * N, L, D), torch.randn(L, D), torch.randn(G, L, D) * 2, torch.randn(G, D),
            torch.randn(G, D))


def check_gradients(ins, upstream):
    with poisoned_outputs():
        got = torch.autograd.grad(input_stage(*ins), [t for t in ins if t.requires_grad], upstream)
    want = torch.autograd.grad(input_stage_ref(*ins), [t for t in ins if t.requires_grad], upstream)
    names = [n for n, t in zip(NAMES, ins) if t.requires_grad]
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"d{name}: {m}")
    return got


@pytest.mark.interpret
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_output_and_every_gradient_match_the_reference(shape):
    ins = tuple(t.requires_grad_() for t in make_inputs(*shape))
    with poisoned_outputs():
        out = input_stage(*ins)
    torch.testing.assert_close(out, input_stage_ref(*ins), **TOL)
    check_gradients(ins, torch.randn_like(out))


@pytest.mark.interpret
def test_model_case_frozen_pos_and_modulation():
    # in MFMDiT pos is a frozen buffer and, with frozen weights, only h and hc (the context x) need gradients
    h, pos, hc, shift, scale = make_inputs(2, 3, 5, 300)
    check_gradients((h.requires_grad_(), pos, hc.requires_grad_(), shift, scale), torch.randn_like(h))


@pytest.mark.interpret
@pytest.mark.parametrize("programs", [1, 6], ids=["one-program-per-token-block", "particles-split-in-3"])
def test_particle_sums_are_deterministic(monkeypatch, programs):
    # the particle sum of a (group, token block) runs in one program, or split over 3 programs (2+2+1 particles)
    # and finished in a fixed order
    monkeypatch.setattr(input_stage_module, "BWD_PROGRAMS", programs)
    ins = tuple(t.requires_grad_() for t in make_inputs(2, 5, 3, 300))
    up = torch.randn(10, 3, 300)
    first, second = check_gradients(ins, up), check_gradients(ins, up)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


@pytest.mark.interpret
@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
def test_jvp_matches_the_reference(shape):
    primals = make_inputs(*shape)
    tangents = tuple(torch.randn_like(t) for t in primals)
    with poisoned_outputs():
        _, got = torch.func.jvp(input_stage, primals, tangents)
        # tangents for the context branch only (hc, scale), as a value gradient w.r.t. x would use
        ctx = lambda c, s: input_stage(primals[0], primals[1], c, primals[3], s)  # noqa: E731
        _, got_ctx = torch.func.jvp(ctx, (primals[2], primals[4]), (tangents[2], tangents[4]))
    torch.testing.assert_close(got, torch.func.jvp(input_stage_ref, primals, tangents)[1], **TOL)
    ctx_ref = lambda c, s: input_stage_ref(primals[0], primals[1], c, primals[3], s)  # noqa: E731
    _, want_ctx = torch.func.jvp(ctx_ref, (primals[2], primals[4]), (tangents[2], tangents[4]))
    torch.testing.assert_close(got_ctx, want_ctx, **TOL)


@pytest.mark.interpret
def test_gradient_through_the_jvp_tangent():
    primals = tuple(t.requires_grad_() for t in make_inputs(2, 3, 5, 300))
    tangents = tuple(torch.randn_like(t).requires_grad_() for t in primals)
    weight = torch.randn(6, 5, 300)

    def tangent_gradients(fn):
        _, tangent = torch.func.jvp(fn, primals, tangents)
        wrt = primals + tangents
        grads = torch.autograd.grad((tangent * weight).sum(), wrt, allow_unused=True)
        return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]

    with poisoned_outputs():
        got = tangent_gradients(input_stage)
    names = NAMES + tuple(f"t{n}" for n in NAMES)
    for name, g, w in zip(names, got, tangent_gradients(input_stage_ref)):
        torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"d{name}: {m}")


@pytest.mark.interpret
def test_registered_op_carries_the_backward_that_torch_compile_uses():
    ins = tuple(t.requires_grad_() for t in make_inputs(2, 3, 5, 300))
    with poisoned_outputs():
        out = torch.ops.mfm_fast.input_stage(*ins)
        up = torch.randn_like(out)
        got = torch.autograd.grad(out, ins, up)
    for name, g, w in zip(NAMES, got, torch.autograd.grad(input_stage_ref(*ins), ins, up)):
        torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"d{name}: {m}")


@pytest.mark.interpret
def test_bad_shapes_name_the_argument():
    h, pos, hc, shift, scale = make_inputs(2, 3, 5, 300)
    with pytest.raises(ValueError, match="pos"):
        input_stage(h, pos[:4], hc, shift, scale)
    with pytest.raises(ValueError, match="hc"):
        input_stage(h, pos, hc[:, :4], shift, scale)
    with pytest.raises(ValueError, match="shift"):
        input_stage(h, pos, hc, shift[:1], scale)
    with pytest.raises(ValueError, match="not a multiple"):
        input_stage(h, pos, torch.randn(4, 5, 300), torch.randn(4, 300), torch.randn(4, 300))


@pytest.mark.gpu
def test_bf16_error_is_within_twice_the_pytorch_bf16_error():
    exact_ins = [t.cuda() for t in make_inputs(16, 4, 256, 1152)]
    up = torch.randn_like(exact_ins[0])

    def run(fn, dtype):
        ins = [t.to(dtype).requires_grad_() for t in exact_ins]
        out = fn(*ins)
        return [out.float()] + [g.float() for g in torch.autograd.grad(out, ins, up.to(dtype))]

    names = ("out",) + tuple(f"d{n}" for n in NAMES)
    exact = run(input_stage_ref, torch.float32)
    for name, fast, torch_bf16, ref in zip(names, run(input_stage, torch.bfloat16),
                                           run(input_stage_ref, torch.bfloat16), exact):
        err, err_torch = (fast - ref).abs().max().item(), (torch_bf16 - ref).abs().max().item()
        assert err <= 2 * err_torch + 1e-3 * ref.abs().max().item(), (name, err, err_torch)


@pytest.mark.gpu
def test_compiled_forward_and_backward_equal_eager():
    ins = [t.cuda().requires_grad_() for t in make_inputs(4, 2, 64, 1152)]
    up = torch.randn_like(ins[0])

    def f(*args):
        return input_stage(*args)

    results = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        out = fn(*ins)
        results.append([out, *torch.autograd.grad(out, ins, up)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_opcheck_of_the_registered_op():
    ins = [t.cuda().requires_grad_() for t in make_inputs(4, 2, 64, 1152)]
    torch.library.opcheck(torch.ops.mfm_fast.input_stage.default, tuple(ins))
