"""`python -m mfm_fast steer|sample --out DIR` end to end on the CPU, from local files only: a small random MFM-DiT
checkpoint, a small VAE directory saved by diffusers, and small random reward models saved by their own libraries
(transformers `save_pretrained` for PickScore and CLIP; imscore models' state dicts as model.safetensors for HPSv2
and ImageReward, with a locally built BERT tokenizer directory).

imscore's HPSv2 and ImageReward constructors build the real-size architectures (OpenCLIP ViT-H-14; BLIP ViT-L with
BERT-base) whatever the weights, so the run that scores with them is an in-process `main([...])` with imscore's
constructors made small (the same real classes at small sizes, as in tests/test_reward_libraries.py); the
subprocess run (`python -m mfm_fast steer`, HF_HUB_OFFLINE=1) uses the transformers models, which load at any
size. rewards.json is checked against scores recomputed with independently built adapters on the same decoded
images (before uint8 quantisation), whose uint8 form must equal samples.npz byte for byte."""
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mfm_fast.__main__ import main as cli_main
from mfm_fast.latents import decode_latents, load_vae
from mfm_fast.models.checkpoints import load_official_mfm
from mfm_fast.parallel_sample import refine_shard, sample_generator, steer_shard
from mfm_fast.reward_models import (REWARD_MODELS, _require, class_prompts, clip_reward,
                                    hpsv2_reward, image_reward, parse_reward_spec, pickscore_reward, score_images)
from mfm_fast.rewards import DecodeThenScore

from tiny_rewards import shrink_imagereward

ROOT = Path(__file__).resolve().parents[1]  # the checkout under test, wherever it is
PROMPT = "A high-quality, high-resolution photograph of a great white shark."  # ImageNet class 2, default template
TINY_OPEN_CLIP = "mfm-e2e-tiny-ViT"
BERT_WORDS = ["a", "high", "-", "quality", ",", "resolution", "photograph", "of", "great", "white", "shark"]


# ---------------------------------------------------------------------------------------------- files on disk
def tiny_clip(seed):
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=224, patch_size=32),
        projection_dim=16)
    return CLIPModel(cfg).eval()


def clip_processor():
    """A CLIPProcessor with OpenAI's CLIP BPE, rebuilt from the vocabulary open_clip ships."""
    _require("open_clip", "open_clip_torch", "test")
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer
    st = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(k, k): v for k, v in st.encoder.items()}
    merges = [pair for pair, _ in sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])]
    return CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=CLIPTokenizer(vocab=vocab, merges=merges))


def small_imscore(m, root: Path, bert_dir: Path):
    """Make imscore's HPSv2 and ImageReward constructors build their real classes at small sizes (monkeypatch m)."""
    import open_clip
    hps = _require("imscore.hps.model", "imscore", "test")
    imr = _require("imscore.imreward.model", "imscore", "test")
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (root / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root / f"{TINY_OPEN_CLIP}.json")
    # random weights (the library would ask for ViT-H-14's pretrained tag; the adapter's factory asks for none)
    m.setattr(hps, "create_model_and_transforms",
              lambda name, pretrained=None, **kw: open_clip.create_model_and_transforms(TINY_OPEN_CLIP, None, **kw))
    return hps, shrink_imagereward(m, imr, bert_dir)


@pytest.fixture(scope="module")
def files(files):
    """conftest's toy checkpoint and VAE, plus small reward-model folders saved by their libraries."""
    from safetensors.torch import save_file
    from transformers import BertTokenizer
    root = files
    proc = clip_processor()
    proc.save_pretrained(root / "clip-h14-processor")  # PickScore's processor directory
    tiny_clip(1).save_pretrained(root / "pickscore")
    tiny_clip(2).save_pretrained(root / "clip-b16")
    proc.save_pretrained(root / "clip-b16")  # openai/clip-vit-base-patch16 ships its processor beside the weights
    bert = root / "bert-base-uncased"
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + BERT_WORDS) + "\n")
    BertTokenizer(str(bert / "vocab.txt")).save_pretrained(bert)
    with pytest.MonkeyPatch.context() as m:
        hps, imr = small_imscore(m, root, bert)
        torch.manual_seed(3)
        (root / "hpsv21").mkdir()
        save_file(hps.HPSv2().state_dict(), root / "hpsv21" / "model.safetensors")
        torch.manual_seed(4)
        (root / "imagereward").mkdir()
        save_file(imr.ImageReward().state_dict(), root / "imagereward" / "model.safetensors")
    return root


@pytest.fixture
def small(files, monkeypatch):
    small_imscore(monkeypatch, files, files / "bert-base-uncased")


def specs(f):
    return {"hpsv2": f"hpsv2,weights={f / 'hpsv21'}",
            "imagereward": f"imagereward,weights={f / 'imagereward'},tokenizer={f / 'bert-base-uncased'}",
            "pickscore": f"pickscore,weights={f / 'pickscore'},processor={f / 'clip-h14-processor'}",
            "clip": f"clip,weights={f / 'clip-b16'}"}


def common(f, out, n=3):
    return ["--ckpt", str(f / "mfm-tiny.pt"), "--vae", str(f / "vae"), "--num-samples", str(n), "--shard-size", "2",
            "--steps", "2", "--seed", "5", "--impl", "torch", "--device", "cpu", "--no-progress", "--out", str(out)]


def check_outputs(out, n, names):
    """The three files: samples.npz (uint8 NHWC under arr_0), grid.png, rewards.json (every scorer, the cost)."""
    with np.load(out / "samples.npz") as z:
        assert list(z.keys()) == ["arr_0"]
        arr = z["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (n, 32, 32, 3)
    grid = np.array(Image.open(out / "grid.png"))
    np.testing.assert_array_equal(grid[2:34, 2:34], arr[0])
    report = json.loads((out / "rewards.json").read_text())
    assert sorted(report["rewards"]) == sorted(names)
    for name in names:
        scores = np.array(report["rewards"][name])
        assert scores.shape == (n,) and np.isfinite(scores).all(), name
        assert report["mean_rewards"][name] == pytest.approx(scores.mean())
    return arr, report


# ---------------------------------------------------------------------------------------------- steer
def test_steer_out_scores_every_sample_under_the_four_release_rewards(files, small, tmp_path, capsys):
    s = specs(files)
    out = tmp_path / "steer"
    argv = ["steer", *common(files, out), "--class", "2", "--reward", s["pickscore"], "--method", "mfm-g",
            "--particles", "2", *[a for k in ("clip", "imagereward", "pickscore", "hpsv2") for a in
                                  ("--score-with", s[k])]]
    assert cli_main(argv) == 0
    assert "mean reward" in capsys.readouterr().out
    arr, report = check_outputs(out, 3, ["pickscore", "clip", "imagereward", "hpsv2"])

    # the same draw by hand: shards [0, 2) and [2, 3) of the steered samples, decoded; then every score from
    # adapters built here straight from the factories
    model = load_official_mfm(files / "mfm-tiny.pt", impl="torch")
    vae = load_vae(files / "vae")
    pick = pickscore_reward(weights=files / "pickscore", processor=files / "clip-h14-processor")
    reward = DecodeThenScore(lambda z: decode_latents(vae, z), pick.with_prompt(PROMPT))
    make_shard = steer_shard(model, lambda z: decode_latents(vae, z), reward, "pickscore", 2, cfg=2.5, steps=2,
                             method="mfm-g", n_particles=2, lam=2.0, sde=False, renorm="rescale", t_start=0.01,
                             chunk_size=None)
    shards = [make_shard([sample_generator(5, i) for i in range(a, b)], a, b) for a, b in ((0, 2), (2, 3))]
    images = torch.cat([sh.images for sh in shards])
    np.testing.assert_array_equal(arr, (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy())
    scorers = {"pickscore": pick,
               "clip": clip_reward(weights=files / "clip-b16"),
               "hpsv2": hpsv2_reward(weights=files / "hpsv21"),
               "imagereward": image_reward(weights=files / "imagereward", tokenizer=files / "bert-base-uncased")}
    want = score_images(images, scorers, prompts=PROMPT)
    for name, scores in want.items():
        np.testing.assert_allclose(report["rewards"][name], scores, rtol=1e-5, atol=1e-6, err_msg=name)
        assert np.std(scores) > 0, name  # the samples differ under every scorer
    # the steering reward is the reward of the final samples, the one steer_shard records
    np.testing.assert_allclose(report["rewards"]["pickscore"], torch.cat([sh.rewards["pickscore"] for sh in shards]),
                               rtol=1e-5, atol=1e-6)
    for key in ("forward_calls", "forward_evals", "backward_evals", "reward_evals"):
        assert report["cost"][key] == sum(sh.cost[key] for sh in shards) > 0, key
    assert report["settings"]["score_with"] == [s[k] for k in ("clip", "imagereward", "pickscore", "hpsv2")]


def test_python_m_steer_out_from_local_directories(files, tmp_path):
    """The command itself, in a fresh interpreter with the hub offline: transformers reward directories."""
    s = specs(files)
    out = tmp_path / "cmd"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "mfm_fast", "steer", *common(files, out, n=2), "--class", "2", "--reward", "clip",
           "--reward-weights", str(files / "clip-b16"), "--method", "mfm-g", "--particles", "2",
           "--score-with", s["pickscore"]]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "mean reward" in res.stdout and "(pickscore)" in res.stdout
    _, report = check_outputs(out, 2, ["clip", "pickscore"])
    assert report["cost"]["backward_evals"] > 0 and report["cost"]["reward_evals"] > 0


# ---------------------------------------------------------------------------------------------- sample
def test_sample_out_scores_each_sample_with_its_class_prompt(files, tmp_path):
    out = tmp_path / "sample"
    assert cli_main(["sample", *common(files, out), "--class", "random", "--prompt-template", "a photo of a {class}",
                     "--score-with", specs(files)["clip"], "--score-with", "toy"]) == 0
    arr, report = check_outputs(out, 3, ["clip", "toy"])
    model = load_official_mfm(files / "mfm-tiny.pt", impl="torch")
    vae = load_vae(files / "vae")
    make_shard = refine_shard(model, lambda z: decode_latents(vae, z), 2, "random", cfg=2.5)
    shards = [make_shard([sample_generator(5, i) for i in range(a, b)], a, b) for a, b in ((0, 2), (2, 3))]
    images, labels = torch.cat([sh.images for sh in shards]), torch.cat([sh.labels for sh in shards])
    np.testing.assert_array_equal(arr, (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy())
    prompts = class_prompts(labels, "a photo of a {class}")
    assert len(set(prompts)) > 1  # random classes: one prompt per sample
    assert report["labels"] == labels.tolist()  # the class of every sample, for class-conditional evaluations
    want = score_images(images, {"clip": clip_reward(weights=files / "clip-b16")}, prompts=prompts)
    np.testing.assert_allclose(report["rewards"]["clip"], want["clip"], rtol=1e-5, atol=1e-6)
    assert report["cost"]["forward_evals"] == 6


# ---------------------------------------------------------------------------------------------- errors
def test_bad_scorer_specs_and_missing_files_are_named(files, tmp_path):
    s = specs(files)
    nowhere = ["--ckpt", str(tmp_path / "absent.pt"), "--vae", str(tmp_path / "absent"), "--out", str(tmp_path / "x")]
    # spec errors come before anything loads (the checkpoint here does not exist)
    with pytest.raises(ValueError, match=r"--score-with: reward spec 'clip,weights'.*key=value"):
        cli_main(["sample", *nowhere, "--score-with", "clip,weights"])
    with pytest.raises(ValueError, match="names 'clip' twice"):
        cli_main(["steer", *nowhere, "--score-with", s["clip"], "--score-with", "clip,weights=elsewhere"])
    with pytest.raises(ValueError, match=r"--reward: reward spec ',weights=x' must start with a reward name"):
        cli_main(["steer", *nowhere, "--reward", ",weights=x"])
    with pytest.raises(ValueError, match="--prompt-template|must contain"):
        cli_main(["sample", *nowhere, "--prompt-template", "no class here"])
    base = common(files, tmp_path / "y", n=1) + ["--class", "2"]
    missing = tmp_path / "no-such-pickscore"
    with pytest.raises(FileNotFoundError, match=f"PickScore: weights directory not found: {missing}"):
        cli_main(["sample", *base, "--score-with", f"pickscore,weights={missing},processor={files / 'clip-b16'}"])
    with pytest.raises(ValueError, match="unknown reward model 'nope'"):
        cli_main(["sample", *base, "--score-with", "nope"])
    with pytest.raises(FileNotFoundError, match=f"HPSv2: weights path not found: {tmp_path / 'hps'}"):
        cli_main(["steer", *base, "--reward", f"hpsv2,weights={tmp_path / 'hps'}"])
    with pytest.raises(ValueError, match="the ImageReward reward needs local weights: pass tokenizer="):
        cli_main(["steer", *base, "--reward", s["clip"], "--score-with",
                  f"imagereward,weights={files / 'imagereward'}"])
    with pytest.raises(ValueError, match="--reward-weights .* contradicts weights="):
        cli_main(["steer", *base, "--reward", s["clip"], "--reward-weights", str(tmp_path)])
    with pytest.raises(ValueError, match="--score-with clip differs from the steering reward"):
        cli_main(["steer", *base, "--reward", s["clip"], "--score-with",
                  f"clip,weights={files / 'pickscore'},processor={files / 'clip-h14-processor'}"])
    with pytest.raises(SystemExit):  # the ImageReward.pt-era option is gone
        cli_main(["steer", *base, "--reward-config", "med_config.json"])


# ---------------------------------------------------------------------------------------------- README
def test_the_readme_release_command_parses_with_the_files_each_reward_needs():
    """The real-weights command of the README's reward section parses with `steer`'s parser, and every spec names
    its factory's required files and nothing the factory does not take."""
    from mfm_fast.cli import steer_parser
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Reward models for image steering"):]
    section = re.sub(r"\\\n\s*", "", section[:section.index("\n## ", 1)])  # join continued lines
    commands = [shlex.split(line) for line in section.splitlines() if line.startswith("python -m mfm_fast steer ")]
    assert len(commands) == 1
    args = steer_parser().parse_args(commands[0][4:])
    required = {"hpsv2": {"weights"}, "imagereward": {"weights", "tokenizer"}, "pickscore": {"weights", "processor"},
                "clip": {"weights"}}
    specs = dict(parse_reward_spec(s) for s in [args.reward, *args.score_with])
    assert set(specs) == set(required) and len(args.score_with) == 4
    for name, kwargs in specs.items():
        accepted = set(inspect.signature(REWARD_MODELS[name]).parameters) - {"device", "med_config"}
        assert required[name] <= set(kwargs) <= accepted, name
    assert class_prompts([281], args.prompt_template) == \
        ["A high-quality, high-resolution photograph of a tabby cat."]  # the release's prompt, by default
    assert (args.lam, args.particles, args.steps, args.cfg, args.method) == (2.0, 4, 250, 2.5, "mfm-g")
