"""Reward-model adapters: the contract (checked on a CLIP-like stand-in), prompts, and actionable errors."""
import sys

import pytest
import torch

from mfm_fast.imagenet_classes import IMAGENET_CLASSES
from mfm_fast.reward_models import (DEFAULT_TEMPLATE, PromptedReward, RewardModel, ToyClipReward, aesthetic_reward,
                                    class_names, class_prompts, clip_preprocess, clip_reward, expand_prompts,
                                    get_reward_model, hpsv2_reward, image_reward, pickscore_reward, reward_for_class)
from mfm_fast.rewards import DecodeThenScore, as_reward


def test_imagenet_names_and_prompts(tmp_path):
    assert len(IMAGENET_CLASSES) == 1000
    assert (IMAGENET_CLASSES[0], IMAGENET_CLASSES[207], IMAGENET_CLASSES[281], IMAGENET_CLASSES[999]) == (
        "tench", "Golden Retriever", "tabby cat", "toilet paper")
    assert class_prompts(torch.tensor([281])) == ["A high-quality, high-resolution photograph of a tabby cat."]
    (tmp_path / "names.txt").write_text("zero\n\none\ntwo\n")
    names = class_names(tmp_path / "names.txt")
    assert names == ["zero", "one", "two"]
    assert class_prompts([2, 5], "a {class}!", names) == ["a two!", "a 5!"]  # index fallback
    (tmp_path / "classes.json").write_text('["cat", "dog"]')
    assert class_prompts([1], "{class}", class_names(tmp_path / "classes.json")) == ["dog"]
    with pytest.raises(ValueError, match="{class}"):
        class_prompts([1], "a photo of a {}")
    with pytest.raises(FileNotFoundError):
        class_names(tmp_path / "missing.txt")


def test_prompt_expansion_rules():
    assert expand_prompts("a", 3) == ["a", "a", "a"]
    assert expand_prompts(["a", "b"], 6) == ["a", "a", "a", "b", "b", "b"]  # contiguous particle groups
    assert expand_prompts(["a", "b", "c"], 3) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="do not divide"):
        expand_prompts(["a", "b"], 3)
    with pytest.raises(TypeError):
        expand_prompts([], 3)


def test_clip_preprocess_resizes_crops_and_normalises():
    c = torch.rand(2, 3, 1, 1)
    out = clip_preprocess(c.expand(2, 3, 20, 40))
    assert out.shape == (2, 3, 224, 224)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    torch.testing.assert_close(out, ((c - mean) / std).expand(2, 3, 224, 224), atol=1e-5, rtol=1e-5)
    x = torch.rand(1, 3, 224, 224)
    torch.testing.assert_close(clip_preprocess(x), (x - mean) / std)


def test_adapter_contract_on_the_stand_in():
    model = get_reward_model("toy", prompt_template="a photo of a {class}")
    assert isinstance(model, RewardModel) and model.prompt_template == "a photo of a {class}"
    images = torch.rand(6, 3, 16, 16, requires_grad=True)
    prompts = ["a photo of a cat", "a photo of a dog"]
    scores = model(images, prompts)  # 2 prompts for 6 images: 3 contiguous particles each
    assert scores.shape == (6,) and scores.dtype == torch.float32
    explicit = torch.stack([model(images[i:i + 1], prompts[i // 3]) for i in range(6)]).squeeze(1)
    torch.testing.assert_close(scores, explicit)
    assert (model(images, "a photo of a cat") - model(images, "a photo of a dog")).abs().max() > 1e-3
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    bound = model.for_labels(torch.tensor([281, 207]))
    assert isinstance(bound, PromptedReward) and bound.prompts == ["a photo of a tabby cat",
                                                                   "a photo of a Golden Retriever"]
    torch.testing.assert_close(bound(images.detach()), model(images.detach(), bound.prompts))
    with pytest.raises(ValueError, match="images must have shape"):
        model(torch.rand(2, 1, 8, 8), "x")


def test_registry_python_path_and_errors():
    by_path = get_reward_model("mfm_fast.reward_models:toy_reward", seed=3)
    assert isinstance(by_path, ToyClipReward)
    bound = reward_for_class("toy", [281], seed=3)
    assert bound.prompts == [DEFAULT_TEMPLATE.replace("{class}", "tabby cat")]
    with pytest.raises(ValueError, match="unknown reward model"):
        get_reward_model("nope")
    with pytest.raises(ValueError, match="cannot import"):
        get_reward_model("mfm_fast.reward_models:missing")
    with pytest.raises(TypeError, match="must return a RewardModel"):
        get_reward_model("mfm_fast.reward_models:class_names")


def test_decode_then_score_pipeline_is_differentiable():
    decoder = torch.nn.Sequential(torch.nn.Conv2d(4, 3, 1), torch.nn.Sigmoid())  # latents -> [0, 1] images
    reward = as_reward(DecodeThenScore(decoder, ToyClipReward().for_labels([281])))
    z = torch.randn(3, 4, 8, 8, requires_grad=True)
    r = reward(z)
    assert r.shape == (3,)
    r.sum().backward()
    assert z.grad.abs().sum() > 0


@pytest.mark.parametrize("factory, kwargs, module, pip_name", [
    (image_reward, {"weights": "file", "tokenizer": "dir"}, "imscore.imreward.model", "imscore"),
    (hpsv2_reward, {"weights": "dir"}, "imscore.hps.model", "imscore"),
    (pickscore_reward, {"weights": "dir", "processor": "dir"}, "transformers", "transformers"),
    (clip_reward, {"weights": "dir"}, "transformers", "transformers"),
    (aesthetic_reward, {"weights": "file", "clip_config": "file"}, "imscore.aesthetic.model", "imscore"),
])
def test_real_models_say_what_is_missing(tmp_path, monkeypatch, factory, kwargs, module, pip_name):
    with pytest.raises(ValueError, match="weights="):
        factory()
    paths = {}
    for k, kind in kwargs.items():
        p = tmp_path / k
        p.mkdir() if kind == "dir" else p.write_bytes(b"x")
        paths[k] = str(p)
    missing = {k: str(tmp_path / "absent") for k in kwargs}
    with pytest.raises(FileNotFoundError, match="not found"):
        factory(**missing)
    monkeypatch.setitem(sys.modules, module, None)  # the package is not importable
    with pytest.raises(ImportError, match=f"pip install {pip_name}"):
        factory(**paths)
