"""The reward adapters through their real libraries (imscore, open_clip, transformers) on the real model classes.

Each model is randomly initialised from a small config (the real ones are GB-sized downloads) and tokenizers are
built locally (open_clip's bundled CLIP BPE, a small BERT WordPiece vocabulary). Each adapter is compared with the
library's own scoring call on the same model, and its image gradient with central finite differences in float64.
"""
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mfm_fast.reward_models import (AestheticModel, CLIPScoreModel, HPSv2Model, ImageRewardModel, PickScoreModel,
                                    _require, aesthetic_reward, build_scorers, clip_preprocess,
                                    clip_reward, hpsv2_reward, image_reward, parse_reward_spec, pickscore_reward,
                                    score_images)

from tiny_rewards import shrink_imagereward

PROMPTS = ["A high-quality, high-resolution photograph of a tabby cat.", "a photo of a golden retriever"]
BERT_WORDS = ["a", "high", "-", "quality", ",", "resolution", "photograph", "of", "tabby", "cat", ".", "photo",
              "golden", "retriever", "dog"]


def fd_check(score, images, eps=1e-6):
    """Autograd's directional derivative of sum(score) against central differences (float64)."""
    x = images.detach().double().requires_grad_(True)
    (grad,) = torch.autograd.grad(score(x).sum(), x)
    v = torch.randn_like(x)
    with torch.no_grad():
        fd = (score(x + eps * v).sum() - score(x - eps * v).sum()) / (2 * eps)
    assert grad.abs().sum() > 0
    torch.testing.assert_close((grad * v).sum(), fd, rtol=1e-5, atol=1e-8)


def test_torchvision_imports_and_its_transforms_run_in_a_fresh_interpreter():
    """PyPI's torchvision beside a CPU torch: after ensure_torchvision its Python transforms (all the reward
    libraries use) run, and the C++ ops it could not load fail with torchvision's own error."""
    code = ("import torch; from mfm_fast._torchvision import ensure_torchvision; ensure_torchvision(); "
            "import torchvision.transforms.functional as TF, diffusers, transformers, open_clip, imscore; "
            "x = torch.rand(1, 3, 8, 12); y = TF.resize(x, [4, 6], antialias=True); "
            "z = torch.nn.functional.interpolate(x, size=(4, 6), mode='bilinear', antialias=True); "
            "assert torch.allclose(y, z, atol=1e-6), (y - z).abs().max()\n"
            "import torchvision.ops\n"
            "if not torchvision.extension._has_ops():\n"
            "    try: torchvision.ops.nms(torch.rand(2, 4), torch.rand(2), 0.5)\n"
            "    except RuntimeError as e: assert 'custom C++ ops' in str(e)\n"
            "    else: raise AssertionError('nms ran without its C++ library')\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parents[1])})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- tokenizers
@pytest.fixture(scope="module")
def clip_processor_dir(tmp_path_factory):
    """A transformers CLIPProcessor whose tokenizer is OpenAI's CLIP BPE, rebuilt from the vocabulary that
    open_clip ships (the same tokens as the laion and openai CLIP tokenizers)."""
    _require("open_clip", "open_clip_torch", "test")
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer
    st = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(k, k): v for k, v in st.encoder.items()}
    merges = [pair for pair, _ in sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])]
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    path = tmp_path_factory.mktemp("clip_processor")
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tok).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert_tokenizer")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + BERT_WORDS
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    from transformers import BertTokenizer
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    return path


def test_locally_built_clip_tokenizer_matches_open_clip(clip_processor_dir):
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import AutoProcessor
    proc = AutoProcessor.from_pretrained(clip_processor_dir, local_files_only=True)
    ids = proc(text=PROMPTS[:1], return_tensors="pt")["input_ids"][0].tolist()
    st = SimpleTokenizer()
    assert ids == [st.sot_token_id] + st.encode(PROMPTS[0]) + [st.eot_token_id]


# ---------------------------------------------------------------------------------------------- transformers CLIP
def tiny_clip(seed=0):
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=32),
        projection_dim=16)
    return CLIPModel(cfg).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def clip_pair(clip_processor_dir):
    from transformers import AutoProcessor
    return tiny_clip(), AutoProcessor.from_pretrained(clip_processor_dir, local_files_only=True)


def test_pickscore_matches_transformers_clip_scoring(clip_pair):
    model, proc = clip_pair
    adapter = PickScoreModel(model, proc, "cpu")
    images = torch.rand(4, 3, 40, 56)
    got = adapter(images, PROMPTS)  # 2 prompts, 2 particles each
    tok = proc(text=[p for p in PROMPTS for _ in range(2)], padding=True, truncation=True, max_length=77,
               return_tensors="pt")
    # the library's own scoring: CLIPModel.forward's logits_per_image = logit_scale · cos(image, text)
    logits = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                   pixel_values=clip_preprocess(images, antialias=False)).logits_per_image
    torch.testing.assert_close(got, logits.diagonal(), rtol=1e-5, atol=1e-5)
    assert (got[:2] - got[2:]).abs().max() > 0  # the prompt matters


def test_clip_score_is_the_clamped_cosine(clip_pair):
    model, proc = clip_pair
    images = torch.rand(4, 3, 32, 32)
    cos = PickScoreModel(model, proc)(images, PROMPTS) / model.logit_scale.exp()
    torch.testing.assert_close(CLIPScoreModel(model, proc)(images, PROMPTS), cos.clamp(min=0))


def test_release_clip_preprocessing():
    """Short side to 224 with bicubic interpolation and no antialiasing, centre crop, CLIP mean/std."""
    x = torch.rand(2, 3, 300, 260)
    h = round(300 * 224 / 260)
    want = F.interpolate(x, size=(h, 224), mode="bicubic", align_corners=False)[:, :, (h - 224) // 2:][:, :, :224]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    torch.testing.assert_close(clip_preprocess(x, antialias=False), (want - mean) / std)
    assert (clip_preprocess(x, antialias=True) - clip_preprocess(x, antialias=False)).abs().max() > 1e-3


def test_pickscore_image_gradient(clip_pair):
    _, proc = clip_pair
    model = tiny_clip().double()
    fd_check(lambda x: PickScoreModel(model, proc)(x, PROMPTS[0]), torch.rand(2, 3, 12, 10))


def test_transformers_v5_features_are_unwrapped(clip_pair):
    """transformers 5 returns BaseModelOutputWithPooling from get_image_features; the release's F.normalize on it
    fails, so the adapter reads .pooler_output."""
    model, _ = clip_pair
    out = model.get_image_features(pixel_values=torch.randn(1, 3, 224, 224))
    from mfm_fast.reward_models import _features
    assert _features(out).shape == (1, 16)


def test_pickscore_and_clip_factories_load_local_directories(tmp_path, clip_pair, clip_processor_dir):
    model, proc = clip_pair
    model.save_pretrained(tmp_path / "weights")
    images = torch.rand(2, 3, 24, 24)
    loaded = pickscore_reward(weights=tmp_path / "weights", processor=clip_processor_dir)
    torch.testing.assert_close(loaded(images, PROMPTS[0]), PickScoreModel(model, proc)(images, PROMPTS[0]))
    proc.save_pretrained(tmp_path / "weights")
    clip = clip_reward(weights=tmp_path / "weights")  # processor defaults to the weights directory
    torch.testing.assert_close(clip(images, PROMPTS[0]), CLIPScoreModel(model, proc)(images, PROMPTS[0]))


# ---------------------------------------------------------------------------------------------- imscore HPSv2
TINY_OPEN_CLIP = "mfm-test-tiny-ViT"


@pytest.fixture
def tiny_open_clip(tmp_path, monkeypatch):
    """imscore's HPSv2 builds OpenCLIP ViT-H-14 with a pretrained tag (a download): build a tiny registered OpenCLIP
    config instead, and prove that the adapter's factory asks for no pretrained weights."""
    import json
    hps = _require("imscore.hps.model", "imscore", "test")
    import open_clip
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{TINY_OPEN_CLIP}.json")
    requested = []

    def build(name, pretrained=None, **kwargs):
        requested.append((name, pretrained))
        return open_clip.create_model_and_transforms(TINY_OPEN_CLIP, None, **kwargs)

    monkeypatch.setattr(hps, "create_model_and_transforms", build)
    return hps, requested


def test_hpsv2_matches_imscore_score(tiny_open_clip):
    hps, requested = tiny_open_clip
    torch.manual_seed(0)
    lib_model = hps.HPSv2().eval()
    assert requested == [("ViT-H-14", "laion2B-s32B-b79K")]  # what the library itself asks for
    images = torch.rand(4, 3, 48, 30)
    got = HPSv2Model(lib_model)(images, PROMPTS)
    want = lib_model.score(images, [p for p in PROMPTS for _ in range(2)])
    torch.testing.assert_close(got, want)
    # an independent reading of the same score: cosine of OpenCLIP's normalised features after imscore's resize
    # (longer side to 224, bicubic, antialiased) and pad
    x = F.interpolate(images, size=(224, 140), mode="bicubic", antialias=True, align_corners=False)
    x = F.pad(x, (42, 42, 0, 0))
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    img = F.normalize(lib_model.model.encode_image((x - mean) / std), dim=-1)
    txt = F.normalize(lib_model.model.encode_text(lib_model.tokenizer([p for p in PROMPTS for _ in range(2)])),
                      dim=-1)
    torch.testing.assert_close(got, (img * txt).sum(-1), rtol=1e-4, atol=1e-5)


def test_hpsv2_image_gradient(tiny_open_clip):
    hps, _ = tiny_open_clip
    lib_model = hps.HPSv2().eval().double()
    fd_check(lambda x: HPSv2Model(lib_model)(x, PROMPTS[0]), torch.rand(2, 3, 10, 14))


def test_hpsv2_factory_loads_local_weights_without_downloading(tmp_path, tiny_open_clip):
    from safetensors.torch import save_file
    hps, requested = tiny_open_clip
    torch.manual_seed(1)
    lib_model = hps.HPSv2().eval()
    (tmp_path / "hpsv21").mkdir()
    save_file(lib_model.state_dict(), tmp_path / "hpsv21" / "model.safetensors")
    torch.save({"state_dict": lib_model.model.state_dict()}, tmp_path / "HPS_v2.1_compressed.pt")
    requested.clear()
    images = torch.rand(2, 3, 32, 32)
    want = lib_model.score(images, [PROMPTS[0]] * 2)
    for weights in (tmp_path / "hpsv21", tmp_path / "HPS_v2.1_compressed.pt"):
        adapter = hpsv2_reward(weights=weights)
        torch.testing.assert_close(adapter(images, PROMPTS[0]), want)
    assert requested and all(pretrained is None for _, pretrained in requested)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hpsv2_reward(weights=tmp_path)
    torch.save({"visual.nope": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not match"):
        hpsv2_reward(weights=tmp_path / "bad.pt")


# ---------------------------------------------------------------------------------------------- imscore ImageReward
@pytest.fixture
def tiny_imagereward(monkeypatch, bert_tokenizer_dir):
    """imscore's ImageReward with its real classes at small sizes: BLIP's ViT one block wide 64, its BERT one layer
    (the MLP head fixes the text width at 768), and the local BERT tokenizer in place of the hub's."""
    return shrink_imagereward(monkeypatch, _require("imscore.imreward.model", "imscore", "test"), bert_tokenizer_dir)


def test_imagereward_matches_imscore_score(tiny_imagereward):
    torch.manual_seed(0)
    lib_model = tiny_imagereward.ImageReward().eval()
    images = torch.rand(4, 3, 30, 40)
    got = ImageRewardModel(lib_model)(images, PROMPTS)
    want = lib_model.score(images, [p for p in PROMPTS for _ in range(2)])
    assert want.shape == (4, 1)
    torch.testing.assert_close(got, want.reshape(4))
    assert (got[:2] - got[2:]).abs().max() > 0


def test_imagereward_image_gradient(tiny_imagereward):
    lib_model = tiny_imagereward.ImageReward().eval().double()
    fd_check(lambda x: ImageRewardModel(lib_model)(x, PROMPTS[0]), torch.rand(2, 3, 9, 11))


def test_imagereward_factory_loads_local_files(tmp_path, tiny_imagereward, bert_tokenizer_dir):
    from safetensors.torch import save_file
    torch.manual_seed(2)
    lib_model = tiny_imagereward.ImageReward().eval()
    save_file(lib_model.state_dict(), tmp_path / "model.safetensors")
    images = torch.rand(2, 3, 32, 32)
    adapter = image_reward(weights=tmp_path, tokenizer=bert_tokenizer_dir)
    torch.testing.assert_close(adapter(images, PROMPTS[0]), lib_model.score(images, [PROMPTS[0]] * 2).reshape(2))
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        image_reward(weights=tmp_path, tokenizer=tmp_path / "absent")
    with pytest.raises(TypeError, match="med_config"):
        image_reward(weights=tmp_path, tokenizer=bert_tokenizer_dir, med_config="med_config.json")


# ---------------------------------------------------------------------------------------------- imscore aesthetic
def test_laion_aesthetic_matches_imscore_score_and_loads_locally(tmp_path, monkeypatch):
    """imscore's LAIONAestheticScorer with a small CLIP vision tower (its MLP head fixes the projection at 768)
    in place of the hub's ViT-L/14; saved, then loaded back through the factory from local files."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    lib = _require("imscore.aesthetic.model", "imscore", "test")
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=224, patch_size=32, projection_dim=768)
    config.save_pretrained(tmp_path / "clip")

    class SmallTower:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            return CLIPVisionModelWithProjection(config)

    with monkeypatch.context() as m:
        m.setattr(lib, "CLIPVisionModelWithProjection", SmallTower)
        torch.manual_seed(5)
        lib_model = lib.LAIONAestheticScorer().eval()
    (tmp_path / "aesthetic").mkdir()
    save_file(lib_model.state_dict(), tmp_path / "aesthetic" / "model.safetensors")
    adapter = aesthetic_reward(weights=tmp_path / "aesthetic", clip_config=tmp_path / "clip")
    images = torch.rand(3, 3, 20, 26)
    want = lib_model.score(images)
    torch.testing.assert_close(adapter(images, "prompts are ignored"), want)
    assert want.std() > 0
    fd_check(lambda x: AestheticModel(lib_model.double())(x, ""), torch.rand(2, 3, 9, 7))
    with pytest.raises(FileNotFoundError, match="clip_config path not found"):
        aesthetic_reward(weights=tmp_path / "aesthetic", clip_config=tmp_path / "absent")


# ---------------------------------------------------------------------------------------------- scoring API
def test_score_images_under_several_rewards(tmp_path, clip_pair, clip_processor_dir):
    model, proc = clip_pair
    model.save_pretrained(tmp_path / "pick")
    scorers = build_scorers([f"pickscore,weights={tmp_path / 'pick'},processor={clip_processor_dir}",
                             "toy"])
    assert set(scorers) == {"pickscore", "toy"}
    images = torch.rand(6, 3, 32, 32)
    out = score_images(images, scorers, prompts=PROMPTS, batch_size=4)
    assert set(out) == {"pickscore", "toy"} and all(len(v) == 6 for v in out.values())
    want = PickScoreModel(model, proc)(images, PROMPTS)
    torch.testing.assert_close(torch.tensor(out["pickscore"]), want, rtol=1e-5, atol=1e-5)
    bound = {"pickscore": scorers["pickscore"].with_prompt(PROMPTS[0])}
    torch.testing.assert_close(torch.tensor(score_images(images, bound)["pickscore"]),
                               PickScoreModel(model, proc)(images, PROMPTS[0]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="key=value"):
        parse_reward_spec("pickscore,weights")
    with pytest.raises(ValueError, match="must return 6 scores"):
        score_images(images, {"bad": lambda x: x.sum()})
