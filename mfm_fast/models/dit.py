"""MFMDiT: the Meta-Flow-Map DiT backbone, module-for-module the official MFM-XL/2 (OFFICIAL_CHECKPOINT.md).

forward(s, u, xbar, t, x, y=None, cfg=None, x_cond_scale=None) -> v_{s,u}(xbar; t, x)

Conditioning (s, u, t, x, y, cfg) has G rows; xbar may have R = G·N rows: the N particles of a state share its
conditioning, which is computed once per state and broadcast inside the ops (never repeated N times).
`impl="torch"` runs the pure-PyTorch reference ops (`mfm_fast.ops.*_ref`); `impl="triton"` the fused kernels.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .. import backend
from .._checks import as_time, check_dtype, check_finite, check_state, host_checks_allowed, n_per_group
from ..ops.table import Ops, reference_ops, triton_ops


@dataclass
class DiTConfig:
    input_size: int = 32  # latent H = W
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # the embedding table has one more row: the null class
    encoder_depth: int = 20  # blocks [0, encoder_depth) see c_enc, the rest and the final layer c_dec
    learn_sigma: bool = False  # 2·C output channels, the first C kept (SiT checkpoints)
    class_guidance_ws: tuple = (1.0, 2.5)  # guidance-embedding table: one row per (class w, x-cond w) pair
    xcond_guidance_ws: tuple = (1.0,)
    time_flip: bool = True  # official is_zero_data: s -> 1-s, u -> 1-u inside, output negated
    frequency_embedding_size: int = 256
    # the release's preserve_t_cond_0 (off in MFM-XL/2): the context modulation becomes (t·shift, t·scale − 1), so
    # t = 0 gates the context off exactly. It leaves no trace in the weights: a checkpoint trained with it must be
    # loaded with preserve_t_cond_0=True (models.checkpoints).
    preserve_t_cond_0: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if not 0 <= self.encoder_depth <= self.depth:
            raise ValueError(f"encoder_depth must lie in [0, depth={self.depth}], got {self.encoder_depth}")
        self.class_guidance_ws = tuple(float(w) for w in self.class_guidance_ws)
        self.xcond_guidance_ws = tuple(float(w) for w in self.xcond_guidance_ws)
        n_c, n_x = len(self.class_guidance_ws), len(self.xcond_guidance_ws)
        if n_c < 1 or n_x < 1:
            raise ValueError("class_guidance_ws and xcond_guidance_ws need at least one weight each (1.0 first)")
        if n_x > 1 and (n_c - 1) + (n_x - 1) * n_x >= n_c * n_x:
            # the release's row index class_idx + xcond_idx·n_x (guidance_index) runs past its n_c·n_x rows
            raise ValueError(f"{n_c} class x {n_x} x-cond guidance weights: the release's guidance row index "
                             f"class_idx + xcond_idx*{n_x} exceeds its {n_c * n_x}-row table (needs n_x <= n_c)")

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def event_shape(self) -> tuple:
        return (self.in_channels, self.input_size, self.input_size)


def _cfg(hidden, depth, heads, encoder_depth, **kw):
    return dict(hidden_size=hidden, depth=depth, num_heads=heads, encoder_depth=encoder_depth, **kw)


CONFIGS = {
    "MFM-XL/2": _cfg(1152, 28, 16, 20),
    "MFM-L/2": _cfg(1024, 24, 16, 17),
    "MFM-B/2": _cfg(768, 12, 12, 9),
    "MFM-S/2": _cfg(384, 12, 6, 9),
    # small configs for tests and CPU experiments (head dim 72 like XL/2)
    "MFM-T/2": _cfg(144, 3, 2, 2, input_size=8, num_classes=10),
    "MFM-Digits": _cfg(144, 4, 2, 3, input_size=8, in_channels=1, num_classes=10),
}


def make_config(config="MFM-XL/2", **overrides) -> DiTConfig:
    if isinstance(config, DiTConfig):
        return dataclasses.replace(config, **overrides)
    if config not in CONFIGS:
        raise ValueError(f"unknown config name {config!r}; known: {sorted(CONFIGS)}")
    known = {f.name for f in dataclasses.fields(DiTConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"unknown config overrides {sorted(unknown)}; allowed: {sorted(known)}")
    return DiTConfig(**{**CONFIGS[config], **overrides})


def sincos_pos_embed(dim: int, grid: int) -> np.ndarray:
    """MAE 2-D sin-cos table (grid², dim): [sin(col·w), cos(col·w), sin(row·w), cos(row·w)], w_k = 10000^(-k/(dim/4))."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    parts = []
    for coord in (cols.reshape(-1), rows.reshape(-1)):
        out = np.einsum("n,k->nk", coord.astype(np.float64), omega)
        parts += [np.sin(out), np.cos(out)]
    return np.concatenate(parts, axis=1).astype(np.float32)


class PatchEmbed(nn.Module):
    """Conv2d patchify (timm PatchEmbed without norm): (B, C, H, W) -> (B, L, D)."""

    def __init__(self, patch: int, in_ch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return rearrange(self.proj(x), "b d h w -> b (h w) d")


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, freq: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq, dim), nn.SiLU(), nn.Linear(dim, dim))


class LabelEmbedder(nn.Module):
    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(rows, dim)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)


class DiTBlock(nn.Module):
    """Parameters only; the fused forward lives in MFMDiT so adjacent blocks can share fused epilogues."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.attn = Attention(dim, heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, out_ch: int):
        super().__init__()
        self.linear = nn.Linear(dim, patch * patch * out_ch)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))


def _nearest(w: torch.Tensor, table: tuple) -> torch.Tensor:
    """Index of the table entry nearest to each w, ties to the first. The table values enter as Python scalars, so
    there is no host→device copy per call (CUDA-graph safe)."""
    w = w.float()
    best = torch.zeros(w.shape, dtype=torch.long, device=w.device)
    best_d = (w - table[0]).abs()
    for i, value in enumerate(table[1:], 1):
        d = (w - value).abs()
        best = torch.where(d < best_d, i, best)
        best_d = torch.minimum(d, best_d)
    return best


def _resolve_ops(impl: str) -> Ops:
    impl = backend.resolve_impl(impl)
    return triton_ops() if impl == "triton" else reference_ops()


# A guidance weight selects one learned embedding row; a value between (or beyond) the trained weights has no
# embedding, so it is refused rather than snapped to the nearest row.
GUIDANCE_ATOL = 1e-6


def check_guidance_weight(name: str, w, table: tuple) -> None:
    """w (a number or a tensor; None selects the unguided row) must equal an entry of `table` up to GUIDANCE_ATOL
    (after rounding the entries to w's dtype). Tensors are read back only where host checks are allowed."""
    if w is None:
        return
    if torch.is_tensor(w):
        if not host_checks_allowed(w):
            return
        values = w.detach().to("cpu", torch.float64).reshape(-1)
        # entries rounded to w's precision: a bf16 tensor holding 2.3 matches the table's 2.3
        entries = torch.tensor(table, dtype=w.dtype if w.is_floating_point() else torch.float64).double()
    else:
        values, entries = torch.tensor([float(w)], dtype=torch.float64), torch.tensor(table, dtype=torch.float64)
    dist = (values[:, None] - entries[None, :]).abs().min(dim=1).values  # NaN for NaN inputs
    bad = ~(dist <= GUIDANCE_ATOL)
    if bool(bad.any()):
        raise ValueError(f"{name} must be one of the model's guidance weights {table}, got "
                         f"{values[bad][0].item():.6g}")


def _guidance_weight(w, G: int, like: torch.Tensor) -> torch.Tensor:
    """None (1), a number or a tensor -> (G,) on like's device. A number is written on the device (torch.full):
    as_tensor would copy it from the host, which a CUDA-graph capture forbids."""
    if w is None:
        w = 1.0
    if isinstance(w, (int, float)):
        return torch.full((G,), float(w), device=like.device, dtype=like.dtype)
    return torch.as_tensor(w, device=like.device, dtype=like.dtype).expand(G)


class MFMDiT(nn.Module):
    """The Meta Flow Map DiT. `MFMDiT("MFM-XL/2")` has the official checkpoint's 313 tensors, 684,286,864 values."""

    supports_particle_groups = True

    def __init__(self, config="MFM-XL/2", impl: str = "auto", **overrides):
        super().__init__()
        cfg = make_config(config, **overrides)
        self.config = cfg
        self.impl = impl
        self._ops = None  # resolved at first forward: no backend probing (or CUDA call) at construction
        self.grad_checkpointing = False
        D, p = cfg.hidden_size, cfg.patch_size
        self.x_embedder = PatchEmbed(p, cfg.in_channels, D)
        self.x_cond_embedder = PatchEmbed(p, cfg.in_channels, D)
        self.x_cond_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        f = cfg.frequency_embedding_size
        self.s_embedder = TimestepEmbedder(D, f)
        self.t_embedder = TimestepEmbedder(D, f)  # embeds u (official naming)
        self.t_cond_embedder = TimestepEmbedder(D, f)
        self.s_embedder_second = TimestepEmbedder(D, f)
        self.t_embedder_second = TimestepEmbedder(D, f)
        self.y_embedder = LabelEmbedder(cfg.num_classes + 1, D)
        self.guidance_embedder = LabelEmbedder(len(cfg.class_guidance_ws) * len(cfg.xcond_guidance_ws), D)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, D), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(D, p, cfg.out_channels)
        self.initialize_weights()

    # ------------------------------------------------------------------ init (adaLN-Zero, gates off)
    @torch.no_grad()
    def initialize_weights(self):
        if self.pos_embed.is_meta:
            return
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        grid = int(math.isqrt(self.config.num_tokens))
        self.pos_embed.copy_(torch.from_numpy(sincos_pos_embed(self.config.hidden_size, grid))[None])
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        # the context branch starts as a copy of x_embedder, gated off by scale = -1
        self.x_cond_embedder.proj.weight.copy_(w)
        nn.init.zeros_(self.x_cond_embedder.proj.bias)
        lin = self.x_cond_adaLN[1]
        nn.init.zeros_(lin.weight)
        lin.bias.copy_(torch.cat([torch.zeros(self.config.hidden_size), -torch.ones(self.config.hidden_size)]))
        for emb in self.time_embedders():
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for emb in (self.t_cond_embedder, self.t_embedder, self.s_embedder_second):
            nn.init.zeros_(emb.mlp[2].weight)
            nn.init.zeros_(emb.mlp[2].bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.zeros_(self.guidance_embedder.embedding_table.weight)
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[1].weight)
            nn.init.zeros_(blk.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def time_embedders(self):
        """In the order of the stacked time inputs: s, u, t_cond, s (decoder), u (decoder)."""
        return [self.s_embedder, self.t_embedder, self.t_cond_embedder, self.s_embedder_second,
                self.t_embedder_second]

    @property
    def ops(self) -> Ops:
        if self._ops is None:
            self._ops = _resolve_ops(self.impl)
        return self._ops

    def set_impl(self, impl: str) -> "MFMDiT":
        self.impl, self._ops = impl, None
        return self

    @property
    def event_shape(self) -> tuple:
        return self.config.event_shape

    # ------------------------------------------------------------------ conditioning (once per group)
    def guidance_index(self, cfg: torch.Tensor, x_cond_scale: torch.Tensor) -> torch.Tensor:
        """Row class_idx + xcond_idx·n_x of the guidance table (n_x = len(xcond_guidance_ws)), the release's
        indexing: checkpoints it trained with several x-cond weights use exactly these rows (with n_x > 1 some
        (class, x-cond) pairs share a row there, and so here)."""
        # nearest-row lookup; forward has already refused weights outside the tables (check_guidance_weight)
        ci = _nearest(cfg, self.config.class_guidance_ws)
        xi = _nearest(x_cond_scale, self.config.xcond_guidance_ws)
        return ci + xi * len(self.config.xcond_guidance_ws)

    def conditioning(self, s, u, t, y, cfg, x_cond_scale):
        """-> (c_enc, c_dec, e_t): (G, D) each."""
        if self.config.time_flip:
            s, u = 1 - s, 1 - u
        times = torch.stack([s, u, t, s, u], dim=-1)  # (G, 5)
        embs = self.time_embedders()
        w1 = torch.stack([e.mlp[0].weight for e in embs])
        b1 = torch.stack([e.mlp[0].bias for e in embs])
        w2 = torch.stack([e.mlp[2].weight for e in embs])
        b2 = torch.stack([e.mlp[2].bias for e in embs])
        e = self.ops.time_embed(times.to(w1.dtype), w1, b1, w2, b2)  # (G, 5, D)
        y_emb = self.y_embedder.embedding_table(y)
        g_emb = self.guidance_embedder.embedding_table(self.guidance_index(cfg, x_cond_scale))
        e_t = e[:, 2]
        c_enc = e[:, 0] + e[:, 1] + e_t + y_emb + g_emb
        c_dec = e[:, 3] + e[:, 4] + e_t + y_emb
        return c_enc, c_dec, e_t

    def _check_inputs(self, s, u, xbar, t, x, y, cfg, x_cond_scale):
        ev = self.config.event_shape
        check_state("xbar", xbar, ev)
        check_state("x", x, ev)
        if xbar.device != x.device:
            raise ValueError(f"xbar is on {xbar.device} but x is on {x.device}")
        G = x.shape[0]
        n_per_group("xbar", xbar.shape[0], G)
        weights = self.x_embedder.proj.weight.dtype
        check_dtype("xbar", xbar, weights)
        check_dtype("x", x, weights)
        check_finite(xbar=xbar, x=x)  # one host read for both; skipped during CUDA-graph capture
        s = as_time("s", s, G, x)
        u = as_time("u", u, G, x)
        t = as_time("t", t, G, x)
        if y is None:
            y = torch.full((G,), self.config.num_classes, device=x.device, dtype=torch.long)
        else:
            if not torch.is_tensor(y) or y.dtype not in (torch.int32, torch.int64):
                got = f"dtype {y.dtype}" if torch.is_tensor(y) else f"{type(y).__name__} {y!r}"
                raise TypeError(f"y must be an integer tensor of class labels (int64 or int32), got {got}; float "
                                "labels are not truncated to classes: pass whole numbers as y.long()")
            if y.dim() == 0:
                y = y.expand(G)
            if y.shape != (G,):
                raise ValueError(f"y must have shape ({G},), got {tuple(y.shape)}")
            if host_checks_allowed(y) and bool(((y < 0) | (y > self.config.num_classes)).any()):
                raise ValueError(f"y must lie in [0, {self.config.num_classes}] ({self.config.num_classes} = null class)")
            y = y.long()
        for name, w in (("cfg", cfg), ("x_cond_scale", x_cond_scale)):
            if torch.is_tensor(w) and w.dim() > 0 and w.shape not in ((1,), (G,)):
                raise ValueError(f"{name} must be a number or a tensor of shape () or ({G},) (one weight per state), "
                                 f"got shape {tuple(w.shape)}")
        check_guidance_weight("cfg", cfg, self.config.class_guidance_ws)
        check_guidance_weight("x_cond_scale", x_cond_scale, self.config.xcond_guidance_ws)
        cfg = _guidance_weight(cfg, G, x)
        x_cond_scale = _guidance_weight(x_cond_scale, G, x)
        return s, u, t, y, cfg, x_cond_scale

    # ------------------------------------------------------------------ forward
    def forward(self, s, u, xbar, t, x, y: Optional[torch.Tensor] = None, cfg=None, x_cond_scale=None):
        s, u, t, y, cfg, x_cond_scale = self._check_inputs(s, u, xbar, t, x, y, cfg, x_cond_scale)
        ops = self.ops
        c_enc, c_dec, e_t = self.conditioning(s, u, t, y, cfg, x_cond_scale)  # (G, D)
        mods = [blk.adaLN_modulation(c_enc if i < self.config.encoder_depth else c_dec).chunk(6, dim=-1)
                for i, blk in enumerate(self.blocks)]  # 6 × (G, D) per block
        final_shift, final_scale = self.final_layer.adaLN_modulation(c_dec).chunk(2, dim=-1)
        ctx_shift, ctx_scale = self.x_cond_adaLN(e_t).chunk(2, dim=-1)
        if self.config.preserve_t_cond_0:  # (t·shift, t·scale − 1): no context at t = 0
            tc = t.to(ctx_shift.dtype)[:, None]
            ctx_shift, ctx_scale = ctx_shift * tc, ctx_scale * tc - 1

        h = self.x_embedder(xbar)  # (R, L, D)
        hc = self.x_cond_embedder(x)  # (G, L, D)
        tokens = ops.input_stage(h, self.pos_embed[0].to(h.dtype), hc, ctx_shift, ctx_scale)  # (R, L, D)

        # Each block's two residual updates are fused with the LN→modulate that follows them, so the stream is
        # read and written once per sub-layer: (x, y) = (x + gate·branch, LN(x + gate·branch)·(1+scale)+shift).
        nxt = [(m[0], m[1]) for m in mods[1:]] + [(final_shift, final_scale)]
        if mods:
            y_mod = ops.ln_modulate(tokens, mods[0][0], mods[0][1])
        else:
            y_mod = ops.ln_modulate(tokens, final_shift, final_scale)
        for i, blk in enumerate(self.blocks):
            args = (tokens, y_mod, mods[i], nxt[i])
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                tokens, y_mod = torch.utils.checkpoint.checkpoint(self._block, blk, *args, use_reentrant=False)
            else:
                tokens, y_mod = self._block(blk, *args)
        out = self.final_layer.linear(y_mod)  # (R, L, p·p·C_out)
        p, C, n = self.config.patch_size, self.config.out_channels, self.config.input_size // self.config.patch_size
        img = rearrange(out, "r (h w) (p q c) -> r c (h p) (w q)", h=n, w=n, p=p, q=p, c=C)
        img = img[:, : self.config.in_channels]
        return -img if self.config.time_flip else img

    def _block(self, blk, x, y_mod, mod, nxt):
        ops = self.ops
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        R, L, D = x.shape
        H = blk.attn.num_heads
        qkv = F.linear(y_mod, blk.attn.qkv.weight, blk.attn.qkv.bias)
        q, k, v = rearrange(qkv, "r l (three h d) -> three r h l d", three=3, h=H).unbind(0)
        a = rearrange(ops.attention(q, k, v), "r h l d -> r l (h d)")
        a = F.linear(a, blk.attn.proj.weight, blk.attn.proj.bias)
        x, y_mod = ops.gate_residual_ln_modulate(x, a, gate_msa, shift_mlp, scale_mlp)
        m = ops.bias_gelu(F.linear(y_mod, blk.mlp.fc1.weight), blk.mlp.fc1.bias)
        m = F.linear(m, blk.mlp.fc2.weight, blk.mlp.fc2.bias)
        return ops.gate_residual_ln_modulate(x, m, gate_mlp, nxt[0], nxt[1])

    def extra_repr(self) -> str:
        c = self.config
        return f"hidden={c.hidden_size}, depth={c.depth}, heads={c.num_heads}, tokens={c.num_tokens}, impl={self.impl}"
