"""The rollout phase of a step, on global rank 0: prompts -> n responses each -> rewards, with
DAPO dynamic sampling (docs/numerics.md §2).

Round r draws ``prompts_per_step`` prompts, the engine generates ``n`` responses for each, the
rewards are scored (plus the overlong penalty when ``algorithm.overlong`` is on: the *score*
that advantages use) and, with dynamic sampling, groups whose verifier rewards are all equal
(all right or all wrong, judged before any shaping: docs/numerics.md §2) are dropped. Rounds continue until
``prompts_per_step`` groups passed or ``max_gen_rounds`` rounds ran; the batch keeps at most
``prompts_per_step`` groups, possibly fewer (none: the step is skipped).

Every sample carries the weight version it was generated with: the engine's own tag where it
gives one (SGLang's per-request version spans), else the engine's ``weight_version`` when its
generation round started (0 for the launch weights, which are the initial policy).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from megatron_archer.algorithms import AlgorithmConfig, dynamic_sampling_filter, overlong_penalty
from megatron_archer.data import Prompt, PromptSampler, PromptSet
from megatron_archer.rollout import RolloutEngine, Sample, SamplingParams
from megatron_archer.trainer.progress import progress
from megatron_archer.trainer.repetition import repetition_ratio
from megatron_archer.trainer.reward_scoring import RewardScorer


class RolloutError(RuntimeError):
    """The rollout engine failed; the message names the engine and the step."""


@dataclass
class Group:
    """One prompt (``index``: its position in the prompt set) and its responses: raw rewards
    and the scores advantages use."""

    prompt: Prompt
    samples: list[Sample]
    rewards: list[float]
    scores: list[float]
    index: int | None = None


@dataclass
class RolloutBatch:
    """The groups a step trains on and how they were obtained."""

    groups: list[Group]
    generated_groups: int
    passed_groups: int  # generated groups that passed the dynamic-sampling filter
    rounds: int
    all_groups: list[Group] = field(default_factory=list)  # every generated group, for metrics
    times: dict[str, float] = field(default_factory=dict)
    engine_metrics: dict[str, float] = field(default_factory=dict)  # RolloutEngine.take_metrics

    def metrics(self) -> dict[str, float]:
        """docs/numerics.md §7 rollout metrics over every generated response (kept or not): reward mean and
        accuracy (share of raw rewards > 0), lengths (mean, max, share cut at the length limit),
        repetition ratio; dynamic sampling: the keep rate is the share of generated groups that
        passed the filter (docs/numerics.md §2), ``groups`` how many the step trains on (at most
        ``prompts_per_step``), ``rounds`` the generation rounds run; the engine's counters
        (``rollout/server_restarts``, ``rollout/requests_retried``) when it has any."""
        samples = [s for g in self.all_groups for s in g.samples]
        rewards = [r for g in self.all_groups for r in g.rewards]
        scores = [r for g in self.all_groups for r in g.scores]
        lengths = [len(s.token_ids) for s in samples]
        return {
            "reward/mean": sum(rewards) / len(rewards),
            "reward/accuracy": sum(r > 0 for r in rewards) / len(rewards),
            "reward/score_mean": sum(scores) / len(scores),
            "response/length_mean": sum(lengths) / len(lengths),
            "response/length_max": float(max(lengths)),
            "response/clipped_share": sum(s.finish_reason == "length" for s in samples)
            / len(samples),
            "response/repetition_ratio": repetition_ratio([s.token_ids for s in samples]),
            "dynamic_sampling/keep_rate": self.passed_groups / self.generated_groups,
            "dynamic_sampling/rounds": float(self.rounds),
            "dynamic_sampling/groups": float(len(self.groups)),
            "time/rollout": self.times["rollout"],
            "time/reward": self.times["reward"],
            **self.engine_metrics,
        }


def collect_rollouts(engine: RolloutEngine, prompt_set: PromptSet, sampler: PromptSampler,
                     params: SamplingParams, scorer: RewardScorer, algorithm: AlgorithmConfig,
                     step: int, show_progress: bool) -> RolloutBatch:
    """Generate, score and filter until the step's groups are there (module docstring)."""
    target = sampler.batch_size
    dynamic = algorithm.dynamic_sampling
    max_rounds = dynamic.max_gen_rounds if dynamic.enabled else 1
    passed: list[Group] = []
    generated: list[Group] = []
    times = {"rollout": 0.0, "reward": 0.0}
    rounds = 0
    bar = progress(range(max_rounds), show_progress, desc=f"step {step} rollout", unit="round")
    for rounds in (r + 1 for r in bar):
        indices = sampler.next_batch()
        prompts = [prompt_set[i] for i in indices]
        start = time.perf_counter()
        seeded = params if params.seed is None else _reseed(params, step, rounds)
        version = engine.weight_version or 0
        try:
            samples = _tagged(engine.generate([list(p.input_ids) for p in prompts], seeded),
                              version)
        except Exception as error:
            raise RolloutError(f"rollout engine {type(engine).__name__} failed at step {step}, "
                               f"generation round {rounds}: {type(error).__name__}: {error}"
                               ) from error
        times["rollout"] += time.perf_counter() - start
        start = time.perf_counter()
        groups = _score(prompts, indices, samples, scorer, algorithm)
        times["reward"] += time.perf_counter() - start
        generated.extend(groups)
        if dynamic.enabled:  # on correctness, not on the shaped score (docs/numerics.md §2)
            keep = dynamic_sampling_filter(torch.tensor([g.rewards for g in groups])).keep.tolist()
            groups = [g for g, k in zip(groups, keep) if k]
        passed.extend(groups)
        if len(passed) >= target:
            break
    return RolloutBatch(groups=passed[:target], generated_groups=len(generated),
                        passed_groups=len(passed), rounds=rounds, all_groups=generated,
                        times=times, engine_metrics=engine.take_metrics())


def _reseed(params: SamplingParams, step: int, round_: int) -> SamplingParams:
    """A distinct, reproducible seed per (step, round) from the configured one."""
    return replace(params, seed=params.seed + 1000 * step + round_)


def _tagged(samples: list[list[Sample]], version: int) -> list[list[Sample]]:
    """Samples without the engine's own version tag get ``version``."""
    return [[s if s.weight_version is not None else replace(s, weight_version=version)
             for s in group] for group in samples]


def _score(prompts, indices, samples, scorer: RewardScorer, algorithm: AlgorithmConfig
           ) -> list[Group]:
    flat_prompts = [p for p, group in zip(prompts, samples) for _ in group]
    results = scorer.score(flat_prompts, [s.token_ids for group in samples for s in group])
    rewards = torch.tensor([r.value for r in results], dtype=torch.float64)
    scores = rewards
    overlong = algorithm.overlong
    if overlong.enabled:
        lengths = torch.tensor([len(s.token_ids) for group in samples for s in group])
        scores = rewards + overlong_penalty(lengths, overlong.max_length, overlong.cache_length)
    groups, offset = [], 0
    for prompt, index, group in zip(prompts, indices, samples):
        end = offset + len(group)
        groups.append(Group(prompt, list(group), rewards[offset:end].tolist(),
                            scores[offset:end].tolist(), int(index)))
        offset = end
    return groups
