"""CUDA-graph steering: CPU fallback and error reasons; on a GPU, replay equals eager and the memory bounds hold."""
import warnings

import pytest
import torch

from mfm_fast.graphs import GraphCaptureError, GraphedSteerStep, StaticStep, _reason, steer_graphed
from mfm_fast.memory import auto_chunk_size
from mfm_fast.models.dit import MFMDiT
from mfm_fast.steer import make_step, steer
from mfm_fast.value import value_and_grad

def tiny(device="cpu", impl="torch", dtype=torch.float32):
    model = MFMDiT("MFM-T/2", impl=impl, input_size=4, hidden_size=72, num_heads=1, depth=2, encoder_depth=1)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.requires_grad_(False).eval().to(device=device, dtype=dtype)


def quadratic_reward(target):
    def reward(x1):
        return -(x1 - target).pow(2).flatten(1).mean(1)
    return reward


def test_graph_true_on_cpu_warns_and_equals_eager():
    model = tiny()
    ev = model.event_shape
    noise = torch.randn(2, *ev)
    reward = quadratic_reward(torch.randn(*ev))
    kw = dict(steps=3, method="mfm-g", n_particles=2, lam=2.0, sde=True, y=torch.tensor([1, 3]))
    eager = steer(model, reward, noise, generator=torch.Generator().manual_seed(5), **kw)
    with pytest.warns(UserWarning, match="CUDA") as rec:
        graphed = steer(model, reward, noise, generator=torch.Generator().manual_seed(5), graph=True, **kw)
    assert any("cpu" in str(w.message) for w in rec)
    torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
    assert not torch.allclose(eager, noise)


def _meta_step(method, sde, renorm, reward, impl_ops=None):
    """Run the captured body (StaticStep) on meta tensors: like a CUDA-graph capture, a host read (.item(),
    bool(tensor), .tolist()) is impossible there, so any host synchronisation in the step raises."""
    from mfm_fast.rewards import as_reward
    with torch.device("meta"):
        model = MFMDiT("MFM-T/2", impl="torch", input_size=4, hidden_size=72, num_heads=1, depth=2, encoder_depth=1)
    if impl_ops is not None:
        model._ops = impl_ops
    ev = model.event_shape
    x0 = torch.randn(2, *ev, device="meta")
    step = make_step(model, as_reward(reward), method=method, sde=sde, lam=2.0, renorm=renorm,
                     cond={"y": torch.zeros(2, dtype=torch.long, device="meta")})
    static = StaticStep(step, x0, torch.linspace(0.01, 1, 4, device="meta"), n_particles=3,
                        draw_eps=method in ("mfm-g", "mfm-gf"), draw_xi=sde)
    with torch.no_grad():
        static.run()
    return static.x


@pytest.mark.parametrize("method", ["none", "mfm-g", "mfm-gf", "dps"])
@pytest.mark.parametrize("sde,renorm", [(False, None), (True, "rescale"), (True, "clip")])
def test_the_captured_step_makes_no_host_synchronisation(method, sde, renorm):
    out = _meta_step(method, sde, renorm, quadratic_reward(torch.randn(4, 4, 4, device="meta")))
    assert out.shape == (2, 4, 4, 4) and out.is_meta


def test_the_meta_proxy_catches_a_reward_that_reads_the_host():
    def syncing_reward(x1):
        r = -(x1 ** 2).flatten(1).mean(1)
        if r.max().item() > 0:  # a host read: illegal while a CUDA graph is being captured
            r = r * 0
        return r
    with pytest.raises(RuntimeError, match="meta"):
        _meta_step("mfm-g", False, None, syncing_reward)


@pytest.mark.parametrize("method,sde,renorm", [("mfm-g", True, "rescale"), ("mfm-gf", False, None),
                                               ("none", True, None)])
def test_static_step_consumes_noise_like_the_eager_loop(method, sde, renorm):
    """What the graph captures — t and dt gathered on the device from a step index, noise drawn inside the step
    — reproduces steer's eager loop exactly for the same generator seed (bitwise, on the CPU)."""
    model = tiny()
    ev = model.event_shape
    noise = torch.randn(2, *ev)
    reward = quadratic_reward(torch.randn(*ev))
    y = torch.tensor([1, 3])
    steps, N = 3, 2
    eager = steer(model, reward, noise, steps=steps, method=method, n_particles=N, lam=2.0, sde=sde, renorm=renorm,
                  generator=torch.Generator().manual_seed(5), y=y)
    gen = torch.Generator().manual_seed(5)
    step = make_step(model, reward, method=method, sde=sde, lam=2.0, renorm=renorm, cond={"y": y})
    static = StaticStep(step, noise, torch.linspace(0.01, 1, steps + 1), n_particles=N,
                        draw_eps=method != "none", draw_xi=sde, generator=gen)
    with torch.no_grad():
        for _ in range(steps):
            static.run()
    torch.testing.assert_close(static.x, eager, rtol=0, atol=0)
    assert int(static.idx) == steps
    with pytest.raises(RuntimeError, match="reset"):
        static.run()
    # and the generator advanced exactly as far as the eager loop's
    ref = torch.Generator().manual_seed(5)
    steer(model, reward, noise, steps=steps, method=method, n_particles=N, lam=2.0, sde=sde, renorm=renorm,
          generator=ref, y=y)
    assert torch.equal(gen.get_state(), ref.get_state())


def test_capture_refuses_cpu_tensors_and_host_driven_samplers():
    model = tiny()
    ev = model.event_shape
    reward = quadratic_reward(torch.zeros(*ev))
    with pytest.raises(GraphCaptureError, match="CUDA tensors; noise is on cpu"):
        steer_graphed(model, reward, torch.randn(2, *ev), steps=2, method="mfm-g")
    for method in ("search", "smc"):
        with pytest.raises(GraphCaptureError, match=f"method '{method}' is not captured"):
            steer_graphed(model, reward, torch.randn(2, *ev), steps=2, method=method)
    step = make_step(model, reward, method="none")
    with pytest.raises(GraphCaptureError, match="CUDA"):
        GraphedSteerStep(step, torch.randn(2, *ev), torch.linspace(0.1, 1, 3), n_particles=1, draw_eps=False,
                         draw_xi=False)
    assert issubclass(GraphCaptureError, RuntimeError)


def test_reason_names_the_synchronising_call():
    def reward_that_reads_a_scalar(x1):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    with pytest.raises(RuntimeError) as info:
        reward_that_reads_a_scalar(None)
    reason = _reason(info.value)
    assert "synchronises with the host" in reason and "reward_that_reads_a_scalar" in reason
    assert "test_graphs.py" in reason


# ---------------------------------------------------------------- GPU tier

STEER_CASES = [("none", False, None), ("mfm-g", False, None), ("mfm-g", True, "rescale"), ("mfm-gf", True, None),
               ("mfm-gf", False, "clip"), ("dps", False, None)]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("method,sde,renorm", STEER_CASES)
def test_graph_replay_equals_eager(impl, method, sde, renorm):
    model = tiny("cuda", impl)
    ev = model.event_shape
    noise = torch.randn(3, *ev, device="cuda")
    reward = quadratic_reward(torch.randn(*ev, device="cuda"))
    kw = dict(steps=6, method=method, n_particles=4, lam=2.0, sde=sde, renorm=renorm, return_result=True,
              y=torch.tensor([1, 3, 10], device="cuda"))
    g_eager = torch.Generator("cuda").manual_seed(7)
    g_graph = torch.Generator("cuda").manual_seed(7)
    eager = steer(model, reward, noise, generator=g_eager, **kw)
    graphed = steer_graphed(model, reward, noise, generator=g_graph, **kw)
    torch.testing.assert_close(graphed.samples, eager.samples, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(eager.samples, noise)
    # the graph consumed exactly the random numbers the eager loop did
    assert torch.equal(g_graph.get_state(), g_eager.get_state())
    assert graphed.cost.forward_evals == eager.cost.forward_evals
    assert graphed.cost.backward_evals == eager.cost.backward_evals


@pytest.mark.gpu
def test_graph_with_default_generator_and_through_steer():
    model = tiny("cuda")
    ev = model.event_shape
    noise = torch.randn(2, *ev, device="cuda")
    reward = quadratic_reward(torch.randn(*ev, device="cuda"))
    kw = dict(steps=4, method="mfm-g", n_particles=3, sde=True)
    torch.manual_seed(3)
    eager = steer(model, reward, noise, **kw)
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a silent fallback to eager must fail this test
        graphed = steer(model, reward, noise, graph=True, **kw)
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_syncing_reward_raises_reason_then_eager_still_works():
    model = tiny("cuda")
    ev = model.event_shape
    noise = torch.randn(2, *ev, device="cuda")

    def syncing_reward(x1):
        scale = float(x1.abs().max())  # a host read: impossible inside a capture
        return -(x1 / scale).pow(2).flatten(1).mean(1)

    kw = dict(steps=3, method="mfm-g", n_particles=2)
    with pytest.raises(GraphCaptureError, match="synchronises with the host.*syncing_reward"):
        steer_graphed(model, syncing_reward, noise, generator=torch.Generator("cuda").manual_seed(1), **kw)
    # generators and allocator are usable afterwards, and steer(graph=True) falls back to the eager result
    eager = steer(model, syncing_reward, noise, generator=torch.Generator("cuda").manual_seed(2), **kw)
    with pytest.warns(UserWarning, match="capture failed"):
        fallback = steer(model, syncing_reward, noise, generator=torch.Generator("cuda").manual_seed(2),
                         graph=True, **kw)
    torch.testing.assert_close(fallback, eager, rtol=0, atol=0)
    torch.randn(4, device="cuda")  # the default generator left capture mode


@pytest.mark.gpu
def test_xl2_bf16_value_gradient_1024_particles_with_auto_chunks():
    model = MFMDiT("MFM-XL/2", impl="auto").to("cuda", torch.bfloat16).requires_grad_(False).eval()
    ev = model.event_shape
    x = torch.randn(1, *ev, device="cuda", dtype=torch.bfloat16)
    chunk = auto_chunk_size(model, 1, 1024, torch.bfloat16, "cuda")
    assert 1 <= chunk <= 1024
    target = torch.randn(*ev, device="cuda", dtype=torch.bfloat16)
    res = value_and_grad(model, quadratic_reward(target), 0.5, x, 1024, chunk_size="auto",
                         generator=torch.Generator("cuda").manual_seed(0), return_info=True)
    assert res.value.shape == (1,) and res.grad.shape == x.shape
    assert torch.isfinite(res.value).all() and torch.isfinite(res.grad.float()).all()
    assert res.cost.forward_calls == -(-1024 // chunk) and res.cost.backward_evals == 1024


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_activation_estimate_covers_measured_gpu_peak(impl):
    """The per-row estimate behind auto_chunk_size bounds the measured peak growth per row (bf16, MFM-B/2)."""
    from mfm_fast.memory import activation_bytes_per_row
    model = MFMDiT("MFM-B/2", impl=impl).to("cuda", torch.bfloat16).requires_grad_(False).eval()
    ev = model.event_shape
    reward = quadratic_reward(torch.zeros(*ev, device="cuda", dtype=torch.bfloat16))
    peaks = []
    for rows in (8, 24):
        x = torch.randn(1, *ev, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        value_and_grad(model, reward, 0.5, x, rows)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    per_row = (peaks[1] - peaks[0]) / 16
    est = activation_bytes_per_row(model, torch.bfloat16)
    assert per_row <= est <= 4 * per_row, (per_row / 2**20, est / 2**20)


@pytest.mark.gpu
def test_w4_peak_memory_within_8_gib_for_8_states_by_32_particles():
    model = MFMDiT("MFM-XL/2", impl="auto").to("cuda", torch.bfloat16).requires_grad_(False).eval()
    ev = model.event_shape
    x = torch.randn(8, *ev, device="cuda", dtype=torch.bfloat16)
    budget = 8 * 2**30
    chunk = auto_chunk_size(model, 8, 32, torch.bfloat16, "cuda", budget_bytes=budget)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    V, g = value_and_grad(model, quadratic_reward(torch.zeros(*ev, device="cuda", dtype=torch.bfloat16)), 0.5, x,
                          32, chunk_size=chunk, generator=torch.Generator("cuda").manual_seed(0))
    torch.cuda.synchronize()
    assert torch.isfinite(g.float()).all()
    assert torch.cuda.max_memory_allocated() <= budget, (chunk, torch.cuda.max_memory_allocated() / 2**30)


def test_warm_up_never_steps_past_the_grid():
    """More warm-up runs than grid steps (steer(steps=1) with the default warmup=2): each run starts at the first
    grid point, so no step index ever reaches past the grid (on CUDA that would be a device-side assert)."""
    model = tiny()
    ev = model.event_shape
    reward = quadratic_reward(torch.randn(*ev))
    step = make_step(model, reward, method="mfm-g", cond={"y": torch.tensor([1, 3])})
    static = StaticStep(step, torch.randn(2, *ev), torch.linspace(0.01, 1, 2), n_particles=2, draw_eps=True,
                        draw_xi=False, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        static.warm_up(3)
    assert int(static.idx) == 1 and torch.isfinite(static.x).all()


def test_time_grid_keeps_distinct_steps_for_half_precision_states():
    from mfm_fast.interpolant import time_grid
    grid = time_grid(0.01, 250, torch.zeros(1, dtype=torch.bfloat16))
    assert grid.dtype == torch.float32 and grid.unique().numel() == 251
    assert torch.all(grid[1:] > grid[:-1])
    assert time_grid(0.0, 4, torch.zeros(1, dtype=torch.float64)).dtype == torch.float64
    # the bf16 linspace it replaces lost 22 of the 250 steps
    assert torch.linspace(0.01, 1, 251, dtype=torch.bfloat16).unique().numel() < 251


def test_guidance_numbers_are_written_on_the_device_and_equal_tensors():
    from mfm_fast.models.dit import _guidance_weight
    like = torch.zeros(1, dtype=torch.float64)
    for w in (2.5, torch.tensor(2.5), [2.5, 2.5, 2.5], None):
        got = _guidance_weight(w, 3, like)
        assert got.shape == (3,) and got.dtype == torch.float64
        torch.testing.assert_close(got, torch.full((3,), 1.0 if w is None else 2.5, dtype=torch.float64))


def test_steer_graphed_validates_like_steer():
    model = tiny()
    noise = torch.randn(2, *model.event_shape)
    with pytest.raises(ValueError, match="renorm"):
        steer_graphed(model, quadratic_reward(noise[0]), noise, steps=2, renorm="bogus")
    with pytest.raises(ValueError, match="lam"):
        steer_graphed(model, quadratic_reward(noise[0]), noise, steps=2, lam=float("nan"))
