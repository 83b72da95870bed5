"""Megatron actor: packed log-probs / entropy, optimiser steps, frozen reference model.

``Actor(model, spec, config, backend)`` over this rank's model chunk(s);
``ReferenceModel`` the frozen copy for the KL term; ``SequenceBatch`` the input;
``ActorConfig`` the validated hyper-parameters. See ``actor.py`` for the loss contract.
"""

from megatron_archer.actor.actor import Actor, LogprobResult, ModelRunner, StepResult, unwrap_chunk
from megatron_archer.actor.config import ActorConfig
from megatron_archer.actor.packing import MicroBatch, SequenceBatch, pack, plan_micro_batches
from megatron_archer.actor.reference import ReferenceModel

__all__ = ["Actor", "ActorConfig", "LogprobResult", "MicroBatch", "ModelRunner", "ReferenceModel",
           "SequenceBatch", "StepResult", "pack", "plan_micro_batches", "unwrap_chunk"]
