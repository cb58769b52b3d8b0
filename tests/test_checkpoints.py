"""Official checkpoint loading (OFFICIAL_CHECKPOINT.md), checked against forwards written here from the spec.

The reference forwards below operate directly on state-dict tensors and share no code with MFMDiT.
"""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from mfm_fast.models.checkpoints import (CheckpointError, infer_config, load_official_mfm, mfm_from_sit,
                                         save_safetensors)
from mfm_fast.models.dit import MFMDiT

PREFIX = "model.model.dit."
# small config with the release's structure: hidden 144 (2 heads of 72), 3 blocks, encoder 2, 4x8x8 latents
SMALL = dict(D=144, depth=3, heads=2, enc=2, C=4, p=2, size=8, classes=10)
TIMES = ("s_embedder", "t_embedder", "t_cond_embedder", "s_embedder_second", "t_embedder_second")


# ------------------------------------------------------------------------------------ shapes from the spec tables
def block_shapes(D, depth, mlp=4):
    out = {}
    for i in range(depth):
        b = f"blocks.{i}."
        out.update({b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
                    b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                    b + "mlp.fc1.weight": (mlp * D, D), b + "mlp.fc1.bias": (mlp * D,),
                    b + "mlp.fc2.weight": (D, mlp * D), b + "mlp.fc2.bias": (D,),
                    b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,)})
    return out


def time_embedder_shapes(name, D):
    return {f"{name}.mlp.0.weight": (D, 256), f"{name}.mlp.0.bias": (D,),
            f"{name}.mlp.2.weight": (D, D), f"{name}.mlp.2.bias": (D,)}


def official_shapes(D, depth, C, p, size, classes, guidance_rows=2, **_):
    L = (size // p) ** 2
    out = {"x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,),
           "x_cond_embedder.proj.weight": (D, C, p, p), "x_cond_embedder.proj.bias": (D,),
           "x_cond_adaLN.1.weight": (2 * D, D), "x_cond_adaLN.1.bias": (2 * D,),
           "y_embedder.embedding_table.weight": (classes + 1, D),
           "guidance_embedder.embedding_table.weight": (guidance_rows, D),
           "pos_embed": (1, L, D),
           "final_layer.linear.weight": (p * p * C, D), "final_layer.linear.bias": (p * p * C,),
           "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,)}
    for name in TIMES:
        out.update(time_embedder_shapes(name, D))
    out.update(block_shapes(D, depth))
    return out


def sit_shapes(D, depth, C, p, size, classes, **_):
    L = (size // p) ** 2
    out = {"x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,),
           "y_embedder.embedding_table.weight": (classes + 1, D), "pos_embed": (1, L, D),
           "final_layer.linear.weight": (p * p * 2 * C, D), "final_layer.linear.bias": (p * p * 2 * C,),
           "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,)}
    out.update(time_embedder_shapes("t_embedder", D))
    out.update(block_shapes(D, depth))
    return out


def random_state(shapes, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * scale for k, s in shapes.items()}


# ------------------------------------------------------------------------------------ reference forwards (§2, §5)
def temb(t, sd, name):
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    arg = t.float()[:, None] * freqs[None]
    feat = torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)  # cos first, t not scaled
    h = F.silu(F.linear(feat, sd[f"{name}.mlp.0.weight"], sd[f"{name}.mlp.0.bias"]))
    return F.linear(h, sd[f"{name}.mlp.2.weight"], sd[f"{name}.mlp.2.bias"])


def patchify(x, sd, name, p):
    h = F.conv2d(x, sd[f"{name}.proj.weight"], sd[f"{name}.proj.bias"], stride=p)  # (B, D, n, n)
    return h.flatten(2).transpose(1, 2)  # row-major tokens


def ln_mod(x, shift, scale):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


def block(x, c, sd, i, heads):
    b = f"blocks.{i}."
    sh1, sc1, g1, sh2, sc2, g2 = F.linear(F.silu(c), sd[b + "adaLN_modulation.1.weight"],
                                          sd[b + "adaLN_modulation.1.bias"]).chunk(6, dim=-1)
    B, L, D = x.shape
    qkv = F.linear(ln_mod(x, sh1, sc1), sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
    q, k, v = qkv.reshape(B, L, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // heads), dim=-1) @ v
    att = att.transpose(1, 2).reshape(B, L, D)
    x = x + g1[:, None] * F.linear(att, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
    m = F.gelu(F.linear(ln_mod(x, sh2, sc2), sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]), approximate="tanh")
    return x + g2[:, None] * F.linear(m, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])


def final(x, c, sd, p, C_out, C_keep):
    shift, scale = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=-1)
    out = F.linear(ln_mod(x, shift, scale), sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    B, L, _ = out.shape
    n = math.isqrt(L)
    # image[c, p*i + a, p*j + b] = out[i*n + j][(a*p + b)*C_out + c]
    img = torch.empty(B, C_out, n * p, n * p)
    for i in range(n):
        for j in range(n):
            for a in range(p):
                for bb in range(p):
                    base = (a * p + bb) * C_out
                    img[:, :, p * i + a, p * j + bb] = out[:, i * n + j, base:base + C_out]
    return img[:, :C_keep]


def guidance_row(w, ws=(1.0, 2.5)):
    return min(range(len(ws)), key=lambda i: (abs(w - ws[i]), i))  # nearest entry, ties to the first


def official_forward(sd, s, u, xbar, t_cond, x_cond, y, cfg_scale, heads, enc, p):
    s_, u_ = 1 - s, 1 - u  # is_zero_data flip; t_cond is not flipped
    e_c = temb(t_cond, sd, "t_cond_embedder")
    shift, scale = F.linear(F.silu(e_c), sd["x_cond_adaLN.1.weight"], sd["x_cond_adaLN.1.bias"]).chunk(2, dim=-1)
    g = patchify(x_cond, sd, "x_cond_embedder", p) * (1 + scale[:, None]) + shift[:, None]
    x = patchify(xbar, sd, "x_embedder", p) + g + sd["pos_embed"]
    y_emb = sd["y_embedder.embedding_table.weight"][y]
    g_emb = sd["guidance_embedder.embedding_table.weight"][[guidance_row(float(w)) for w in cfg_scale]]
    c1 = temb(s_, sd, "s_embedder") + temb(u_, sd, "t_embedder") + e_c + y_emb + g_emb
    c2 = temb(s_, sd, "s_embedder_second") + temb(u_, sd, "t_embedder_second") + e_c + y_emb
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        x = block(x, c1 if i < enc else c2, sd, i, heads)
    C = xbar.shape[1]
    return -final(x, c2, sd, p, C, C)


def sit_forward(sd, t, x, y, heads, p):
    c = temb(t, sd, "t_embedder") + sd["y_embedder.embedding_table.weight"][y]
    h = patchify(x, sd, "x_embedder", p) + sd["pos_embed"]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        h = block(h, c, sd, i, heads)
    C_out = sd["final_layer.linear.weight"].shape[0] // (p * p)  # 2C for SiT (learn_sigma), C for DMF
    return final(h, c, sd, p, C_out, x.shape[1])


def small_official(seed=0):
    return {PREFIX + k: v for k, v in random_state(official_shapes(**SMALL), seed).items()}


def inputs(B=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    ev = (SMALL["C"], SMALL["size"], SMALL["size"])
    return dict(s=torch.rand(B, generator=g), u=torch.rand(B, generator=g), xbar=torch.randn(B, *ev, generator=g),
                t=torch.rand(B, generator=g), x=torch.randn(B, *ev, generator=g),
                y=torch.randint(0, SMALL["classes"] + 1, (B,), generator=g))


# ------------------------------------------------------------------------------------ tests
def test_xl2_spec_shapes_are_the_release_count_and_load_strictly_on_meta():
    xl = dict(D=1152, depth=28, C=4, p=2, size=32, classes=1000)
    shapes = official_shapes(**xl)
    assert len(shapes) == 313 and sum(math.prod(s) for s in shapes.values()) == 684_286_864
    sd = {PREFIX + k: torch.empty(s, device="meta") for k, s in shapes.items()}
    sd["model.latents_scale"] = torch.empty(1, 4, 1, 1, device="meta")
    sd["model.latents_bias"] = torch.empty(1, 4, 1, 1, device="meta")
    cfg = infer_config({k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)})
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.encoder_depth) == (1152, 28, 16, 20)
    assert (cfg.input_size, cfg.patch_size, cfg.in_channels, cfg.num_classes) == (32, 2, 4, 1000)
    assert cfg.learn_sigma is False and cfg.time_flip is True and cfg.class_guidance_ws == (1.0, 2.5)
    model = load_official_mfm(sd, impl="torch", device="meta")
    assert model.config == cfg and model.pos_embed.is_meta and not model.pos_embed.requires_grad
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes


def test_sit_xl2_spec_shapes_on_meta():
    shapes = sit_shapes(D=1152, depth=28, C=4, p=2, size=32, classes=1000)
    assert len(shapes) == 292 and sum(math.prod(s) for s in shapes.values()) == 675_129_632
    model = mfm_from_sit({k: torch.empty(s, device="meta") for k, s in shapes.items()}, impl="torch", device="meta")
    c = model.config
    assert (c.hidden_size, c.depth, c.num_heads, c.encoder_depth) == (1152, 28, 16, 20)
    assert c.learn_sigma is False and c.time_flip is False
    assert tuple(model.final_layer.linear.weight.shape) == (16, 1152)


def test_official_forward_matches_the_spec_on_random_weights():
    raw = small_official()
    model = load_official_mfm(raw, impl="torch", config="MFM-T/2")
    sd = {k[len(PREFIX):]: v for k, v in raw.items()}
    assert model.config.num_heads == 2 and model.config.encoder_depth == 2 and model.config.time_flip
    inp = inputs()
    # guidance rows: entries of the table (a weight outside it has no row: the model refuses what the release snaps)
    cfg = torch.tensor([1.0, 2.5, 1.0, 2.5, 2.5])
    got = model(inp["s"], inp["u"], inp["xbar"], inp["t"], inp["x"], y=inp["y"], cfg=cfg)
    with pytest.raises(ValueError, match="cfg must be one of"):
        model(inp["s"], inp["u"], inp["xbar"], inp["t"], inp["x"], y=inp["y"],
              cfg=torch.tensor([1.0, 2.5, 1.75, 2.0, 7.0]))
    ref = official_forward(sd, inp["s"], inp["u"], inp["xbar"], inp["t"], inp["x"], inp["y"], cfg, 2, 2, 2)
    assert ref.abs().mean() > 1e-2  # non-degenerate: every path carries signal
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    # the context and the guidance row both matter with these weights, so the comparison above sees them
    other = official_forward(sd, inp["s"], inp["u"], inp["xbar"], inp["t"], torch.randn_like(inp["x"]), inp["y"],
                             cfg, 2, 2, 2)
    assert (other - ref).abs().max() > 1e-3
    flipped = official_forward(sd, inp["s"], inp["u"], inp["xbar"], inp["t"], inp["x"], inp["y"],
                               torch.tensor([2.5, 1.0, 2.5, 1.0, 1.0]), 2, 2, 2)
    assert (flipped - ref)[:4].flatten(1).abs().amax(1).min() > 1e-4


@pytest.mark.parametrize("drop, needle", [("blocks.2.mlp.fc2.bias", "missing keys"),
                                          ("t_cond_embedder.mlp.0.weight", "missing keys")])
def test_missing_key_is_named(drop, needle):
    raw = small_official()
    del raw[PREFIX + drop]
    with pytest.raises(CheckpointError, match=needle) as err:
        load_official_mfm(raw, impl="torch", config="MFM-T/2")
    assert repr(drop) in str(err.value)


def test_unexpected_and_misshaped_keys_are_named():
    raw = small_official()
    raw[PREFIX + "blocks.0.attn.q_norm.weight"] = torch.randn(72)
    with pytest.raises(CheckpointError, match="unexpected keys") as err:
        load_official_mfm(raw, impl="torch", config="MFM-T/2")
    assert "'blocks.0.attn.q_norm.weight'" in str(err.value) and "ignore=" in str(err.value)
    raw["teacher.blocks.0.attn.qkv.weight"] = torch.randn(3)
    model = load_official_mfm(raw, impl="torch", config="MFM-T/2", ignore=("blocks.0.attn.q_norm.", "teacher."))
    assert "blocks.0.attn.q_norm.weight" not in model.state_dict()

    raw = small_official()
    raw[PREFIX + "blocks.1.attn.proj.weight"] = torch.randn(144, 145)
    with pytest.raises(CheckpointError, match="wrong shapes") as err:
        load_official_mfm(raw, impl="torch", config="MFM-T/2")
    assert "'blocks.1.attn.proj.weight'" in str(err.value) and "(144, 145)" in str(err.value)

    raw = small_official()
    raw[PREFIX + "guidance_embedder.embedding_table.weight"] = torch.randn(3, 144)
    arch = dict(num_heads=2, encoder_depth=2, preserve_t_cond_0=False)  # inferred, not from a registry config
    with pytest.raises(CheckpointError, match="class_guidance_ws"):
        load_official_mfm(raw, impl="torch", **arch)
    model = load_official_mfm(raw, impl="torch", class_guidance_ws=(1.0, 2.0, 4.0), **arch)
    assert model.guidance_embedder.embedding_table.weight.shape == (3, 144)


def test_unknown_hidden_size_asks_for_num_heads():
    shapes = official_shapes(D=96, depth=2, C=4, p=2, size=4, classes=3)
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    with pytest.raises(CheckpointError, match="num_heads"):
        load_official_mfm(state, device="meta")
    model = load_official_mfm(state, device="meta", num_heads=4, encoder_depth=1, preserve_t_cond_0=False)
    assert model.config.num_heads == 4 and model.config.encoder_depth == 1


def test_nestings_prefixes_and_ignored_entries_load_the_same_weights():
    flat = random_state(official_shapes(**SMALL))
    base = load_official_mfm({PREFIX + k: v for k, v in flat.items()}, impl="torch", config="MFM-T/2")
    variants = [
        {"state_dict": {**{PREFIX + k: v for k, v in flat.items()}, "model.latents_scale": torch.ones(1, 4, 1, 1),
                        "model.weighting_model.net.0.weight": torch.randn(3, 3)}, "epoch": 3},
        {"ema": {"module._orig_mod." + k: v for k, v in flat.items()}, "model": {"junk": torch.zeros(1)}},
        {"model": {"dit." + k: v for k, v in flat.items()}, "n_averaged": torch.tensor(7)},
        {"module.model.dit." + k: v for k, v in flat.items()},
        dict(flat),
    ]
    for nested in variants:
        model = load_official_mfm(nested, impl="torch", config="MFM-T/2")
        for k, v in base.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match="both map"):
        load_official_mfm({**{PREFIX + k: v for k, v in flat.items()}, "pos_embed": flat["pos_embed"]}, config="MFM-T/2")


def test_weights_only_file_round_trip_and_refusal(tmp_path):
    raw = small_official(seed=3)
    path = tmp_path / "mfm-small.pt"
    torch.save(raw, path)
    model = load_official_mfm(str(path), impl="torch", config="MFM-T/2", dtype=torch.float64)
    assert model.pos_embed.dtype == torch.float64
    torch.testing.assert_close(model.pos_embed.float(), raw[PREFIX + "pos_embed"])
    legacy = tmp_path / "legacy.pt"  # the pre-zip serializer cannot be memory-mapped: read without mmap
    torch.save(raw, legacy, _use_new_zipfile_serialization=False)
    torch.testing.assert_close(load_official_mfm(legacy, impl="torch", config="MFM-T/2").pos_embed, raw[PREFIX + "pos_embed"])
    bad = tmp_path / "with-args.pt"
    torch.save({"model": raw, "args": argparse.Namespace(lr=1e-4)}, bad)
    with pytest.raises(CheckpointError, match="weights_only=False"):
        load_official_mfm(bad, impl="torch", config="MFM-T/2")
    assert load_official_mfm(bad, impl="torch", config="MFM-T/2", weights_only=False).config.depth == 3
    with pytest.raises(FileNotFoundError):
        load_official_mfm(tmp_path / "nope.pt")


def test_safetensors_round_trip_keeps_config(tmp_path):
    model = MFMDiT("MFM-T/2", impl="torch", class_guidance_ws=(1.0, 2.0, 4.0), time_flip=False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    path = tmp_path / "m.safetensors"
    save_safetensors(model, path)
    back = load_official_mfm(path, impl="torch")
    assert back.config == model.config
    inp = inputs(B=3)
    cfg = torch.tensor([1.0, 2.0, 4.0])
    torch.testing.assert_close(back(**inp, cfg=cfg), model(**inp, cfg=cfg), rtol=0, atol=0)
    # an official-format safetensors file (prefixed keys, no metadata) is read like the .pt release
    from safetensors.torch import save_file
    save_file(small_official(seed=4), tmp_path / "official.safetensors")
    assert load_official_mfm(tmp_path / "official.safetensors", impl="torch", config="MFM-T/2").config.time_flip


def test_mfm_fast_training_checkpoint_uses_its_stored_config_and_ema(tmp_path):
    from mfm_fast import train
    # hidden 144 with 4 blocks is in no registry row for encoder_depth: only the stored config can say 3
    model = MFMDiT("MFM-Digits", impl="torch")
    ema = MFMDiT("MFM-Digits", impl="torch")
    with torch.no_grad():
        for p, q in zip(model.parameters(), ema.parameters()):
            p.normal_()
            q.normal_()
    train.save(model, str(tmp_path / "run.pt"), ema=ema, step=3)
    back = load_official_mfm(tmp_path / "run.pt", impl="torch")
    assert back.config == ema.config and back.config.encoder_depth == 3
    for k, v in ema.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_mfm_from_sit_reproduces_the_sit_velocity_on_the_diagonal():
    sd = random_state(sit_shapes(**SMALL), seed=5)
    model = mfm_from_sit({"ema": {"module." + k: v for k, v in sd.items()}, "args": {}}, impl="torch", config="MFM-T/2")
    assert not model.config.time_flip and not model.config.learn_sigma
    inp = inputs(B=4, seed=6)
    t = inp["s"]
    ref = sit_forward(sd, t, inp["xbar"], inp["y"], heads=2, p=2)
    assert ref.abs().mean() > 1e-2
    for t_cond, x_cond in [(torch.zeros(4), torch.zeros_like(inp["x"])), (inp["t"], 3 * inp["x"])]:
        got = model(t, t, inp["xbar"], t_cond, x_cond, y=inp["y"], cfg=torch.full((4,), 2.5))
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    # the velocity rows are not the first 16 of SiT's 32: a wrong slice would differ
    wrong = dict(sd)
    wrong["final_layer.linear.weight"] = sd["final_layer.linear.weight"][:16].repeat(2, 1)
    wrong["final_layer.linear.bias"] = sd["final_layer.linear.bias"][:16].repeat(2)
    assert (sit_forward(wrong, t, inp["xbar"], inp["y"], 2, 2) - ref).abs().max() > 1e-3
    # off the diagonal the MFM is a different function (encoder sees s, decoder sees u)
    off = model(t, torch.rand(4), inp["xbar"], inp["t"], inp["x"], y=inp["y"])
    assert (off - ref).abs().max() > 1e-4


def test_mfm_from_dmf_orientation_flips_time_and_drops_extra_heads():
    shapes = sit_shapes(**SMALL)
    shapes.update({"final_layer.linear.weight": (16, 144), "final_layer.linear.bias": (16,)})
    sd = random_state(shapes, seed=8)
    model = mfm_from_sit({**sd, "logvar_linear.weight": torch.randn(1, 144)}, impl="torch", time_flip=True, config="MFM-T/2",
                         ignore=("logvar_linear.",))
    inp = inputs(B=3, seed=9)
    t = inp["s"]
    # DMF orientation (t = 0 data, v = eps - x): the MFM flips time and negates
    ref = -sit_forward(sd, 1 - t, inp["xbar"], inp["y"], heads=2, p=2)
    torch.testing.assert_close(model(t, t, inp["xbar"], inp["t"], inp["x"], y=inp["y"]), ref, atol=1e-5, rtol=1e-4)


def test_mfm_from_sit_is_strict():
    sd = random_state(sit_shapes(**SMALL), seed=5)
    del sd["t_embedder.mlp.2.bias"]
    sd["x_cond_embedder.proj.bias"] = torch.zeros(144)
    with pytest.raises(CheckpointError) as err:
        mfm_from_sit(sd, impl="torch", config="MFM-T/2")
    assert "'t_embedder.mlp.2.bias'" in str(err.value) and "'x_cond_embedder.proj.bias'" in str(err.value)
