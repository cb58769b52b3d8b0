"""Fidelity to the MFM release where it is the reference: the MFM-GF steering term at every t, the guidance-table
row, preserve_t_cond_0, the traceless config fields of release checkpoints, and float64 math in float64.

The release formulas are written out here from OFFICIAL_CHECKPOINT.md §2.4, §2.5 and §4, independently of mfm_fast.
"""
import math

import pytest
import torch
import torch.nn as nn

from mfm_fast.models.checkpoints import CheckpointError, load_official_mfm
from mfm_fast.models.dit import MFMDiT, make_config
from mfm_fast.ops.adaln import ln_modulate_ref
from mfm_fast.ops.attention import attention_ref
from mfm_fast.steer import guided_drift

F64 = torch.float64
PREFIX = "model.model.dit."


class ToyMap(nn.Module):
    """v_{s,u}(xbar; t, x): a small smooth function of every input, so the MFM-GF weights are not uniform."""

    def __init__(self, dim=3):
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.a = nn.Parameter(torch.randn(dim, dim, generator=g, dtype=F64) / dim)
        self.b = nn.Parameter(torch.randn(dim, dim, generator=g, dtype=F64) / dim)

    def forward(self, s, u, xbar, t, x, **cond):
        n = xbar.shape[0] // x.shape[0]
        ctx = (x @ self.b.T).repeat_interleave(n, 0)
        times = (0.3 * s + 0.7 * u - 0.5 * t).repeat_interleave(n, 0)[:, None]
        return torch.tanh(xbar @ self.a.T + ctx + times)


def reward(x1):
    return -(x1 - 0.5).pow(2).sum(-1)


def release_mfmgf_correction(model, x, t, eps, lam):
    """The release's `sne` correction (x̃1 − x̄1)/max(1 − t, 1e-3) from the same one-step samples."""
    B, N, D = eps.shape
    tt = torch.full((B,), t, dtype=F64)
    rows = eps.reshape(B * N, D)
    v = model(torch.zeros_like(tt), torch.ones_like(tt), rows, tt, x)
    x1 = (rows + v).view(B, N, D)
    w = torch.softmax(lam * reward(x1.reshape(B * N, D)).view(B, N), dim=1)
    twisted, uniform = (w[..., None] * x1).sum(1), x1.mean(1)
    return (twisted - uniform) / max(1 - t, 1e-3)


def steering_term(model, x, t, eps, sde, lam=2.0):
    kw = dict(sde=sde, lam=lam, renorm=None, renorm_scale=1.0, clamp_ratio=25.0, chunk_size=None, cond={})
    tt = torch.tensor(t, dtype=F64)
    with torch.no_grad():
        steered = guided_drift(model, reward, x, tt, eps, method="mfm-gf", **kw)
        base = guided_drift(model, reward, x, tt, None, method="none", **kw)
    return steered - base


# ---------------------------------------------------------------------------------------------- (a), (b) MFM-GF
@pytest.mark.parametrize("t", [0.01, 0.02, 0.9995, 0.99999])
@pytest.mark.parametrize("sde", [False, True])
def test_mfmgf_steering_term_is_the_release_correction_at_every_t(t, sde):
    """ODE adds exactly the release's correction c, the SDE 2c (σ² · c/(σ²/2)), also where σ² is clamped
    (t < 1/26; ours was 25t/(1−t)·c) and where 1 − t is (t > 0.999; ours was (1−t)/1e-3·c)."""
    model = ToyMap()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, generator=g, dtype=F64)
    eps = torch.randn(4, 6, 3, generator=g, dtype=F64)
    corr = release_mfmgf_correction(model, x, t, eps, lam=2.0)
    assert corr.abs().max() > 1e-3  # a non-trivial correction
    torch.testing.assert_close(steering_term(model, x, t, eps, sde), (2 if sde else 1) * corr, rtol=1e-10,
                               atol=1e-12)


# ---------------------------------------------------------------------------------------------- (c) guidance row
def test_guidance_row_is_class_idx_plus_xcond_idx_times_n_x():
    model = MFMDiT("MFM-T/2", impl="torch", class_guidance_ws=(1.0, 2.5, 4.0), xcond_guidance_ws=(1.0, 2.0))
    cfg = torch.tensor([1.0, 2.5, 4.0, 1.0, 2.5, 4.0])
    xcs = torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0, 2.0])
    n_x = 2
    expected = torch.tensor([c + x * n_x for x in (0, 1) for c in (0, 1, 2)])
    assert torch.equal(model.guidance_index(cfg, xcs), expected)
    # and the forward reads that row: put the row number into the table and look at what the encoder sees
    with torch.no_grad():
        model.guidance_embedder.embedding_table.weight.copy_(
            torch.arange(6, dtype=torch.float32)[:, None].expand(6, 144))
    G = 6
    y = torch.full((G,), 10)
    c_enc, c_dec, _ = model.conditioning(torch.zeros(G), torch.zeros(G), torch.zeros(G), y, cfg, xcs)
    torch.testing.assert_close((c_enc - c_dec)[:, 0] - (c_enc - c_dec)[0, 0], expected.float() - expected[0])


def test_guidance_tables_the_release_index_cannot_address_are_refused():
    with pytest.raises(ValueError, match="guidance row index"):
        make_config("MFM-T/2", class_guidance_ws=(1.0, 2.5), xcond_guidance_ws=(1.0, 1.5, 2.0))


# ---------------------------------------------------------------------------------------------- (d) preserve_t_cond_0
def _random_tiny(**overrides):
    torch.manual_seed(5)
    model = MFMDiT("MFM-T/2", impl="torch", **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def _inputs(B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    ev = (4, 8, 8)
    return (torch.rand(B, generator=g), torch.rand(B, generator=g), torch.randn(B, *ev, generator=g),
            torch.randn(B, *ev, generator=g))


def test_preserve_t_cond_0_modulates_the_context_as_the_release():
    """Release: (shift, scale) -> (t·shift, t·scale − 1). At t = 0 the context is gated off exactly; at t = 1 it
    equals the plain model whose scale bias is lowered by one."""
    pres = _random_tiny(preserve_t_cond_0=True)
    plain = _random_tiny()
    s, u, xbar, x = _inputs()
    zero, one = torch.zeros(3), torch.ones(3)
    with torch.no_grad():
        a = pres(s, u, xbar, zero, x)
        assert torch.equal(a, pres(s, u, xbar, zero, 5 * torch.randn_like(x)))
        assert (plain(s, u, xbar, zero, x) - plain(s, u, xbar, zero, 5 * torch.randn_like(x))).abs().max() > 1e-3
        plain.x_cond_adaLN[1].bias[144:] -= 1
        torch.testing.assert_close(pres(s, u, xbar, one, x), plain(s, u, xbar, one, x), rtol=1e-4, atol=1e-5)


def test_preserve_t_cond_0_is_an_explicit_load_option(tmp_path):
    model = _random_tiny()
    raw = {PREFIX + k: v for k, v in model.state_dict().items()}
    arch = dict(num_heads=2, encoder_depth=2)
    # the weights cannot tell: not saying is refused for a file that is not the released XL/2
    with pytest.raises(CheckpointError, match="preserve_t_cond_0"):
        load_official_mfm(raw, impl="torch", **arch)
    on = load_official_mfm(raw, impl="torch", preserve_t_cond_0=True, **arch)
    off = load_official_mfm(raw, impl="torch", preserve_t_cond_0=False, **arch)
    assert on.config.preserve_t_cond_0 and not off.config.preserve_t_cond_0
    s, u, xbar, x = _inputs()
    with torch.no_grad():
        assert (on(s, u, xbar, torch.zeros(3), x) - off(s, u, xbar, torch.zeros(3), x)).abs().max() > 1e-3
    # mfm_fast's own files store it
    from mfm_fast.models.checkpoints import save_safetensors
    save_safetensors(on, tmp_path / "p.safetensors")
    assert load_official_mfm(tmp_path / "p.safetensors", impl="torch").config.preserve_t_cond_0


# ---------------------------------------------------------------------------------------------- (e) traceless fields
def test_encoder_depth_and_heads_are_not_taken_from_a_registry_config_of_the_same_size():
    """A 3-block, hidden-144 release file with encoder depth 1 has MFM-T/2's shapes (encoder depth 2): it must not
    load as MFM-T/2."""
    truth = _random_tiny(encoder_depth=1)
    raw = {PREFIX + k: v for k, v in truth.state_dict().items()}
    with pytest.raises(CheckpointError, match="encoder_depth"):
        load_official_mfm(raw, impl="torch")
    with pytest.raises(CheckpointError, match="num_heads"):
        load_official_mfm(raw, impl="torch", encoder_depth=1, preserve_t_cond_0=False)
    got = load_official_mfm(raw, impl="torch", num_heads=2, encoder_depth=1, preserve_t_cond_0=False)
    assert got.config == truth.config
    s, u, xbar, x = _inputs()
    t = torch.rand(3)
    with torch.no_grad():
        torch.testing.assert_close(got(s, u, xbar, t, x), truth(s, u, xbar, t, x), rtol=0, atol=0)


def test_released_xl2_architecture_still_loads_without_arguments():
    with torch.device("meta"):
        ref = MFMDiT("MFM-XL/2", impl="torch")
    raw = {PREFIX + k: torch.empty(v.shape, device="meta") for k, v in ref.state_dict().items()}
    model = load_official_mfm(raw, impl="torch", device="meta")
    c = model.config
    assert (c.num_heads, c.encoder_depth, c.preserve_t_cond_0) == (16, 20, False)
    assert load_official_mfm(raw, impl="torch", device="meta", preserve_t_cond_0=True).config.preserve_t_cond_0


# ---------------------------------------------------------------------------------------------- (f) float64
def _ln_modulate_f64(x, shift, scale, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    xn = (x - mean) / torch.sqrt(var + eps)
    G = shift.shape[0]
    xn = xn.view(G, -1, *x.shape[1:])
    return (xn * (1 + scale[:, None, None]) + shift[:, None, None]).reshape(x.shape)


def test_float64_layernorm_is_float64_math():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 144, generator=g, dtype=F64) * 3 + 1
    shift, scale = torch.randn(2, 144, generator=g, dtype=F64), torch.randn(2, 144, generator=g, dtype=F64)
    got = ln_modulate_ref(x, shift, scale)
    assert got.dtype == F64
    torch.testing.assert_close(got, _ln_modulate_f64(x, shift, scale), rtol=1e-12, atol=1e-12)


def test_float64_attention_is_float64_math():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 17, 72, generator=g, dtype=F64) for _ in range(3))
    logits = q @ k.transpose(-1, -2) / math.sqrt(72)
    ref = torch.softmax(logits, -1) @ v
    got = attention_ref(q, k, v)
    assert got.dtype == F64
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_float64_model_forward_agrees_with_float64_ops_to_float64_precision():
    """The whole torch-path model in float64 is deterministic in float64: with the same weights, perturbing the
    input by 1e-12 moves the output by about that much (fp32 internals would round it away or jump by ~1e-7)."""
    model = _random_tiny().double().set_impl("torch")
    s, u, xbar, x = (a.double() for a in _inputs())
    t = torch.rand(3, dtype=F64)
    with torch.no_grad():
        a = model(s, u, xbar, t, x)
        b = model(s, u, xbar + 1e-12 * torch.randn_like(xbar), t, x)
    d = (a - b).abs().max().item()
    assert 0 < d < 1e-9
