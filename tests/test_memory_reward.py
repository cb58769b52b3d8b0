"""chunk_size="auto" budgets the reward's activations too (decoder + image reward): the shape-only measurement
behind it against real saved tensors, against a meta-device run at the release's configs (SD-VAE decoder at 32x32
latents, OpenCLIP ViT-H-14 at 224), and its effect on the plan."""
import warnings

import pytest
import torch

from mfm_fast.latents import SD_VAE_CONFIG, LatentDecoder, build_vae
from mfm_fast.memory import plan_chunks, reward_bytes_per_row, saved_bytes_per_row
from mfm_fast.models.dit import MFMDiT
from mfm_fast.reward_models import HPSv2Model, ToyClipReward, _require
from mfm_fast.rewards import DecodeThenScore

TINY_SD_VAE = {**SD_VAE_CONFIG, "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4}
MiB = 2 ** 20


def measured_saved_bytes(fn, row_shape, device="cpu", rows=(1, 2)):
    """Saved-tensor bytes per row of an actual run (real tensors: storages told apart by address; meta tensors,
    which all sit at address 0: by storage object)."""
    totals = []
    for n in rows:
        storages = {}

        def pack(t):
            st = t.untyped_storage()
            storages[st._cdata if t.is_meta else st.data_ptr()] = st.nbytes()
            return t

        x = (torch.rand if device == "cpu" else torch.empty)((n, *row_shape), device=device).requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x)
        totals.append(sum(storages.values()))
    return (totals[1] - totals[0]) // (rows[1] - rows[0])


def test_shape_only_measurement_equals_the_saved_bytes_of_a_real_run():
    decoder = LatentDecoder(build_vae(TINY_SD_VAE, seed=3))
    reward = DecodeThenScore(decoder, ToyClipReward().with_prompt("a photo of a cat"))
    for fn in (decoder, reward):
        real = measured_saved_bytes(fn, (4, 4, 4))
        fake, largest = saved_bytes_per_row(fn, (4, 4, 4))
        assert fake == real and 0 < largest < fake
    saved, largest = saved_bytes_per_row(reward, (4, 4, 4))
    assert reward_bytes_per_row(reward, (4, 4, 4)) == saved + 2 * largest


def test_release_configs_on_the_meta_device():
    """SD-VAE decoder at 32x32 latents and OpenCLIP ViT-H-14 at 224 (inside imscore's HPSv2, the release's
    reward), fp32: the planner's measurement against a meta-device run of the same modules."""
    decoder = LatentDecoder(build_vae(device="meta"))
    meta_decoder = measured_saved_bytes(decoder, (4, 32, 32), device="meta")
    assert saved_bytes_per_row(decoder, (4, 32, 32), device="meta")[0] == meta_decoder

    hps = _require("imscore.hps.model", "imscore", "test")
    build = hps.create_model_and_transforms

    def on_meta(name, pretrained=None, **kwargs):
        with torch.device("meta"):
            return build(name, None, device="meta", **kwargs)

    hps.create_model_and_transforms = on_meta
    try:
        lib_model = hps.HPSv2().eval().requires_grad_(False)
    finally:
        hps.create_model_and_transforms = build
    meta_vit = measured_saved_bytes(lib_model.model.encode_image, (3, 224, 224), device="meta")
    reward = DecodeThenScore(decoder, HPSv2Model(lib_model).with_prompt("a photo of a tabby cat"))
    planned = reward_bytes_per_row(reward, (4, 32, 32), torch.float32, "meta")
    saved, largest = saved_bytes_per_row(reward, (4, 32, 32), device="meta")
    # the whole reward keeps the decoder's and the image tower's saved tensors (plus imscore's resize and
    # normalisation, a fraction of a MiB), and the planner adds the backward's transients on top
    assert meta_decoder + meta_vit <= saved <= meta_decoder + meta_vit + MiB
    assert planned == saved + 2 * largest
    print(f"fp32 saved MiB per image: SD-VAE decoder {meta_decoder / MiB:.1f}, ViT-H-14 {meta_vit / MiB:.1f}, "
          f"planned decode + HPSv2 {planned / MiB:.1f}")


def test_plan_budgets_the_reward_and_falls_back_when_it_cannot_measure():
    with torch.device("meta"):
        xl = MFMDiT("MFM-XL/2", impl="triton")
    reward = DecodeThenScore(LatentDecoder(build_vae(TINY_SD_VAE)), ToyClipReward().with_prompt("x"))
    extra = reward_bytes_per_row(reward, xl.event_shape, torch.bfloat16, "cpu")
    budget = 4 * 2 ** 30
    alone = plan_chunks(xl, 8, 32, torch.bfloat16, "cpu", budget_bytes=budget)
    both = plan_chunks(xl, 8, 32, torch.bfloat16, "cpu", budget_bytes=budget, reward=reward)
    assert both.reward_bytes_per_row == extra > 0 and alone.reward_bytes_per_row == 0
    assert both.bytes_per_row == alone.bytes_per_row + extra
    assert both.chunk_size * both.bytes_per_row <= both.budget_bytes and both.chunk_size <= alone.chunk_size
    # a reward keeping more than the model per row (ten saved (4, 2048, 2048) bf16 maps, 320 MiB): smaller chunks
    def heavy_reward(z):
        h = torch.nn.functional.interpolate(z, scale_factor=64)
        for _ in range(10):
            h = h.exp()  # exp saves its output
        return h.flatten(1).sum(-1)

    heavy = plan_chunks(xl, 8, 32, torch.bfloat16, "cpu", budget_bytes=budget, reward=heavy_reward)
    assert heavy.reward_bytes_per_row >= 10 * 4 * 2048 * 2048 * 2 > alone.bytes_per_row
    assert heavy.chunk_size < alone.chunk_size and heavy.chunk_size * heavy.bytes_per_row <= heavy.budget_bytes

    def needs_values(z):
        if z.sum() > 0:  # a data-dependent branch: fake tensors answer 0, so this is the path measured
            raise RuntimeError("cannot tell")
        raise ValueError("no shapes here")

    with pytest.warns(UserWarning, match="could not measure"):
        fallback = plan_chunks(xl, 8, 32, torch.bfloat16, "cpu", budget_bytes=budget, reward=needs_values)
    assert fallback.chunk_size == alone.chunk_size and fallback.reward_bytes_per_row == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # measured once per reward, shape and dtype: no second attempt, no warning
        plan_chunks(xl, 8, 32, torch.bfloat16, "cpu", budget_bytes=budget, reward=needs_values)
