"""Model protocol and MFMDiT contract (reference path)."""
import numpy as np
import pytest
import torch

import mfm_fast
from mfm_fast.models.dit import CONFIGS, MFMDiT, make_config, sincos_pos_embed


def tiny(**kw):
    return MFMDiT("MFM-T/2", impl="torch", **kw)


def randomize_(model, scale=0.05):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def test_xl2_parameter_count_on_meta_device():
    with torch.device("meta"):
        model = MFMDiT("MFM-XL/2", impl="torch")
    sd = model.state_dict()
    assert len(sd) == 313
    assert sum(v.numel() for v in sd.values()) == 684_286_864
    assert sd["pos_embed"].shape == (1, 256, 1152)
    assert sd["blocks.27.adaLN_modulation.1.weight"].shape == (6912, 1152)
    assert sd["guidance_embedder.embedding_table.weight"].shape == (2, 1152)
    assert sd["y_embedder.embedding_table.weight"].shape == (1001, 1152)
    assert sd["final_layer.linear.weight"].shape == (16, 1152)


def test_shape_dtype_contract_with_labels_and_null_class():
    model = randomize_(tiny())
    B = 3
    ev = model.event_shape
    xbar, x = torch.randn(B, *ev), torch.randn(B, *ev)
    s, u, t = torch.rand(B), torch.rand(B), torch.rand(B)
    y = torch.tensor([0, 4, 10])  # 10 = null class of MFM-T/2
    v = model(s, u, xbar, t, x, y=y)
    assert v.shape == xbar.shape and v.dtype == xbar.dtype and torch.isfinite(v).all()
    v_null = model(s, u, xbar, t, x)  # y omitted -> null class
    v_null2 = model(s, u, xbar, t, x, y=torch.full((B,), 10))
    torch.testing.assert_close(v_null, v_null2)
    assert not torch.allclose(v, v_null)
    v64 = model.double()(s.double(), u.double(), xbar.double(), t.double(), x.double(), y=y)
    assert v64.dtype == torch.float64


def test_init_gates_context_off_and_pos_embed_is_sincos():
    model = tiny()
    B, ev = 2, tiny().event_shape
    xbar = torch.randn(B, *ev)
    s, u, t = torch.rand(B), torch.rand(B), torch.rand(B)
    # at init the x-context branch adds exactly nothing, whatever x is
    with torch.no_grad():
        for p in model.final_layer.parameters():
            p.normal_()  # make the output depend on the stream
    a = model(s, u, xbar, t, torch.randn(B, *ev))
    b = model(s, u, xbar, t, torch.randn(B, *ev))
    torch.testing.assert_close(a, b)
    n = int(np.sqrt(model.config.num_tokens))
    ref = sincos_pos_embed(model.config.hidden_size, n)
    D = model.config.hidden_size
    col = 1  # token 1 is row 0, col 1: first quarter is sin(col·w_0) = sin(1)
    assert ref[col, 0] == pytest.approx(np.sin(1.0), abs=1e-6)
    assert ref[n, D // 2] == pytest.approx(np.sin(1.0), abs=1e-6)  # token n: row 1, col 0
    torch.testing.assert_close(model.pos_embed[0], torch.from_numpy(ref))


def test_particle_groups_equal_repeated_conditioning():
    model = randomize_(tiny())
    G, N, ev = 2, 3, model.event_shape
    xbar = torch.randn(G * N, *ev)
    x = torch.randn(G, *ev)
    s, u, t, y = torch.rand(G), torch.rand(G), torch.rand(G), torch.tensor([1, 2])
    v = model(s, u, xbar, t, x, y=y)
    r = lambda z: z.repeat_interleave(N, 0)  # noqa: E731
    v_rep = model(r(s), r(u), xbar, r(t), r(x), y=r(y))
    torch.testing.assert_close(v, v_rep, rtol=1e-5, atol=1e-6)


def test_guidance_table_rounds_to_nearest_with_ties_to_first():
    model = tiny()
    cfg = torch.tensor([1.0, 2.0, 1.75, 2.5, 7.0])
    idx = model.guidance_index(cfg, torch.ones(5))
    assert idx.tolist() == [0, 1, 0, 1, 1]


def test_time_flip_negates_and_flips_inner_times():
    torch.manual_seed(3)
    a = randomize_(tiny(time_flip=True))
    b = tiny(time_flip=False)
    b.load_state_dict(a.state_dict())
    B, ev = 2, a.event_shape
    xbar, x = torch.randn(B, *ev), torch.randn(B, *ev)
    s, u, t = torch.rand(B), torch.rand(B), torch.rand(B)
    torch.testing.assert_close(a(s, u, xbar, t, x), -b(1 - s, 1 - u, xbar, t, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(s=torch.full((2,), 1.5)), "s must lie in"),
    (dict(t=torch.rand(3)), r"t must have shape \(2,\)"),
    (dict(xbar=torch.randn(3, 4, 8, 8)), "not a multiple"),
    (dict(x=torch.randn(2, 4, 4, 4)), "x must have shape"),
    (dict(y=torch.tensor([0.5, 1.0])), "y must be an integer"),
    (dict(y=torch.tensor([0, 11])), "y must lie in"),
    (dict(xbar=torch.randint(0, 3, (2, 4, 8, 8))), "xbar must be floating"),
])
def test_bad_inputs_name_the_argument(bad, match):
    model = tiny()
    args = dict(s=torch.rand(2), u=torch.rand(2), xbar=torch.randn(2, 4, 8, 8), t=torch.rand(2),
                x=torch.randn(2, 4, 8, 8), y=None)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        model(args["s"], args["u"], args["xbar"], args["t"], args["x"], y=args["y"])


def test_unknown_config_and_override_errors():
    with pytest.raises(ValueError, match="unknown config name"):
        MFMDiT("MFM-XXL/2")
    with pytest.raises(TypeError, match="unknown config overrides"):
        make_config("MFM-S/2", hidden=3)
    with pytest.raises(ValueError, match="not divisible"):
        make_config("MFM-S/2", num_heads=5)
    with pytest.raises(ValueError, match="impl must be one of"):
        tiny().set_impl("cuda")(torch.rand(1), torch.rand(1), torch.randn(1, 4, 8, 8), torch.rand(1),
                               torch.randn(1, 4, 8, 8))


def test_registry_overrides():
    cfg = make_config("MFM-B/2", input_size=16, in_channels=3, num_classes=7)
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.num_tokens) == (768, 12, 12, 64)
    assert set(CONFIGS) >= {"MFM-S/2", "MFM-B/2", "MFM-L/2", "MFM-XL/2"}


def test_public_primitives_on_mlp():
    model = mfm_fast.MFMMLP(2, hidden=32, depth=2)
    x = torch.randn(4, 2)
    xs = mfm_fast.posterior_sample(model, 0.3, x, 5, generator=torch.Generator().manual_seed(0))
    assert xs.shape == (4, 5, 2)
    xs2 = mfm_fast.posterior_sample(model, 0.3, x, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(xs, xs2)
    # posterior_sample is X_{0,1}(eps; t, x)
    eps = torch.randn(8, 2)
    ref = mfm_fast.flow_map(model, 0.0, 1.0, eps, torch.full((8,), 0.3), x.repeat_interleave(2, 0))
    got = mfm_fast.posterior_sample(model, 0.3, x.repeat_interleave(2, 0), 1, noise=eps)[:, 0]
    torch.testing.assert_close(got, ref)
    b = mfm_fast.drift(model, torch.rand(4), x)
    assert b.shape == x.shape
    with pytest.raises(ValueError, match="t must lie in"):
        mfm_fast.posterior_sample(model, 1.2, x, 2)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        mfm_fast.posterior_sample(model, 0.5, x, 0)
    out = mfm_fast.refine_sample(model, torch.randn(6, 2), steps=3)
    assert out.shape == (6, 2) and torch.isfinite(out).all()
