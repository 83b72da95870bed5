"""The rollout phase's DAPO dynamic sampling (docs/numerics.md §2): groups are filtered on the verifier's
rewards, not on the shaped score, and the keep rate is the share of generated groups that
passed the filter. A scripted engine and scorer, no model."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from megatron_archer.algorithms import DynamicSamplingConfig, OverlongConfig, preset
from megatron_archer.rewards import RewardResult
from megatron_archer.rollout import Sample, SamplingParams
from megatron_archer.trainer.rollout_phase import collect_rollouts


class ScriptedEngine:
    """Generation round r returns ``rounds[r]``: per prompt, the responses as (correct, length)."""

    weight_version = None  # the launch weights (RolloutEngine.weight_version)

    def __init__(self, rounds):
        self.rounds = list(rounds)

    def generate(self, prompts, params):
        groups = self.rounds.pop(0)
        assert len(groups) == len(prompts)
        return [[Sample(token_ids=[1 + correct] * length, logprobs=[-0.5] * length,
                        finish_reason="stop") for correct, length in group] for group in groups]

    def take_metrics(self):
        return {}


class CorrectIfTwos:
    """Reward 1 for a response of token 2 (the engine's 'correct' ones), else 0."""

    def score(self, prompts, responses):
        return [RewardResult(float(ids[0] == 2), "scripted") for ids in responses]


class Sampler:
    def __init__(self, batch_size):
        self.batch_size = batch_size

    def next_batch(self):
        return list(range(self.batch_size))


PROMPTS = [SimpleNamespace(input_ids=(5, 6, 7)) for _ in range(4)]


def _collect(rounds, algorithm, target):
    return collect_rollouts(ScriptedEngine(rounds), PROMPTS, Sampler(target),
                            SamplingParams(n=2, max_new_tokens=12), CorrectIfTwos(), algorithm,
                            step=1, show_progress=False)


def test_dapo_drops_an_all_wrong_group_whose_lengths_differ():
    algorithm = replace(preset("dapo"), dynamic_sampling=DynamicSamplingConfig(True, 1),
                        overlong=OverlongConfig(True, max_length=12, cache_length=8))
    # group 0: both wrong, lengths 2 and 10 (shaped scores 0 and -0.75 differ); group 1: mixed
    batch = _collect([[[(0, 2), (0, 10)], [(1, 3), (0, 3)]]], algorithm, target=2)
    assert [g.rewards for g in batch.groups] == [[1.0, 0.0]]
    assert batch.groups[0].scores == [1.0, 0.0]
    dropped = batch.all_groups[0]
    assert dropped.rewards == [0.0, 0.0] and dropped.scores[0] != dropped.scores[1]
    metrics = batch.metrics()
    assert metrics["dynamic_sampling/keep_rate"] == 0.5
    assert metrics["dynamic_sampling/groups"] == 1 and metrics["dynamic_sampling/rounds"] == 1


def test_an_all_right_group_is_dropped_too():
    archer = replace(preset("archer"), dynamic_sampling=DynamicSamplingConfig(True, 1))
    batch = _collect([[[(1, 2), (1, 7)], [(1, 3), (0, 3)]]], archer, target=2)
    assert [g.rewards for g in batch.groups] == [[1.0, 0.0]]


def test_keep_rate_is_the_share_of_generated_groups_that_passed():
    signal, flat = [(1, 2), (0, 2)], [(0, 2), (0, 2)]
    # round 1: 1 of 4 groups passes; round 2: all 4 pass; the step uses 4 of the 5 that passed
    batch = _collect([[signal, flat, flat, flat], [signal] * 4], preset("archer"), target=4)
    metrics = batch.metrics()
    assert batch.generated_groups == 8 and batch.passed_groups == 5
    assert metrics["dynamic_sampling/keep_rate"] == pytest.approx(5 / 8)
    assert metrics["dynamic_sampling/groups"] == 4
    assert metrics["dynamic_sampling/rounds"] == 2


def test_without_dynamic_sampling_every_group_is_kept():
    flat = [(0, 2), (0, 5)]
    batch = _collect([[flat, flat]], preset("grpo"), target=2)
    assert len(batch.groups) == 2 and batch.metrics()["dynamic_sampling/keep_rate"] == 1.0
