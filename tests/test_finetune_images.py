"""MFM-FT on latent images, end to end on the CPU from local files: the loss against a restatement of the release's
formula on identical weights and draws, the `finetune` command (checkpoints, evaluation curve, resume, refused
changes, torchrun = one process), and `sample` from the fine-tuned checkpoint."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mfm_fast.__main__ import main as cli_main
from mfm_fast.finetune import FinetuneConfig, euler_sample, finetune, ft_loss, load_finetuned
from mfm_fast.latents import LatentDecoder, load_vae, write_shard
from mfm_fast.models.checkpoints import load_official_mfm
from mfm_fast.reward_models import FT_PROMPT_PREFIX, class_prompts, finetune_prompts, toy_reward
from mfm_fast.rewards import DecodeThenScore

ROOT = Path(__file__).resolve().parents[1]
SCORER = "test_parallel_sample:toy16"  # a second reward model, by module:function


@pytest.fixture(scope="module")
def latents(files):
    """Two latent shards of 4x8x8 latents with labels in [0, 10), as `encode` writes them."""
    root = files / "latents"
    if not root.exists():
        root.mkdir()
        g = torch.Generator().manual_seed(3)
        for k in range(2):
            write_shard(root / f"shard_{k:03d}.safetensors", torch.randn(6, 4, 8, 8, generator=g) * 0.8,
                        torch.randint(0, 10, (6,), generator=g))
    return root


def release_loss(model, base, vae, score, x1, labels, lam, sigma_sq, sigma_type, gen, cfg_scale=2.5):
    """The release's MFM-FT loss (src/mfm/losses/finetune.py), restated from its formulas with the draws taken
    from `gen` in its order: t ~ U[0, 1], the interpolant noise, the posterior noise."""
    N = x1.shape[0]
    t = torch.rand(N, generator=gen)
    noise = torch.randn(x1.shape, generator=gen)
    eps = torch.randn(x1.shape, generator=gen)
    tb = t.view(-1, 1, 1, 1)
    xt = (tb * x1 + (1 - tb) * noise).detach().requires_grad_(True)
    prompts = [f"A high-resolution, high-quality photograph of a {name}" for name in
               [("tench, Tinca tinca", "goldfish, Carassius auratus",
                 "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias",
                 "tiger shark, Galeocerdo cuvieri", "hammerhead, hammerhead shark", "electric ray, crampfish, "
                 "numbfish, torpedo", "stingray", "cock", "hen", "ostrich, Struthio camelus")[int(i)]
                for i in labels]]
    ones, zeros = torch.ones_like(t), torch.zeros_like(t)
    v = base(zeros, ones, eps, t, xt, y=labels, cfg=torch.full_like(t, cfg_scale))
    x1_samps = eps + (ones - zeros).view(-1, 1, 1, 1) * v
    images = (vae.decode(x1_samps / 0.18215).sample + 1) / 2  # no clamp
    rewards = lam * score(images, prompts)
    exp_r = torch.exp(rewards)
    grad_x = torch.autograd.grad(exp_r.sum(), inputs=xt)[0]
    bt_pred = model(t, t, xt, zeros, torch.zeros_like(xt), y=labels)  # the drifts: labels, no guidance
    bt_base = base(t, t, xt, zeros, torch.zeros_like(xt), y=labels)
    if sigma_type == "constant":
        sq = torch.ones_like(t) * sigma_sq
    else:
        sq = 2 * torch.clamp(1 / (t + 1e-8) - 1, min=0, max=1000)
    e = exp_r.view(-1, 1, 1, 1)
    target = bt_base - (e - 1) * (bt_pred - bt_base) + 0.5 * sq.view(-1, 1, 1, 1) * grad_x
    return (bt_pred - target.detach()).pow(2).mean()


@pytest.mark.parametrize("schedule", ["constant", "schedule"])
def test_loss_equals_the_release_formula(files, schedule):
    base = load_official_mfm(files / "mfm-tiny.pt", impl="torch")
    model = load_official_mfm(files / "mfm-tiny.pt", impl="torch").train()
    with torch.no_grad():  # the trainable drift has moved away from the frozen one
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    vae = load_vae(files / "vae")
    score = toy_reward(32, seed=0)
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(5, 4, 8, 8, generator=g)
    labels = torch.tensor([0, 3, 9, 2, 2])
    assert finetune_prompts(labels)[:2] == [FT_PROMPT_PREFIX + "tench, Tinca tinca",
                                           FT_PROMPT_PREFIX + "tiger shark, Galeocerdo cuvieri"]
    assert finetune_prompts([281]) == ["A high-resolution, high-quality photograph of a tabby, tabby cat"]
    lam = 3.0
    expected = release_loss(model, base, vae, score, x1, labels, lam, 200.0, schedule,
                            torch.Generator().manual_seed(7))
    expected.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    grads_ref = [p.grad.clone() for p in params]
    model.zero_grad()
    reward = DecodeThenScore(LatentDecoder(vae, clamp=False), score)
    loss = ft_loss(model, base, reward, x1, lam, schedule, 100.0, t_eps=0.0, generator=torch.Generator().manual_seed(7),
                   posterior_cond={"y": labels, "cfg": torch.full((5,), 2.5)}, prompts=finetune_prompts(labels),
                   y=labels)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    for a, b in zip([p.grad for p in params], grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)
    # the test can tell: the steering prompts, or no guidance on the posterior, give another loss
    variants = [
        dict(prompts=class_prompts(labels)),  # the steering prompt: other wording, CLIP's class names
        dict(posterior_cond={"y": labels}),
    ]
    for change in variants:
        kw = dict(posterior_cond={"y": labels, "cfg": torch.full((5,), 2.5)}, prompts=finetune_prompts(labels))
        kw.update(change)
        other = ft_loss(model, base, reward, x1, lam, schedule, 100.0, t_eps=0.0,
                        generator=torch.Generator().manual_seed(7), y=labels, **kw)
        assert not torch.allclose(other, expected, rtol=1e-4), change


def test_micro_batches_give_the_full_batch_gradient(files, latents):
    mfm = load_official_mfm(files / "mfm-tiny.pt", impl="torch")
    reward = DecodeThenScore(LatentDecoder(load_vae(files / "vae"), clamp=False), toy_reward(32, seed=0))
    prompts = finetune_prompts
    states = []
    for micro in (0, 2, 3):
        cfg = FinetuneConfig(steps=2, batch_size=6, lam=2.0, micro_batch=micro, device="cpu", ema_start=0)
        res = finetune(mfm, reward, str(latents), cfg, progress=False, prompts=prompts)
        states.append(res.raw.mfm.state_dict())
    for other in states[1:]:
        for k in states[0]:
            torch.testing.assert_close(other[k], states[0][k], rtol=1e-5, atol=1e-7)


def ft_args(files, latents, out, *extra, steps="4"):
    return ["finetune", "--ckpt", str(files / "mfm-tiny.pt"), "--vae", str(files / "vae"), "--latents",
            str(latents), "--reward", "toy", "--score-with", SCORER, "--out", str(out), "--steps", steps,
            "--batch-size", "4", "--lam", "2", "--eval-every", "2", "--eval-samples", "3", "--eval-steps", "2",
            "--checkpoint-every", "2", "--device", "cpu", "--impl", "torch", "--quiet", *extra]


def weights(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt["model"], ckpt["ema"], ckpt["step"]


def test_finetune_command_images_resume_and_sample(files, latents, tmp_path):
    assert cli_main(ft_args(files, latents, tmp_path / "A")) == 0
    out = tmp_path / "A"
    records = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]
    assert all(set(r) == {"step", "n", "toy", SCORER} for r in records)
    assert records[0]["toy"] != records[0][SCORER]
    assert all(r["n"] == 3 for r in records)
    assert (out / "rewards.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["step_0000000.png", "step_0000002.png",
                                                                  "step_0000004.png"]
    ckpt = torch.load(out / "finetune.pt", weights_only=True)
    assert ckpt["kind"] == "finetune" and ckpt["step"] == 4 and ckpt["extra"]["finetune"]["lam"] == 2.0
    assert ckpt["identity"]["base_fingerprint"]
    # resume: 2 steps, then the rest, equals 4 steps in one go, bit for bit
    assert cli_main(ft_args(files, latents, tmp_path / "B", steps="2")) == 0
    assert cli_main(ft_args(files, latents, tmp_path / "B")) == 0
    a, b = weights(out / "finetune.pt"), weights(tmp_path / "B" / "finetune.pt")
    assert a[2] == b[2] == 4
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
        assert torch.equal(a[1][k], b[1][k]), k
    # a resume with another setting is refused, naming it, unless --override
    with pytest.raises(ValueError, match="lam"):
        cli_main(ft_args(files, latents, tmp_path / "B", "--lam", "3", steps="6"))
    assert cli_main(ft_args(files, latents, tmp_path / "B", "--lam", "3", "--override", steps="5")) == 0
    assert torch.load(tmp_path / "B" / "finetune.pt", weights_only=True)["overrides"][0]["changes"]["lam"] == [2.0, 3.0]
    # sample draws Euler steps of the fine-tuned drift
    assert cli_main(["sample", "--ckpt", str(out / "finetune.pt"), "--vae", str(files / "vae"), "--class", "3",
                     "--steps", "3", "--num-samples", "2", "--shard-size", "2", "--out", str(tmp_path / "S"),
                     "--device", "cpu", "--impl", "torch", "--no-progress"]) == 0
    import numpy as np
    from mfm_fast.parallel_sample import sample_generator
    from mfm_fast.sampling import randn_rows
    drift = load_finetuned(str(out / "finetune.pt"), impl="torch")
    gens = [sample_generator(0, i) for i in range(2)]
    noise = randn_rows((2, 4, 8, 8), torch.empty(()), gens)
    images = LatentDecoder(load_vae(files / "vae"))(euler_sample(drift, noise, 3, torch.tensor([3, 3]), 2.5))
    expected = (images.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    with np.load(tmp_path / "S" / "samples.npz") as z:
        got = z["arr_0"]
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_finetune_bad_inputs_fail_before_training(files, latents, tmp_path):
    base = ft_args(files, latents, tmp_path / "X")
    with pytest.raises(ValueError, match="--vae"):
        cli_main([a for i, a in enumerate(base) if a != "--vae" and base[i - 1] != "--vae"])
    with pytest.raises(FileNotFoundError, match="--latents"):
        cli_main(ft_args(files, tmp_path / "missing", tmp_path / "X"))
    bad = tmp_path / "bad_latents"
    bad.mkdir()
    write_shard(bad / "s.safetensors", torch.randn(2, 4, 8, 8), torch.tensor([1, 10]))
    with pytest.raises(ValueError, match="--latents: labels must lie in"):
        cli_main(ft_args(files, bad, tmp_path / "X"))
    with pytest.raises(ValueError, match="unknown reward"):
        cli_main([*ft_args(files, latents, tmp_path / "X")[:-1], "--quiet", "--reward", "nosuch"])
    with pytest.raises(ValueError, match="--out"):
        cli_main(ft_args(files, latents, ""))
    with pytest.raises(ValueError, match="--cfg"):
        cli_main(ft_args(files, latents, tmp_path / "X", "--cfg", "7"))
    assert not (tmp_path / "X" / "finetune.pt").exists()


def test_torchrun_two_ranks_equal_one_process(files, latents, tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = ft_args(files, latents, tmp_path / "one", steps="2")
        args[args.index("--batch-size") + 1] = "4"
        assert cli_main(args) == 0
    finally:
        torch.set_num_threads(n)
    script = Path(sys.executable).with_name("torchrun")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    args = ft_args(files, latents, tmp_path / "two", steps="2")
    args[args.index("--batch-size") + 1] = "2"  # per rank: the same global batch of 4
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    res = subprocess.run([*cmd, "--standalone", "--nproc_per_node=2", "-m", "mfm_fast", *args], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = weights(tmp_path / "one" / "finetune.pt"), weights(tmp_path / "two" / "finetune.pt")
    for k in a[0]:
        torch.testing.assert_close(b[0][k], a[0][k], rtol=1e-5, atol=1e-6)
    one = [json.loads(x) for x in (tmp_path / "one" / "eval.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in one] == [r["step"] for r in two] == [0, 2]
    assert one[0]["n"] == two[0]["n"] == 3
    assert abs(one[0]["toy"] - two[0]["toy"]) < 1e-4
