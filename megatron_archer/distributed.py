"""Distributed plumbing in one place: the process group, group queries and the few collectives
the numerics need.

Every helper accepts ``group=None`` meaning "no parallelism": it then returns rank 0 of size 1
and the collectives are no-ops, so the same numerical code runs in one process.

The device rule (CUDA and CPU alike; ``tests/cuda_guard.py`` enforces it on CPU):

1. One process group serves both devices. ``init_process_group`` creates the default group with
   ``PROCESS_GROUP_BACKEND_CUDA`` (``cpu:gloo,cuda:nccl``, as megatron's own launcher does) on
   CUDA, ``gloo`` on CPU. megatron's ``parallel_state.initialize_model_parallel`` (0.16.1, and
   Megatron-LM main) creates the tensor, pipeline, data and other subgroups with
   ``create_group(..., backend=None)``, which ``torch.distributed.new_group`` resolves to the
   default group's backend string: every subgroup serves CPU tensors with gloo and CUDA tensors
   with NCCL. So small control tensors (counts, flags, sizes built from Python numbers) may stay
   on the CPU in any collective, and values computed from model tensors may stay on the GPU.
2. A collective's tensor must be on the same device on every rank (gloo and NCCL are separate
   communicators): choose the device by the code, never by the data (an empty list, a rank that
   has no tokens).
3. One op never mixes a CPU tensor of one or more dimensions with a CUDA tensor: move explicitly
   (``.to(device)``, or ``.item()`` / ``.cpu()`` for control values). 0-dim CPU tensors act as
   scalars, which torch allows.

A group created elsewhere with ``backend="nccl"`` alone serves only CUDA tensors; this package
creates none.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

PROCESS_GROUP_BACKEND_CUDA = "cpu:gloo,cuda:nccl"
PROCESS_GROUP_BACKEND_CPU = "gloo"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def process_group_backend(cuda: bool) -> str:
    """The default group's backend string: both devices on CUDA machines, gloo on CPU-only ones."""
    return PROCESS_GROUP_BACKEND_CUDA if cuda else PROCESS_GROUP_BACKEND_CPU


def die_with_launcher() -> None:
    """Under torchrun, ask the kernel for SIGTERM when the launcher (this process's parent) dies,
    so a ``kill -9`` of torchrun does not leave ranks writing into the run directory (the trainer
    stops at the step's end on SIGTERM). Linux only; elsewhere nothing happens."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def init_process_group(timeout_minutes: float | None = None) -> None:
    """The default group (see the module docstring): torchrun's env:// rendezvous, or one
    in-process rank otherwise. ``timeout_minutes`` bounds each collective
    (``parallel.timeout_minutes``; None: torch's default). Under torchrun the rank is tied to
    its launcher's life (``die_with_launcher``)."""
    die_with_launcher()
    cuda = torch.cuda.is_available()
    backend = process_group_backend(cuda)
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    timeout = {} if timeout_minutes is None else {"timeout": timedelta(minutes=timeout_minutes)}
    if "RANK" in os.environ:
        dist.init_process_group(backend, **timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **timeout)


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
