"""`python -m mfm_fast profile`: report fields on a CPU run, FLOP accounting, the NVML sampler."""
import json
import sys
import time
import types

import pytest
import torch

from mfm_fast.__main__ import main as cli
from mfm_fast.models.dit import MFMDiT, make_config
from mfm_fast.profile import NaiveParticles, Telemetry, forward_flops, randomize_


def test_forward_flops_match_the_documented_xl2_count():
    # BENCHMARKS.md: 28·(2·L·D·12D + 4·L²·D) with L = 256, D = 1152 ≈ 237 GFLOP per sample
    assert forward_flops(make_config("MFM-XL/2")) == 28 * (2 * 256 * 1152 * 12 * 1152 + 4 * 256 ** 2 * 1152)
    assert forward_flops(make_config("MFM-XL/2")) / 1e9 == pytest.approx(236.7, abs=0.1)


def test_flop_accounting_agrees_with_torch_flop_counter_at_xl2():
    """The benchmarks' TFLOP/s use forward_flops per forward sample and 2× it for a value gradient (forward plus
    the backward to the context x only, weights frozen). Count what the XL/2 model really runs (on meta tensors,
    particle groups on) with torch's FlopCounterMode, which knows nothing of that formula."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = MFMDiT("MFM-XL/2", impl="torch").to(torch.bfloat16).requires_grad_(False)
    G, N = 2, 4
    mk = dict(device="meta", dtype=torch.bfloat16)
    s, u, t = torch.rand(G, **mk), torch.rand(G, **mk), torch.rand(G, **mk)
    x, xbar = torch.randn(G, *model.event_shape, **mk).requires_grad_(), torch.randn(G * N, *model.event_shape, **mk)
    y = torch.zeros(G, dtype=torch.long, device="meta")
    per_sample = G * N * forward_flops(model.config)
    with FlopCounterMode(display=False) as fwd:
        with torch.no_grad():
            model(s, u, xbar, t, x, y=y)
    with FlopCounterMode(display=False) as fwd_bwd:
        model(s, u, xbar, t, x, y=y).float().sum().backward()
    assert fwd.get_total_flops() == pytest.approx(per_sample, rel=0.01)
    assert fwd_bwd.get_total_flops() == pytest.approx(2 * per_sample, rel=0.03)


def test_naive_particles_repeat_conditioning_to_the_same_result():
    model = randomize_(MFMDiT("MFM-T/2", impl="torch", input_size=4, depth=1, encoder_depth=1), std=0.1)
    naive = NaiveParticles(model)
    assert naive.supports_particle_groups is False and naive.event_shape == model.event_shape
    from mfm_fast.sampling import call_model
    ev = model.event_shape
    G, N = 2, 3
    s, u, t = torch.rand(G), torch.rand(G), torch.rand(G)
    xbar, x, y = torch.randn(G * N, *ev), torch.randn(G, *ev), torch.tensor([1, 2])
    torch.testing.assert_close(call_model(naive, s, u, xbar, t, x, y=y), model(s, u, xbar, t, x, y=y),
                               rtol=1e-4, atol=1e-5)


def test_profile_cli_on_cpu_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "profile.json"
    rc = cli(["profile", "--model", "MFM-T/2", "--states", "2", "--particles", "2", "--steps", "1",
              "--paths", "fast,ref", "--repeat", "1", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "fast" in table and "ref" in table and "not performance" in table
    assert "telemetry: no GPU" in table
    rep = json.loads(out.read_text())
    assert rep["config"]["model"] == "MFM-T/2" and rep["config"]["dtype"] == "float32"
    assert rep["matmul_peak_tflops"] is None and rep["env"]["gpu"] == "none"
    rows = 2 * 2
    flops = rep["config"]["forward_gflop_per_sample"] * 1e9
    assert flops == pytest.approx(forward_flops(make_config("MFM-T/2")))
    for path in ("fast", "ref"):
        r = rep["paths"][path]
        assert r["impl"] == {"fast": "torch", "ref": "torch+sdpa"}[path]
        w1, w2 = r["W1"], r["W2"]
        assert w1["ms"] > 0 and w2["ms"] > 0 and r["W3"]["ms_per_step"] > 0
        assert r["W3"]["graph"] is False and r["W3"]["graph_error"] is None  # no capture attempted on a CPU
        assert w1["samples_per_s"] == pytest.approx(rows / (w1["ms"] / 1e3))
        assert w2["particles_per_s"] == pytest.approx(rows / (w2["ms"] / 1e3))
        assert w2["tflops"] == pytest.approx(2 * rows * flops / (w2["ms"] / 1e3) / 1e12)
        assert w2["pct_of_matmul_peak"] is None
        assert r["W4"] == {"peak_gib": None, "max_particles_per_state": None}
        assert r["telemetry"]["available"] is False and "CPU" in r["telemetry"]["reason"]
    assert rep["paths"]["fast"]["chunk_size"] == rows  # no memory bound on a CPU
    assert rep["paths"]["fast"]["speedup_vs_ref"]["W2"] == pytest.approx(
        rep["paths"]["ref"]["W2"]["ms"] / rep["paths"]["fast"]["W2"]["ms"])


def test_profile_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        cli(["profile", "--states", "0", "--device", "cpu"])
    with pytest.raises(ValueError, match="unknown path 'fastest'"):
        cli(["profile", "--model", "MFM-T/2", "--paths", "fastest", "--device", "cpu"])


def test_telemetry_samples_nvml_in_a_background_thread(monkeypatch):
    readings = {"power": 0}

    def power(handle):
        readings["power"] += 1
        return 250_000  # mW

    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, NVML_CLOCK_SM=1, nvmlDeviceGetPowerUsage=power,
        nvmlDeviceGetClockInfo=lambda handle, kind: 1980,
        nvmlDeviceGetMemoryInfo=lambda handle: types.SimpleNamespace(used=3 * 2**30))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(Telemetry, "_device_handle", staticmethod(lambda nvml, device: "gpu0"))
    with Telemetry(torch.device("cuda"), interval_s=0.01) as tele:
        deadline = time.time() + 5
        while readings["power"] < 3 and time.time() < deadline:
            time.sleep(0.01)
    n = readings["power"]
    time.sleep(0.05)
    assert readings["power"] == n  # the thread stopped with the context
    s = tele.summary()
    assert s["available"] and s["samples"] >= 3
    assert s["power_w_mean"] == pytest.approx(250.0) and s["sm_clock_mhz_mean"] == 1980
    assert s["memory_used_gib_max"] == pytest.approx(3.0)
    cpu = Telemetry(torch.device("cpu"))
    with cpu:
        pass
    assert cpu.summary() == {"available": False, "reason": "no GPU: NVML telemetry is not sampled on a CPU run"}


def test_peers_run_sdpa_and_compiled_peers_do_not_pile_up_recompiles():
    """The peers are the reference ops with PyTorch's SDPA (what a user's plain model runs), equal to the
    reference; every compiled peer starts from a clean compile state, so a run of peers never reaches Dynamo's
    recompile limit (which would silently run later peers eagerly)."""
    from mfm_fast.profile import build_path
    from mfm_fast.sampling import call_model
    model = randomize_(MFMDiT("MFM-T/2", impl="torch", input_size=4, depth=1, encoder_depth=1), std=0.1)
    ev = model.event_shape
    G, N = 2, 3
    s, u, t = torch.rand(G), torch.rand(G), torch.rand(G)
    xbar, x, y = torch.randn(G * N, *ev), torch.randn(G, *ev), torch.tensor([1, 2])
    expected = model(s, u, xbar, t, x, y=y)
    peer, impl = build_path("ref", model, "cpu")
    assert impl == "torch+sdpa" and model.ops.attention.__name__ == "sdpa_attention"
    torch.testing.assert_close(call_model(peer, s, u, xbar, t, x, y=y), expected, rtol=1e-5, atol=1e-5)
    from torch._dynamo.utils import counters
    counters.clear()
    for path in ("compile", "compile-ro", "compile", "compile-ro"):
        compiled, _ = build_path(path, model, "cpu")
        for _ in range(2):
            torch.testing.assert_close(call_model(compiled, s, u, xbar, t, x, y=y), expected, rtol=1e-5, atol=1e-5)
    assert not counters["recompiles"] and not any("recompile_limit" in k for k in counters["stats"])
    assert counters["stats"]["unique_graphs"] >= 4


def test_profile_ft_workload_on_cpu_reports_step_time_and_memory_per_row(tmp_path, capsys):
    """--workload ft: one MFM-FT optimizer step (FinetuneRun.train_step) per path at toy size: MFM-T/2, a tiny
    SD-VAE-shaped decoder, the toy reward with per-row prompts, 2 rows in micro-batches of 1."""
    out = tmp_path / "ft.json"
    rc = cli(["profile", "--model", "MFM-T/2", "--workload", "ft", "--ft-batch", "2", "--ft-micro-batch", "1",
              "--paths", "fast,ref", "--repeat", "1", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "FT step, MFM-T/2" in table and "tiny VAE decode + toy reward" in table and "not performance" in table
    assert "W1 ms" not in table  # the steering workloads did not run
    rep = json.loads(out.read_text())
    assert rep["config"]["workload"] == "ft"
    assert rep["config"]["ft"] == {"batch": 2, "micro_batch": 1, "reward": "toy", "vae": "tiny", "autocast": None,
                                   "weights": "float32"}
    flops = 6 * forward_flops(make_config("MFM-T/2"))
    for path in ("fast", "ref"):
        assert set(rep["paths"][path]) == {"FT"}
        r = rep["paths"][path]["FT"]
        assert r["impl"] == {"fast": "torch", "ref": "torch+sdpa"}[path]
        assert r["rows"] == 2 and r["micro_batch"] == 1 and r["micro_batches"] == 2 and r["lam"] == 1.0
        assert r["ms"] > 0 and r["rows_per_s"] == pytest.approx(2 / (r["ms"] / 1e3))
        assert r["model_gflop_per_row"] == pytest.approx(flops / 1e9)
        assert r["tflops"] == pytest.approx(2 * flops / (r["ms"] / 1e3) / 1e12) and r["pct_of_matmul_peak"] is None
        assert r["loss"] > 0
        # measured peak memory needs a GPU; the field is there, and so is what the micro-batch planner assumes
        assert "peak_mib_per_row" in r and r["peak_mib_per_row"] is None and r["peak_gib"] is None
        assert r["planned_mib_per_row"] > 0
        assert r["telemetry"]["available"] is False
    assert rep["paths"]["fast"]["FT"]["speedup_vs_ref"] == pytest.approx(
        rep["paths"]["ref"]["FT"]["ms"] / rep["paths"]["fast"]["FT"]["ms"])


def test_ft_step_memory_per_row_is_peak_minus_fixed_over_micro_batch_rows(monkeypatch):
    """The GPU arithmetic, with CUDA's allocator statistics stubbed: (peak − fixed bytes) / micro-batch rows."""
    from mfm_fast.profile import FTStep, ft_model, ft_reward
    model, _ = ft_model("ref", "MFM-T/2", "cpu", depth=1, encoder_depth=1)
    reward, prompts, lam = ft_reward("quadratic", model, "cpu")
    step = FTStep(model, reward, 6, 4, prompts, lam, "cpu")
    assert step.micro == 4 and step.fixed_bytes() is None
    assert step.memory(None) == {"peak_gib": None, "peak_reserved_gib": None, "fixed_gib": None,
                                 "peak_mib_per_row": None}
    logs = step()
    assert torch.isfinite(logs["loss"]) and logs["grad_norm"] > 0
    GiB, MiB = 2 ** 30, 2 ** 20
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 3 * GiB)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * GiB + 400 * MiB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 4 * GiB)
    step.run.device = torch.device("cuda")
    fixed = step.fixed_bytes()
    assert fixed == 3 * GiB
    assert step.memory(fixed) == {"peak_gib": pytest.approx(3 + 400 / 1024), "peak_reserved_gib": 4.0,
                                  "fixed_gib": 3.0, "peak_mib_per_row": pytest.approx(100.0)}


def test_profile_ft_rejects_bad_arguments():
    with pytest.raises(ValueError, match="FT workload runs the paths fast and ref"):
        cli(["profile", "--model", "MFM-T/2", "--workload", "ft", "--paths", "compile", "--device", "cpu"])
    for bad in (["--ft-batch", "0"], ["--ft-micro-batch", "-1"], ["--workload", "train"], ["--ft-reward", "x"]):
        with pytest.raises(SystemExit):
            cli(["profile", "--model", "MFM-T/2", "--workload", "ft", "--device", "cpu", *bad])
    from mfm_fast.profile import ft_model, ft_reward
    digits, _ = ft_model("ref", "MFM-Digits", "cpu", depth=1, encoder_depth=1)
    with pytest.raises(ValueError, match="4-channel latents"):
        ft_reward("toy", digits, "cpu", "tiny")
