"""`python -m mfm_fast sample|steer` end to end on CPU: tiny official-format checkpoint, tiny VAE, stand-in reward.
(Sharding, resumption and torchrun: tests/test_parallel_sample.py.)"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mfm_fast.__main__ import main as cli_main
from mfm_fast.latents import decode_latents, load_vae
from mfm_fast.models.checkpoints import load_official_mfm
from mfm_fast.parallel_sample import sample_generator
from mfm_fast.sampling import randn_rows, refine_sample


def read_png(path):
    return np.array(Image.open(path))


def test_sample_command_writes_the_refinement_samples(files, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli_main(["sample", "--ckpt", str(files / "mfm-tiny.pt"), "--vae", str(files / "vae"), "--class", "3",
                   "--n", "3", "--steps", "2", "--cfg", "2.5", "--seed", "7", "--out", str(out), "--nrow", "2",
                   "--impl", "torch", "--device", "cpu"])
    assert rc == 0
    assert "2 NFE each" in capsys.readouterr().out
    grid = read_png(out / "grid.png")
    assert grid.shape == (2 * 34 + 2, 2 * 34 + 2, 3)
    # the same draw, done by hand: sample i's generator (seed 7, index i) -> noise -> 2-step refinement with
    # y = 3, cfg 2.5 -> decode (the 3 samples are one shard, one batch)
    model = load_official_mfm(files / "mfm-tiny.pt", impl="torch")
    gens = [sample_generator(7, i) for i in range(3)]
    noise = randn_rows((3, 4, 8, 8), torch.empty(()), gens)
    x1 = refine_sample(model, noise, steps=2, generator=gens, y=torch.full((3,), 3), cfg=2.5)
    with torch.no_grad():
        img = decode_latents(load_vae(files / "vae"), x1)
    first = (img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(grid[2:34, 2:34], first)
    with np.load(out / "samples.npz") as z:
        np.testing.assert_array_equal(z["arr_0"][0], first)
    # another class gives other images
    cli_main(["sample", "--ckpt", str(files / "mfm-tiny.pt"), "--vae", str(files / "vae"), "--class", "4",
              "--n", "3", "--steps", "2", "--seed", "7", "--out", str(tmp_path / "g4"), "--nrow", "2",
              "--impl", "torch", "--no-progress"])
    assert not np.array_equal(read_png(tmp_path / "g4" / "grid.png"), grid)


def test_steer_command_runs_mfm_g_and_reports_cost(files, tmp_path, capsys):
    out = tmp_path / "steer"
    rc = cli_main(["steer", "--ckpt", str(files / "mfm-tiny.pt"), "--vae", str(files / "vae"), "--class", "2",
                   "--reward", "mfm_fast.reward_models:toy_reward", "--prompt-template", "a photo of a {class}",
                   "--method", "mfm-g", "--particles", "2", "--steps", "2", "--n", "2", "--out", str(out),
                   "--impl", "torch", "--device", "cpu"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "'a photo of a great white shark'" in text  # ImageNet class 2
    assert "paper NFE per sample  18" in text  # K + 4NK with K = 2, N = 2
    assert "backward rows" in text and "mean reward" in text
    assert read_png(out / "grid.png").shape == (34 + 2, 2 * 34 + 2, 3)
    one = json.loads((out / "rewards.json").read_text())["cost"]
    # the 2-step composed posterior sampler in the estimator: twice the particle work, counted
    rc = cli_main(["steer", "--ckpt", str(files / "mfm-tiny.pt"), "--vae", str(files / "vae"), "--class", "2",
                   "--reward", "mfm_fast.reward_models:toy_reward", "--prompt-template", "a photo of a {class}",
                   "--method", "mfm-g", "--particles", "2", "--steps", "2", "--n", "2", "--posterior-steps", "2",
                   "--out", str(tmp_path / "steer2"), "--impl", "torch", "--device", "cpu"])
    assert rc == 0
    assert "paper NFE per sample  34" in capsys.readouterr().out  # K + 4·(2N)·K
    two = json.loads((tmp_path / "steer2" / "rewards.json").read_text())["cost"]
    assert two["forward_evals"] > one["forward_evals"] and two["backward_evals"] > one["backward_evals"]
    with pytest.raises(ValueError, match="--posterior-steps"):
        cli_main(["steer", "--ckpt", str(files / "mfm-tiny.pt"), "--vae", str(files / "vae"), "--class", "2",
                  "--reward", "mfm_fast.reward_models:toy_reward", "--posterior-steps", "0", "--out",
                  str(tmp_path / "steer3"), "--impl", "torch"])
    # jackknifed weights: same network work and NFE, different samples
    rc = cli_main(["steer", "--ckpt", str(files / "mfm-tiny.pt"), "--vae", str(files / "vae"), "--class", "2",
                   "--reward", "mfm_fast.reward_models:toy_reward", "--prompt-template", "a photo of a {class}",
                   "--method", "mfm-g", "--particles", "2", "--steps", "2", "--n", "2", "--jackknife",
                   "--out", str(tmp_path / "steer_jk"), "--impl", "torch", "--device", "cpu"])
    assert rc == 0 and "paper NFE per sample  18" in capsys.readouterr().out
    jk = json.loads((tmp_path / "steer_jk" / "rewards.json").read_text())
    assert jk["cost"]["forward_evals"] == one["forward_evals"]
    plain = np.load(out / "samples.npz")["arr_0"]
    assert not np.array_equal(np.load(tmp_path / "steer_jk" / "samples.npz")["arr_0"], plain)
    with pytest.raises(ValueError, match="n_particles >= 2"):
        cli_main(["steer", "--ckpt", str(files / "mfm-tiny.pt"), "--vae", str(files / "vae"), "--class", "2",
                  "--reward", "mfm_fast.reward_models:toy_reward", "--particles", "1", "--jackknife", "--out",
                  str(tmp_path / "steer4"), "--impl", "torch", "--device", "cpu"])


def test_cli_rejects_bad_arguments(files, tmp_path):
    base = ["--ckpt", str(files / "mfm-tiny.pt"), "--vae", str(files / "vae"), "--impl", "torch",
            "--out", str(tmp_path / "x")]
    with pytest.raises(ValueError, match="--class must lie in"):
        cli_main(["sample", *base, "--class", "11"])
    with pytest.raises(ValueError, match="--steps"):
        cli_main(["sample", *base, "--steps", "0"])
    with pytest.raises(ValueError, match="unknown reward model"):
        cli_main(["steer", *base, "--class", "1", "--reward", "nope", "--steps", "1"])
    with pytest.raises(ValueError, match="--out is an output directory"):
        cli_main(["sample", *base, "--out", str(tmp_path / "grid.png")])
