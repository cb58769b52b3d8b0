"""Ahead-of-time compilation of every kernel for the H100 (sm_90), without a GPU (mfm_fast.aot).

The interpreter tier checks what the kernels compute in fp32; this checks that the launches the MFM-XL/2 model
really makes (bf16 and fp32, forward, backward and jvp, with and without particle groups) compile for sm_90 with the
installed triton, and that the checker reports a kernel that does not compile instead of passing it. The compiler
must run with the interpreter off, so each check runs in a subprocess.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, **kw):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default, stated (newer triton warns when it is unset)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          **kw)


def test_every_kernel_compiles_for_sm90_at_xl_shapes(tmp_path):
    out = tmp_path / "kernels.json"
    res = _run(["-m", "mfm_fast", "kernels", "--model", "MFM-XL/2", "--dtype", "bf16", "fp32",
                "--shapes", "1x1", "8x32", "--json", str(out)])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    data = json.loads(out.read_text())
    reports = data["reports"]
    assert data["not_launched"] == [], f"kernels no workload launched: {data['not_launched']}"
    assert all(r["ok"] for r in reports)
    # every kernel compiled in both storage dtypes, with real resource numbers from ptxas
    for dtype in ("bf16", "fp32"):
        kernels = {r["kernel"] for r in reports if dtype in r["dtypes"].split(",")}
        assert kernels >= {"ln_modulate_fwd_kernel", "gate_residual_fwd_kernel", "gate_residual_bwd_kernel",
                           "input_stage_kernel", "bias_gelu_fwd_kernel", "time_embed_fwd_kernel"}, kernels
    assert all(isinstance(r["registers"], int) and 0 < r["registers"] <= 255 for r in reports)
    # the XL row kernels cover a 1152-wide row in one power-of-two tile
    assert {r["constexprs"].get("BLOCK_D") for r in reports if r["kernel"].startswith("ln_modulate")} == {2048}


def test_a_kernel_that_does_not_compile_is_reported(tmp_path):
    (tmp_path / "bad_kernels.py").write_text(textwrap.dedent('''
        import triton
        import triton.language as tl

        @triton.jit
        def bad_kernel(X, Y, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            x = tl.load(X + offs, mask=offs < n)
            tl.store(Y + offs, tl.dot(x, x))  # 1-D dot: rejected by the compiler, not by the interpreter
    '''))
    script = textwrap.dedent(f'''
        import sys, json, torch
        sys.path.insert(0, {str(tmp_path)!r})
        from bad_kernels import bad_kernel
        from mfm_fast.aot import Launch, compile_launch, _specialise
        x = torch.empty(64, dtype=torch.bfloat16, device="meta")
        launch = Launch(bad_kernel, dict(X=x, Y=x, n=1, BLOCK=64), num_warps=4)
        sig, const, attrs = _specialise(launch)
        r = compile_launch(launch, 90)
        print(json.dumps(dict(sig=sig, const=const, ok=r.ok, error=r.error)))
    ''')
    res = _run(["-c", script])
    assert res.returncode == 0, res.stderr[-4000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    # launcher-style specialisation: an int equal to 1 becomes a constant, tensors typed pointers
    assert got["sig"] == {"X": "*bf16", "Y": "*bf16", "n": "constexpr", "BLOCK": "constexpr"}
    assert got["const"] == {"n": 1, "BLOCK": 64}
    assert not got["ok"] and got["error"]


def test_cli_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "mfm_fast", "kernels"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0 and "TRITON_INTERPRET" in res.stderr


def test_torch_compile_traces_the_triton_model_in_one_graph_with_its_backward():
    """fullgraph torch.compile of the Triton-op model, forward and backward, traced on meta tensors (no GPU): every
    fused op must be traceable (triton_op + wrap_triton), attention dispatch constant, backward registered."""
    script = textwrap.dedent('''
        import collections, json, torch
        from mfm_fast import aot
        from mfm_fast.ops.table import triton_ops
        from mfm_fast.models.dit import MFMDiT
        with torch.device("meta"):
            m = MFMDiT("MFM-T/2", impl="torch", depth=2, encoder_depth=1).to(torch.bfloat16)
        m._ops = triton_ops()
        G, N, ev = 2, 3, m.event_shape
        mk = dict(device="meta", dtype=torch.bfloat16)
        s, u, t = torch.rand(G, **mk), torch.rand(G, **mk), torch.rand(G, **mk)
        xb = torch.randn(G * N, *ev, **mk, requires_grad=True)
        x = torch.randn(G, *ev, **mk, requires_grad=True)
        y = torch.zeros(G, dtype=torch.long, device="meta")
        f = torch.compile(lambda s, u, xb, t, x: m(s, u, xb, t, x, y=y), backend="aot_eager", fullgraph=True)
        with aot.record_launches() as rec:
            out = f(s, u, xb, t, x)
            gx, gxb = torch.autograd.grad(out.float().sum(), (x, xb))
        print(json.dumps(dict(shapes=[list(out.shape), list(gx.shape), list(gxb.shape)],
                              kernels=collections.Counter(r.name for r in rec))))
    ''')
    res = _run(["-c", script])
    assert res.returncode == 0, res.stderr[-4000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["shapes"] == [[6, 4, 8, 8], [2, 4, 8, 8], [6, 4, 8, 8]]
    for kernel in ("time_embed_fwd_kernel", "input_stage_kernel", "ln_modulate_fwd_kernel", "gate_residual_fwd_kernel",
                   "bias_gelu_fwd_kernel", "gate_residual_bwd_kernel", "bias_gelu_grad_kernel",
                   "ln_modulate_bwd_kernel", "input_stage_bwd_kernel"):
        assert got["kernels"].get(kernel, 0) > 0, (kernel, got["kernels"])
