"""One-step-asynchronous rollout (``rollout.async``): the rollout of step k + 1 runs while step
k trains (docs/numerics.md §8), on global rank 0, in a worker thread that drives the engine.

Versions. The trainer's weights after step k are version k (the initial policy: 0) and the
engine serves version k from the weight sync that ends step k. Step k on rank 0:

1. take rollout k (submitted during step k - 1; step 1 generates its own first);
2. submit rollout k + 1, served by version k - 1;
3. train on rollout k, whose samples are of version k - 2 (step 1: 0) while the trainer holds
   version k - 1: staleness 1 (0 at step 1);
4. sync the weights to version k. An engine whose updates cannot land mid-generation (the local
   engine, in its own process: ``rollout.process_engine``) first waits for rollout k + 1, so each
   rollout sees one version and a run is reproducible; SGLang servers keep generating: the
   update pauses them in ``retract`` mode, the running requests go back to the queue and resume
   on the new weights, none lost (``RolloutEngine.updates_during_generation``); a sample's
   version is the one it started with (SGLang's version spans).

Staleness of a group = trainer version - the oldest version among its samples; a group more
than ``rollout.max_staleness`` behind is dropped before advantages (they are relative to the
whole group) and counted: ``async/dropped_groups``, ``async/dropped_samples``, with
``async/staleness_mean`` and ``async/staleness_max`` over the samples kept. With one rollout
ahead the staleness is 1 by construction; the drop guards against an engine that serves older
weights than the trainer pushed (a failed update: SGLang then refuses, the local engine keeps
its version).

"Old" under async. With ``algorithm.old_logprobs: recompute``, pi_old is the trainer's weights at
the start of the step (version k - 1), so the PPO ratio pi / pi_old stays a trust region around
the weights being updated; the sample came from pi_rollout (version k - 2, the engine's kernels),
and the importance weight w = pi_old / pi_rollout of ``algorithm.rollout_correction`` then holds
the staleness as well as the kernel mismatch: the per-token engine log-probs kept with each
sample are the generating version's own. With ``old_logprobs: rollout``, pi_old = pi_rollout
and the ratio carries both.

Exact resume: the checkpoint after step k records rollout k + 1, finished (step 4 waited for it,
or saving waits), as JSON in the trainer state (prompt indices, tokens, engine log-probs and
versions, rewards, scores, its metrics) with the sampler position after its draws; the engine's
routing, at mixture-of-experts scale gigabytes (768 bytes a token for 48 layers x top-8), goes
to the checkpoint's tensor file as one flat int16 tensor, each sample recording its shape and
offset; the resumed run trains step k + 1 on it and equals
the uninterrupted run bitwise. Regenerating it instead would need version k - 1's weights,
which the checkpoint does not hold. When the last step saves a checkpoint, the rollout after
it is generated too, so a run extended by resume continues exactly.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, replace
from typing import Any

import torch

from megatron_archer.data import PromptSet
from megatron_archer.rollout import Sample
from megatron_archer.trainer.rollout_phase import Group, RolloutBatch

ROUTING = "rollout_ahead.routing"  # the in-flight rollout's routing in the checkpoint's tensors


def group_staleness(group: Group, trainer_version: int) -> int:
    """Versions between the trainer and the oldest sample of ``group``."""
    return trainer_version - min(s.weight_version for s in group.samples)


def drop_stale(batch: RolloutBatch, trainer_version: int, max_staleness: int
               ) -> tuple[RolloutBatch, dict[str, float]]:
    """``batch`` without the groups more than ``max_staleness`` versions behind, and the
    ``async/*`` metrics (module docstring)."""
    staleness = [group_staleness(g, trainer_version) for g in batch.groups]
    kept = [g for g, s in zip(batch.groups, staleness) if s <= max_staleness]
    dropped = [g for g, s in zip(batch.groups, staleness) if s > max_staleness]
    per_sample = [trainer_version - s.weight_version for g in kept for s in g.samples]
    metrics = {"async/dropped_groups": float(len(dropped)),
               "async/dropped_samples": float(sum(len(g.samples) for g in dropped)),
               "async/staleness_mean": sum(per_sample) / len(per_sample) if per_sample else 0.0,
               "async/staleness_max": float(max(per_sample, default=0))}
    return replace(batch, groups=kept), metrics


class RolloutsAhead:
    """Rank 0's rollouts, one step ahead: ``collect(step)`` runs in a worker thread.
    ``wait_before_update``: the engine takes weights only between rollouts."""

    def __init__(self, collect: Callable[[int], RolloutBatch], wait_before_update: bool):
        self.collect, self.wait_before_update = collect, wait_before_update
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rollout")
        self._step: int | None = None
        self._future: Future | None = None
        self._waited = 0.0

    def submit(self, step: int) -> None:
        """Start rollout ``step`` (one at a time)."""
        if self._future is not None:
            raise RuntimeError(f"rollout {self._step} is still in flight; take it first")
        self._step, self._future = step, self._pool.submit(self.collect, step)

    def take(self, step: int) -> RolloutBatch:
        """Rollout ``step``: the one in flight (waited for), or generated now when none is."""
        if self._future is None:
            self.submit(step)
        if self._step != step:
            raise RuntimeError(f"rollout {self._step} is in flight, step {step} asked for")
        future, self._step, self._future = self._future, None, None
        return self._wait(future)

    def before_update(self) -> None:
        """Called before each weight sync: waits for the rollout in flight if the engine needs."""
        if self.wait_before_update and self._future is not None:
            self._wait(self._future)

    def pop_wait(self) -> float:
        """Seconds the trainer waited for rollouts since the last call (``time/rollout_wait``:
        the part of the rollout that training did not hide)."""
        waited, self._waited = self._waited, 0.0
        return waited

    def _wait(self, future: Future) -> RolloutBatch:
        start = time.perf_counter()
        try:
            return future.result()
        finally:
            self._waited += time.perf_counter() - start

    def state_dict(self) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor]]:
        """The rollout in flight, finished (waited for): JSON-able data and the tensors it
        refers to (its routing, ``ROUTING``); (None, {}) if none."""
        if self._future is None:
            return None, {}
        data, routing = batch_to_dict(self._future.result())
        return {"step": self._step, "batch": data}, ({} if routing is None else {ROUTING: routing})

    def load_state_dict(self, state: dict[str, Any] | None, prompt_set: PromptSet,
                        tensors: dict[str, torch.Tensor]) -> None:
        """Put a recorded rollout back in flight (already finished)."""
        if state is None:
            return
        future: Future = Future()
        future.set_result(batch_from_dict(state["batch"], prompt_set, tensors.get(ROUTING)))
        self._step, self._future = state["step"], future

    def close(self) -> None:
        """Let a running rollout finish (it holds the engine), then stop the thread."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def batch_to_dict(batch: RolloutBatch) -> tuple[dict[str, Any], torch.Tensor | None]:
    """A RolloutBatch as plain data (every float a Python float: JSON round-trips it exactly);
    prompts by their index in the prompt set, the kept groups by position in ``all_groups``; and
    its samples' routing as one flat int16 tensor (None when no sample has any)."""
    position = {id(g): i for i, g in enumerate(batch.all_groups)}
    routed = [s.routing.to(torch.int16).reshape(-1) for g in batch.all_groups for s in g.samples
              if s.routing is not None]
    offsets = itertools.accumulate((r.numel() for r in routed), initial=0)
    data = {"all_groups": [{"index": g.index, "rewards": g.rewards, "scores": g.scores,
                            "samples": [_sample_to_dict(s, offsets) for s in g.samples]}
                           for g in batch.all_groups],
            "groups": [position[id(g)] for g in batch.groups],
            "generated_groups": batch.generated_groups, "passed_groups": batch.passed_groups,
            "rounds": batch.rounds, "times": batch.times, "engine_metrics": batch.engine_metrics}
    return data, torch.cat(routed) if routed else None


def batch_from_dict(data: dict[str, Any], prompt_set: PromptSet,
                    routing: torch.Tensor | None = None) -> RolloutBatch:
    """The inverse of ``batch_to_dict``."""
    every = [Group(prompt_set[g["index"]], [_sample_from_dict(s, routing) for s in g["samples"]],
                   g["rewards"], g["scores"], g["index"]) for g in data["all_groups"]]
    return RolloutBatch(groups=[every[i] for i in data["groups"]],
                        generated_groups=data["generated_groups"],
                        passed_groups=data["passed_groups"], rounds=data["rounds"],
                        all_groups=every, times=data["times"],
                        engine_metrics=data["engine_metrics"])


def _sample_to_dict(sample: Sample, offsets: Iterator[int]) -> dict[str, Any]:
    """A Sample as plain data; its routing as its shape and its offset in the flat tensor
    (the next of ``offsets``)."""
    data = asdict(replace(sample, routing=None))
    if sample.routing is not None:
        data["routing"] = {"shape": list(sample.routing.shape), "offset": next(offsets)}
    return data


def _sample_from_dict(data: dict[str, Any], routing: torch.Tensor | None) -> Sample:
    """The inverse of ``_sample_to_dict``, slicing its routing out of ``routing``."""
    where = data.get("routing")
    if where is not None:
        if routing is None or "offset" not in where:
            raise ValueError(f"the in-flight rollout's routing ({ROUTING}) is missing from the "
                             "checkpoint (saved by an earlier version?)")
        start = where["offset"]
        where = routing[start:start + math.prod(where["shape"])].clone().view(where["shape"])
    return Sample(**{**data, "routing": where})
