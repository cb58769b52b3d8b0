"""SD-VAE latents: shards of pre-extracted latents, the encoder command, decoding and image grids.

Scale convention. Shards store **scaled** latents z = 0.18215 · (a sample of the VAE posterior), the space the
MFM/SiT/DiT models work in (roughly unit variance); `decode_latents` divides by 0.18215 before the VAE decoder.
A safetensors shard records its factor in the metadata key "latent_scale"; `LatentShards(scale=...)` rescales
shards written with another factor (e.g. raw VAE latents, "latent_scale" = "1.0") so that every yielded latent is
raw × `scale`. `.npy` shards carry no metadata and are taken as already scaled by 0.18215.

Shard formats: `NAME.safetensors` with tensors "latents" (n, 4, H, W) and "labels" (n,), or the pair
`NAME_latents.npy` + `NAME_labels.npy`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ._checks import check_positive_int, check_state
from ._torchvision import ensure_torchvision

SCALE = 0.18215  # SD-VAE (stabilityai/sd-vae-ft-mse) latent scaling factor
SHARD_FORMAT = "mfm_fast-latents"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


# ---------------------------------------------------------------------------------------------- shards
def write_shard(path, latents: torch.Tensor, labels: torch.Tensor, latent_scale: float = SCALE) -> None:
    """Write one shard: `path` ends in ".safetensors" or "_latents.npy" (then "_labels.npy" is written beside it).

    `latents` (n, C, H, W) float, already multiplied by `latent_scale`; `labels` (n,) integer class indices."""
    check_state("latents", latents)
    if latents.dim() != 4:
        raise ValueError(f"latents must have shape (n, C, H, W), got {tuple(latents.shape)}")
    if not torch.is_tensor(labels) or labels.dtype not in (torch.int32, torch.int64) or labels.shape != (
            latents.shape[0],):
        raise ValueError(f"labels must be an integer tensor of shape ({latents.shape[0]},), got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
    latents = latents.detach().float().cpu().contiguous()
    labels = labels.detach().long().cpu().contiguous()
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file({"latents": latents, "labels": labels}, path,
                  metadata={"format": SHARD_FORMAT, "latent_scale": repr(float(latent_scale))})
    elif path.endswith("_latents.npy"):
        if not math.isclose(latent_scale, SCALE):
            raise ValueError(f".npy shards have no metadata and must hold latents scaled by {SCALE}")
        np.save(path, latents.numpy())
        np.save(path[: -len("_latents.npy")] + "_labels.npy", labels.numpy())
    else:
        raise ValueError(f"shard path must end in '.safetensors' or '_latents.npy', got {path!r}")


def list_shards(root, split: Optional[str] = None) -> list[Path]:
    """The shard files under root[/split], sorted by name (the order every rank agrees on)."""
    base = Path(root) / split if split else Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"latent shard directory not found: {base}")
    shards = sorted(p for p in base.iterdir() if p.name.endswith((".safetensors", "_latents.npy")))
    if not shards:
        raise FileNotFoundError(f"no shards (*.safetensors or *_latents.npy) in {base}")
    return shards


def read_shard(path) -> tuple[torch.Tensor, torch.Tensor, float]:
    """-> (latents (n, C, H, W) float32, labels (n,) int64, the scale the stored latents carry)."""
    path = Path(path)
    if path.name.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            if not {"latents", "labels"} <= names:
                raise ValueError(f"shard {path} must hold tensors 'latents' and 'labels', found {sorted(names)}")
            latents, labels = f.get_tensor("latents"), f.get_tensor("labels")
        scale = float(meta.get("latent_scale", SCALE))
    else:
        label_path = path.with_name(path.name[: -len("_latents.npy")] + "_labels.npy")
        if not label_path.is_file():
            raise FileNotFoundError(f"shard {path} has no labels file {label_path.name}")
        latents = torch.from_numpy(np.load(path))
        labels = torch.from_numpy(np.load(label_path))
        scale = SCALE
    if latents.dim() != 4 or labels.dim() != 1 or labels.shape[0] != latents.shape[0]:
        raise ValueError(f"shard {path}: latents must be (n, C, H, W) and labels (n,), got "
                         f"{tuple(latents.shape)} and {tuple(labels.shape)}")
    return latents.float(), labels.long(), scale


class LatentShards(torch.utils.data.IterableDataset):
    """Stream (latent (C, H, W), label) pairs from latent shards, one shard in memory at a time.

    Shards are split across ranks (`shards[rank::world_size]`) and then across DataLoader workers. With
    `shuffle`, the shard order and the order inside each shard are permuted from (seed, epoch); call
    `set_epoch(e)` between epochs. Latents are yielded as raw VAE latents × `scale` (module docstring).
    """

    def __init__(self, root, split: Optional[str] = None, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, scale: float = SCALE):
        super().__init__()
        check_positive_int("world_size", world_size)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, world_size={world_size}), got {rank!r}")
        self.shards = list_shards(root, split)
        if len(self.shards) < world_size:
            raise ValueError(f"{len(self.shards)} shards cannot be split over world_size={world_size} ranks")
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.scale = float(scale)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rank_shards(self) -> list[Path]:
        order = list(range(len(self.shards)))
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
            order = torch.randperm(len(order), generator=g).tolist()
        return [self.shards[i] for i in order[self.rank::self.world_size]]

    def __iter__(self):
        shards = self.rank_shards()
        info = torch.utils.data.get_worker_info()
        if info is not None:
            shards = shards[info.id::info.num_workers]
        for k, path in enumerate(shards):
            latents, labels, stored = read_shard(path)
            if not math.isclose(stored, self.scale):
                latents = latents * (self.scale / stored)
            order = range(len(labels))
            if self.shuffle:
                # crc32, not hash(): string hashes differ between processes
                g = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch
                                                  + zlib.crc32(path.name.encode()))
                order = torch.randperm(len(labels), generator=g).tolist()
            for i in order:
                yield latents[i], labels[i]

    def __len__(self) -> int:
        """Samples this rank yields per epoch (reads only the shard headers)."""
        return sum(_shard_len(p) for p in self.rank_shards())


def _shard_len(path: Path) -> int:
    if path.name.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.get_slice("labels").get_shape()[0]
    return np.load(path, mmap_mode="r").shape[0]


# ---------------------------------------------------------------------------------------------- VAE
# diffusers AutoencoderKL config of stabilityai/sd-vae-ft-mse, the release's decoder (scaling_factor 0.18215)
SD_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": SCALE,
}


def build_vae(config: Optional[dict] = None, device="cpu", dtype: Optional[torch.dtype] = None, seed: int = 0):
    """A randomly initialised, frozen AutoencoderKL from a config (default SD_VAE_CONFIG): the real architecture
    without its weights, for tests, dry runs and memory measurements (device="meta" allocates nothing)."""
    ensure_torchvision()  # diffusers imports transformers, which imports torchvision when it is installed
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise ImportError("the SD-VAE needs diffusers: pip install 'mfm_fast[latent]' (or pip install diffusers)"
                          ) from err
    config = dict(SD_VAE_CONFIG if config is None else config)
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            vae = AutoencoderKL(**config)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderKL(**config)
    vae = vae.to(device=device) if dtype is None else vae.to(device=device, dtype=dtype)
    vae.eval().requires_grad_(False)
    return vae


def load_vae(path, device="cpu", dtype: Optional[torch.dtype] = None):
    """diffusers AutoencoderKL from a LOCAL directory (e.g. a copy of stabilityai/sd-vae-ft-mse); no download."""
    ensure_torchvision()  # diffusers imports transformers, which imports torchvision when it is installed
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise ImportError("the SD-VAE needs diffusers: pip install 'mfm_fast[latent]' (or pip install diffusers)"
                          ) from err
    if path is None or not Path(path).is_dir():
        raise FileNotFoundError(
            f"VAE directory not found: {path!r}. Pass the local folder of an AutoencoderKL (config.json + weights), "
            "e.g. a downloaded copy of stabilityai/sd-vae-ft-mse; nothing is fetched from the hub.")
    kw = {} if dtype is None else {"torch_dtype": dtype}
    vae = AutoencoderKL.from_pretrained(os.fspath(path), local_files_only=True, low_cpu_mem_usage=False, **kw)
    vae = vae.to(device=device).eval()
    vae.requires_grad_(False)
    return vae


def encode_images(vae, images: torch.Tensor, scale: float = SCALE, sample: bool = True,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> scaled latents: scale · (posterior sample, or its mean if not sample)."""
    check_state("images", images)
    dist = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
    z = dist.sample(generator=generator) if sample else dist.mean
    return z * scale


def decode_latents(vae, z: torch.Tensor, scale: float = SCALE, bias: float = 0.0) -> torch.Tensor:
    """Scaled latents (B, C, h, w) or particles (B, N, C, h, w) -> images in [0, 1] (B[, N], 3, H, W), as in the
    release: decode((z - bias) / scale), then (x + 1) / 2, clamped. Differentiable in z (rewards backpropagate
    through it)."""
    check_state("z", z)
    if z.dim() not in (4, 5):
        raise ValueError(f"z must have shape (B, C, h, w) or (B, N, C, h, w), got {tuple(z.shape)}")
    lead = z.shape[:-3]
    flat = z.reshape(-1, *z.shape[-3:])  # particles are folded into the batch for the decoder
    x = vae.decode(((flat - bias) / scale).to(dtype=vae.dtype)).sample
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # half precision out as float32, float64 kept
    return ((x + 1) / 2).clamp(0, 1).reshape(*lead, *x.shape[1:])


class LatentDecoder(torch.nn.Module):
    """`decode_latents` as a module (frozen VAE, scale, bias): the decoder of `rewards.DecodeThenScore`."""

    def __init__(self, vae, scale: float = SCALE, bias: float = 0.0):
        super().__init__()
        self.vae, self.scale, self.bias = vae, float(scale), float(bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.vae, z, self.scale, self.bias)


def save_image_grid(images: torch.Tensor, path, nrow: int = 8, padding: int = 2) -> None:
    """Save (B, C, H, W) images in [0, 1] (C = 1 or 3) as one PNG grid with `nrow` images per row."""
    from PIL import Image
    check_state("images", images)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
    check_positive_int("nrow", nrow)
    B, C, H, W = images.shape
    ncol = min(nrow, B)
    rows = math.ceil(B / ncol)
    grid = torch.ones(C, rows * (H + padding) + padding, ncol * (W + padding) + padding)
    for i, img in enumerate(images.detach().float().cpu().clamp(0, 1)):
        r, c = divmod(i, ncol)
        top, left = padding + r * (H + padding), padding + c * (W + padding)
        grid[:, top:top + H, left:left + W] = img
    arr = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[..., 0] if C == 1 else arr).save(path)


# ---------------------------------------------------------------------------------------------- image folder
def image_folder(root) -> tuple[list[tuple[Path, int]], list[str]]:
    """ImageFolder layout: root/<class>/<image>; classes sorted by name get labels 0, 1, ..."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image directory not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root} has no class subfolders (expected root/<class>/<image files>)")
    items = [(p, label) for label, name in enumerate(classes)
             for p in sorted((root / name).rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not items:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return items, classes


def center_crop(image, size: int):
    """ADM/DiT preprocessing: box-downsample while the short side is >= 2·size, bicubic to size, center crop."""
    from PIL import Image
    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    ratio = size / min(image.size)
    image = image.resize(tuple(round(x * ratio) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def _load_batch(paths: Sequence[Path], size: int) -> torch.Tensor:
    from PIL import Image
    arrs = []
    for p in paths:
        with Image.open(p) as im:
            arrs.append(center_crop(im, size))
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x  # (B, 3, size, size) in [-1, 1]


def encode_main(argv=None) -> int:
    """python -m mfm_fast encode --images DIR --vae PATH --out DIR [--batch 32 --size 256 --shard-size 1000]"""
    from tqdm.auto import tqdm
    ap = argparse.ArgumentParser(prog="python -m mfm_fast encode",
                                 description="Encode an image folder (root/<class>/<image>) into SD-VAE latent "
                                             f"shards (latents scaled by {SCALE}).")
    ap.add_argument("--images", required=True, help="image root with one subfolder per class (ImageFolder layout)")
    ap.add_argument("--vae", required=True, help="local AutoencoderKL directory (e.g. sd-vae-ft-mse)")
    ap.add_argument("--out", required=True, help="output directory for shard-XXXXX.safetensors")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=256, help="image side after the center crop (latent side = size/8)")
    ap.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    ap.add_argument("--mean", action="store_true", help="store the posterior mean instead of a sample")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    for name in ("batch", "size", "shard_size"):
        check_positive_int(f"--{name.replace('_', '-')}", getattr(args, name))

    items, classes = image_folder(args.images)
    vae = load_vae(args.vae, device=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "classes.json").write_text(json.dumps(classes, indent=0))
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    buf_z, buf_y, n_shards = [], [], 0

    def flush():
        nonlocal buf_z, buf_y, n_shards
        write_shard(out / f"shard-{n_shards:05d}.safetensors", torch.stack(buf_z), torch.stack(buf_y))
        buf_z, buf_y, n_shards = [], [], n_shards + 1

    with torch.no_grad(), tqdm(total=len(items), desc="encode", unit="img") as bar:
        for start in range(0, len(items), args.batch):
            chunk = items[start:start + args.batch]
            x = _load_batch([p for p, _ in chunk], args.size)
            z = encode_images(vae, x, sample=not args.mean, generator=g).float().cpu()
            y = torch.tensor([label for _, label in chunk], dtype=torch.long)
            for zi, yi in zip(z, y):  # cut shards at exactly shard_size samples
                buf_z.append(zi)
                buf_y.append(yi)
                if len(buf_y) == args.shard_size:
                    flush()
            bar.update(len(chunk))
    if buf_y:
        flush()
    print(f"wrote {len(items)} latents of shape {tuple(z.shape[1:])} in {n_shards} shards to {out} "
          f"({len(classes)} classes, scale {SCALE})")
    return 0
