"""ActorConfig: the actor's hyper-parameters, typed and validated at construction
(``config_fields``): every error names the field, the value and what it allows, so a bad YAML/CLI
value is found without a traceback hunt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_archer.config_fields import choice, integer, number

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LR_SCHEDULES = ("constant", "cosine")
PARAMS_DTYPES = tuple(_DTYPES)
LOGPROB_IMPLS = ("logits", "fused")
ROUTING_REPLAY = ("none", "rollout", "old")


@dataclass(frozen=True)
class ActorConfig:
    """How the actor splits, differentiates and optimises.

    - ``max_tokens_per_micro_batch``: token budget of one packed micro-batch (prompt + response
      tokens of every sequence in it). Sequences are packed whole, never split; a sequence longer
      than the budget is an error.
    - ``lr``, ``weight_decay``, ``adam_beta1``, ``adam_beta2``, ``adam_eps``: AdamW. Weight decay
      applies to matrices only (not to biases and norms), as megatron's optimizer does.
    - ``clip_grad``: global gradient-norm clip (0 disables clipping; the norm is still reported).
    - ``lr_schedule``: ``constant`` (the papers' 1e-6) or ``cosine`` to ``min_lr`` over
      ``lr_decay_steps``; both after ``lr_warmup_steps`` of linear warmup from 0.
    - ``params_dtype``: ``float32`` or ``bfloat16`` (``bf16`` on CUDA with fp32 main params in
      the distributed optimizer; on CPU the parameters and AdamW states have this dtype).
    - ``temperature``: the rollout's sampling temperature, log-probs are of softmax(z / T).
    - ``logprob_chunk_size``: tokens per fp32 working chunk of the vocab-parallel op: the op's
      fp32 working set is ``logprob_chunk_size`` x V/tp, never a full copy of the shard (docs/numerics.md §1;
      1024 tokens x 151,936 / tp vocabulary is 0.6 GB / tp).
    - ``logprob_impl``: ``logits`` (the model's vocab-sharded logits, then the vocab-parallel op)
      or ``fused`` (the last stage hands its final hidden states and the output weight to the
      fused LM-head op, which never materialises logits: docs/numerics.md §1, "the strongest form").
    - ``routing_replay`` (mixture-of-experts models, ``actor.routing``): ``none``; ``old``:
      every update dispatches each token to the experts the old-policy forward of its
      mini-batch chose, so the updates' routing matches the policy the ratios are taken
      against (docs/numerics.md §11); ``rollout``: every forward of a batch that carries the
      rollout engine's routing (``SequenceBatch.routing``: the old-policy, reference and update
      forwards) dispatches each token to the experts the engine chose for it.
    """

    max_tokens_per_micro_batch: int = 4096
    lr: float = 1e-6
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    lr_decay_steps: int | None = None
    min_lr: float = 0.0
    params_dtype: str = "float32"
    temperature: float = 1.0
    logprob_chunk_size: int = 1024
    logprob_impl: str = "logits"
    routing_replay: str = "none"

    def __post_init__(self) -> None:
        integer("max_tokens_per_micro_batch", self.max_tokens_per_micro_batch, low=2)
        number("lr", self.lr, low=0.0, low_open=True)
        number("weight_decay", self.weight_decay, low=0.0)
        for name in ("adam_beta1", "adam_beta2"):
            number(name, getattr(self, name), low=0.0, high=1.0, high_open=True)
        number("adam_eps", self.adam_eps, low=0.0, low_open=True)
        number("clip_grad", self.clip_grad, low=0.0)  # 0 disables clipping
        choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        integer("lr_warmup_steps", self.lr_warmup_steps, low=0)
        if self.lr_schedule == "cosine":
            decay = self.lr_decay_steps
            if isinstance(decay, bool) or not isinstance(decay, int) \
                    or decay <= self.lr_warmup_steps:
                raise ValueError(f"lr_decay_steps must be an integer > lr_warmup_steps "
                                 f"({self.lr_warmup_steps}) with lr_schedule 'cosine'; "
                                 f"got {decay!r}")
        number("min_lr", self.min_lr, low=0.0, high=self.lr)
        choice("params_dtype", self.params_dtype, PARAMS_DTYPES)
        number("temperature", self.temperature, low=0.0, low_open=True)
        integer("logprob_chunk_size", self.logprob_chunk_size, low=1)
        choice("logprob_impl", self.logprob_impl, LOGPROB_IMPLS)
        choice("routing_replay", self.routing_replay, ROUTING_REPLAY)

    @property
    def torch_params_dtype(self) -> torch.dtype:
        return _DTYPES[self.params_dtype]

    def lr_at(self, step: int) -> float:
        """Learning rate of optimiser step ``step`` (0-based count of steps already taken)."""
        if step < self.lr_warmup_steps:
            return self.lr * (step + 1) / (self.lr_warmup_steps + 1)
        if self.lr_schedule == "constant":
            return self.lr
        span = self.lr_decay_steps - self.lr_warmup_steps
        progress = min(1.0, (step - self.lr_warmup_steps) / span)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))
