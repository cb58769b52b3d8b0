"""Text-image reward models (ImageReward, HPSv2, PickScore) behind one adapter interface, with ImageNet prompts.

An adapter is an nn.Module `adapter(images, prompts) -> (B,)` taking images in [0, 1] (B, 3, H, W) and a prompt
per image (or one prompt for all, or G prompts for B = G·N images grouped contiguously, as particles are).
`adapter.with_prompt(p)` binds the prompts and returns a plain reward `images -> (B,)` for
`mfm_fast.rewards.DecodeThenScore`. Preprocessing (resize to 224, CLIP normalisation) is done in torch, so scores
are differentiable in the images whenever the underlying network is.

The real models need their packages and LOCAL weights; nothing is downloaded. A missing package or weight file
raises an error saying what to install or which file to pass:
- ImageReward: `pip install image-reward`; weights=ImageReward.pt, med_config=med_config.json (THUDM/ImageReward);
  its BLIP tokenizer also loads `bert-base-uncased` from the local Hugging Face cache.
- HPSv2: `pip install open_clip_torch`; weights=HPS_v2_compressed.pt or HPS_v2.1_compressed.pt (ViT-H-14).
- PickScore: `pip install transformers`; weights=a local copy of yuvalkirstain/PickScore_v1,
  processor=a local copy of laion/CLIP-ViT-H-14-laion2B-s32B-b79K.

Prompts: `class_prompts(labels)` fills DEFAULT_TEMPLATE with the ImageNet class names shipped in
`mfm_fast.imagenet_classes` (CLIP's readable names), or with the lines of a user-supplied names file; a label
outside the list falls back to its index.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import check_state

DEFAULT_TEMPLATE = "A high-quality, high-resolution photograph of a {class}"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
Prompts = Union[str, Sequence[str]]


# ---------------------------------------------------------------------------------------------- prompts
def class_names(names_file=None) -> list[str]:
    """The ImageNet-1k class names, or those of `names_file` (one per line, or a JSON list)."""
    if names_file is None:
        from .imagenet_classes import IMAGENET_CLASSES
        return list(IMAGENET_CLASSES)
    path = Path(names_file)
    if not path.is_file():
        raise FileNotFoundError(f"class names file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        names = json.loads(text)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{path} must hold a JSON list of class names")
        return names
    return [line.strip() for line in text.splitlines() if line.strip()]


def class_prompts(labels, template: str = DEFAULT_TEMPLATE, names: Optional[Sequence[str]] = None) -> list[str]:
    """One prompt per label: template with "{class}" replaced by the class name (the index if it has none)."""
    if "{class}" not in template:
        raise ValueError(f"template must contain '{{class}}', got {template!r}")
    names = class_names() if names is None else list(names)
    labels = labels.tolist() if torch.is_tensor(labels) else list(labels)
    return [template.replace("{class}", names[i] if 0 <= i < len(names) else str(i)) for i in map(int, labels)]


def expand_prompts(prompts: Prompts, batch: int) -> list[str]:
    """One prompt per image: a single prompt is shared; G prompts for B = G·N images repeat N times each."""
    if isinstance(prompts, str):
        return [prompts] * batch
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a string or a non-empty sequence of strings")
    if batch % len(prompts):
        raise ValueError(f"{len(prompts)} prompts do not divide the {batch} images into equal contiguous groups")
    n = batch // len(prompts)
    return [p for p in prompts for _ in range(n)]


def clip_preprocess(images: torch.Tensor, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """Differentiable CLIP preprocessing of [0, 1] images: resize the short side to `size` (bicubic, antialiased),
    center crop, normalise."""
    H, W = images.shape[-2:]
    if (H, W) != (size, size):
        scale = size / min(H, W)
        h, w = max(size, round(H * scale)), max(size, round(W * scale))
        images = F.interpolate(images, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        top, left = (h - size) // 2, (w - size) // 2
        images = images[..., top:top + size, left:left + size]
    m = images.new_tensor(mean).view(1, 3, 1, 1)
    s = images.new_tensor(std).view(1, 3, 1, 1)
    return (images - m) / s


# ---------------------------------------------------------------------------------------------- adapter base
class RewardModel(nn.Module):
    """Adapter interface: `forward(images (B, 3, H, W) in [0, 1], prompts) -> (B,)` float32 scores."""

    name = "reward_model"
    prompt_template = DEFAULT_TEMPLATE

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, prompts: Prompts) -> torch.Tensor:
        check_state("images", images)
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W) with values in [0, 1], got "
                             f"{tuple(images.shape)}")
        out = self.score(images, expand_prompts(prompts, images.shape[0]))
        return out.reshape(images.shape[0]).float()

    def with_prompt(self, prompts: Prompts) -> "PromptedReward":
        return PromptedReward(self, prompts)

    def for_labels(self, labels, template: Optional[str] = None, names_file=None) -> "PromptedReward":
        """Bind one class prompt per label (G labels for B = G·N images: each prompt covers N contiguous ones)."""
        template = self.prompt_template if template is None else template
        return PromptedReward(self, class_prompts(labels, template, class_names(names_file)))


class PromptedReward(nn.Module):
    """images -> (B,) with fixed prompts (see `expand_prompts` for how they map to the images)."""

    def __init__(self, model: RewardModel, prompts: Prompts):
        super().__init__()
        self.model = model
        self.prompts = prompts
        self.name = getattr(model, "name", type(model).__name__)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images, self.prompts)


def _require(module: str, pip_name: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"the {what} reward needs the '{module}' package: pip install {pip_name}") from err


def _require_path(value, arg: str, what: str, hint: str, directory: bool = False) -> str:
    if value is None:
        raise ValueError(f"the {what} reward needs local weights: pass {arg}=<{hint}> (nothing is downloaded)")
    path = Path(value)
    if not (path.is_dir() if directory else path.is_file()):
        kind = "directory" if directory else "file"
        raise FileNotFoundError(f"{what}: {arg} {kind} not found: {path} (expected {hint})")
    return str(path)


# ---------------------------------------------------------------------------------------------- real models
class ImageRewardModel(RewardModel):
    """ImageReward (BLIP ViT-L + MLP head), scores standardised as in the package; differentiable (score_gard)."""

    name = "imagereward"

    def __init__(self, model, tokenizer, device):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.device_ = torch.device(device)

    def score(self, images, prompts):
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        x = clip_preprocess(images.to(self.device_).float())
        return self.model.score_gard(tok.input_ids.to(self.device_), tok.attention_mask.to(self.device_), x)


def image_reward(weights=None, med_config=None, device="cpu") -> ImageRewardModel:
    weights = _require_path(weights, "weights", "ImageReward", "ImageReward.pt from THUDM/ImageReward")
    med_config = _require_path(med_config, "med_config", "ImageReward", "med_config.json from THUDM/ImageReward")
    rm = _require("ImageReward", "image-reward", "ImageReward")
    model = rm.load(weights, device=device, med_config=med_config).eval()
    model.requires_grad_(False)
    return ImageRewardModel(model, model.blip.tokenizer, device)


class HPSv2Model(RewardModel):
    """HPSv2 / HPSv2.1: cosine similarity of OpenCLIP ViT-H-14 image and text features (fine-tuned weights)."""

    name = "hpsv2"

    def __init__(self, model, tokenizer, device):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.device_ = torch.device(device)

    def score(self, images, prompts):
        x = clip_preprocess(images.to(self.device_).float())
        img = F.normalize(self.model.encode_image(x), dim=-1)
        txt = F.normalize(self.model.encode_text(self.tokenizer(prompts).to(self.device_)), dim=-1)
        return (img * txt).sum(-1)


def hpsv2_reward(weights=None, device="cpu") -> HPSv2Model:
    weights = _require_path(weights, "weights", "HPSv2", "HPS_v2_compressed.pt or HPS_v2.1_compressed.pt")
    open_clip = _require("open_clip", "open_clip_torch", "HPSv2")
    model = open_clip.create_model("ViT-H-14", pretrained=None, device=device)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state.get("state_dict", state))
    model.eval().requires_grad_(False)
    return HPSv2Model(model, open_clip.get_tokenizer("ViT-H-14"), device)


class PickScoreModel(RewardModel):
    """PickScore_v1: logit_scale · cos(image, text) of a fine-tuned CLIP ViT-H-14 (transformers)."""

    name = "pickscore"

    def __init__(self, model, processor, device):
        super().__init__()
        self.model, self.processor = model, processor
        self.device_ = torch.device(device)

    def score(self, images, prompts):
        tok = self.processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        x = clip_preprocess(images.to(self.device_).float())
        img = F.normalize(self.model.get_image_features(pixel_values=x), dim=-1)
        txt = F.normalize(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device_),
                                                       attention_mask=tok["attention_mask"].to(self.device_)), dim=-1)
        return self.model.logit_scale.exp() * (img * txt).sum(-1)


def pickscore_reward(weights=None, processor=None, device="cpu") -> PickScoreModel:
    weights = _require_path(weights, "weights", "PickScore", "a local copy of yuvalkirstain/PickScore_v1",
                            directory=True)
    processor = _require_path(processor, "processor", "PickScore",
                              "a local copy of laion/CLIP-ViT-H-14-laion2B-s32B-b79K", directory=True)
    tf = _require("transformers", "transformers", "PickScore")
    proc = tf.AutoProcessor.from_pretrained(processor, local_files_only=True)
    model = tf.AutoModel.from_pretrained(weights, local_files_only=True).to(device).eval()
    model.requires_grad_(False)
    return PickScoreModel(model, proc, device)


# ---------------------------------------------------------------------------------------------- stand-in
class ToyClipReward(RewardModel):
    """A CLIP-shaped stand-in with random weights (tests, dry runs): cos(image features, text features) · 10.

    Image features: a linear map of 4x4 average-pooled pixels; text features: the mean of per-byte embeddings."""

    name = "toy"

    def __init__(self, dim: int = 32, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.image_proj = nn.Parameter(torch.randn(3 * 16, dim, generator=g) / 7, requires_grad=False)
        self.byte_embed = nn.Parameter(torch.randn(256, dim, generator=g), requires_grad=False)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return torch.stack([self.byte_embed[torch.tensor(list(p.encode("utf-8")) or [0])].mean(0)
                            for p in prompts])

    def score(self, images, prompts):
        x = F.adaptive_avg_pool2d(clip_preprocess(images.float(), size=32), 4).flatten(1)
        img = F.normalize(x @ self.image_proj.to(x.device), dim=-1)
        txt = F.normalize(self.encode_text(prompts).to(x.device), dim=-1)
        return 10 * (img * txt).sum(-1)


def toy_reward(dim: int = 32, seed: int = 0, device="cpu") -> ToyClipReward:
    return ToyClipReward(dim, seed).to(device)


REWARD_MODELS: dict[str, Callable[..., RewardModel]] = {
    "imagereward": image_reward,
    "hpsv2": hpsv2_reward,
    "pickscore": pickscore_reward,
    "toy": toy_reward,
}


def get_reward_model(name: str, prompt_template: Optional[str] = None, **kwargs) -> RewardModel:
    """A registered adapter by name (REWARD_MODELS), or `module:function` returning one; kwargs go to the factory.
    `prompt_template` (with "{class}") becomes the adapter's default for `for_labels`."""
    if name in REWARD_MODELS:
        factory = REWARD_MODELS[name]
    elif ":" in name:
        module, func = name.split(":", 1)
        try:
            factory = getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"cannot import the reward model factory {name!r}: {err}") from err
    else:
        raise ValueError(f"unknown reward model {name!r}; known: {sorted(REWARD_MODELS)} or 'module:function'")
    model = factory(**kwargs)
    if not isinstance(model, RewardModel):
        raise TypeError(f"reward model factory {name!r} must return a RewardModel (forward(images, prompts) -> "
                        f"(B,)), got {type(model).__name__}")
    if prompt_template is not None:
        class_prompts([0], prompt_template)  # validates the template
        model.prompt_template = prompt_template
    return model


def reward_for_class(name: str, labels, prompt_template: Optional[str] = None, names_file=None,
                     **kwargs) -> PromptedReward:
    """images -> (B,) scores of the named reward model against the class prompts of `labels`."""
    model = get_reward_model(name, prompt_template=prompt_template, **kwargs)
    return model.for_labels(labels, names_file=names_file)
