"""attention_jvp: the fused Triton attention with a forward-mode rule, against attention_ref (output, log-sum-exp,
every gradient, the jvp tangent, reverse mode through the tangent), its place in the attention dispatch, and an
MFMDiT under torch.func.jvp with impl="triton" against impl="torch".

interpret tier: fp32 under TRITON_INTERPRET=1. The fp32 tiles are 32 query/key rows for the forward and backward
and 16 for the jvp, so L = 17, 37, 70 cover one partial block, several blocks and a ragged last block in every
kernel; head dims 16, 32 and 72 (MFM-XL/2, padded to 128-wide tiles).
"""
import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mfm_fast.ops.attention as att
from mfm_fast.models.dit import MFMDiT
from mfm_fast.ops.attention import attention, attention_backends, attention_jvp, attention_ref, backend_table
from mfm_fast.ops.launch import poisoned_outputs

pytest.importorskip("triton")

# (R, H, Lq, Lk, Dh)
SHAPES = [(2, 3, 17, 17, 72), (1, 2, 70, 70, 16), (2, 1, 37, 37, 32), (2, 2, 9, 40, 72)]
TOL = dict(rtol=1e-4, atol=1e-5)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_qkv(R, H, Lq, Lk, Dh, scale=1.5):
    # scores of order a few units: a softmax far from uniform, so errors in the rescaling cannot hide
    return torch.randn(R, H, Lq, Dh) * scale, torch.randn(R, H, Lk, Dh) * scale, torch.randn(R, H, Lk, Dh)


def strided_qkv(R, H, L, Dh):
    """q, k, v as the model slices them out of one (R, L, 3·H·Dh) projection: strided (R, H, L, Dh) views."""
    qkv = torch.randn(R, L, 3, H, Dh) * 1.5
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def test_the_shapes_span_several_blocks_with_a_ragged_last_one():
    """What the shapes above are for: each kernel loops over more than one block and masks a partial last one."""
    for kind in ("fwd", "jvp", "bwd"):
        tiles = att.attention_tiles(72, kind, torch.float32)
        for block in (tiles.block_m, tiles.block_n):
            assert 70 > block and 70 % block and 37 % block, (kind, tiles)


@pytest.mark.interpret
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_output_lse_and_every_gradient_match_the_reference(shape):
    q, k, v = (t.requires_grad_() for t in make_qkv(*shape))
    with poisoned_outputs():
        o = attention_jvp(q, k, v)
        _, lse = torch.ops.mfm_fast.attention(q.detach(), k.detach(), v.detach())
        do = torch.randn_like(o)
        grads = torch.autograd.grad(o, (q, k, v), do)
    o_ref = attention_ref(q, k, v)
    torch.testing.assert_close(o, o_ref, **TOL)
    scores = torch.einsum("rhld,rhmd->rhlm", q, k) / shape[-1] ** 0.5
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1).detach(), **TOL)
    for name, g, g_ref in zip("qkv", grads, torch.autograd.grad(o_ref, (q, k, v), do)):
        assert g.is_contiguous() and g.shape == g_ref.shape
        torch.testing.assert_close(g, g_ref, **TOL, msg=lambda m: f"d{name}: {m}")


@pytest.mark.interpret
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_jvp_value_and_tangent_match_the_reference(shape):
    primals = make_qkv(*shape)
    tangents = tuple(torch.randn_like(t) for t in primals)
    with poisoned_outputs():
        o, to = torch.func.jvp(attention_jvp, primals, tangents)
    o_ref, to_ref = torch.func.jvp(attention_ref, primals, tangents)
    assert to_ref.abs().max() > 0.1
    torch.testing.assert_close(o, o_ref, **TOL)
    torch.testing.assert_close(to, to_ref, **TOL)


@pytest.mark.interpret
@pytest.mark.parametrize("which", ["q", "k", "v", "qk", "kv"])
def test_a_subset_of_tangents_runs_the_kernel_with_only_those(which, monkeypatch):
    """Absent tangents reach the kernel as None (their matmuls compiled out), not as materialised zeros."""
    primals = make_qkv(2, 2, 37, 37, 72)
    idx = ["qkv".index(c) for c in which]
    tangents = tuple(torch.randn_like(primals[i]) for i in idx)
    flags = []
    launch = att._launch_fwd

    def spy(q, k, v, tq, tk, tv, *rest):
        flags.append((tq is not None, tk is not None, tv is not None))
        return launch(q, k, v, tq, tk, tv, *rest)

    monkeypatch.setattr(att, "_launch_fwd", spy)

    def f(*args, fn):
        full = list(primals)
        for i, a in zip(idx, args):
            full[i] = a
        return fn(*full)

    with poisoned_outputs():
        _, to = torch.func.jvp(lambda *a: f(*a, fn=attention_jvp), tuple(primals[i] for i in idx), tangents)
    _, to_ref = torch.func.jvp(lambda *a: f(*a, fn=attention_ref), tuple(primals[i] for i in idx), tangents)
    torch.testing.assert_close(to, to_ref, **TOL)
    assert flags[-1] == tuple(c in which for c in "qkv")


@pytest.mark.interpret
def test_forward_ad_and_strided_views_of_one_qkv_tensor():
    q, k, v = strided_qkv(2, 3, 37, 72)
    assert not q.is_contiguous()
    tq, tk, tv = strided_qkv(2, 3, 37, 72)
    fa = torch.autograd.forward_ad
    with poisoned_outputs(), fa.dual_level():
        o = attention_jvp(fa.make_dual(q, tq), fa.make_dual(k, tk), fa.make_dual(v, tv))
        o, to = fa.unpack_dual(o)
    o_ref, to_ref = torch.func.jvp(attention_ref, (q, k, v), (tq, tk, tv))
    torch.testing.assert_close(o, o_ref, **TOL)
    torch.testing.assert_close(to, to_ref, **TOL)


@pytest.mark.interpret
def test_large_row_constant_in_the_score_tangent_cancels():
    """Keys close to one common key make Ṡ nearly constant along each row, a part that cancels exactly in ȯ (the
    kernel centres Ṡ on its running mean); the remainder must still match."""
    R, H, L, Dh = 1, 2, 70, 32
    q = torch.randn(R, H, L, Dh)
    k = torch.randn(R, H, 1, Dh) * 3 + 0.3 * torch.randn(R, H, L, Dh)
    v = torch.randn(R, H, L, Dh)
    tangents = (50 * torch.randn_like(q), torch.randn_like(k), torch.randn_like(v))
    with poisoned_outputs():
        _, to = torch.func.jvp(attention_jvp, (q, k, v), tangents)
    _, to_ref = torch.func.jvp(attention_ref, (q.double(), k.double(), v.double()),
                               tuple(t.double() for t in tangents))
    torch.testing.assert_close(to.double(), to_ref, rtol=1e-4, atol=1e-4 * to_ref.abs().max().item())


def tangent_gradients(fn, primals, tangents, weight):
    """Gradients of <weight, jvp tangent> w.r.t. primals and tangents (reverse over forward: LSD's loss on ∂_u X)."""
    _, tangent = torch.func.jvp(fn, primals, tangents)
    wrt = primals + tangents
    grads = torch.autograd.grad((tangent * weight).sum(), wrt, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]


@pytest.mark.interpret
def test_gradient_through_the_jvp_tangent_recomputes_the_reference():
    primals = tuple(t.requires_grad_() for t in make_qkv(2, 2, 37, 37, 72))
    tangents = tuple(torch.randn_like(t).requires_grad_() for t in primals)
    weight = torch.randn_like(primals[0])
    with poisoned_outputs():
        got = tangent_gradients(attention_jvp, primals, tangents, weight)
    for name, g, w in zip(("q", "k", "v", "tq", "tk", "tv"), got,
                          tangent_gradients(attention_ref, primals, tangents, weight)):
        torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"d{name}: {m}")


@pytest.mark.interpret
def test_gradient_through_the_primal_of_a_jvp_uses_the_fused_backward(monkeypatch):
    """Eulerian losses: v, dv = jvp(model, ...); the loss backpropagates through v, the tangent is detached."""
    calls = []
    bwd = att._attention_bwd
    monkeypatch.setattr(att, "_attention_bwd", lambda *a: calls.append(1) or bwd(*a))
    primals = tuple(t.requires_grad_() for t in make_qkv(2, 2, 37, 37, 72))
    tangents = tuple(torch.randn_like(t) for t in primals)
    w = torch.randn_like(primals[0])
    grads = []
    for fn in (attention_jvp, attention_ref):
        o, to = torch.func.jvp(fn, primals, tangents)
        grads.append(torch.autograd.grad(((o - to.detach()) * w).sum(), primals))
    assert calls
    for name, g, g_ref in zip("qkv", *grads):
        torch.testing.assert_close(g, g_ref, **TOL, msg=lambda m: f"d{name}: {m}")


@pytest.mark.interpret
def test_vmap_and_func_grad_go_through_the_fused_op():
    B, shape = 3, (2, 2, 17, 17, 16)
    qs, ks, vs = (torch.stack(t) for t in zip(*(make_qkv(*shape) for _ in range(B))))  # (B, R, H, L, Dh)
    with poisoned_outputs():
        out = torch.func.vmap(attention_jvp)(qs, ks, vs)
        shared_k = torch.func.vmap(attention_jvp, in_dims=(0, None, 0))(qs, ks[0], vs)
    torch.testing.assert_close(out, torch.func.vmap(attention_ref)(qs, ks, vs), **TOL)
    torch.testing.assert_close(shared_k, torch.func.vmap(attention_ref, in_dims=(0, None, 0))(qs, ks[0], vs), **TOL)
    q, k, v = qs[0], ks[0], vs[0]
    w = torch.randn_like(q)
    grads = [torch.func.grad(lambda a, b, c, fn=fn: (fn(a, b, c) * w).sum(), argnums=(0, 1, 2))(q, k, v)
             for fn in (attention_jvp, attention_ref)]
    for g, g_ref in zip(*grads):
        torch.testing.assert_close(g, g_ref, **TOL)


@pytest.mark.interpret
def test_double_backward_falls_back_to_the_reference_vjp(monkeypatch):
    """A backward that is itself differentiated (create_graph=True) runs the reference's vjp, not the kernels."""
    monkeypatch.setattr(att, "_attention_bwd", lambda *a: pytest.fail("the fused backward cannot be differentiated"))
    primals = tuple(t.requires_grad_() for t in make_qkv(1, 2, 17, 17, 16))
    do, w = torch.randn_like(primals[0]), torch.randn_like(primals[0])
    second = []
    for fn in (attention_jvp, attention_ref):
        dq = torch.autograd.grad(fn(*primals), primals[0], do, create_graph=True)[0]
        second.append(torch.autograd.grad((dq * w).sum(), primals))
    for g, g_ref in zip(*second):
        torch.testing.assert_close(g, g_ref, **TOL)


# ---------------------------------------------------------------------------------------------- dispatch
@pytest.mark.interpret
def test_dispatch_picks_the_fused_op_when_a_jvp_is_needed(monkeypatch):
    q, k, v = make_qkv(2, 2, 17, 17, 72)
    table = attention_backends(q, k, v, need_jvp=True)
    assert [name for name, ok, _ in table if ok] == ["triton", "math"]
    assert [name for name, _, _ in table].index("triton") == len(table) - 2  # just before "math"
    chosen = []

    def f(q, k, v):
        chosen.append(att.select_backend(q, k, v).name)
        return attention(q, k, v)

    tangents = tuple(torch.randn_like(t) for t in (q, k, v))
    _, to = torch.func.jvp(f, (q, k, v), tangents)
    assert chosen == ["triton"]
    torch.testing.assert_close(to, torch.func.jvp(attention_ref, (q, k, v), tangents)[1], **TOL)
    assert next(name for name, ok, _ in attention_backends(q, k, v) if ok) == "sdpa"  # no jvp: SDPA first
    monkeypatch.setenv("MFM_FAST_ATTENTION", "triton")
    assert att.select_backend(q, k, v).name == "triton"
    torch.testing.assert_close(attention(q, k, v), attention_ref(q, k, v), **TOL)
    monkeypatch.setenv("MFM_FAST_ATTENTION", "math")
    torch.func.jvp(f, (q, k, v), tangents)
    assert chosen[-1] == "math"


@pytest.mark.parametrize("capability, dtype, ok", [((9, 0), torch.bfloat16, True), ((8, 0), torch.float16, True),
                                                   ((7, 5), torch.float16, True), ((7, 5), torch.bfloat16, False),
                                                   ((9, 0), torch.float64, False)])
def test_declared_capability_on_a_gpu(monkeypatch, capability, dtype, ok):
    monkeypatch.setattr(att, "_cuda_capability", lambda device: capability)
    table = {name: (good, reasons) for name, good, reasons in backend_table("cuda", dtype, 72, need_jvp=True)}
    assert table["triton"][0] == ok, table["triton"][1]
    first = next(name for name, (good, _) in table.items() if good)
    assert first == ("triton" if ok else "math")


def test_reasons_name_what_does_not_fit(monkeypatch):
    monkeypatch.setattr(att, "_cuda_capability", lambda device: (9, 0))
    reasons = dict((n, r) for n, _, r in backend_table("cuda", torch.bfloat16, 300, need_jvp=True))["triton"]
    assert any("head dim 300 > 256" in r for r in reasons)
    reasons = dict((n, r) for n, _, r in backend_table("meta", torch.float32, 72, need_jvp=True))["triton"]
    assert any("needs a CUDA device" in r for r in reasons)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reasons = dict((n, r) for n, _, r in backend_table("cpu", torch.float32, 72, need_jvp=True))["triton"]
    assert any("TRITON_INTERPRET=1" in r for r in reasons)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reasons = dict((n, r) for n, _, r in backend_table("cpu", torch.bfloat16, 72, need_jvp=True))["triton"]
    assert any("float32 only" in r for r in reasons)


@pytest.mark.interpret
def test_bad_inputs_are_named():
    q, k, v = make_qkv(1, 1, 5, 5, 16)
    with pytest.raises(ValueError, match="do not fit"):
        attention_jvp(q, k[..., :8], v)
    with pytest.raises(TypeError, match="float32"):
        attention_jvp(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="head dim 300"):
        attention_jvp(*(torch.randn(1, 1, 3, 300) for _ in range(3)))


@pytest.mark.interpret
@pytest.mark.parametrize("name", ["attention", "attention_bwd", "attention_jvp"])
def test_opcheck_schema_and_autograd_registration(name):
    q, k, v = make_qkv(1, 2, 9, 9, 16)
    o, lse = torch.ops.mfm_fast.attention(q, k, v)
    req = lambda *ts: tuple(t.clone().requires_grad_() for t in ts)  # noqa: E731
    op, args = {"attention": (torch.ops.mfm_fast.attention.default, req(q, k, v)),
                "attention_bwd": (torch.ops.mfm_fast.attention_bwd.default, (torch.randn_like(o), q, k, v, o, lse)),
                "attention_jvp": (torch.ops.mfm_fast.attention_jvp.default,
                                  (*req(q, k, v), torch.randn_like(q), None, torch.randn_like(v)))}[name]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration"))


# ---------------------------------------------------------------------------------------------- the model
def _randomized_pair(**overrides):
    g = torch.Generator().manual_seed(1)
    ref = MFMDiT("MFM-T/2", impl="torch", **overrides)
    with torch.no_grad():  # every weight random: the adaLN-Zero init would zero the attention branches
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return ref, copy.deepcopy(ref).set_impl("triton")


@pytest.mark.interpret
def test_model_under_jvp_with_triton_attention_matches_torch(monkeypatch):
    """MFM-T/2 (head dim 72) at 25 tokens (a ragged last block), frozen weights, tangents on s, u and xbar: the
    Triton model's attention runs the fused jvp kernel, and its output and tangent match the reference model's."""
    ref, fast = (m.requires_grad_(False) for m in _randomized_pair(input_size=10, depth=2, encoder_depth=1))
    calls = []
    jvp = att.Attention.jvp
    monkeypatch.setattr(att.Attention, "jvp", staticmethod(lambda ctx, *t: calls.append(1) or jvp(ctx, *t)))
    G, N = 2, 2
    ev = ref.event_shape
    s, u, t = torch.rand(G), torch.rand(G), torch.rand(G)
    xbar, x, y = torch.randn(G * N, *ev), torch.randn(G, *ev), torch.randint(0, 10, (G,))
    tangents = (torch.randn(G), torch.randn(G), torch.randn(G * N, *ev))
    results = []
    for model in (ref, fast):
        def f(s_, u_, xbar_):
            return model(s_, u_, xbar_, t, x, y=y)
        results.append(torch.func.jvp(f, (s, u, xbar), tangents))
    (v_ref, dv_ref), (v_fast, dv_fast) = results
    assert len(calls) == 2  # one fused jvp per block
    assert dv_ref.abs().max() > 0
    for got, want, name in ((v_fast, v_ref, "v"), (dv_fast, dv_ref, "tangent")):
        err = (got - want).abs().max().item()
        assert err <= 1e-4 * want.abs().max().item(), f"{name}: max error {err:.3g}"


def _run_without_interpreter(script):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default, stated (newer triton warns when it is unset)
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_torch_compile_traces_the_fused_op_with_its_backward():
    """fullgraph torch.compile of attention_jvp, forward and backward, on meta tensors (launches recorded, not run):
    the op is a triton_op that carries its backward (an autograd.Function with a jvp cannot be traced)."""
    got = _run_without_interpreter('''
        import collections, json, torch
        from mfm_fast import aot
        from mfm_fast.ops.attention import attention_jvp
        q, k, v = (torch.randn(6, 2, 16, 72, device="meta", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        f = torch.compile(attention_jvp, backend="aot_eager", fullgraph=True)
        with aot.record_launches() as rec:
            out = f(q, k, v)
            grads = torch.autograd.grad(out.float().sum(), (q, k, v))
        print(json.dumps(dict(shapes=[list(t.shape) for t in (out, *grads)],
                              kernels=sorted(set(r.name for r in rec)))))
    ''')
    assert got["shapes"] == [[6, 2, 16, 72]] * 4
    assert got["kernels"] == ["attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel", "attention_fwd_kernel"]


def test_aot_records_the_fused_attention_launches():
    """`python -m mfm_fast kernels` compiles what model_workloads records: the fused attention's forward, both
    backward kernels and the jvp (all tangents, and q alone) at the model's shapes (meta tensors, no compile)."""
    got = _run_without_interpreter('''
        import collections, json, torch
        from mfm_fast import aot
        work = aot.model_workloads("MFM-T/2", torch.bfloat16, shapes=((2, 3),))
        rec = work["attention_jvp G=2,N=3"]
        print(json.dumps(dict(kernels=collections.Counter(r.name for r in rec),
                              flags=[[r.args[f] for f in ("HAS_TQ", "HAS_TK", "HAS_TV", "STORE_O")]
                                     for r in rec if r.name == "attention_fwd_kernel"],
                              shapes=[list(r.args["Q"].shape) for r in rec[:1]])))
    ''')
    # under torch.func.jvp the primal forward runs first, then the tangent kernel
    assert got["kernels"] == {"attention_fwd_kernel": 5, "attention_bwd_dq_kernel": 1, "attention_bwd_dkdv_kernel": 1}
    primal, all_tangents, q_tangent = [False] * 3 + [True], [True] * 3 + [False], [True] + [False] * 3
    assert got["flags"] == [primal, primal, all_tangents, primal, q_tangent]
    assert got["shapes"] == [[6, 2, 16, 72]]


# ---------------------------------------------------------------------------------------------- gpu tier
@pytest.mark.gpu
def test_bf16_xl2_value_tangent_and_gradients_within_twice_the_pytorch_bf16_error():
    """MFM-XL/2's attention shape in bf16: the fused op's output, jvp tangent and gradients against an fp64
    reference, within twice the error (+ a small atol) of the explicit softmax computed in bf16 by PyTorch."""
    R, H, L, Dh = 8, 16, 256, 72
    primals = [t.cuda() for t in make_qkv(R, H, L, L, Dh)]
    tangents = [torch.randn_like(t) for t in primals]
    do = torch.randn_like(primals[0])

    def eager_bf16(q, k, v):  # every matmul and the softmax in bf16
        return ((q @ k.transpose(-2, -1)) * Dh ** -0.5).softmax(-1) @ v

    def results(fn, dtype):
        ins = [t.to(dtype).requires_grad_() for t in primals]
        o, to = torch.func.jvp(fn, tuple(ins), tuple(t.to(dtype) for t in tangents))
        return [o, to, *torch.autograd.grad(o, ins, do.to(dtype))]

    exact = results(attention_ref, torch.float64)
    fast, slow = results(attention_jvp, torch.bfloat16), results(eager_bf16, torch.bfloat16)
    for name, e, f, s in zip(("o", "tangent", "dq", "dk", "dv"), exact, fast, slow):
        err = lambda a: (a.double() - e).abs().max().item()  # noqa: E731
        assert err(f) <= 2 * err(s) + 1e-3 * e.abs().max().item(), (name, err(f), err(s))
