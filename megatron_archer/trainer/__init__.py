"""The RL trainer: experiment configs, the step (rollout, rewards, dynamic sampling, log-probs,
mini-batch updates, weight sync), metrics and the run loop. ``launch.run_training`` is the entry
point; ``megatron-archer train CONFIG`` calls it under torchrun."""

from megatron_archer.trainer.config import (
    ExperimentConfig,
    config_from_mapping,
    load_config,
    parse_overrides,
    resolved_yaml,
)
from megatron_archer.trainer.launch import run_training
from megatron_archer.trainer.loop import Trainer
from megatron_archer.trainer.rollout_phase import RolloutError

__all__ = ["ExperimentConfig", "RolloutError", "Trainer", "config_from_mapping", "load_config",
           "parse_overrides", "resolved_yaml", "run_training"]
