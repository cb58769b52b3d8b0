"""ln_modulate: the fused Triton LayerNorm → adaLN modulate against ln_modulate_ref (output, every gradient, jvp)."""
import pytest
import torch

import mfm_fast.ops.adaln as adaln
from mfm_fast.ops.adaln import ln_modulate, ln_modulate_ref
from mfm_fast.ops.launch import poisoned_outputs

# (G groups, N particles per group, L tokens, D features): D not a power of two, N > 1, and the XL width with 2 rows
SHAPES = [(3, 1, 7, 300), (2, 3, 5, 300), (1, 2, 1, 1152)]
TOL = dict(rtol=1e-4, atol=1e-5)


def make_inputs(G, N, L, D):
    # scale of order one so that (1+scale) is far from 1 and mistakes in it cannot hide
    return torch.randn(G * N, L, D) * 3 + 1, torch.randn(G, D), torch.randn(G, D)


@pytest.mark.interpret
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_output_and_every_gradient_match_the_reference(shape):
    x, shift, scale = (t.requires_grad_() for t in make_inputs(*shape))
    with poisoned_outputs():
        y = ln_modulate(x, shift, scale)
        y_ref = ln_modulate_ref(x, shift, scale)
        torch.testing.assert_close(y, y_ref, **TOL)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, shift, scale), dy)
    for name, g, g_ref in zip(("x", "shift", "scale"), grads, torch.autograd.grad(y_ref, (x, shift, scale), dy)):
        torch.testing.assert_close(g, g_ref, **TOL, msg=lambda m: f"d{name}: {m}")


@pytest.mark.interpret
def test_gradient_of_x_alone_skips_the_parameter_reduction():
    x, shift, scale = make_inputs(2, 3, 5, 300)
    x.requires_grad_()
    with poisoned_outputs():
        dy = torch.randn_like(x)
        (dx,) = torch.autograd.grad(ln_modulate(x, shift, scale), x, dy)
    torch.testing.assert_close(dx, torch.autograd.grad(ln_modulate_ref(x, shift, scale), x, dy)[0], **TOL)


@pytest.mark.interpret
@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
def test_jvp_matches_the_reference(shape):
    primals = make_inputs(*shape)
    tangents = tuple(torch.randn_like(t) for t in primals)
    with poisoned_outputs():
        y, ty = torch.func.jvp(ln_modulate, primals, tangents)
        # a tangent for shift alone and for (x, scale): the absent ones are zero
        _, ty_shift = torch.func.jvp(lambda s: ln_modulate(primals[0], s, primals[2]), primals[1:2], tangents[1:2])
        _, ty_xs = torch.func.jvp(lambda a, c: ln_modulate(a, primals[1], c), primals[::2], tangents[::2])
    y_ref, ty_ref = torch.func.jvp(ln_modulate_ref, primals, tangents)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(ty, ty_ref, **TOL)
    G, N, L, D = shape
    torch.testing.assert_close(ty_shift, tangents[1][:, None, None].expand(G, N, L, D).reshape(G * N, L, D))
    _, ty_xs_ref = torch.func.jvp(lambda a, c: ln_modulate_ref(a, primals[1], c), primals[::2], tangents[::2])
    torch.testing.assert_close(ty_xs, ty_xs_ref, **TOL)


def tangent_gradients(fn, primals, tangents, weight):
    """Gradients of <weight, jvp tangent> w.r.t. primals and tangents (reverse over forward, as a loss on ∂_u X)."""
    _, tangent = torch.func.jvp(fn, primals, tangents)
    wrt = primals + tangents
    grads = torch.autograd.grad((tangent * weight).sum(), wrt, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]


@pytest.mark.interpret
def test_gradient_through_the_jvp_tangent():
    primals = tuple(t.requires_grad_() for t in make_inputs(2, 3, 5, 300))
    tangents = tuple(torch.randn_like(t).requires_grad_() for t in primals)
    weight = torch.randn_like(primals[0])
    with poisoned_outputs():
        got = tangent_gradients(ln_modulate, primals, tangents, weight)
    for name, g, w in zip(("x", "shift", "scale", "tx", "tshift", "tscale"), got,
                          tangent_gradients(ln_modulate_ref, primals, tangents, weight)):
        torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"d{name}: {m}")


@pytest.mark.interpret
def test_vjp_and_forward_ad_go_through_the_fused_op():
    primals = make_inputs(2, 3, 5, 300)
    dy = torch.randn_like(primals[0])
    _, vjp = torch.func.vjp(ln_modulate, *primals)
    _, vjp_ref = torch.func.vjp(ln_modulate_ref, *primals)
    for g, g_ref in zip(vjp(dy), vjp_ref(dy)):
        torch.testing.assert_close(g, g_ref, **TOL)
    tx = torch.randn_like(primals[0])
    _, ty_ref = torch.func.jvp(lambda a: ln_modulate_ref(a, *primals[1:]), primals[:1], (tx,))
    with torch.autograd.forward_ad.dual_level():
        y = ln_modulate(torch.autograd.forward_ad.make_dual(primals[0], tx), *primals[1:])
        torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(y).tangent, ty_ref, **TOL)


@pytest.mark.interpret
def test_parameter_gradients_are_deterministic_with_many_rows_per_program(monkeypatch):
    # 33 rows per group, ~5 programs: each program loops over 2 row tiles of 8 rows and a group's
    # parameter-gradient partials come from 3 programs
    monkeypatch.setattr(adaln, "BWD_PROGRAMS", 5)
    x, shift, scale = (t.requires_grad_() for t in make_inputs(2, 3, 11, 300))
    dy = torch.randn_like(x)
    runs = [torch.autograd.grad(ln_modulate(x, shift, scale), (x, shift, scale), dy) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    for g, g_ref in zip(runs[0], torch.autograd.grad(ln_modulate_ref(x, shift, scale), (x, shift, scale), dy)):
        torch.testing.assert_close(g, g_ref, **TOL)


@pytest.mark.interpret
def test_registered_op_carries_the_backward_that_torch_compile_uses():
    x, shift, scale = (t.requires_grad_() for t in make_inputs(2, 3, 5, 300))
    with poisoned_outputs():
        y = torch.ops.mfm_fast.ln_modulate(x, shift, scale, 1e-6)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, shift, scale), dy)
    y_ref = ln_modulate_ref(x, shift, scale)
    torch.testing.assert_close(y, y_ref, **TOL)
    for g, g_ref in zip(grads, torch.autograd.grad(y_ref, (x, shift, scale), dy)):
        torch.testing.assert_close(g, g_ref, **TOL)


@pytest.mark.interpret
def test_non_contiguous_inputs_and_bad_shapes():
    x, shift, scale = make_inputs(2, 3, 5, 300)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, not contiguous
    torch.testing.assert_close(ln_modulate(xt, shift, scale), ln_modulate_ref(x, shift, scale), **TOL)
    with pytest.raises(ValueError, match="shift"):
        ln_modulate(x, shift[:, :-1], scale)
    with pytest.raises(ValueError, match="scale"):
        ln_modulate(x, shift, scale[:1])
    with pytest.raises(ValueError, match="x has 6 rows"):
        ln_modulate(x, torch.randn(4, 300), torch.randn(4, 300))
    with pytest.raises(TypeError, match="float32"):
        ln_modulate(x.double(), shift.double(), scale.double())


@pytest.mark.gpu
def test_bf16_error_is_within_twice_the_pytorch_bf16_error():
    G, N, L, D = 16, 4, 256, 1152
    x32, shift32, scale32 = (t.cuda() for t in make_inputs(G, N, L, D))
    shift32, scale32 = shift32 * 0.3, scale32 * 0.3
    dy32 = torch.randn_like(x32)

    def run(fn, dtype):
        ins = [t.to(dtype).requires_grad_() for t in (x32, shift32, scale32)]
        y = fn(*ins)
        return [y.float()] + [g.float() for g in torch.autograd.grad(y, ins, dy32.to(dtype))]

    exact = run(ln_modulate_ref, torch.float32)
    for name, fast, torch_bf16, ref in zip(("y", "dx", "dshift", "dscale"), run(ln_modulate, torch.bfloat16),
                                           run(ln_modulate_ref, torch.bfloat16), exact):
        err, err_torch = (fast - ref).abs().max().item(), (torch_bf16 - ref).abs().max().item()
        assert err <= 2 * err_torch + 1e-2 * ref.abs().max().item(), (name, err, err_torch)


@pytest.mark.gpu
def test_compiled_forward_and_backward_equal_eager():
    x, shift, scale = (t.cuda().requires_grad_() for t in make_inputs(4, 2, 64, 1152))
    dy = torch.randn_like(x)

    def f(a, b, c):
        return ln_modulate(a, b, c)

    outs = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        y = fn(x, shift, scale)
        outs.append([y, *torch.autograd.grad(y, (x, shift, scale), dy)])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_opcheck_of_the_registered_op():
    x, shift, scale = (t.cuda().requires_grad_() for t in make_inputs(4, 2, 64, 1152))
    torch.library.opcheck(torch.ops.mfm_fast.ln_modulate.default, (x, shift, scale, 1e-6))


@pytest.mark.interpret
def test_row_warps_override_changes_the_launch_not_the_values(monkeypatch):
    from mfm_fast.ops.launch import row_config
    x, shift, scale = make_inputs(2, 3, 5, 300)
    default = ln_modulate(x, shift, scale)
    assert row_config(1152) == (2048, 2, 8)
    monkeypatch.setenv("MFM_FAST_ROW_WARPS", "16")
    assert row_config(1152) == (2048, 2, 16)
    assert torch.equal(ln_modulate(x, shift, scale), default)
    monkeypatch.setenv("MFM_FAST_ROW_WARPS", "12")
    with pytest.raises(ValueError, match="MFM_FAST_ROW_WARPS"):
        ln_modulate(x, shift, scale)
