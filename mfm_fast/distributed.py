"""Data-parallel helpers for `mfm_fast.train` under torchrun (DDP-style replication or FSDP2 sharding).

Flow-map losses evaluate the network inside `torch.func.jvp`, which calls the bare module and so bypasses the
hooks of `DistributedDataParallel`. Replicated training therefore does not wrap the model: it broadcasts rank 0's
weights once and averages the gradients explicitly after every backward (`all_reduce_grads`), one flat bucket per
dtype. FSDP2 (`fully_shard`) keeps its own hooks on the module's forward and reduce-scatters gradients itself.

Every rank draws the same global batch from the same per-step seed and keeps its own slice (`local_rows`), so a
K-process run computes exactly the loss a single process computes at the same global batch.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

PARALLEL = ("ddp", "fsdp")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def info() -> DistInfo:
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def init_from_env(backend: str | None = None, timeout: datetime.timedelta | None = None) -> DistInfo:
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    Without WORLD_SIZE > 1 nothing happens. backend: "nccl" on CUDA, else "gloo". On CUDA the local device is
    selected before any collective. `timeout`: how long a collective waits for the other ranks before it raises
    (None: PyTorch's default)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return info()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, **({} if timeout is None else {"timeout": timeout}))
    return info()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_rows(parts, rank: int, world: int) -> torch.Tensor:
    """Indices of rank's share of a global batch made of consecutive parts of the given sizes: each part is cut
    into `world` equal slices and the rank keeps slice `rank` of every part (so a per-row role such as "diagonal
    row" / "consistency row" is preserved). Every part size must be divisible by world."""
    idx, start = [], 0
    for n in parts:
        if n % world:
            raise ValueError(f"a batch part of {n} rows cannot be split evenly over {world} ranks")
        k = n // world
        idx.append(torch.arange(start + rank * k, start + (rank + 1) * k))
        start += n
    return torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy src's parameters and buffers to every rank."""
    if not is_distributed():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)


@torch.no_grad()
def all_reduce_grads(params: Iterable[torch.Tensor]) -> None:
    """Average `.grad` over ranks in place (missing grads count as zeros), one flat all-reduce per dtype."""
    if not is_distributed():
        return
    params = [p for p in params if p.requires_grad]
    world = dist.get_world_size()
    by_dtype: dict = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (a copy; identity without a process group)."""
    if not is_distributed():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def fsdp_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def shard_fsdp(model: nn.Module) -> nn.Module:
    """FSDP2: shard the model's parameters over ranks in place, one unit for the whole model (MFMDiT's fused
    forward reads block weights directly rather than calling the blocks, so per-block units would never be
    gathered)."""
    if not fsdp_available():
        raise RuntimeError("parallel='fsdp' needs torch.distributed.fsdp.fully_shard (PyTorch >= 2.6)")
    from torch.distributed.fsdp import fully_shard
    fully_shard(model)
    return model
