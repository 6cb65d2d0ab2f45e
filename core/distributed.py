"""Collectives for code that runs on every rank of a DDP job, and no-ops in a single process.

The one bottom-layer module for distributed work: models (ProtoPNet's push, the ICNN's filter assignment), the
interpretation algorithms and the callbacks all use it, so there is one way to shard, to reduce and to agree.

Rules every caller follows:
- Every rank calls the same collectives in the same order (a collective called on some ranks only deadlocks).
- Tensors go to the caller's device for the collective (NCCL needs CUDA tensors) and come back on that device.
- Ranks decide together with `agree_any` (a failure on one rank stops all of them at the same point:
  `raise_together`), never with a rank-local `if` around a collective.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


class PeerFailure(RuntimeError):
    """Another rank failed; raised on this rank at the same point so that every rank leaves the collectives
    together."""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_rank_zero() -> bool:
    return rank() == 0


def shard_indices(n: int, num_shards: int | None = None, shard: int | None = None) -> list[int]:
    """Contiguous, non-overlapping shard of range(n) for this rank. Unlike Lightning's DistributedSampler it never
    pads by repeating samples, so sums over shards equal the single-process sums exactly."""
    num_shards = world_size() if num_shards is None else num_shards
    shard = rank() if shard is None else shard
    per = math.ceil(n / num_shards) if n else 0
    return list(range(min(n, shard * per), min(n, (shard + 1) * per)))


def shard(dataset):
    """This rank's contiguous part of a dataset (torch Subset; the whole dataset in a single process)."""
    from torch.utils.data import Subset
    return Subset(dataset, shard_indices(len(dataset)))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_cat(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate each rank's tensor along `dim` in rank order; shards may have different lengths along `dim`."""
    if not is_distributed():
        return t
    t = t.contiguous()
    n = torch.tensor([t.shape[dim]], device=t.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    pad_shape = list(t.shape)
    pad_shape[dim] = max(sizes) - t.shape[dim]
    padded = torch.cat([t, t.new_zeros(pad_shape)], dim=dim) if pad_shape[dim] else t
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([o.narrow(dim, 0, s) for o, s in zip(out, sizes)], dim=dim)


def agree_any(flag: bool, device: torch.device | str = "cpu") -> bool:
    """The one way ranks agree on a decision: True on every rank when `flag` is true on at least one."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


# the name the earlier code used; same function
any_rank = agree_any


def raise_together(error: BaseException | None, device: torch.device | str = "cpu") -> None:
    """Every rank calls this at the same point after a local phase that may fail on some ranks only: then either
    all ranks go on to the next collective, or all raise (the failing rank its own error, the others PeerFailure),
    and none is left waiting in a collective."""
    if agree_any(error is not None, device=device):
        if error is not None:
            raise error
        raise PeerFailure("another rank failed (see its log)")


def all_gather_object(obj) -> list:
    """Every rank's picklable `obj`, in rank order (e.g. which rank failed and why, so rank 0 can record it)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
