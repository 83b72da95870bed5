"""Starting a run on an initialised process group: megatron's parallel state from
``config.parallel`` (checked against the world size), the rank-zero control group, seeds, then
the Trainer."""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_archer import compat
from megatron_archer.rollout import RolloutEngine
from megatron_archer.trainer.config import ExperimentConfig, ParallelConfig
from megatron_archer.trainer.loop import Trainer
from megatron_archer.trainer.rank_zero import destroy_control_group, init_control_group


def init_parallel_state(parallel: ParallelConfig, world_size: int, **options) -> None:
    """megatron's parallel state for ``parallel`` at ``world_size`` (checked first, naming the
    fields); ``options`` are further ``initialize_model_parallel`` arguments (``plan``'s)."""
    parallel.data_size(world_size)  # raises, naming the fields, when it does not fit
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor, pipeline_model_parallel_size=parallel.pipeline,
        context_parallel_size=parallel.context, expert_model_parallel_size=parallel.expert,
        expert_tensor_parallel_size=parallel.expert_tensor_size, **options)


def run_training(config: ExperimentConfig, engine: RolloutEngine | None = None) -> Trainer:
    """Train ``config`` on the initialised process group; returns the finished Trainer."""
    init_parallel_state(config.parallel, dist.get_world_size())
    init_control_group(config.parallel.rank_zero_timeout_minutes)
    try:
        compat.model_parallel_seed(config.train.seed)
        trainer = Trainer(config, engine=engine)
        trainer.run()
        return trainer
    finally:
        destroy_control_group()
        parallel_state.destroy_model_parallel()
