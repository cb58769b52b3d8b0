"""time_embed (Triton first layer + batched second layer, interpreter tier) against time_embed_ref."""
import pytest
import torch

from mfm_fast.ops.launch import poisoned_outputs
from mfm_fast.ops.time_embed import time_embed, time_embed_ref

pytestmark = pytest.mark.interpret

# (G, K, D, F): odd G and D, a non-power-of-two F, G above one tile, K = 1 with the model's F = 256
SHAPES = [(3, 5, 40, 34), (1, 1, 17, 256), (19, 2, 24, 64)]


def make(G, K, D, F, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(G, K, generator=g), torch.randn(K, D, F, generator=g) * F ** -0.5,
            torch.randn(K, D, generator=g), torch.randn(K, D, D, generator=g) * D ** -0.5,
            torch.randn(K, D, generator=g)]


def close(actual, expected, rel=1e-5, name=""):
    torch.testing.assert_close(actual, expected, rtol=rel * 10, atol=rel * expected.abs().max().item(),
                               msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_every_gradient_match_reference(shape):
    args = [a.requires_grad_() for a in make(*shape)]
    with poisoned_outputs():
        out = time_embed(*args)
        dout = torch.randn(out.shape)
        grads = torch.autograd.grad(out, args, dout)
    ref = time_embed_ref(*args)
    grads_ref = torch.autograd.grad(ref, args, dout)
    assert out.shape == (shape[0], shape[1], shape[2]) and out.dtype == torch.float32
    close(out, ref)
    for name, g, g_ref in zip(["times", "w1", "b1", "w2", "b2"], grads, grads_ref):
        assert g_ref.abs().max() > 0
        close(g, g_ref, name=f"d/d {name}")


def test_max_period_is_used():
    args = make(3, 2, 24, 64)
    for period in (100.0, 10000.0):
        close(time_embed(*args, max_period=period), time_embed_ref(*args, max_period=period))
    assert not torch.allclose(time_embed(*args, max_period=100.0), time_embed(*args))


@pytest.mark.parametrize("tangents_on", [("times", "w1", "b1", "w2", "b2"), ("times",), ("w1", "b2")])
def test_jvp_matches_reference(tangents_on):
    names = ["times", "w1", "b1", "w2", "b2"]
    args = dict(zip(names, make(3, 5, 40, 34)))
    tangents = tuple(torch.randn_like(args[n]) for n in tangents_on)

    def restrict(fn):
        return lambda *xs: fn(**{**args, **dict(zip(tangents_on, xs))})

    primals = tuple(args[n] for n in tangents_on)
    with poisoned_outputs():
        out, tan = torch.func.jvp(restrict(time_embed), primals, tangents)
    out_ref, tan_ref = torch.func.jvp(restrict(time_embed_ref), primals, tangents)
    close(out, out_ref)
    close(tan, tan_ref)


def test_registered_op_carries_the_backward_used_under_torch_compile():
    """The raw first-layer op (what torch.compile sees) differentiates like the reference with W2 = I, b2 = 0."""
    times, w1, b1, _, _ = [a.requires_grad_() for a in make(3, 2, 8, 16)]
    h = torch.ops.mfm_fast.time_embed_hidden(times, w1, b1, 10000.0)
    h_ref = time_embed_ref(times, w1, b1, torch.eye(8).expand(2, 8, 8), torch.zeros(2, 8))
    close(h, h_ref)
    dh = torch.randn_like(h)
    for g, g_ref in zip(torch.autograd.grad(h, (times, w1, b1), dh), torch.autograd.grad(h_ref, (times, w1, b1), dh)):
        close(g, g_ref)


def test_backward_through_the_jvp_tangent():
    """Losses such as LSD differentiate a jvp tangent w.r.t. the weights: ∂/∂(w1, b1, w2) of ||∂_t embed||²."""
    times, *weights = make(3, 5, 40, 34)
    tangent_t = torch.randn_like(times)
    grads = []
    for fn in (time_embed, time_embed_ref):
        ws = [w.clone().requires_grad_() for w in weights]
        _, tangent = torch.func.jvp(lambda t: fn(t, *ws), (times,), (tangent_t,))
        grads.append(torch.autograd.grad(tangent.square().sum(), ws[:3]))  # b2 does not reach the tangent
    for g, g_ref, name in zip(*grads, ["w1", "b1", "w2"]):
        close(g, g_ref, name=f"d/d {name}")


def test_frozen_weights_give_only_the_time_gradient():
    times, *weights = make(4, 5, 40, 256)
    times.requires_grad_()
    (dt,) = torch.autograd.grad(time_embed(times, *weights).square().sum(), times)
    (dt_ref,) = torch.autograd.grad(time_embed_ref(times, *weights).square().sum(), times)
    close(dt, dt_ref)


def test_bad_inputs_name_the_argument():
    times, w1, b1, w2, b2 = make(2, 3, 8, 16)
    with pytest.raises(ValueError, match="times must have shape"):
        time_embed(times[0], w1, b1, w2, b2)
    with pytest.raises(ValueError, match="w1 must have shape"):
        time_embed(times, w1[..., :15], b1, w2, b2)
    with pytest.raises(ValueError, match="w2 must have shape"):
        time_embed(times, w1, b1, w2[:, :4], b2)


@pytest.mark.gpu
def test_bf16_error_within_twice_pytorch_bf16_error():
    args = [a.cuda() for a in make(4, 5, 1152, 256)]
    exact = time_embed_ref(*[a.double() for a in args])
    low = [a.bfloat16() for a in args]
    err = lambda a: (a.double() - exact).abs().max().item()  # noqa: E731
    assert err(time_embed(*low)) <= 2 * err(time_embed_ref(*low)) + 1e-3 * exact.abs().max().item()
