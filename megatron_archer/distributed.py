"""Distributed plumbing in one place: group queries and the few collectives the numerics need.

Every helper accepts ``group=None`` meaning "no parallelism": it then returns rank 0 of size 1
and the collectives are no-ops, so the same numerical code runs in one process.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_process_group() -> None:
    """NCCL on CUDA, gloo on CPU: torchrun's env:// rendezvous, or one in-process rank otherwise."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def rank_and_size(group) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size; (0, 1) for ``group=None``."""
    if group is None:
        return 0, 1
    if not dist.is_initialized():
        raise RuntimeError("a process group was passed but torch.distributed is not initialised")
    return dist.get_rank(group=group), dist.get_world_size(group=group)


def all_reduce_(tensor: torch.Tensor, group, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``op`` in sum | max | min) over ``group``; a no-op without one."""
    if group is None or dist.get_world_size(group=group) == 1:
        return tensor
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    dist.all_reduce(tensor, op=reduce_op, group=group)
    return tensor
