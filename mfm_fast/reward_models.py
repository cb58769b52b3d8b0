"""Text-image reward models (HPSv2.1, ImageReward, PickScore, CLIP) behind one adapter interface, with prompts.

An adapter is an nn.Module `adapter(images, prompts) -> (B,)` taking images in [0, 1] (B, 3, H, W) and a prompt
per image (or one prompt for all, or G prompts for B = G·N images grouped contiguously, as particles are).
`adapter.with_prompt(p)` binds the prompts and returns a plain reward `images -> (B,)` for
`mfm_fast.rewards.DecodeThenScore`. Scores are differentiable in the images.

Each adapter scores exactly as the MFM release does (same library, preprocessing, tokenisation and scale), so a
steering strength λ means the same thing here and there:
- hpsv2: `imscore.hps.model.HPSv2` and its own `score` (OpenCLIP ViT-H-14; longer side to 224, pad, normalise).
- imagereward: `imscore.imreward.model.ImageReward` and its own `score` (BLIP; standardised score).
- pickscore: transformers CLIP ViT-H-14, logit_scale · cosine, the release's torch preprocessing (no antialias).
- clip: transformers CLIP ViT-B/16, cosine clamped at 0, same preprocessing.
- aesthetic: `imscore.aesthetic.model.LAIONAestheticScorer` and its own `score` (not used by the release).
Every adapter also wraps an in-memory model (e.g. `PickScoreModel(model, processor, device)`).

The factories load LOCAL files only; nothing is downloaded, and a missing package or file raises an error naming
what to install or which argument and path is wrong (`pip install 'mfm_fast[rewards]'` installs the libraries):
- hpsv2: weights = a copy of RE-N-Y/hpsv21 (directory with model.safetensors), or HPS_v2.1_compressed.pt.
- imagereward: weights = a copy of RE-N-Y/ImageReward (model.safetensors); tokenizer = a copy of the
  bert-base-uncased tokenizer (vocab.txt), which imscore would otherwise fetch.
- pickscore: weights = a copy of yuvalkirstain/PickScore_v1; processor = a copy of
  laion/CLIP-ViT-H-14-laion2B-s32B-b79K (tokenizer files suffice).
- clip: weights = a copy of openai/clip-vit-base-patch16 (processor defaults to the same directory).
- aesthetic (LAION aesthetic v2, not a release reward): weights = a copy of RE-N-Y/laion-aesthetic;
  clip_config = openai/clip-vit-large-patch14's config.json.

Scoring several rewards at once (e.g. every sample of a run under every configured reward): `build_scorers` and
`score_images`. Prompts: `class_prompts(labels)` fills DEFAULT_TEMPLATE with the ImageNet class names shipped in
`mfm_fast.imagenet_classes` (CLIP's readable names), or with the lines of a user-supplied names file; a label
outside the list falls back to its index.
"""
from __future__ import annotations

import contextlib
import importlib
import json
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import check_finite, check_label, check_positive_int, check_state, host_checks_allowed
from ._torchvision import ensure_torchvision

DEFAULT_TEMPLATE = "A high-quality, high-resolution photograph of a {class}."  # the release's prompt
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
        try:
            names = json.loads(text)
        except ValueError as err:
            raise ValueError(f"class names file {path} is not valid JSON: {err}") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{path} must hold a JSON list of class names")
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ValueError(f"class names file {path} holds no class names")
    return names


def class_prompts(labels, template: str = DEFAULT_TEMPLATE, names: Optional[Sequence[str]] = None) -> list[str]:
    """One prompt per label: template with "{class}" replaced by the class name (the index if it has none)."""
    if "{class}" not in template:
        raise ValueError(f"template must contain '{{class}}', got {template!r}")
    names = class_names() if names is None else list(names)
    labels = labels.tolist() if torch.is_tensor(labels) else list(labels)
    labels = [check_label(f"labels[{k}]", v) for k, v in enumerate(labels)]  # 2.7 is refused, not truncated to 2
    return [template.replace("{class}", names[i] if 0 <= i < len(names) else str(i)) for i in labels]


FT_PROMPT_PREFIX = "A high-resolution, high-quality photograph of a "  # the release's fine-tuning prompt prefix


def finetune_prompts(labels, prefix: str = FT_PROMPT_PREFIX, names: Optional[Sequence[str]] = None) -> list[str]:
    """The release's fine-tuning prompts: prefix + the class's WordNet lemmas ("tabby, tabby cat" for 281, no
    final period), which differ from the steering prompts of `class_prompts`. `names` replaces the lemma list."""
    from .imagenet_lemmas import IMAGENET_LEMMAS
    names = IMAGENET_LEMMAS if names is None else list(names)
    labels = labels.tolist() if torch.is_tensor(labels) else list(labels)
    out = []
    for i in labels:
        if isinstance(i, float) and not float(i).is_integer():
            raise ValueError(f"labels must be integers, got {i}")
        i = int(i)
        if not 0 <= i < len(names):
            raise ValueError(f"label {i} has no class description (labels must lie in [0, {len(names)}))")
        out.append(f"{prefix}{names[i]}")
    return out


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


def clip_preprocess(images: torch.Tensor, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD,
                    antialias: bool = True) -> torch.Tensor:
    """Differentiable CLIP preprocessing of [0, 1] images: resize the short side to `size` (bicubic, align_corners
    False; the release's PickScore/CLIP rewards resize without antialiasing), center crop, normalise."""
    H, W = images.shape[-2:]
    if (H, W) != (size, size):
        scale = size / min(H, W)
        h, w = max(size, round(H * scale)), max(size, round(W * scale))
        images = F.interpolate(images, size=(h, w), mode="bicubic", antialias=antialias,
                               align_corners=False)
        top, left = (h - size) // 2, (w - size) // 2
        images = images[..., top:top + size, left:left + size]
    m = images.new_tensor(mean).view(1, 3, 1, 1)
    s = images.new_tensor(std).view(1, 3, 1, 1)
    return (images - m) / s


# ---------------------------------------------------------------------------------------------- adapter base
class RewardModel(nn.Module):
    """Adapter interface: `forward(images (B, 3, H, W) in [0, 1], prompts) -> (B,)` scores (float32; float64 stays)."""

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
        out = out.reshape(images.shape[0])
        return out if out.dtype == torch.float64 else out.float()  # float64 kept for gradient checks

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
    ensure_torchvision()
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"the {what} reward needs the '{module}' package: pip install {pip_name} "
                          f"(or pip install 'mfm_fast[rewards]')") from err


def _require_path(value, arg: str, what: str, hint: str, directory: Optional[bool] = False) -> str:
    """A local path that exists; directory=None accepts a file or a directory."""
    if value is None:
        raise ValueError(f"the {what} reward needs local weights: pass {arg}=<{hint}> (nothing is downloaded)")
    path = Path(value)
    ok = path.exists() if directory is None else (path.is_dir() if directory else path.is_file())
    if not ok:
        kind = "path" if directory is None else ("directory" if directory else "file")
        raise FileNotFoundError(f"{what}: {arg} {kind} not found: {path} (expected {hint})")
    return str(path)


@contextlib.contextmanager
def _patched(module, attr: str, value):
    """Swap a library's module-level name while its constructor runs (hub downloads -> local files)."""
    old = getattr(module, attr)
    setattr(module, attr, value)
    try:
        yield
    finally:
        setattr(module, attr, old)


def _load_state(module: nn.Module, path: Path, what: str) -> None:
    """Load a state dict strictly (weights_only for pickles); a mismatch names the keys."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{what}: {path} does not match the model: missing keys {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")


def _weights_file(weights: str, what: str, hint: str) -> Path:
    """A weights file, or the model.safetensors of a local hub-style directory."""
    path = Path(weights)
    if path.is_dir():
        path = path / "model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{what}: no model.safetensors in the weights directory {weights} "
                                    f"(expected {hint})")
    return path


def _param_dtype_device(model: nn.Module, device=None):
    p = next(model.parameters())
    return p.dtype, (p.device if device is None else torch.device(device))


def _features(out) -> torch.Tensor:
    """transformers < 5 returns the projected embeddings; 5.x a BaseModelOutputWithPooling holding them."""
    return out if torch.is_tensor(out) else out.pooler_output


# ---------------------------------------------------------------------------------------------- real models
class ImscoreReward(RewardModel):
    """An `imscore` scorer scored with the library's own `score(images, prompts)`, as the release does."""

    def __init__(self, model: nn.Module, device=None):
        super().__init__()
        if not callable(getattr(model, "score", None)):
            raise TypeError(f"{type(self).__name__} wraps an imscore model with score(images, prompts), got "
                            f"{type(model).__name__}")
        self.model = model
        self.device_ = None if device is None else torch.device(device)

    def score(self, images, prompts):
        dtype, device = _param_dtype_device(self.model, self.device_)
        return self.model.score(images.to(device=device, dtype=dtype), prompts)


class ImageRewardModel(ImscoreReward):
    """ImageReward (BLIP ViT-L/16 + BERT cross-attention + MLP head), standardised by the stored mean and std:
    `imscore.imreward.model.ImageReward` (weights RE-N-Y/ImageReward), which resizes the short side to 224
    (bicubic, antialiased), centre-crops and CLIP-normalises with torchvision."""

    name = "imagereward"


class HPSv2Model(ImscoreReward):
    """HPSv2.1: cosine of OpenCLIP ViT-H-14 image and text features, `imscore.hps.model.HPSv2` (weights
    RE-N-Y/hpsv21), which resizes the LONGER side to 224 (bicubic, antialiased), pads to 224 x 224 and
    CLIP-normalises."""

    name = "hpsv2"


def blip_tokenizer_loader(path):
    """A stand-in for the `BertTokenizer` name in imscore's ImageReward module: its `from_pretrained` reads the
    tokenizer from the local directory `path` instead of the hub's bert-base-uncased."""
    tf = _require("transformers", "transformers", "ImageReward")
    base = tf.BertTokenizer
    if not hasattr(base, "additional_special_tokens_ids"):
        class BlipBertTokenizer(base):
            # transformers 5 keeps added special tokens as `extra_special_tokens` and dropped this property, which
            # imscore's BLIP constructor reads once (for an id its scoring never uses)
            @property
            def additional_special_tokens_ids(self):
                return self.convert_tokens_to_ids(list(self.extra_special_tokens))
        base = BlipBertTokenizer

    class LocalBertTokenizer:
        @staticmethod
        def from_pretrained(*_args, **_kwargs):
            return base.from_pretrained(str(path), local_files_only=True)

    return LocalBertTokenizer


def image_reward(weights=None, tokenizer=None, device="cpu", med_config=None) -> ImageRewardModel:
    """ImageReward from local files: weights = a copy of RE-N-Y/ImageReward (directory with model.safetensors, or
    the file), tokenizer = a copy of the `bert-base-uncased` tokenizer (directory with vocab.txt), which imscore
    would otherwise fetch from the hub."""
    if med_config is not None:
        raise TypeError("image_reward: med_config belongs to the image-reward package; the release scores with "
                        "imscore's ImageReward, which needs weights=<RE-N-Y/ImageReward directory> and "
                        "tokenizer=<bert-base-uncased tokenizer directory>")
    weights = _require_path(weights, "weights", "ImageReward",
                            "a local copy of RE-N-Y/ImageReward (model.safetensors)", directory=None)
    tokenizer = _require_path(tokenizer, "tokenizer", "ImageReward",
                              "a local copy of the bert-base-uncased tokenizer (vocab.txt)", directory=True)
    lib = _require("imscore.imreward.model", "imscore", "ImageReward")
    path = _weights_file(weights, "ImageReward", "a local copy of RE-N-Y/ImageReward")
    with _patched(lib, "BertTokenizer", blip_tokenizer_loader(tokenizer)):
        model = lib.ImageReward()
    _load_state(model, path, "ImageReward")
    model.to(device).eval().requires_grad_(False)
    return ImageRewardModel(model, device)


def hpsv2_reward(weights=None, device="cpu") -> HPSv2Model:
    """HPSv2.1 from local files: weights = a copy of RE-N-Y/hpsv21 (directory with model.safetensors, or the file),
    or an original HPS_v2(.1)_compressed.pt checkpoint (the OpenCLIP model's state dict)."""
    weights = _require_path(weights, "weights", "HPSv2",
                            "a local copy of RE-N-Y/hpsv21 (model.safetensors) or HPS_v2.1_compressed.pt",
                            directory=None)
    lib = _require("imscore.hps.model", "imscore", "HPSv2")
    path = _weights_file(weights, "HPSv2", "a local copy of RE-N-Y/hpsv21")
    build = lib.create_model_and_transforms

    def empty_model(name, pretrained=None, **kwargs):  # imscore asks for a pretrained tag, i.e. a download
        return build(name, None, **kwargs)

    with _patched(lib, "create_model_and_transforms", empty_model):
        model = lib.HPSv2()
    _load_state(model if path.suffix == ".safetensors" else model.model, path, "HPSv2")
    model.to(device).eval().requires_grad_(False)
    return HPSv2Model(model, device)


class AestheticModel(ImscoreReward):
    """LAION aesthetic predictor v2: an MLP on normalised CLIP ViT-L/14 image embeddings,
    `imscore.aesthetic.model.LAIONAestheticScorer` (weights RE-N-Y/laion-aesthetic); prompts are ignored.
    Not one of the release's rewards: an extra differentiable scorer."""

    name = "aesthetic"


def aesthetic_reward(weights=None, clip_config=None, device="cpu") -> AestheticModel:
    """LAION aesthetic from local files: weights = a copy of RE-N-Y/laion-aesthetic (directory with
    model.safetensors, or the file; it holds the CLIP tower too), clip_config = the config.json of
    openai/clip-vit-large-patch14 (or its directory), from which imscore's CLIP tower is built instead of downloaded."""
    weights = _require_path(weights, "weights", "aesthetic",
                            "a local copy of RE-N-Y/laion-aesthetic (model.safetensors)", directory=None)
    clip_config = _require_path(clip_config, "clip_config", "aesthetic",
                                "config.json of openai/clip-vit-large-patch14", directory=None)
    lib = _require("imscore.aesthetic.model", "imscore", "aesthetic")
    path = _weights_file(weights, "aesthetic", "a local copy of RE-N-Y/laion-aesthetic")
    tower = lib.CLIPVisionModelWithProjection

    class ConfiguredTower:  # imscore loads the pretrained tower from the hub; its weights are in `weights` anyway
        @staticmethod
        def from_pretrained(*_args, **_kwargs):
            return tower(tower.config_class.from_pretrained(clip_config, local_files_only=True))

    with _patched(lib, "CLIPVisionModelWithProjection", ConfiguredTower):
        model = lib.LAIONAestheticScorer()
    _load_state(model, path, "aesthetic")
    model.to(device).eval().requires_grad_(False)
    return AestheticModel(model, device)


class PickScoreModel(RewardModel):
    """PickScore_v1: logit_scale · cos(image, text) of a fine-tuned CLIP ViT-H-14 (transformers), with the release's
    preprocessing: bicubic resize of the short side to 224 WITHOUT antialiasing, centre crop, CLIP normalisation.
    Text embeddings carry no gradient (the release computes them under no_grad)."""

    name = "pickscore"
    antialias = False

    def __init__(self, model, processor, device=None):
        super().__init__()
        self.model, self.processor = model, processor
        self.device_ = None if device is None else torch.device(device)

    def text_embeds(self, prompts: list[str], device) -> torch.Tensor:
        unique = list(dict.fromkeys(prompts))  # particles share a prompt: encode it once
        tok = self.processor(text=unique, padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.no_grad():
            txt = _features(self.model.get_text_features(input_ids=tok["input_ids"].to(device),
                                                         attention_mask=tok["attention_mask"].to(device)))
        txt = F.normalize(txt, dim=-1)
        return txt[torch.tensor([unique.index(p) for p in prompts], device=device)]

    def cosine(self, images, prompts) -> torch.Tensor:
        dtype, device = _param_dtype_device(self.model, self.device_)
        x = clip_preprocess(images.to(device=device, dtype=dtype), antialias=self.antialias)
        img = F.normalize(_features(self.model.get_image_features(pixel_values=x)), dim=-1)
        return (img * self.text_embeds(prompts, device)).sum(-1)

    def score(self, images, prompts):
        return self.model.logit_scale.exp() * self.cosine(images, prompts)


class CLIPScoreModel(PickScoreModel):
    """The release's CLIP reward: cos(image, text) of openai/clip-vit-base-patch16, clamped at 0, with the same
    preprocessing as PickScore."""

    name = "clip"

    def score(self, images, prompts):
        return self.cosine(images, prompts).clamp(min=0)


def _clip_like(cls, what, weights, processor, weights_hint, processor_hint, device):
    weights = _require_path(weights, "weights", what, weights_hint, directory=True)
    processor = _require_path(processor, "processor", what, processor_hint, directory=True)
    tf = _require("transformers", "transformers", what)
    proc = tf.AutoProcessor.from_pretrained(processor, local_files_only=True)
    model = tf.AutoModel.from_pretrained(weights, local_files_only=True).to(device).eval()
    model.requires_grad_(False)
    return cls(model, proc, device)


def pickscore_reward(weights=None, processor=None, device="cpu") -> PickScoreModel:
    return _clip_like(PickScoreModel, "PickScore", weights, processor, "a local copy of yuvalkirstain/PickScore_v1",
                      "a local copy of laion/CLIP-ViT-H-14-laion2B-s32B-b79K", device)


def clip_reward(weights=None, processor=None, device="cpu") -> CLIPScoreModel:
    """processor defaults to the weights directory (openai/clip-vit-base-patch16 ships both)."""
    return _clip_like(CLIPScoreModel, "CLIP", weights, weights if processor is None else processor,
                      "a local copy of openai/clip-vit-base-patch16", "a local CLIP processor directory", device)


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
    "clip": clip_reward,
    "aesthetic": aesthetic_reward,
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


# ---------------------------------------------------------------------------------------------- scoring API
def _spec_value(value: str):
    """A spec value as the factory wants it: an int, else a float, else a bool ('true' / 'false', any case), else
    the string (paths, devices)."""
    for convert in (int, float):
        try:
            return convert(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def parse_reward_spec(spec: str) -> tuple[str, dict]:
    """"pickscore,weights=DIR,processor=DIR" -> ("pickscore", {"weights": "DIR", "processor": "DIR"}); values
    that read as an int, a float or true/false become one ("toy,dim=8" -> {"dim": 8}). A repeated key is an
    error."""
    name, *items = [part.strip() for part in spec.split(",")]
    if not name:
        raise ValueError(f"reward spec {spec!r} must start with a reward name, e.g. 'hpsv2,weights=DIR'")
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"reward spec {spec!r}: expected key=value after the name, got {item!r}")
        if key.strip() in kwargs:
            raise ValueError(f"reward spec {spec!r} sets {key.strip()!r} twice; give each key once")
        kwargs[key.strip()] = _spec_value(value.strip())
    return name, kwargs


def build_scorers(specs, device="cpu") -> dict[str, RewardModel]:
    """Reward adapters by name, from local files: `specs` maps a name (a key of REWARD_MODELS, or
    'module:function') to its factory's keyword arguments, or is a list of `parse_reward_spec` strings.
    `device` is passed to registered factories that take it unless the spec sets its own. A plain string is one
    spec; a name given twice is an error."""
    if isinstance(specs, str):
        specs = [specs]
    if not isinstance(specs, dict):
        parsed = {}
        for name, kwargs in map(parse_reward_spec, specs):
            if name in parsed:
                raise ValueError(f"scorer {name!r} is given twice; give each scorer once")
            parsed[name] = kwargs
        specs = parsed
    scorers = {}
    for name, kwargs in specs.items():
        kwargs = dict(kwargs or {})
        if name in REWARD_MODELS:
            kwargs.setdefault("device", device)
        scorers[name] = get_reward_model(name, **kwargs)
    return scorers


IMAGE_RANGE_TOLERANCE = 1 / 255  # one 8-bit level: rounding of a clamped decode, not a 0–255 or [-1, 1] image


def check_image_range(name: str, images: torch.Tensor) -> None:
    """Images in [0, 1] (up to IMAGE_RANGE_TOLERANCE) and finite: a NaN image or one in 0–255 or [-1, 1] would
    otherwise be scored as if it were a picture."""
    check_finite(**{name: images})
    if images.numel() == 0 or not host_checks_allowed(images):
        return
    lo, hi = float(images.detach().min()), float(images.detach().max())
    if lo < -IMAGE_RANGE_TOLERANCE or hi > 1 + IMAGE_RANGE_TOLERANCE:
        hint = ""
        if hi > 2:
            hint = " (0–255 pixel values? divide them by 255)"
        elif lo < -0.5:
            hint = " ([-1, 1] values? map them with (x + 1) / 2)"
        raise ValueError(f"{name} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]{hint}")


def score_images(images: torch.Tensor, scorers: dict, prompts: Optional[Prompts] = None,
                 batch_size: Optional[int] = None) -> dict[str, list[float]]:
    """Score decoded images (B, 3, H, W) in [0, 1] under every scorer: {name: B floats}, without gradients.

    With `prompts` (one, one per image, or G for B = G·N contiguous images), scorers are adapters called as
    `scorer(images, prompts)`; without, plain rewards `scorer(images) -> (B,)` (e.g. `adapter.with_prompt(p)`).
    `batch_size` bounds the images per call (memory)."""
    check_state("images", images)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W) with values in [0, 1], got {tuple(images.shape)}")
    check_image_range("images", images)
    B = images.shape[0]
    step = B if batch_size is None else check_positive_int("batch_size", batch_size)
    per_image = None if prompts is None else expand_prompts(prompts, B)
    out = {}
    for name, scorer in scorers.items():
        if not callable(scorer):
            raise TypeError(f"scorer {name!r} must be callable, got {type(scorer).__name__}")
        scores = []
        with torch.no_grad():
            for i in range(0, B, step):
                chunk = images[i:i + step]
                r = scorer(chunk) if per_image is None else scorer(chunk, per_image[i:i + step])
                if not torch.is_tensor(r) or r.numel() != chunk.shape[0]:
                    raise ValueError(f"scorer {name!r} must return {chunk.shape[0]} scores for {chunk.shape[0]} "
                                     f"images, got {getattr(r, 'shape', type(r).__name__)}")
                scores.extend(float(v) for v in r.reshape(-1).float().cpu())
        out[name] = scores
    return out
