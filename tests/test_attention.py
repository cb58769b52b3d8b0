"""attention dispatch: declared capabilities, reasons, head-dim padding for flash kernels, jvp-capable path."""
import types

import pytest
import torch
import torch.nn.functional as F

from mfm_fast.ops import attention as att
from mfm_fast.ops.attention import attention, attention_backends, attention_ref, backend_table
from mfm_fast.ops.launch import interpreter_on

# the fused Triton attention (with its jvp) is a CPU backend only under the interpreter
CPU_BACKENDS = ["sdpa", "triton", "math"] if interpreter_on() else ["sdpa", "math"]


def qkv(shape=(3, 2, 17, 72), dtype=torch.float32, device="cpu"):
    return [torch.randn(shape, dtype=dtype, device=device) for _ in range(3)]


def test_cpu_dispatch_matches_reference_with_gradients():
    q, k, v = [t.requires_grad_() for t in qkv()]
    table = attention_backends(q, k, v)
    assert [name for name, ok, _ in table if ok] == CPU_BACKENDS
    out, out_ref = attention(q, k, v), attention_ref(q, k, v)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    dout = torch.randn_like(out)
    for g, g_ref in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(out_ref, (q, k, v), dout)):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


def test_jvp_takes_the_jvp_capable_path_and_matches_reference():
    q, k, v = qkv()
    tangents = tuple(torch.randn_like(t) for t in (q, k, v))
    chosen = []

    def f(q, k, v):
        chosen.append(att.select_backend(q, k, v).name)
        return attention(q, k, v)

    out, tan = torch.func.jvp(f, (q, k, v), tangents)
    out_ref, tan_ref = torch.func.jvp(attention_ref, (q, k, v), tangents)
    assert chosen == ["triton" if interpreter_on() else "math"]
    torch.testing.assert_close(tan, tan_ref, rtol=1e-5, atol=1e-5)
    assert attention_backends(q, k, v, need_jvp=True)[3][1] is False  # sdpa declares no jvp rule
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(q, tangents[0])
        assert att.needs_jvp(dual, k, v) and not att.needs_jvp(q, k, v)


def _fake_gpu(monkeypatch, capability, installed):
    monkeypatch.setattr(att, "_cuda_capability", lambda device: capability)
    monkeypatch.setattr(att, "_import", lambda name: types.SimpleNamespace() if name in installed else None)


@pytest.mark.parametrize("capability, installed, dtype, need_jvp, expected", [
    ((9, 0), {"flash_attn_interface", "flash_attn", "xformers.ops"}, torch.bfloat16, False, "fa3"),
    ((8, 0), {"flash_attn_interface", "flash_attn", "xformers.ops"}, torch.bfloat16, False, "fa2"),
    ((9, 0), {"flash_attn", "xformers.ops"}, torch.bfloat16, False, "fa2"),
    ((9, 0), {"flash_attn_interface", "flash_attn", "xformers.ops"}, torch.float32, False, "xformers"),
    ((7, 5), {"flash_attn", "xformers.ops"}, torch.float16, False, "xformers"),
    ((9, 0), set(), torch.bfloat16, False, "sdpa"),
    ((9, 0), {"flash_attn_interface", "flash_attn", "xformers.ops"}, torch.bfloat16, True, "math"),
])
def test_declared_capabilities_pick_the_first_fitting_backend(monkeypatch, capability, installed, dtype, need_jvp,
                                                              expected):
    _fake_gpu(monkeypatch, capability, installed)
    table = backend_table("cuda", dtype, 72, need_jvp)
    assert [name for name, _, _ in table] == ["fa3", "fa2", "xformers", "sdpa", "triton", "math"]
    assert next(name for name, ok, _ in table if ok) == expected
    for _, ok, reasons in table:
        assert ok == (not reasons)


def test_no_fitting_backend_lists_every_reason(monkeypatch):
    monkeypatch.setenv("MFM_FAST_ATTENTION", "fa2,xformers")
    q, k, v = qkv()
    with pytest.raises(RuntimeError) as e:
        attention(q, k, v)
    msg = str(e.value)
    for name in ("fa3", "fa2", "xformers", "sdpa", "math"):
        assert f"  {name}: " in msg
    assert "needs a CUDA device" in msg and "needs float16/bfloat16" in msg and "excluded by" in msg
    monkeypatch.setenv("MFM_FAST_ATTENTION", "flash")
    with pytest.raises(ValueError, match="unknown backends"):
        attention(q, k, v)


def test_bad_shapes_are_named():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="do not fit"):
        attention(q, k[..., :64], v)
    with pytest.raises(ValueError, match="4-D"):
        attention(q[0], k, v)


def test_flash_call_pads_head_dim_72_to_96_with_the_original_scale():
    """The FA2/FA3 wrapper on CPU with a stand-in kernel that only accepts the padded head dim."""
    seen = []

    def fake_flash(q, k, v, softmax_scale):  # flash layout (B, L, H, D)
        seen.append(q.shape[-1])
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             scale=softmax_scale)
        return out.transpose(1, 2), None  # like FA3 releases that also return the log-sum-exp

    q, k, v = qkv()
    out = att._run_flash(fake_flash, q, k, v, att._FA2_DIMS)
    assert seen == [96]
    torch.testing.assert_close(out, attention_ref(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_bf16_xl2_shape_error_within_twice_sdpa_bf16_error():
    q, k, v = qkv((4, 16, 256, 72), device="cuda")
    exact = attention_ref(q.double(), k.double(), v.double())
    low = [t.bfloat16() for t in (q, k, v)]
    err = lambda a: (a.double() - exact).abs().max().item()  # noqa: E731
    assert err(attention(*low)) <= 2 * err(F.scaled_dot_product_attention(*low)) + 1e-3


def test_first_dispatch_inside_torch_compile_keeps_one_graph():
    """The backend choice probes optional packages (imports) and the device: under torch.compile it must be a
    trace-time constant, not traced code, or fullgraph compilation of a model fails on its first call."""
    att._choose.cache_clear()  # the first decision for this key happens while tracing
    q, k, v = [t.requires_grad_() for t in qkv((2, 3, 9, 40))]
    compiled = torch.compile(attention, backend="eager", fullgraph=True)
    out = compiled(q, k, v)
    torch.testing.assert_close(out, attention_ref(q, k, v), rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(out.sum(), q)[0]
    torch.testing.assert_close(g, torch.autograd.grad(attention_ref(q, k, v).sum(), q)[0], rtol=1e-5, atol=1e-5)
