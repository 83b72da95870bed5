"""One rank of a job of any size, inside this process, holding no memory.

torch's fake process-group backend (``torch.testing._internal.distributed.fake_pg``, a testing
module of torch since 2.1; torchtitan's dry run uses it too) accepts any rank and world size and
completes every collective without communicating. On it megatron's parallel state is built with
the job's real sizes, so the model, DDP and optimizer code see exactly the groups the job's
rank would. Parameters go to the meta device: shapes and dtypes, no storage.

Each rank is entered and left completely (``fake_rank``): the process group and megatron's
parallel state are created for it and destroyed after it, so one rank's state never leaks into
the next one's build.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_archer.trainer.config import ParallelConfig
from megatron_archer.trainer.launch import init_parallel_state


@contextlib.contextmanager
def fake_rank(rank: int, world_size: int, parallel: ParallelConfig) -> Iterator[None]:
    """Global rank ``rank`` of ``world_size``: the fake default group and megatron's parallel
    state as ``launch.run_training`` creates them (without megatron's extra gloo groups, which
    need a real store); both destroyed on exit."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("plan needs a process of its own: a process group exists already")
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    try:
        init_parallel_state(parallel, world_size, create_gloo_process_groups=False)
        try:
            yield
        finally:
            parallel_state.destroy_model_parallel()
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def cuda_allocations_on_meta() -> Iterator[None]:
    """During the block, ``torch.cuda.current_device()`` is the meta device.

    megatron's DDP allocates its parameter and gradient buffers with
    ``torch.zeros(n, device=torch.cuda.current_device())`` (distributed/param_and_grad_buffer.py,
    megatron-core 0.16.1); with this, the buffers are laid out by megatron's own code (its
    bucketing and padding) and take no memory. Only for building on the meta device: nothing
    computes in the block.
    """
    current_device = torch.cuda.current_device
    torch.cuda.current_device = lambda: torch.device("meta")
    try:
        yield
    finally:
        torch.cuda.current_device = current_device
