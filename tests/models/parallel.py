"""Megatron model-parallel state for test workers (inside tests/distributed.py's gloo processes)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
from megatron.core import parallel_state


@contextmanager
def model_parallel(tensor_parallel: int, pipeline_parallel: int = 1, context_parallel: int = 1,
                   expert_parallel: int = 1, expert_tensor_parallel: int | None = None):
    """Megatron's groups for the given sizes, torn down afterwards so a worker can loop sizes."""
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        context_parallel_size=context_parallel,
        expert_model_parallel_size=expert_parallel,
        expert_tensor_parallel_size=expert_tensor_parallel,
    )
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits from this rank's vocab shard [..., V/tp]."""
    group = parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, logits.contiguous(), group=group)
    return torch.cat(shards, dim=-1)
