"""Latent shards, the encode command (tiny random AutoencoderKL, tiny PNGs) and decoding/grids."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mfm_fast.__main__ import main as cli_main
from mfm_fast.latents import (SCALE, SD_VAE_CONFIG, LatentDecoder, LatentShards, build_vae, center_crop,
                              decode_latents, list_shards, load_vae, read_shard, save_image_grid, write_shard)
from mfm_fast.reward_models import ToyClipReward
from mfm_fast.rewards import DecodeThenScore


def make_tiny_vae(path):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32)
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    return make_tiny_vae(tmp_path_factory.mktemp("vae"))


def shards_of(tmp_path, sizes, fmt="safetensors", seed=0):
    g = torch.Generator().manual_seed(seed)
    all_z, all_y, start = [], [], 0
    for k, n in enumerate(sizes):
        z = torch.randn(n, 4, 4, 4, generator=g)
        y = torch.arange(start, start + n)  # unique labels identify samples
        start += n
        name = f"shard-{k:03d}.safetensors" if fmt == "safetensors" else f"shard-{k:03d}_latents.npy"
        write_shard(tmp_path / name, z, y)
        all_z.append(z)
        all_y.append(y)
    return torch.cat(all_z), torch.cat(all_y)


@pytest.mark.parametrize("fmt", ["safetensors", "npy"])
def test_shards_round_trip_every_sample_once(tmp_path, fmt):
    z, y = shards_of(tmp_path, [3, 5, 2], fmt)
    ds = LatentShards(tmp_path, shuffle=True, seed=4)
    assert len(ds) == 10
    got = list(ds)
    labels = torch.stack([lab for _, lab in got])
    assert sorted(labels.tolist()) == list(range(10))
    assert labels.tolist() != list(range(10))  # shuffled
    for lat, lab in got:
        assert lat.shape == (4, 4, 4) and lat.dtype == torch.float32 and lab.dtype == torch.int64
        torch.testing.assert_close(lat, z[lab], rtol=0, atol=0)
    # deterministic per (seed, epoch), different across epochs
    assert [int(b) for _, b in LatentShards(tmp_path, seed=4)] == labels.tolist()
    ds.set_epoch(1)
    assert [int(b) for _, b in ds] != labels.tolist()
    assert [int(b) for _, b in LatentShards(tmp_path, shuffle=False)] == list(range(10))


def test_ranks_and_workers_partition_the_data(tmp_path):
    shards_of(tmp_path, [2, 3, 1, 4, 2])
    per_rank = [[int(b) for _, b in LatentShards(tmp_path, seed=1, rank=r, world_size=2)] for r in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(12))
    assert [len(LatentShards(tmp_path, seed=1, rank=r, world_size=2)) for r in range(2)] == [len(p) for p in
                                                                                              per_rank]
    loader = torch.utils.data.DataLoader(LatentShards(tmp_path, seed=1), batch_size=4, num_workers=2)
    labels = torch.cat([b for _, b in loader]).tolist()
    assert sorted(labels) == list(range(12))


def test_scale_is_explicit(tmp_path):
    raw = torch.randn(3, 4, 4, 4)
    write_shard(tmp_path / "raw.safetensors", raw, torch.arange(3), latent_scale=1.0)
    assert read_shard(tmp_path / "raw.safetensors")[2] == 1.0
    lat = torch.stack([a for a, _ in LatentShards(tmp_path, shuffle=False)])
    torch.testing.assert_close(lat, raw * SCALE)
    lat_raw = torch.stack([a for a, _ in LatentShards(tmp_path, shuffle=False, scale=1.0)])
    torch.testing.assert_close(lat_raw, raw)


def test_shard_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="'.safetensors' or '_latents.npy'"):
        write_shard(tmp_path / "x.pt", torch.randn(2, 4, 4, 4), torch.arange(2))
    with pytest.raises(ValueError, match="labels"):
        write_shard(tmp_path / "x.safetensors", torch.randn(2, 4, 4, 4), torch.arange(3))
    with pytest.raises(FileNotFoundError, match="no shards"):
        list_shards(tmp_path)
    shards_of(tmp_path, [2])
    with pytest.raises(ValueError, match="world_size"):
        LatentShards(tmp_path, world_size=2, rank=1)
    with pytest.raises(ValueError, match="rank"):
        LatentShards(tmp_path, world_size=1, rank=1)
    (tmp_path / "train").mkdir()
    shards_of(tmp_path / "train", [3])
    assert len(LatentShards(tmp_path, split="train")) == 3


def write_image_folder(root, seed=0):
    rng = np.random.default_rng(seed)
    counts = {"n01-cat": 3, "n02-dog": 2}
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    (root / "n02-dog" / "notes.txt").write_text("not an image")
    return counts


def test_encode_command_end_to_end(tmp_path, tiny_vae_dir):
    images = tmp_path / "images"
    write_image_folder(images)
    out = tmp_path / "latents"
    rc = cli_main(["encode", "--images", str(images), "--vae", str(tiny_vae_dir), "--out", str(out),
                   "--batch", "3", "--size", "32", "--shard-size", "2", "--mean", "--device", "cpu"])
    assert rc == 0
    assert [p.name for p in list_shards(out)] == ["shard-00000.safetensors", "shard-00001.safetensors",
                                                  "shard-00002.safetensors"]
    assert json.loads((out / "classes.json").read_text()) == ["n01-cat", "n02-dog"]
    got = list(LatentShards(out, shuffle=False))
    assert [int(y) for _, y in got] == [0, 0, 0, 1, 1]
    # oracle: scale · posterior mean of the tiny VAE on the pixels mapped to [-1, 1] (32x32 needs no crop)
    vae = load_vae(tiny_vae_dir)
    files = sorted((images / "n01-cat").glob("*.png")) + sorted((images / "n02-dog").glob("*.png"))
    x = torch.stack([torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1).float() for f in files])
    with torch.no_grad():
        want = SCALE * vae.encode(x / 127.5 - 1).latent_dist.mean
    assert want.shape == (5, 4, 8, 8)
    torch.testing.assert_close(torch.stack([z for z, _ in got]), want, atol=1e-5, rtol=1e-5)


def test_encode_reports_missing_vae(tmp_path):
    write_image_folder(tmp_path / "images")
    with pytest.raises(FileNotFoundError, match="VAE directory not found"):
        cli_main(["encode", "--images", str(tmp_path / "images"), "--vae", str(tmp_path / "no-vae"),
                  "--out", str(tmp_path / "o")])


def test_center_crop_shape():
    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))
    assert center_crop(im, 16).shape == (16, 16, 3)
    # no resize needed: a plain centre crop of the original pixels
    im = Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8))
    np.testing.assert_array_equal(center_crop(im, 16), np.asarray(im)[:, 2:18])


def test_decode_latents_shape_range_scale_and_gradient(tiny_vae_dir):
    vae = load_vae(tiny_vae_dir)
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    img = decode_latents(vae, z)
    assert img.shape == (2, 3, 32, 32) and img.min() >= 0 and img.max() <= 1
    with torch.no_grad():
        raw = vae.decode(z / SCALE).sample
    torch.testing.assert_close(img, ((raw + 1) / 2).clamp(0, 1))
    img.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="z must have shape"):
        decode_latents(vae, torch.randn(4, 8, 8))


TINY_SD_VAE = {**SD_VAE_CONFIG, "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4}


def test_decoder_folds_particles_applies_scale_and_bias():
    vae = build_vae(TINY_SD_VAE, seed=1)
    decoder = LatentDecoder(vae, bias=0.3)
    z = torch.randn(2, 3, 4, 4, 4)  # (B, N, C, h, w) particles
    img = decoder(z)
    assert img.shape == (2, 3, 3, 32, 32)  # three 2x up-samplings: 4 -> 32 pixels
    with torch.no_grad():
        raw = vae.decode((z[1, 2:3] - 0.3) / SCALE).sample
    torch.testing.assert_close(img[1, 2:3], ((raw + 1) / 2).clamp(0, 1))
    assert (img - LatentDecoder(vae)(z)).abs().max() > 1e-4  # the bias is used


def test_decoder_gradient_reaches_the_latents():
    vae = build_vae(TINY_SD_VAE, dtype=torch.float64, seed=2)
    reward = DecodeThenScore(LatentDecoder(vae), lambda x: (x - 0.5).pow(2).flatten(1).sum(-1))
    z = 0.1 * torch.randn(2, 4, 4, 4, dtype=torch.float64)
    zr = z.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(reward(zr).sum(), zr)
    v, eps = torch.randn_like(z), 1e-6
    with torch.no_grad():
        fd = (reward(z + eps * v).sum() - reward(z - eps * v).sum()) / (2 * eps)
    assert grad.abs().sum() > 0
    torch.testing.assert_close((grad * v).sum(), fd, rtol=1e-5, atol=1e-8)
    # and through an image reward adapter, the steering reward's shape
    zr = z.float().requires_grad_(True)
    DecodeThenScore(LatentDecoder(build_vae(TINY_SD_VAE)), ToyClipReward().with_prompt("a cat"))(zr).sum().backward()
    assert zr.grad.abs().sum() > 0


def test_real_sd_vae_config_decodes_32x32_latents():
    """The release's decoder architecture (stabilityai/sd-vae-ft-mse) with random weights: 32x32 latents become
    256x256 images in [0, 1]."""
    vae = build_vae()
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # the published sd-vae-ft-mse's size
    assert vae.config.scaling_factor == SCALE and not any(p.requires_grad for p in vae.parameters())
    with torch.inference_mode():
        img = LatentDecoder(vae)(torch.randn(1, 4, 32, 32))
    assert img.shape == (1, 3, 256, 256) and 0 <= img.min() and img.max() <= 1 and img.std() > 0


def test_save_image_grid_layout(tmp_path):
    images = torch.rand(5, 3, 6, 7)
    save_image_grid(images, tmp_path / "g.png", nrow=3, padding=2)
    arr = np.asarray(Image.open(tmp_path / "g.png"))
    assert arr.shape == (2 * 8 + 2, 3 * 9 + 2, 3)
    # image 4 sits at row 1, column 1
    expected = (images[4].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(arr[10:16, 11:18], expected)
    assert (arr[:2] == 255).all()  # white padding
