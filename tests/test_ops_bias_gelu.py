"""bias_gelu (Triton, interpreter tier) against bias_gelu_ref: output, both gradients, jvp tangents."""
import pytest
import torch

from mfm_fast.ops import launch
from mfm_fast.ops.bias_gelu import bias_gelu, bias_gelu_ref
from mfm_fast.ops.launch import poisoned_outputs

# the interpreter evaluates σ with numpy, whose exp overflows (harmlessly, to σ = 0) for large negative inputs
pytestmark = [pytest.mark.interpret, pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")]

SHAPES = [(3, 7, 300), (2, 17, 1152), (5, 33), (70,), (2, 3, 1, 4600)]


def close(actual, expected, rel=2e-6):
    torch.testing.assert_close(actual, expected, rtol=rel * 10, atol=rel * expected.abs().max().item())


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_match_reference(shape):
    x = (torch.randn(shape) * 3).requires_grad_()  # wide range: both tails of the GELU
    bias = torch.randn(shape[-1]).requires_grad_()
    with poisoned_outputs():
        y = bias_gelu(x, bias)
        dy = torch.randn(shape)
        dx, db = torch.autograd.grad(y, (x, bias), dy)
    y_ref = bias_gelu_ref(x, bias)
    dx_ref, db_ref = torch.autograd.grad(y_ref, (x, bias), dy)
    assert y.shape == x.shape and y.dtype == x.dtype
    close(y, y_ref)
    close(dx, dx_ref)
    close(db, db_ref, rel=1e-5)


@pytest.mark.parametrize("which", ["both", "x", "bias"])
def test_jvp_matches_reference(which):
    x, bias = torch.randn(3, 7, 300) * 2, torch.randn(300)
    tx, tb = torch.randn_like(x), torch.randn_like(bias)
    if which == "x":
        fns = [lambda x, f=f: f(x, bias) for f in (bias_gelu, bias_gelu_ref)]
        primals, tangents = (x,), (tx,)
    elif which == "bias":
        fns = [lambda b, f=f: f(x, b) for f in (bias_gelu, bias_gelu_ref)]
        primals, tangents = (bias,), (tb,)
    else:
        fns = [bias_gelu, bias_gelu_ref]
        primals, tangents = (x, bias), (tx, tb)
    with poisoned_outputs():
        y, ty = torch.func.jvp(fns[0], primals, tangents)
    y_ref, ty_ref = torch.func.jvp(fns[1], primals, tangents)
    close(y, y_ref)
    close(ty, ty_ref)


def test_backward_through_the_jvp_tangent():
    """Losses such as LSD differentiate a jvp tangent w.r.t. the weights: ∂/∂bias of ||∂_u bias_gelu(u·x, bias)||²."""
    x, u = torch.randn(4, 30), torch.rand(4, 1)
    grads = []
    for fn in (bias_gelu, bias_gelu_ref):
        bias = torch.linspace(-2, 2, 30).requires_grad_()
        _, tangent = torch.func.jvp(lambda u_: fn(u_ * x, bias), (u,), (torch.ones_like(u),))
        grads.append(torch.autograd.grad(tangent.square().sum(), bias)[0])
    close(grads[0], grads[1], rel=1e-5)


def test_bias_gradient_is_deterministic_and_skipped_when_frozen():
    x = torch.randn(300, 130).requires_grad_()
    bias = torch.randn(130).requires_grad_()
    dy = torch.randn(300, 130)
    db1 = torch.autograd.grad(bias_gelu(x, bias), bias, dy)[0]
    db2 = torch.autograd.grad(bias_gelu(x, bias), bias, dy)[0]
    assert torch.equal(db1, db2)
    frozen = bias.detach()
    dx = torch.autograd.grad(bias_gelu(x, frozen), x, dy)[0]
    close(dx, torch.autograd.grad(bias_gelu_ref(x, frozen), x, dy)[0])


def test_registered_op_carries_the_backward_used_under_torch_compile():
    x, bias = torch.randn(5, 70).requires_grad_(), torch.randn(70).requires_grad_()
    y = torch.ops.mfm_fast.bias_gelu_fwd(x, bias)
    dy = torch.randn_like(y)
    for g, g_ref in zip(torch.autograd.grad(y, (x, bias), dy),
                        torch.autograd.grad(bias_gelu_ref(x, bias), (x, bias), dy)):
        close(g, g_ref, rel=1e-5)


def test_non_contiguous_input():
    x = torch.randn(40, 2, 64).transpose(0, 1)
    bias = torch.randn(64)
    close(bias_gelu(x, bias), bias_gelu_ref(x, bias))


def test_bad_inputs_name_the_argument(monkeypatch):
    with pytest.raises(ValueError, match="bias must have shape"):
        bias_gelu(torch.randn(4, 8), torch.randn(7))
    with pytest.raises(TypeError, match="fp32 only; x, bias not float32"):
        bias_gelu(torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(8, dtype=torch.bfloat16))
    monkeypatch.setattr(launch, "interpreter_on", lambda: False)
    with pytest.raises(RuntimeError, match="bias_gelu: CPU tensors need the Triton interpreter"):
        bias_gelu(torch.randn(4, 8), torch.randn(8))


@pytest.mark.gpu
def test_bf16_error_within_twice_pytorch_bf16_error():
    x = torch.randn(256 * 16, 4608, device="cuda")
    bias = torch.randn(4608, device="cuda")
    dy = torch.randn_like(x)
    exact = bias_gelu_ref(x.double(), bias.double())
    xb, bb = x.bfloat16().requires_grad_(), bias.bfloat16().requires_grad_()
    xr, br = x.bfloat16().requires_grad_(), bias.bfloat16().requires_grad_()
    fast, torch_path = bias_gelu(xb, bb), bias_gelu_ref(xr, br)
    err = lambda a, b: (a.double() - b.double()).abs().max().item()  # noqa: E731
    assert err(fast, exact) <= 2 * err(torch_path, exact) + 1e-3
    x64, b64 = x.double().requires_grad_(), bias.double().requires_grad_()
    g_exact = torch.autograd.grad(bias_gelu_ref(x64, b64), (x64, b64), dy.double())
    g_fast = torch.autograd.grad(fast, (xb, bb), dy.bfloat16())
    g_torch = torch.autograd.grad(torch_path, (xr, br), dy.bfloat16())
    for a, b, e in zip(g_fast, g_torch, g_exact):
        assert err(a, e) <= 2 * err(b, e) + 1e-3 * e.abs().max().item()
