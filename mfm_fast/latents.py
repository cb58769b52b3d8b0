"""SD-VAE latents: shards of pre-extracted latents, the encoder command, decoding and image grids.

Scale convention. Shards store **scaled** latents z = 0.18215 · (a sample of the VAE posterior), the space the
MFM/SiT/DiT models work in (roughly unit variance); `decode_latents` divides by 0.18215 before the VAE decoder.
A safetensors shard records its factor in the metadata key "latent_scale"; `LatentShards(scale=...)` rescales
shards written with another factor (e.g. raw VAE latents, "latent_scale" = "1.0") so that every yielded latent is
raw × `scale`. `.npy` shards carry no metadata and are taken as already scaled by 0.18215.

Shard formats: `NAME.safetensors` with tensors "latents" (n, 4, H, W) and "labels" (n,), or the pair
`NAME_latents.npy` + `NAME_labels.npy`.

Manifest. `encode` writes `manifest.json` last and atomically (`write_manifest`): every shard's name, size in bytes
and sample count, and the classes. A shard folder with a manifest is read only as the manifest lists it: a listed
shard missing, an unlisted one present (e.g. left by an earlier encode into the same folder) or a size that differs
is an error naming the file. Folders without a manifest (shards written with `write_shard`) are read as they are.
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
SHARD_SUFFIXES = (".safetensors", "_latents.npy")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "mfm_fast-latent-manifest"


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


def _labels_path(path: Path) -> Path:
    return path.with_name(path.name[: -len("_latents.npy")] + "_labels.npy")


def _damaged(path: Path, err: Exception) -> ValueError:
    return ValueError(f"latent shard {path} is damaged (truncated, or not a shard: {type(err).__name__}: {err}); "
                      "re-encode or remove it")


def _read_manifest(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not isinstance(
                data.get("shards"), list):
            raise ValueError(f"not a {MANIFEST_FORMAT} file")
        for e in data["shards"]:
            if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not isinstance(e.get("size"), int):
                raise ValueError(f"malformed shard entry {e!r}")
    except (OSError, ValueError) as err:
        raise ValueError(f"shard manifest {path} is damaged ({type(err).__name__}: {err}); restore it, or remove it "
                         "to read the folder's shards as they are") from err
    return data


def _check_manifest(base: Path, shards: list) -> list:
    """The shards of `base` checked against base/manifest.json: names, sizes (and the .npy label files)."""
    manifest = base / MANIFEST
    entries = {e["name"]: e for e in _read_manifest(manifest)["shards"]}
    present = {p.name for p in shards}
    missing, extra = sorted(set(entries) - present), sorted(present - set(entries))
    if missing:
        raise FileNotFoundError(f"shard {', '.join(str(base / n) for n in missing)} is listed in {manifest} but "
                                "missing")
    if extra:
        raise ValueError(f"shard {', '.join(str(base / n) for n in extra)} is not listed in {manifest}: left by "
                         "another run? Remove it (or rewrite the manifest with mfm_fast.latents.write_manifest)")
    for p in shards:
        e = entries[p.name]
        files = [(p, e["size"])] + ([(_labels_path(p), e.get("labels_size"))] if p.name.endswith(".npy") else [])
        for f, size in files:
            if not f.is_file():
                raise FileNotFoundError(f"shard file {f} is missing (listed in {manifest})")
            if size is not None and f.stat().st_size != size:
                raise ValueError(f"shard file {f} has {f.stat().st_size} bytes, {manifest} lists {size}: truncated "
                                 "or replaced since the manifest was written")
    return shards


def write_manifest(root, classes: Optional[Sequence[str]] = None) -> Path:
    """Write root/manifest.json atomically: every shard of root (name, size in bytes, samples; `labels_size` for
    .npy pairs), the total and `classes`. `encode` calls it last; call it after adding shards by hand to check
    the folder from then on (module docstring)."""
    root = Path(root)
    shards = sorted(p for p in root.iterdir() if p.name.endswith(SHARD_SUFFIXES))
    entries = []
    for p in shards:
        e = {"name": p.name, "size": p.stat().st_size, "count": int(_shard_len(p))}
        if p.name.endswith(".npy"):
            e["labels_size"] = _labels_path(p).stat().st_size
        entries.append(e)
    data = {"format": MANIFEST_FORMAT, "version": 1, "samples": sum(e["count"] for e in entries),
            "classes": None if classes is None else list(classes), "shards": entries}
    path = root / MANIFEST
    tmp = root / f".{MANIFEST}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def list_shards(root, split: Optional[str] = None) -> list[Path]:
    """The shard files under root[/split], sorted by name (the order every rank agrees on); checked against the
    folder's manifest.json when it has one (module docstring)."""
    base = Path(root) / split if split else Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"latent shard directory not found: {base}")
    shards = sorted(p for p in base.iterdir() if p.name.endswith(SHARD_SUFFIXES))
    if (base / MANIFEST).exists():
        shards = _check_manifest(base, shards)
    if not shards:
        raise FileNotFoundError(f"no shards (*.safetensors or *_latents.npy) in {base}")
    return shards


def read_shard(path) -> tuple[torch.Tensor, torch.Tensor, float]:
    """-> (latents (n, C, H, W) float32, labels (n,) int64, the scale the stored latents carry). A damaged file
    is a ValueError naming it."""
    path = Path(path)
    if path.name.endswith(".safetensors"):
        from safetensors import safe_open
        if not path.is_file():
            raise FileNotFoundError(f"latent shard not found: {path}")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                names = set(f.keys())
                tensors = {k: f.get_tensor(k) for k in ("latents", "labels") if k in names}
            scale = float(meta.get("latent_scale", SCALE))
        except Exception as err:  # SafetensorError (truncated, garbled header), ...
            raise _damaged(path, err) from err
        if len(tensors) < 2:
            raise ValueError(f"shard {path} must hold tensors 'latents' and 'labels', found {sorted(names)}")
        latents, labels = tensors["latents"], tensors["labels"]
    else:
        label_path = _labels_path(path)
        if not label_path.is_file():
            raise FileNotFoundError(f"shard {path} has no labels file {label_path.name}")
        arrays = []
        for p in (path, label_path):
            try:
                arrays.append(torch.from_numpy(np.load(p)))
            except FileNotFoundError:
                raise
            except (OSError, ValueError, EOFError) as err:
                raise _damaged(p, err) from err
        latents, labels = arrays
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
    try:
        if path.name.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return f.get_slice("labels").get_shape()[0]
        return np.load(path, mmap_mode="r").shape[0]
    except FileNotFoundError:
        raise
    except Exception as err:  # SafetensorError, a truncated .npy (mmap longer than the file), ...
        raise _damaged(path, err) from err


class LatentRows:
    """Random access to the rows of a latent shard set, for training loops that draw their batch of step k from
    a generator seeded by (seed, k) (bitwise resume, any number of ranks): `sample(n, generator)` -> (latents
    (n, C, H, W) float32 scaled by `scale`, labels (n,) int64), uniformly with replacement.

    Only the shard headers are read up front; rows are read on demand (safetensors slices, memory-mapped .npy),
    so a 1.28M-image ImageNet shard set costs no memory beyond the open files."""

    def __init__(self, root, split: Optional[str] = None, scale: float = SCALE):
        if isinstance(root, LatentShards):
            self.shards, self.scale = list(root.shards), root.scale
        else:
            self.shards, self.scale = list_shards(root, split), float(scale)
        sizes = [_shard_len(p) for p in self.shards]
        if not sum(sizes):
            raise ValueError(f"the latent shards under {root} hold no rows")
        self.offsets = np.cumsum([0] + sizes)
        self._open: dict = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _reader(self, k: int):
        if k not in self._open:
            path = self.shards[k]
            if path.name.endswith(".safetensors"):
                from safetensors import safe_open
                f = safe_open(str(path), framework="pt", device="cpu")
                meta = f.metadata() or {}
                self._open[k] = ("st", f, float(meta.get("latent_scale", SCALE)))
            else:
                lab = path.with_name(path.name[: -len("_latents.npy")] + "_labels.npy")
                self._open[k] = ("npy", (np.load(path, mmap_mode="r"), np.load(lab, mmap_mode="r")), SCALE)
        return self._open[k]

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, labels) of the given global row indices, in that order."""
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self)):
            raise IndexError(f"row index out of range [0, {len(self)})")
        shard = np.searchsorted(self.offsets, index.numpy(), side="right") - 1
        lat, lab = [], []
        for i, k in zip(index.tolist(), shard.tolist()):
            kind, f, stored = self._reader(k)
            j = i - int(self.offsets[k])
            if kind == "st":
                z, y = f.get_slice("latents")[j:j + 1], f.get_slice("labels")[j:j + 1]
            else:
                z, y = torch.from_numpy(np.array(f[0][j:j + 1])), torch.from_numpy(np.array(f[1][j:j + 1]))
            z = z.float()
            if not math.isclose(stored, self.scale):
                z = z * (self.scale / stored)
            lat.append(z)
            lab.append(y.long())
        return torch.cat(lat), torch.cat(lab)

    def labels(self) -> torch.Tensor:
        """Every row's label (reads only the label tensors)."""
        out = []
        for p in self.shards:
            if p.name.endswith(".safetensors"):
                from safetensors import safe_open
                with safe_open(str(p), framework="pt", device="cpu") as f:
                    out.append(f.get_tensor("labels").long())
            else:
                out.append(torch.from_numpy(np.load(p.with_name(p.name[: -len("_latents.npy")] + "_labels.npy"))).long())
        return torch.cat(out)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self), (n,), generator=generator)
        return self.rows(idx)


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


def decode_latents(vae, z: torch.Tensor, scale: float = SCALE, bias: float = 0.0, clamp: bool = True) -> torch.Tensor:
    """Scaled latents (B, C, h, w) or particles (B, N, C, h, w) -> images in [0, 1] (B[, N], 3, H, W), as in the
    release: decode((z - bias) / scale), then (x + 1) / 2, clamped. Differentiable in z (rewards backpropagate
    through it). clamp=False leaves the decoder's overshoot, as the release's fine-tuning reward sees it (the
    clamp would zero the gradient of every saturated pixel)."""
    check_state("z", z)
    if z.dim() not in (4, 5):
        raise ValueError(f"z must have shape (B, C, h, w) or (B, N, C, h, w), got {tuple(z.shape)}")
    lead = z.shape[:-3]
    flat = z.reshape(-1, *z.shape[-3:])  # particles are folded into the batch for the decoder
    x = vae.decode(((flat - bias) / scale).to(dtype=vae.dtype)).sample
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # half precision out as float32, float64 kept
    x = (x + 1) / 2
    return (x.clamp(0, 1) if clamp else x).reshape(*lead, *x.shape[1:])


class LatentDecoder(torch.nn.Module):
    """`decode_latents` as a module (frozen VAE, scale, bias): the decoder of `rewards.DecodeThenScore`."""

    def __init__(self, vae, scale: float = SCALE, bias: float = 0.0, clamp: bool = True):
        super().__init__()
        self.vae, self.scale, self.bias, self.clamp = vae, float(scale), float(bias), bool(clamp)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.vae, z, self.scale, self.bias, self.clamp)


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
    """ImageFolder layout: root/<class>/<image>; classes sorted by name get labels 0, 1, ... Hidden folders and
    files (a name starting with '.', e.g. .ipynb_checkpoints) are skipped; a class folder without images is an
    error naming it (as torchvision's ImageFolder), since it would take a label no sample carries."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image directory not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"{root} has no class subfolders (expected root/<class>/<image files>)")
    items = []
    for label, name in enumerate(classes):
        found = [p for p in sorted((root / name).rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS
                 and p.is_file() and not any(part.startswith(".") for part in p.relative_to(root / name).parts)]
        if not found:
            raise FileNotFoundError(f"class folder {root / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                                    f"every subfolder of {root} is a class: add images or remove it")
        items += [(p, label) for p in found]
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
        try:
            with Image.open(p) as im:
                arrs.append(center_crop(im, size))
        except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for truncated or garbled files
            raise ValueError(f"image {p} is damaged or not an image ({type(err).__name__}: {err})") from err
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
    out = Path(args.out)
    if out.is_dir():  # shards of an earlier run would mix with these (its extra shards survive the overwrite)
        old = sorted(p.name for p in out.iterdir() if p.name == MANIFEST or p.name.endswith(SHARD_SUFFIXES))
        if old:
            more = f" and {len(old) - 1} more" if len(old) > 1 else ""
            raise ValueError(f"--out {out} already holds {out / old[0]}{more} (shards or the manifest of another "
                             "encode); pass an empty or new directory, or remove them")
    vae = load_vae(args.vae, device=args.device)
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
    write_manifest(out, classes)  # last: a folder with a manifest is complete
    print(f"wrote {len(items)} latents of shape {tuple(z.shape[1:])} in {n_shards} shards to {out} "
          f"({len(classes)} classes, scale {SCALE})")
    return 0
