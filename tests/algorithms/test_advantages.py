"""Advantages and DAPO reward machinery against direct float64 re-derivations (docs/numerics.md §2)."""

import numpy as np
import pytest
import torch

from megatron_archer.algorithms import (
    AdvantageConfig,
    dynamic_sampling_filter,
    group_advantages,
    overlong_penalty,
)


def _reference(rewards: np.ndarray, estimator: str, eps: float) -> np.ndarray:
    out = np.zeros_like(rewards)
    for g, row in enumerate(rewards):
        n = len(row)
        if np.all(row == row[0]):
            continue
        for i, r in enumerate(row):
            if estimator == "grpo":
                mean = sum(row) / n
                std = np.sqrt(sum((x - mean) ** 2 for x in row) / (n - 1))
                out[g, i] = (r - mean) / (std + eps)
            elif estimator == "dr_grpo":
                out[g, i] = r - sum(row) / n
            else:  # leave-one-out baseline
                out[g, i] = r - (sum(row) - r) / (n - 1)
    return out


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_advantages_match_float64_reference(estimator):
    gen = torch.Generator().manual_seed(1)
    rewards = torch.rand(7, 5, generator=gen, dtype=torch.float64)
    rewards[2] = 0.3  # all equal: zero advantage
    rewards[4] = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    cfg = AdvantageConfig(estimator=estimator, std_eps=1e-6)
    got = group_advantages(rewards, cfg)
    want = _reference(rewards.numpy(), estimator, 1e-6)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_all_equal_rewards_and_singletons_give_exact_zeros(estimator):
    rewards = torch.tensor([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0]])
    adv = group_advantages(rewards, AdvantageConfig(estimator=estimator))
    assert torch.equal(adv, torch.zeros_like(adv))
    single = group_advantages(torch.tensor([[0.7], [0.2]]), AdvantageConfig(estimator=estimator))
    assert torch.equal(single, torch.zeros(2, 1))


def test_dynamic_sampling_keeps_groups_with_signal_and_reports_keep_rate():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    result = dynamic_sampling_filter(rewards)
    assert result.keep.tolist() == [False, True, False, True]
    assert result.keep_rate == 0.5
    assert dynamic_sampling_filter(torch.ones(3, 4)).keep_rate == 0.0


def test_overlong_penalty_is_the_piecewise_formula():
    max_len, cache = 20, 8
    lengths = torch.arange(0, 30)
    got = overlong_penalty(lengths, max_len, cache)
    for length, value in zip(lengths.tolist(), got.tolist()):
        if length <= max_len - cache:
            want = 0.0
        elif length <= max_len:
            want = ((max_len - cache) - length) / cache
        else:
            want = -1.0
        assert value == pytest.approx(want, abs=1e-15)
    assert got[max_len].item() == -1.0  # continuous at L_max


def test_non_finite_rewards_raise():
    for bad in (float("nan"), float("inf")):
        rewards = torch.tensor([[0.0, bad]])
        with pytest.raises(ValueError, match="rewards"):
            group_advantages(rewards)
        with pytest.raises(ValueError, match="rewards"):
            dynamic_sampling_filter(rewards)
    with pytest.raises(ValueError, match="num_groups, group_size"):
        group_advantages(torch.zeros(4))
