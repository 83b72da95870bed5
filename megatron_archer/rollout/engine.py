"""The rollout engine interface and its request/result types.

Log-prob convention (every engine): ``logprob`` of a sampled token y at step t is
``log softmax(z_t / T_t)[y]`` over the full vocabulary, where z_t are the model's raw logits and
T_t the temperature used at that step, taken *before* top-k / top-p truncation. This is the
quantity ``megatron_archer.ops.vocab_parallel_logprobs_and_entropy(..., temperature=T_t)``
computes in training, and the one SGLang returns by default. Greedy decoding
(``temperature=0``) reports log-probs at T = 1, as SGLang does.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from megatron_archer.buckets import Bucket
from megatron_archer.config_fields import integer, number

FinishReason = Literal["stop", "length"]
MemoryPart = Literal["weights", "cache"]
MEMORY_PARTS: tuple[MemoryPart, ...] = ("weights", "cache")


def check_sampling(*, max_new_tokens, n, temperature, top_p, top_k) -> None:
    """The sampling fields' rules, in one place: ``SamplingParams`` and the trainer's
    ``RolloutConfig`` both call this. ``temperature=0`` (greedy) passes; ``top_k=-1`` is off."""
    integer("max_new_tokens", max_new_tokens, low=1)
    integer("n", n, low=1)
    number("temperature", temperature, low=0.0)
    number("top_p", top_p, low=0.0, high=1.0, low_open=True)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k == 0 or top_k < -1:
        raise ValueError(f"top_k must be -1 (off) or an integer >= 1; got {top_k!r}")


@dataclass(frozen=True)
class EntropyAwareDecoding:
    """docs/numerics.md §6: temperature ``t_high`` where the token entropy H_t (of softmax(z_t), T = 1)
    exceeds ``threshold`` nats, ``t_low`` otherwise."""

    threshold: float
    t_high: float
    t_low: float

    def __post_init__(self):
        number("threshold", self.threshold, low=0.0)
        for name in ("t_high", "t_low"):
            number(name, getattr(self, name), low=0.0, low_open=True)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: ``n`` responses per prompt, at most ``max_new_tokens`` each.

    ``top_k=-1`` and ``top_p=1`` disable truncation; ``temperature=0`` is greedy. A sampled
    token in ``stop_token_ids`` ends its response (and is kept in it). ``seed`` makes sampling
    reproducible; None draws fresh randomness. ``entropy_aware`` replaces ``temperature``.
    """

    max_new_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    entropy_aware: EntropyAwareDecoding | None = None

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        check_sampling(max_new_tokens=self.max_new_tokens, n=self.n,
                       temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative token ids; "
                             f"got {self.stop_token_ids!r}")
        if self.entropy_aware is not None and self.temperature == 0:
            raise ValueError("entropy_aware needs sampling: temperature must be > 0 with it; "
                             "got 0 (greedy)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 and self.entropy_aware is None


@dataclass(frozen=True)
class Sample:
    """One response: its tokens, the engine's log-prob of each (see the module docstring), the
    temperature each was sampled at, and why it ended. ``weight_version``: the weights its
    generation started with (an update mid-request serves its later tokens newer ones); None
    when the engine does not say (the rollout phase then tags it, ``rollout_phase``).
    ``routing`` (a mixture-of-experts model, when asked for): the experts the engine's forward
    routed each token of prompt + response to, [tokens, num_layers, top_k] integers (a dense
    layer's rows are 0), for every token but the response's last, which no forward ran."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    temperatures: list[float] = field(default_factory=list)
    weight_version: int | None = None
    routing: torch.Tensor | None = field(default=None, compare=False)

    def __post_init__(self):
        if len(self.logprobs) != len(self.token_ids):
            raise ValueError(
                f"logprobs has {len(self.logprobs)} entries for {len(self.token_ids)} token_ids"
            )
        if self.temperatures and len(self.temperatures) != len(self.token_ids):
            raise ValueError(
                f"temperatures has {len(self.temperatures)} entries for "
                f"{len(self.token_ids)} token_ids"
            )
        if self.finish_reason not in ("stop", "length"):
            raise ValueError(f"finish_reason={self.finish_reason!r} must be 'stop' or 'length'")
        if self.routing is not None and (self.routing.dim() != 3
                                         or self.routing.dtype.is_floating_point):
            raise ValueError(f"routing must be [tokens, layers, top_k] integers, got "
                             f"{self.routing.dtype} {tuple(self.routing.shape)}")


def check_prompts(prompts: Sequence[Sequence[int]]) -> None:
    """Every prompt is a non-empty list of non-negative token ids."""
    if not prompts:
        raise ValueError("prompts is empty")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompts[{i}] is empty")
        if min(prompt) < 0:
            raise ValueError(f"prompts[{i}] holds a negative token id")


class RolloutEngine(abc.ABC):
    """Generates responses with the policy's current weights, which the trainer pushes in.

    ``updates_during_generation``: ``update_weights`` may run while ``generate`` does (from
    another thread) and the generation continues on the new weights, nothing lost; otherwise
    the caller updates only between generations (``trainer.async_rollout``)."""

    updates_during_generation: bool = False

    @abc.abstractmethod
    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[Sample]]:
        """``params.n`` samples for each prompt (token ids), in prompt order."""

    @abc.abstractmethod
    def update_weights(self, buckets: Iterable[Bucket], version: int) -> None:
        """Load ``(hf_name, full_tensor)`` buckets (``models.hf_weight_buckets``); on success the
        engine's ``weight_version`` becomes ``version``. On failure it stays, and ``generate``
        never silently serves a mix of two versions: it serves the old weights or refuses."""

    @property
    @abc.abstractmethod
    def weight_version(self) -> int | None:
        """Version of the last successful update; None before the first."""

    @abc.abstractmethod
    def release_memory(self) -> None:
        """Free accelerator memory (weights and cache) for a colocated training phase."""

    @abc.abstractmethod
    def resume_memory(self, parts: Sequence[MemoryPart] = MEMORY_PARTS) -> None:
        """Take back the ``parts`` released by ``release_memory`` (a part not released is left
        alone, so resuming twice or without a release is safe). Colocated weight sync resumes
        ``weights`` first, updates them, then resumes ``cache``: the KV cache is allocated only
        once the trainer's memory is free."""

    @abc.abstractmethod
    def health(self) -> bool:
        """True when the engine can serve ``generate`` now."""

    def take_metrics(self) -> dict[str, float]:
        """Counters since the last call (e.g. server restarts, retried requests) for the step's
        metrics; none by default."""
        return {}

    def shutdown(self) -> None:
        """Stop whatever this engine started (servers); nothing by default."""
