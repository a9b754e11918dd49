"""Multi-process training through torchrun: process group setup and gradient averaging.

The JVP objectives call the *unwrapped* module (torch.func.jvp through a DDP wrapper does not sync
gradients correctly, docs/reference.md "Traps"), so the loop never wraps the model in DDP. Instead, after
backward, ``sync_gradients`` all-reduces every gradient (plus the loss and a stop flag, in the same
buffer) and divides by the world size: one mechanism, correct for every objective.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(device_name: str = "auto") -> DistInfo:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_name != "cpu"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local_rank)


def current() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def broadcast_object(obj, src: int = 0):
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_parameters(module: nn.Module, src: int = 0) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=src)


@torch.no_grad()
def sync_gradients(
    params: list[torch.Tensor], extras: torch.Tensor, world_size: int, bucket_elems: int = 2**25
) -> torch.Tensor:
    """Average gradients over ranks with flat all-reduces of at most ``bucket_elems`` elements;
    ``extras`` (a small float vector: the loss, a stop flag) rides in the first bucket and is
    returned averaged. Missing grads count as zeros."""
    if world_size <= 1:
        return extras
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    extras = extras.detach().float().to(params[0].device)
    buckets, current_bucket, size = [], [], 0
    for p in params:
        if current_bucket and size + p.numel() > bucket_elems:
            buckets.append(current_bucket)
            current_bucket, size = [], 0
        current_bucket.append(p)
        size += p.numel()
    buckets.append(current_bucket)
    out = extras
    for k, bucket in enumerate(buckets):
        parts = [p.grad.reshape(-1).float() for p in bucket]
        if k == 0:
            parts.append(extras)
        flat = torch.cat(parts)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world_size
        offset = 0
        for p in bucket:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n
        if k == 0:
            out = flat[offset:].clone()
    return out


def all_gather_rows(a: torch.Tensor) -> torch.Tensor:
    """Concatenate a (B, ...) over all ranks in rank order (no gradient; equal B on every rank);
    a itself when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return a
    parts = [torch.empty_like(a) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, a.contiguous())
    return torch.cat(parts, 0)


def gather_batch(fn, indices: list[int]) -> torch.Tensor:
    """fn(indices) -> (len(indices), ...) tensor, computed jointly by all ranks.

    Rank k of W evaluates ``indices[k::W]`` (padded to equal length), the pieces are all-gathered and
    put back in order, so every rank returns exactly ``fn(indices)`` (for a per-index function such
    as seeded sampling). Every rank must call it with the same ``indices``. One process: ``fn(indices)``.
    """
    info = current()
    indices = list(indices)
    if info.world_size <= 1 or not indices:
        return fn(indices)
    world = info.world_size
    per_rank = -(-len(indices) // world)
    mine = indices[info.rank :: world]
    mine = mine + [indices[0]] * (per_rank - len(mine))  # padding rows are dropped below
    out = fn(mine)
    # Slot j of rank k holds index j*W + k.
    rows = all_gather_rows(out).view(world, per_rank, *out.shape[1:]).transpose(0, 1)
    return rows.reshape(per_rank * world, *out.shape[1:])[: len(indices)]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Barrier, then destroy the process group: no rank tears its connections down while another is
    still inside a collective (gloo aborted the process at exit on torch 2.15 without the barrier)."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
