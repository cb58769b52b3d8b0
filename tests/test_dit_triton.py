"""MFMDiT(impl="triton") against MFMDiT(impl="torch") with the same (randomised) weights.

interpret tier: fp32 under TRITON_INTERPRET=1, a tiny model with the XL/2 head dim 72 and particle groups —
outputs, gradients w.r.t. xbar, x and every weight, and torch.func.jvp through the whole network.
gpu tier: MFM-XL/2 in bf16, fast path vs the PyTorch bf16 path, both against an fp32 reference; torch.compile.
"""
import copy

import pytest
import torch

from mfm_fast.models.dit import MFMDiT

TINY = dict(input_size=4, depth=2, encoder_depth=1, hidden_size=144, num_heads=2)  # head dim 72, 4 tokens


def randomize_(model, scale=0.1, seed=1):
    """Every weight random: the default adaLN-Zero init zeroes gates and projections, which would hide bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def pair(config="MFM-T/2", device="cpu", **overrides):
    ref = randomize_(MFMDiT(config, impl="torch", **overrides)).to(device)
    fast = copy.deepcopy(ref).set_impl("triton")
    return ref, fast


def inputs(model, groups, particles, device="cpu", dtype=torch.float32):
    ev = model.event_shape
    G, R = groups, groups * particles
    return dict(s=torch.rand(G, device=device, dtype=dtype), u=torch.rand(G, device=device, dtype=dtype),
                xbar=torch.randn(R, *ev, device=device, dtype=dtype), t=torch.rand(G, device=device, dtype=dtype),
                x=torch.randn(G, *ev, device=device, dtype=dtype),
                y=torch.randint(0, model.config.num_classes + 1, (G,), device=device),
                cfg=torch.full((G,), 2.5, device=device, dtype=dtype))


def assert_rel(actual, expected, rel=1e-4, name=""):
    """max |a − e| ≤ rel·max |e|: relative to the tensor's scale."""
    err = (actual - expected).abs().max().item()
    bound = rel * expected.abs().max().item()
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


@pytest.mark.interpret
def test_triton_model_matches_reference_outputs_and_all_gradients():
    ref, fast = pair(**TINY)
    assert fast.ops.name == "triton" and ref.ops.name == "torch"
    inp = inputs(ref, groups=2, particles=3)
    outs, grads = [], []
    for model in (ref, fast):
        xbar = inp["xbar"].clone().requires_grad_()
        x = inp["x"].clone().requires_grad_()
        v = model(inp["s"], inp["u"], xbar, inp["t"], x, y=inp["y"], cfg=inp["cfg"])
        w = torch.randn(v.shape, generator=torch.Generator().manual_seed(5))
        params = [p for p in model.parameters() if p.requires_grad]
        grads.append(torch.autograd.grad((v * w).sum(), [xbar, x, *params]))
        outs.append(v)
    assert outs[0].shape == inp["xbar"].shape
    assert_rel(outs[1], outs[0], name="v")
    names = ["xbar", "x"] + [n for n, p in ref.named_parameters() if p.requires_grad]
    assert len(names) == len(grads[0])
    for name, g_fast, g_ref in zip(names, grads[1], grads[0]):
        assert g_ref.abs().max() > 0, f"reference gradient of {name} is zero: the test could not fail"
        assert_rel(g_fast, g_ref, name=f"d/d {name}")


@pytest.mark.interpret
def test_triton_model_jvp_matches_reference_jvp():
    """Frozen weights: the fused jvp kernels compute every tangent."""
    ref, fast = (m.requires_grad_(False) for m in pair(**TINY))
    inp = inputs(ref, groups=2, particles=2)
    ts, tu, txbar = torch.randn(2), torch.randn(2), torch.randn_like(inp["xbar"])
    results = []
    for model in (ref, fast):
        def f(s, u, xbar):
            return model(s, u, xbar, inp["t"], inp["x"], y=inp["y"], cfg=inp["cfg"])
        results.append(torch.func.jvp(f, (inp["s"], inp["u"], inp["xbar"]), (ts, tu, txbar)))
    (v_ref, dv_ref), (v_fast, dv_fast) = results
    assert dv_ref.abs().max() > 0
    assert_rel(v_fast, v_ref, name="v")
    assert_rel(dv_fast, dv_ref, name="jvp tangent")


@pytest.mark.interpret
def test_backward_through_the_model_jvp_tangent_matches_reference():
    """LSD-style loss on ∂_u v: reverse mode through the tangent reaches every weight the reference reaches."""
    ref, fast = pair(**TINY)
    inp = inputs(ref, groups=2, particles=2)
    grads = []
    for model in (ref, fast):
        def f(u):
            return model(inp["s"], u, inp["xbar"], inp["t"], inp["x"], y=inp["y"], cfg=inp["cfg"])
        _, dv_du = torch.func.jvp(f, (inp["u"],), (torch.ones_like(inp["u"]),))
        params = [p for p in model.parameters() if p.requires_grad]
        grads.append(torch.autograd.grad(dv_du.square().sum(), params, allow_unused=True))
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    assert sum(g is not None for g in grads[0]) > len(names) // 2
    for name, g_ref, g_fast in zip(names, *grads):
        assert (g_ref is None) == (g_fast is None), name
        if g_ref is not None:
            assert_rel(g_fast, g_ref, name=f"d/d {name}")


# ------------------------------------------------------------------------------------------------ gpu tier
def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.gpu
def test_xl2_bf16_fast_error_within_twice_pytorch_bf16_error():
    torch.manual_seed(0)
    ref32 = randomize_(MFMDiT("MFM-XL/2", impl="torch"), scale=0.02).cuda()
    torch_bf16 = copy.deepcopy(ref32).to(torch.bfloat16)
    fast_bf16 = copy.deepcopy(torch_bf16).set_impl("triton")
    inp = inputs(ref32, groups=2, particles=2, device="cuda")
    with torch.no_grad():
        v32 = ref32(**inp)
        low = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in inp.items()}
        err_torch = _max_err(torch_bf16(**low), v32)
        err_fast = _max_err(fast_bf16(**low), v32)
    assert err_fast <= 2 * err_torch + 1e-3 * v32.abs().max().item(), (err_fast, err_torch)


@pytest.mark.gpu
def test_xl2_bf16_input_gradient_within_twice_pytorch_bf16_error():
    ref32 = randomize_(MFMDiT("MFM-XL/2", impl="torch"), scale=0.02).cuda().requires_grad_(False)
    torch_bf16 = copy.deepcopy(ref32).to(torch.bfloat16)
    fast_bf16 = copy.deepcopy(torch_bf16).set_impl("triton")
    inp = inputs(ref32, groups=2, particles=2, device="cuda")
    grads = []
    for model, dtype in ((ref32, torch.float32), (torch_bf16, torch.bfloat16), (fast_bf16, torch.bfloat16)):
        kw = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inp.items()}
        kw["x"] = kw["x"].clone().requires_grad_()
        grads.append(torch.autograd.grad(model(**kw).float().square().sum(), kw["x"])[0])
    g32, g_torch, g_fast = grads
    assert _max_err(g_fast, g32) <= 2 * _max_err(g_torch, g32) + 1e-3 * g32.abs().max().item()


@pytest.mark.gpu
def test_compiled_triton_model_runs_and_matches_eager():
    _, fast = pair("MFM-S/2", device="cuda")
    fast = fast.to(torch.bfloat16)
    inp = inputs(fast, groups=2, particles=2, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = fast(**inp)
        compiled = torch.compile(fast)(**inp)
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=2e-2, atol=2e-2 * eager.abs().max().item())
