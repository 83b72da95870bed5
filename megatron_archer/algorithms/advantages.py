"""Group-relative advantages and DAPO's reward machinery (docs/numerics.md §2).

Rewards are [num_groups, group_size]: row g holds the scalar rewards of the responses sampled for
prompt g. Advantages come back in the same layout, one per response; policy_loss broadcasts them
over the response's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_archer.algorithms.config import AdvantageConfig
from megatron_archer.algorithms.validation import require_finite


def _require_groups(rewards: torch.Tensor) -> torch.Tensor:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, group_size]; got shape {tuple(rewards.shape)}")
    require_finite("rewards", rewards)
    return rewards.to(torch.promote_types(rewards.dtype, torch.float32))


def groups_with_signal(rewards: torch.Tensor) -> torch.Tensor:
    """Bool [num_groups]: groups whose rewards are not all equal (a group of one never has signal)."""
    rewards = _require_groups(rewards)
    return rewards.amax(dim=1) != rewards.amin(dim=1)


def group_advantages(rewards: torch.Tensor, config: AdvantageConfig = AdvantageConfig()) -> torch.Tensor:
    """Advantages [num_groups, group_size] of ``config.estimator``:

    - ``grpo``: (R - mean) / (std + std_eps), std with Bessel's correction (as verl);
    - ``dr_grpo``: R - mean (no std);
    - ``rloo``: R minus the mean of the group's other rewards = G / (G - 1) * (R - mean).

    A group whose rewards are all equal (including a group of one) gets exactly 0, never NaN.
    """
    rewards = _require_groups(rewards)
    size = rewards.shape[1]
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if config.estimator == "grpo":
        std = rewards.std(dim=1, keepdim=True) if size > 1 else torch.zeros_like(centred)
        advantages = centred / (std + config.std_eps)
    elif config.estimator == "dr_grpo":
        advantages = centred
    else:
        advantages = centred * (size / (size - 1)) if size > 1 else torch.zeros_like(centred)
    return torch.where(groups_with_signal(rewards)[:, None], advantages, torch.zeros_like(advantages))


@dataclass(frozen=True)
class DynamicSamplingResult:
    """Which groups DAPO's dynamic sampling keeps, and the kept share (logged as the keep rate)."""

    keep: torch.Tensor
    keep_rate: float


def dynamic_sampling_filter(rewards: torch.Tensor) -> DynamicSamplingResult:
    """DAPO dynamic sampling: drop the groups whose rewards are all equal (no gradient signal)."""
    keep = groups_with_signal(rewards)
    return DynamicSamplingResult(keep=keep, keep_rate=keep.float().mean().item() if keep.numel() else 0.0)


def overlong_penalty(lengths: torch.Tensor, max_length: int, cache_length: int) -> torch.Tensor:
    """DAPO soft overlong penalty added to the reward, per response length |y| (docs/numerics.md §2):
    0 if |y| <= L_max - L_c; ((L_max - L_c) - |y|) / L_c up to L_max; -1 beyond."""
    if not 0 < cache_length <= max_length:
        raise ValueError(f"need 0 < cache_length <= max_length; got {cache_length}, {max_length}")
    lengths = lengths.to(torch.float64)
    require_finite("lengths", lengths)
    start = max_length - cache_length
    ramp = (start - lengths) / cache_length
    penalty = torch.where(lengths <= start, torch.zeros_like(ramp), ramp)
    return torch.where(lengths > max_length, torch.full_like(ramp, -1.0), penalty)
