"""backend: MFM_FAST_IMPL resolution, fallback warning, `python -m mfm_fast info`, no CUDA at import."""
import subprocess
import sys
import warnings

import pytest

from mfm_fast import backend


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(backend, "_warned", False)
    monkeypatch.delenv("MFM_FAST_IMPL", raising=False)
    return monkeypatch


def test_env_var_is_parsed(fresh):
    fresh.setattr(backend, "triton_status", lambda: (True, "test"))
    fresh.setattr(backend, "interpreter_on", lambda: False)
    assert backend.resolve_impl() == "triton"
    fresh.setenv("MFM_FAST_IMPL", "torch")
    assert backend.resolve_impl() == "torch" and backend.resolve_impl("auto") == "torch"
    assert backend.resolve_impl("triton") == "triton"  # an explicit argument beats the variable
    fresh.setenv("MFM_FAST_IMPL", "cuda")
    with pytest.raises(ValueError, match="MFM_FAST_IMPL"):
        backend.resolve_impl()
    with pytest.raises(ValueError, match="impl must be one of"):
        backend.resolve_impl("fast")


def test_explicit_triton_without_ability_raises_with_the_reason(fresh):
    fresh.setattr(backend, "triton_status", lambda: (False, "no CUDA device is available (simulated)"))
    with pytest.raises(RuntimeError, match=r"impl='triton' cannot run: no CUDA device is available \(simulated\)"):
        backend.resolve_impl("triton")
    fresh.setenv("MFM_FAST_IMPL", "triton")
    with pytest.raises(RuntimeError, match="simulated"):
        backend.resolve_impl()


def test_auto_falls_back_with_exactly_one_warning(fresh):
    fresh.setattr(backend, "triton_status", lambda: (False, "triton is not installed (simulated)"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [backend.resolve_impl("auto") for _ in range(3)] == ["torch"] * 3
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "simulated" in msgs[0]


def test_interpreter_is_never_chosen_implicitly(fresh):
    fresh.setattr(backend, "triton_status", lambda: (True, "interpreter"))
    fresh.setattr(backend, "interpreter_on", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.resolve_impl("auto") == "torch"
    assert backend.resolve_impl("triton") == "triton"


@pytest.mark.interpret
def test_op_table_is_all_triton_under_the_interpreter():
    kinds = backend.op_kernels("triton")
    assert set(kinds) == {"time_embed", "ln_modulate", "gate_residual_ln_modulate", "input_stage", "bias_gelu",
                          "attention"}
    assert all(k == "triton" for n, k in kinds.items() if n != "attention"), kinds
    assert set(backend.op_kernels("torch").values()) == {"ref"}


def test_info_command_runs():
    r = subprocess.run([sys.executable, "-m", "mfm_fast", "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for key in ("torch:", "triton:", "gpu:", "impl:", "op time_embed:", "op bias_gelu:", "attention:",
                "attention (jvp):", "sdpa:"):
        assert key in r.stdout, (key, r.stdout)


NO_CUDA_SCRIPT = """
import torch
def forbidden(*a, **k):
    raise AssertionError("CUDA queried during import or construction")
for name in ("is_available", "device_count", "get_device_capability", "get_device_name", "_lazy_init", "init"):
    setattr(torch.cuda, name, forbidden)
import mfm_fast
import mfm_fast.backend, mfm_fast.ops.fused, mfm_fast.ops.attention
model = mfm_fast.MFMDiT("MFM-T/2")
assert not torch.cuda.is_initialized()
print("ok")
"""


def test_import_and_construction_make_no_cuda_call():
    r = subprocess.run([sys.executable, "-c", NO_CUDA_SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
