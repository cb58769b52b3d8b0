"""Load the official MFM-XL/2 release (`mfm-xl2.pt`) and SiT-XL/2 checkpoints into MFMDiT, strictly.

OFFICIAL_CHECKPOINT.md is the spec. The release is a flat dict whose keys read `model.model.dit.<name>`; training
checkpoints nest the weights under `state_dict`, `ema` or `model` and prefix them with `module.`, `_orig_mod.`,
`model.` or `dit.`. Every file is reduced to MFMDiT's own `<name>`s, then *every* name must be present with its
exact shape — the release's own loader (`strict=False`) would silently keep a freshly initialised network instead.

mfm_fast's own format is a safetensors file of MFMDiT's state_dict with the config in its metadata
(`save_safetensors`); `load_official_mfm` reads it too.

Damaged files fail with a CheckpointError naming the path, never as altered weights: a torch checkpoint's zip
CRC-32s are checked before torch.load (which skips them), and a .safetensors file written by `save_safetensors`
carries a sha256 of its tensors that the reader verifies (`mfm_fast.integrity`: costs and what is skipped).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping
from typing import Optional

import torch
from einops import rearrange

from ..integrity import DIGEST_KEY, check_zip_crc, tensor_digest
from .dit import CONFIGS, DiTConfig, MFMDiT, make_config

# prefixes added by DDP, torch.compile, Lightning (TrainingModule.model), the SI wrapper and DiTMFM
STRIP_PREFIXES = ("module.", "_orig_mod.", "model.", "dit.")
# where training checkpoints keep the weights, in order of preference (EMA weights first)
NESTING_KEYS = ("ema", "state_dict", "model", "module")
# buffers of the Lightning module and of the loss-weighting net that are not part of the backbone
IGNORED_PREFIXES = ("latents_", "weighting_model.")
IGNORED_NAMES = ("n_averaged",)
# the SiT checkpoint holds these MFMDiT modules only (OFFICIAL_CHECKPOINT.md §5)
SIT_MODULES = ("x_embedder", "t_embedder", "y_embedder", "pos_embed", "blocks", "final_layer")
SAFETENSORS_FORMAT = "mfm_fast"


class CheckpointError(ValueError):
    """A checkpoint does not match the model: the message names every missing, unexpected or mis-shaped key."""


# ---------------------------------------------------------------------------------------------- reading
def read_state_dict(path_or_state_dict, weights_only: bool = True) -> tuple[dict, Optional[DiTConfig]]:
    """-> (flat {key: tensor}, config stored with it or None). Accepts a path (.pt/.pth/.ckpt via torch.load, or
    .safetensors) or an already loaded (possibly nested) dict. torch.load runs with weights_only=True and mmap."""
    config = None
    obj = path_or_state_dict
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        if os.path.getsize(path) == 0:
            raise CheckpointError(f"cannot read the checkpoint {path}: the file is empty (0 bytes)")
        if path.endswith(".safetensors"):
            obj, config = _read_safetensors(path)
        else:
            obj = _torch_load(path, weights_only)
    if not isinstance(obj, Mapping):
        raise TypeError(f"path_or_state_dict must be a path or a dict of tensors, got {type(obj).__name__}")
    if config is None:
        config = _stored_config(obj)
    seen = []
    while True:
        nested = next((k for k in NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        seen.append(nested)
        obj = obj[nested]
    bad = [k for k, v in obj.items() if not torch.is_tensor(v) and not _ignored(_strip(k))]
    if bad:
        where = "/".join(seen) or "the top level"
        raise CheckpointError(f"expected a dict of tensors at {where}, but these entries are not tensors: "
                              f"{_preview(bad)} (nesting keys looked for: {list(NESTING_KEYS)})")
    return dict(obj), config


def _stored_config(obj: Mapping) -> Optional[DiTConfig]:
    """The config saved beside the weights: "config" (DiTConfig or dict) or mfm_fast.train's "model_config"."""
    if obj.get("model_class", "MFMDiT") != "MFMDiT":
        raise CheckpointError(f"the checkpoint holds a {obj['model_class']}, not an MFMDiT")
    for key in ("config", "model_config"):
        value = obj.get(key)
        if isinstance(value, DiTConfig):
            return value
        if isinstance(value, Mapping):
            try:
                return DiTConfig(**value)
            except TypeError as err:
                raise CheckpointError(f"the checkpoint's {key!r} is not a DiTConfig: {err}") from err
    return None


def _unreadable(path: str, err: BaseException) -> CheckpointError:
    """A truncated, corrupt or foreign file: torch/safetensors errors name neither the file nor the likely cause."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()] or ["no details"]
    # weights_only's refusal of stray bytes opens with a paragraph on its defaults; the operand is the finding
    detail = next((line for line in lines if line.startswith("Unsupported operand")), lines[0])
    return CheckpointError(f"cannot read the checkpoint {path}: it is truncated, corrupt or not a checkpoint "
                           f"({type(err).__name__}: {detail[:300]})")


def _torch_load(path: str, weights_only: bool):
    # torch.load does not check the zip's CRC-32s: a flipped byte would load as an altered weight
    damage = check_zip_crc(path)
    if damage is not None:
        raise CheckpointError(f"cannot read the checkpoint {path}: it is corrupt, a CRC-32 check failed ({damage}); "
                              "download or copy the file again")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
        # files written by the legacy (pre-zip) serializer cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except OSError as err:
        if err.filename is not None:  # open() failing on the path (permissions, ...): it names the file already
            raise
        raise _unreadable(path, err) from err  # a read or mmap of a truncated file: name it
    except Exception as err:
        # a pickle of Python objects that weights_only refuses (random bytes fail there too, on an "operand")
        if weights_only and "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path} holds Python objects besides tensors, which torch.load(weights_only=True) refuses. "
                "If you trust the file, pass weights_only=False; otherwise re-save only its state_dict.") from err
        raise _unreadable(path, err) from err


def _read_safetensors(path: str):
    from safetensors import safe_open
    tensors = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except OSError as err:
        if err.filename is not None:
            raise
        raise _unreadable(path, err) from err
    except Exception as err:  # SafetensorError: bad header, file shorter than its header says, ...
        raise _unreadable(path, err) from err
    if DIGEST_KEY in meta and tensor_digest(tensors) != meta[DIGEST_KEY]:
        raise CheckpointError(f"cannot read the checkpoint {path}: it is corrupt, its tensors do not match the "
                              f"sha256 digest stored in its metadata ({DIGEST_KEY}); download or copy the file "
                              "again")
    config = None
    if meta.get("format") == SAFETENSORS_FORMAT and "config" in meta:
        try:
            config = DiTConfig(**json.loads(meta["config"]))
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"the config stored in {path} is not a DiTConfig: {err}") from err
    return tensors, config


def save_safetensors(model: MFMDiT, path) -> None:
    """Write MFMDiT's weights and config to a .safetensors file readable by `load_official_mfm`."""
    if not isinstance(model, MFMDiT):
        raise TypeError(f"model must be an MFMDiT, got {type(model).__name__}")
    from safetensors.torch import save_file
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": SAFETENSORS_FORMAT, "config": json.dumps(dataclasses.asdict(model.config)),
            DIGEST_KEY: tensor_digest(state)}  # safetensors has no checksum of its own: `_read_safetensors` checks
    save_file(state, os.fspath(path), metadata=meta)


# ---------------------------------------------------------------------------------------------- key names
@functools.lru_cache(maxsize=None)
def _top_level_names() -> frozenset:
    with torch.device("meta"):
        model = MFMDiT("MFM-T/2", impl="torch")
    return frozenset(k.split(".")[0] for k in model.state_dict())


def _ignored(name: str) -> bool:
    return name in IGNORED_NAMES or name.startswith(IGNORED_PREFIXES)


def _strip(key: str) -> str:
    """Remove wrapper prefixes until the key starts with one of MFMDiT's top-level module names."""
    top = _top_level_names()
    name = key
    while name.split(".")[0] not in top and not _ignored(name):
        prefix = next((p for p in STRIP_PREFIXES if name.startswith(p)), None)
        if prefix is None:
            break
        name = name[len(prefix):]
    return name


def canonicalize(state_dict: Mapping, ignore: tuple = ()) -> dict:
    """{file key: tensor} -> {MFMDiT name: tensor}, dropping the ignored buffers and the keys that start with a
    prefix in `ignore` (before or after stripping); a name reached twice is an error."""
    out, origin = {}, {}
    ignore = tuple(ignore)
    for key, value in state_dict.items():
        name = _strip(key)
        if _ignored(name) or (ignore and (key.startswith(ignore) or name.startswith(ignore))):
            continue
        if name in out:
            raise CheckpointError(f"keys {origin[name]!r} and {key!r} both map to the parameter {name!r}")
        out[name], origin[name] = value, key
    return out


def _preview(names, limit: int = 8) -> str:
    names = sorted(names, key=_natural)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def check_keys(state: Mapping, expected: Mapping, what: str = "checkpoint") -> None:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped key. `expected`: {name: shape}."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mis = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing keys: {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_preview(unexpected)}")
    if mis:
        shown = "; ".join(f"{k!r}: {what} {tuple(state[k].shape)} vs model {tuple(expected[k])}"
                          for k in sorted(mis, key=_natural)[:8])
        problems.append(f"wrong shapes: {shown}" + (f" ... ({len(mis)} in all)" if len(mis) > 8 else ""))
    non_float = [k for k in expected if k in state and not state[k].is_floating_point()]
    if non_float:
        problems.append(f"non-floating-point tensors: {_preview(non_float)}")
    if problems:
        hint = " (keys that are not part of the backbone can be dropped with ignore=(prefix, ...))" if unexpected \
            else ""
        raise CheckpointError(f"the {what} does not match the model ({len(expected)} parameters expected): "
                              + " | ".join(problems) + hint)


# ---------------------------------------------------------------------------------------------- config
def _shape(state, name):
    if name not in state:
        raise CheckpointError(f"cannot infer the model config: missing key {name!r}")
    return tuple(state[name].shape)


# The one architecture the release published weights for (conf/model/sit_xl_2.yaml; the SiT-XL/2 it starts from has
# the same backbone): (hidden, depth, patch) -> what its shapes cannot tell.
PUBLISHED = {(1152, 28, 2): dict(num_heads=16, encoder_depth=20, preserve_t_cond_0=False)}
# config fields that leave no trace in the weights
TRACELESS = ("num_heads", "encoder_depth", "preserve_t_cond_0")


def infer_config(state: Mapping, sit: bool = False, **overrides) -> DiTConfig:
    """The DiTConfig whose parameters have the shapes in `state` ({MFMDiT name: tensor or anything with .shape}).

    Shapes fix hidden size, depth, patch, channels, token grid, classes, guidance rows and learn_sigma. The head
    count, the encoder depth and the release's preserve_t_cond_0 leave no trace in the weights: they are taken
    from the released MFM-XL/2 config (16 heads, encoder depth 20, preserve_t_cond_0 off) only when the shapes are
    that architecture; for any other they must be given as overrides (a CheckpointError says which), since a
    registry config of the same size may well differ from the file's (preserve_t_cond_0 is not asked for SiT
    files, whose MFM is new).
    """
    D, C, p, p2 = _shape(state, "x_embedder.proj.weight")
    if p != p2:
        raise CheckpointError(f"x_embedder.proj.weight has a non-square patch {p}x{p2}")
    depth = len({int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()})
    _, L, _ = _shape(state, "pos_embed")
    grid = math.isqrt(L)
    if grid * grid != L:
        raise CheckpointError(f"pos_embed has {L} tokens, not a square grid")
    rows = _shape(state, "final_layer.linear.weight")[0]
    if rows not in (p * p * C, 2 * p * p * C):
        raise CheckpointError(f"final_layer.linear.weight has {rows} rows; expected {p * p * C} or {2 * p * p * C}")
    cfg = dict(input_size=grid * p, patch_size=p, in_channels=C, hidden_size=D, depth=depth,
               num_classes=_shape(state, "y_embedder.embedding_table.weight")[0] - 1,
               learn_sigma=rows == 2 * p * p * C,
               frequency_embedding_size=_shape(state, "t_embedder.mlp.0.weight")[1],
               time_flip=not sit)
    if depth:
        cfg["mlp_ratio"] = _shape(state, "blocks.0.mlp.fc1.weight")[0] / D
    needed = [f for f in TRACELESS if f not in overrides and not (sit and f == "preserve_t_cond_0")]
    published = PUBLISHED.get((D, depth, p))
    if published is not None:
        cfg.update({f: published[f] for f in needed})
    elif needed:
        alike = [f"{name} ({c['num_heads']} heads, encoder depth {c['encoder_depth']})" for name, c in CONFIGS.items()
                 if c["hidden_size"] == D and c["depth"] == depth]
        hint = f"; registry configs of this size, for reference: {', '.join(alike)}" if alike else ""
        raise CheckpointError(
            f"hidden size {D}, depth {depth}, patch {p} is not the released MFM-XL/2, and {', '.join(needed)} leave "
            f"no trace in the weights: pass {', '.join(f + '=...' for f in needed)} (or config=<name or DiTConfig>)"
            + hint)
    if not sit and "class_guidance_ws" not in overrides and "xcond_guidance_ws" not in overrides:
        n_rows = _shape(state, "guidance_embedder.embedding_table.weight")[0]
        default = DiTConfig()
        if n_rows != len(default.class_guidance_ws) * len(default.xcond_guidance_ws):
            raise CheckpointError(
                f"guidance_embedder has {n_rows} rows, not the release's {default.class_guidance_ws} x "
                f"{default.xcond_guidance_ws}; pass class_guidance_ws=... and xcond_guidance_ws=... (the guidance "
                "scales cannot be read from the shapes)")
    known = {f.name for f in dataclasses.fields(DiTConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"unknown config overrides {sorted(unknown)}; allowed: {sorted(known)}")
    return DiTConfig(**{**cfg, **overrides})


def _file_config(state: Mapping, stored: Optional[DiTConfig], config, overrides: dict) -> DiTConfig:
    """The config stored with the weights, else `config` (a registry name or DiTConfig), else the inferred one;
    overrides win. A `config` that contradicts the stored one is an error."""
    if config is not None:
        chosen = make_config(config)
        if stored is not None and stored != chosen:
            raise CheckpointError(f"config={config!r} contradicts the config stored in the checkpoint ({stored}); "
                                  "drop config= or pass the fields to change as overrides")
        return make_config(chosen, **overrides)
    if stored is not None:
        return make_config(stored, **overrides)
    return infer_config(state, **overrides)


def expected_shapes(config: DiTConfig) -> dict:
    with torch.device("meta"):
        model = MFMDiT(config, impl="torch")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- loaders
def load_official_mfm(path_or_state_dict, impl: str = "auto", dtype: Optional[torch.dtype] = None,
                      device="cpu", *, weights_only: bool = True, ignore: tuple = (), config=None,
                      preserve_t_cond_0: Optional[bool] = None, **overrides) -> MFMDiT:
    """MFMDiT with the weights of the official `mfm-xl2.pt` (or of a nested/prefixed training checkpoint, or of
    an mfm_fast .safetensors file).

    The config is the one stored in the file (mfm_fast's formats), else `config` (a registry name or DiTConfig),
    else inferred from the shapes (`infer_config`): the released MFM-XL/2 architecture loads as is; any other
    needs num_heads=, encoder_depth= and preserve_t_cond_0=, which leave no trace in the weights. `overrides`
    (num_heads=, encoder_depth=, time_flip=, ...) win. `preserve_t_cond_0`: the release option of that name
    (context modulation (t·shift, t·scale − 1), DiTConfig); None keeps the stored value, or the released XL/2's
    False — pass True for a checkpoint the release trained with it, which the weights cannot reveal. Strict: any
    missing, unexpected or mis-shaped key raises a CheckpointError naming it; `ignore` drops keys by prefix.
    dtype=None keeps the stored dtype. device="meta" checks keys and shapes without allocating."""
    if preserve_t_cond_0 is not None:
        overrides["preserve_t_cond_0"] = bool(preserve_t_cond_0)
    raw, stored_config = read_state_dict(path_or_state_dict, weights_only=weights_only)
    state = canonicalize(raw, ignore)
    config = _file_config(state, stored_config, config, overrides)
    check_keys(state, expected_shapes(config))
    with torch.device("meta"):
        model = MFMDiT(config, impl=impl)
    # assign=True adopts the (memory-mapped) tensors instead of initialising and then copying 2.7 GB
    model.load_state_dict(state, strict=True, assign=True)
    model.pos_embed.requires_grad_(False)
    return model.to(device=device, dtype=dtype).eval()


def mfm_from_sit(path_or_state_dict, impl: str = "auto", dtype: Optional[torch.dtype] = None, device="cpu", *,
                 weights_only: bool = True, ignore: tuple = (), config=None, **overrides) -> MFMDiT:
    """Start an MFM from an official SiT checkpoint (OFFICIAL_CHECKPOINT.md §5.1), no time flip (pass
    time_flip=True for DMF-orientation checkpoints, t = 0 data; their extra heads can be dropped with `ignore`).

    SiT's modules are copied 1:1; its 2C-channel final layer keeps the velocity rows (p, q, c < C); its time
    embedder initialises s_embedder and t_embedder_second, after which t_embedder.mlp.2 is zeroed; the context
    branch, t_cond embedder and guidance table keep MFMDiT's gated-off init. On the diagonal s = u the result is
    SiT's velocity at that time, for any (t, x) context. The config is inferred from the shapes as in
    `load_official_mfm`: SiT-XL/2 gets the released MFM-XL/2's heads and encoder depth, any other size needs
    num_heads= and encoder_depth=, or `config` (a registry name or DiTConfig) to take them from.
    """
    raw, _ = read_state_dict(path_or_state_dict, weights_only=weights_only)
    state = canonicalize(raw, ignore)
    if config is not None:
        chosen = make_config(config)
        overrides = {"num_heads": chosen.num_heads, "encoder_depth": chosen.encoder_depth, **overrides}
    sit_config = infer_config(state, sit=True, **overrides)
    expected = {k: v for k, v in expected_shapes(sit_config).items() if k.split(".")[0] in SIT_MODULES}
    check_keys(state, expected, what="SiT checkpoint")
    config = dataclasses.replace(sit_config, learn_sigma=False)
    if str(torch.device(device)) == "meta":
        with torch.device("meta"):
            return MFMDiT(config, impl=impl)
    model = MFMDiT(config, impl=impl)
    P, C = config.patch_size ** 2, config.in_channels
    with torch.no_grad():
        params = model.state_dict()
        for name, value in state.items():
            if name.startswith("final_layer.linear.") and sit_config.learn_sigma:
                # rows ordered (p, q, c) over 2C channels: keep the velocity channels c < C
                value = rearrange(value, "(pq c) ... -> pq c ...", pq=P)[:, :C].flatten(0, 1)
            params[name].copy_(value)
        model.x_cond_embedder.load_state_dict(model.x_embedder.state_dict())
        for target in (model.s_embedder, model.t_embedder_second):
            target.load_state_dict(model.t_embedder.state_dict())
        model.t_embedder.mlp[2].weight.zero_()
        model.t_embedder.mlp[2].bias.zero_()
    return model.to(device=device, dtype=dtype).eval()
