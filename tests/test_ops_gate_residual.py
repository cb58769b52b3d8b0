"""gate_residual and gate_residual_ln_modulate: the fused Triton ops against their references (outputs, every
gradient with upstream gradients for one or both outputs, jvp tangents of both outputs)."""
import pytest
import torch

import mfm_fast.ops.gate_residual as gate_residual_module
from mfm_fast.ops.gate_residual import (gate_residual, gate_residual_ln_modulate, gate_residual_ln_modulate_ref,
                                        gate_residual_ref)
from mfm_fast.ops.launch import poisoned_outputs

# (G groups, N particles per group, L tokens, D features): D not a power of two, N > 1, and the XL width with 3 rows
SHAPES = [(3, 1, 7, 300), (2, 3, 5, 300), (3, 1, 1, 1152)]
TOL = dict(rtol=1e-4, atol=1e-5)
NAMES = ("x", "branch", "gate", "shift", "scale")


def make_inputs(G, N, L, D):
    """x, branch (G·N, L, D); gate, shift, scale (G, D)."""
    return (torch.randn(G * N, L, D) * 2 + 1, torch.randn(G * N, L, D), torch.randn(G, D), torch.randn(G, D),
            torch.randn(G, D))


def grads(outs, ins, upstream):
    pairs = [(o, u) for o, u in zip(outs, upstream) if u is not None]
    return torch.autograd.grad([o for o, _ in pairs], ins, [u for _, u in pairs], allow_unused=True,
                               retain_graph=True)


@pytest.mark.interpret
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fused_outputs_and_every_gradient_match_the_reference(shape):
    ins = tuple(t.requires_grad_() for t in make_inputs(*shape))
    with poisoned_outputs():
        outs = gate_residual_ln_modulate(*ins)
        refs = gate_residual_ln_modulate_ref(*ins)
        for name, o, r in zip(("x_new", "y"), outs, refs):
            torch.testing.assert_close(o, r, **TOL, msg=lambda m: f"{name}: {m}")
        d_xnew, d_y = torch.randn_like(outs[0]), torch.randn_like(outs[1])
        # both outputs used, then the LN output alone, then the residual stream alone
        for used, upstream in (("both", (d_xnew, d_y)), ("y", (None, d_y)), ("x_new", (d_xnew, None))):
            got = grads(outs, ins, upstream)
            want = grads(refs, ins, upstream)
            for name, g, w in zip(NAMES, got, want):
                if w is None:  # shift/scale get no gradient through x_new alone
                    assert g is None, (name, used)
                else:
                    torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"d{name} (grads of {used}): {m}")


@pytest.mark.interpret
@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
def test_gate_residual_output_gradients_and_jvp(shape):
    ins = tuple(t.requires_grad_() for t in make_inputs(*shape)[:3])
    with poisoned_outputs():
        out = gate_residual(*ins)
        ref = gate_residual_ref(*ins)
        torch.testing.assert_close(out, ref, **TOL)
        d = torch.randn_like(out)
        for name, g, w in zip(NAMES, torch.autograd.grad(out, ins, d), torch.autograd.grad(ref, ins, d)):
            torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"d{name}: {m}")
        primals = tuple(t.detach() for t in ins)
        tangents = tuple(torch.randn_like(t) for t in primals)
        _, t_out = torch.func.jvp(gate_residual, primals, tangents)
    torch.testing.assert_close(t_out, torch.func.jvp(gate_residual_ref, primals, tangents)[1], **TOL)


@pytest.mark.interpret
@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
def test_fused_jvp_of_both_outputs(shape):
    primals = make_inputs(*shape)
    tangents = tuple(torch.randn_like(t) for t in primals)
    with poisoned_outputs():
        _, got = torch.func.jvp(gate_residual_ln_modulate, primals, tangents)
        # tangents for (branch, scale) only: the others are absent, i.e. zero
        partial = lambda b, c: gate_residual_ln_modulate(primals[0], b, *primals[2:4], c)  # noqa: E731
        _, got_partial = torch.func.jvp(partial, (primals[1], primals[4]), (tangents[1], tangents[4]))
    _, want = torch.func.jvp(gate_residual_ln_modulate_ref, primals, tangents)
    partial_ref = lambda b, c: gate_residual_ln_modulate_ref(primals[0], b, *primals[2:4], c)  # noqa: E731
    _, want_partial = torch.func.jvp(partial_ref, (primals[1], primals[4]), (tangents[1], tangents[4]))
    for g, w in zip(got + got_partial, want + want_partial):
        torch.testing.assert_close(g, w, **TOL)


@pytest.mark.interpret
def test_gradient_through_the_jvp_tangents():
    primals = tuple(t.requires_grad_() for t in make_inputs(2, 3, 5, 300))
    tangents = tuple(torch.randn_like(t).requires_grad_() for t in primals)
    weights = (torch.randn_like(primals[0]), torch.randn_like(primals[0]))

    def tangent_gradients(fn):
        _, out = torch.func.jvp(fn, primals, tangents)
        wrt = primals + tangents
        loss = sum((o * w).sum() for o, w in zip(out, weights))
        return [torch.zeros_like(t) if g is None else g
                for g, t in zip(torch.autograd.grad(loss, wrt, allow_unused=True), wrt)]

    with poisoned_outputs():
        got = tangent_gradients(gate_residual_ln_modulate)
    names = NAMES + tuple(f"t{n}" for n in NAMES)
    for name, g, w in zip(names, got, tangent_gradients(gate_residual_ln_modulate_ref)):
        torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"d{name}: {m}")


@pytest.mark.interpret
def test_gradients_without_parameter_grads_and_with_many_rows_per_program(monkeypatch):
    # 33 rows per group, ~5 programs: each program loops over 2 row tiles of 8 rows and a group's
    # parameter-gradient partials come from 3 programs
    monkeypatch.setattr(gate_residual_module, "BWD_PROGRAMS", 5)
    x, branch, gate, shift, scale = make_inputs(2, 3, 11, 300)
    x.requires_grad_(), branch.requires_grad_()
    outs = gate_residual_ln_modulate(x, branch, gate, shift, scale)
    up = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, (x, branch), up)
    want = torch.autograd.grad(gate_residual_ln_modulate_ref(x, branch, gate, shift, scale), (x, branch), up)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)
    ins = (x, branch, gate.requires_grad_(), shift.requires_grad_(), scale.requires_grad_())
    runs = [grads(gate_residual_ln_modulate(*ins), ins, up) for _ in range(2)]
    for name, a, b, w in zip(NAMES, *runs, grads(gate_residual_ln_modulate_ref(*ins), ins, up)):
        assert torch.equal(a, b), name
        torch.testing.assert_close(a, w, **TOL)


def saved_storages(fn, *args):
    """Run fn under saved_tensors_hooks: the outputs and the storage addresses of every tensor saved for backward."""
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, saved


@pytest.mark.interpret
@pytest.mark.parametrize("op, ref, n_ins", [(gate_residual_ln_modulate, gate_residual_ln_modulate_ref, 5),
                                            (gate_residual, gate_residual_ref, 3)], ids=["ln_modulate", "plain"])
@pytest.mark.parametrize("gate_grad", [False, True], ids=["frozen_gate", "gate_grad"])
def test_branch_is_saved_only_when_the_gate_needs_its_gradient(op, ref, n_ins, gate_grad):
    """A value gradient asks for gradients of the stream, not of the (frozen) gate: branch, an (R, L, D)
    activation per block, is then not kept for backward, and every gradient asked for is still right."""
    ins = make_inputs(2, 3, 5, 300)[:n_ins]
    ins[0].requires_grad_(), ins[1].requires_grad_()  # x and branch: activations in a value gradient
    ins[2].requires_grad_(gate_grad)
    with poisoned_outputs():
        outs, saved = saved_storages(op, *ins)
        outs = outs if isinstance(outs, tuple) else (outs,)
        branch_kept = ins[1].untyped_storage().data_ptr() in saved
        assert branch_kept == gate_grad, saved
        assert len(saved) == (3 if n_ins == 5 else 1) + gate_grad  # (x_new, scale,) gate [, branch]
        refs = ref(*ins)
        refs = refs if isinstance(refs, tuple) else (refs,)
        wrt = tuple(t for t in ins if t.requires_grad)
        up = [torch.randn_like(o) for o in outs]
        for g, w in zip(torch.autograd.grad(outs, wrt, up), torch.autograd.grad(refs, wrt, up)):
            torch.testing.assert_close(g, w, **TOL)


@pytest.mark.interpret
def test_registered_ops_carry_the_backward_that_torch_compile_uses():
    ins = tuple(t.requires_grad_() for t in make_inputs(2, 3, 5, 300))
    with poisoned_outputs():
        outs = torch.ops.mfm_fast.gate_residual_ln_modulate(*ins, 1e-6)
        refs = gate_residual_ln_modulate_ref(*ins)
        up = (None, torch.randn_like(outs[1]))  # the LN output alone: no gradient is materialised for x_new
        for name, g, w in zip(NAMES, grads(outs, ins, up), grads(refs, ins, up)):
            torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"d{name}: {m}")
        out = torch.ops.mfm_fast.gate_residual(*ins[:3])
        d = torch.randn_like(out)
        want = torch.autograd.grad(gate_residual_ref(*ins[:3]), ins[:3], d)
        for g, w in zip(torch.autograd.grad(out, ins[:3], d), want):
            torch.testing.assert_close(g, w, **TOL)


@pytest.mark.interpret
def test_bad_shapes_name_the_argument():
    x, branch, gate, shift, scale = make_inputs(2, 3, 5, 300)
    with pytest.raises(ValueError, match="branch"):
        gate_residual(x, branch[:, :-1], gate)
    with pytest.raises(ValueError, match="gate"):
        gate_residual_ln_modulate(x, branch, gate[:, :7], shift, scale)
    with pytest.raises(ValueError, match="scale"):
        gate_residual_ln_modulate(x, branch, gate, shift, scale[:1])
    with pytest.raises(ValueError, match="not a multiple"):
        gate_residual(x, branch, torch.randn(4, 300))


@pytest.mark.gpu
def test_bf16_error_is_within_twice_the_pytorch_bf16_error():
    exact_ins = [t.cuda() for t in make_inputs(16, 4, 256, 1152)]
    exact_ins[2:] = [t * 0.3 for t in exact_ins[2:]]
    up = [torch.randn_like(exact_ins[0]) for _ in range(2)]

    def run(fn, dtype):
        ins = [t.to(dtype).requires_grad_() for t in exact_ins]
        outs = fn(*ins)
        grads_ = torch.autograd.grad(outs, ins, [u.to(dtype) for u in up])
        return [o.float() for o in outs] + [g.float() for g in grads_]

    names = ("x_new", "y") + tuple(f"d{n}" for n in NAMES)
    exact = run(gate_residual_ln_modulate_ref, torch.float32)
    for name, fast, torch_bf16, ref in zip(names, run(gate_residual_ln_modulate, torch.bfloat16),
                                           run(gate_residual_ln_modulate_ref, torch.bfloat16), exact):
        err, err_torch = (fast - ref).abs().max().item(), (torch_bf16 - ref).abs().max().item()
        assert err <= 2 * err_torch + 1e-3 * ref.abs().max().item(), (name, err, err_torch)


@pytest.mark.gpu
def test_compiled_forward_and_backward_equal_eager():
    ins = [t.cuda().requires_grad_() for t in make_inputs(4, 2, 64, 1152)]
    up = [torch.randn_like(ins[0]) for _ in range(2)]

    def f(*args):
        return gate_residual_ln_modulate(*args)

    results = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        outs = fn(*ins)
        results.append([*outs, *torch.autograd.grad(outs, ins, up)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager():
    static = [t.cuda() for t in make_inputs(4, 2, 64, 1152)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: compiles the kernels
        gate_residual_ln_modulate(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = gate_residual_ln_modulate(*static)
    fresh = [t.cuda() for t in make_inputs(4, 2, 64, 1152)]
    for s, f in zip(static, fresh):
        s.copy_(f)
    graph.replay()
    for o, e in zip(outs, gate_residual_ln_modulate(*fresh)):
        torch.testing.assert_close(o, e, rtol=0, atol=0)


@pytest.mark.gpu
def test_opcheck_of_the_registered_ops():
    ins = [t.cuda().requires_grad_() for t in make_inputs(4, 2, 64, 1152)]
    torch.library.opcheck(torch.ops.mfm_fast.gate_residual_ln_modulate.default, (*ins, 1e-6))
    torch.library.opcheck(torch.ops.mfm_fast.gate_residual.default, tuple(ins[:3]))
