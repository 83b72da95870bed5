"""The train-versus-rollout log-prob gap (SPEC §7): how far the engine's log-probs of the
sampled tokens are from the trainer's for the same tokens at the same temperature."""

from __future__ import annotations

import torch


def logprob_gap(
    rollout_logprobs: torch.Tensor, train_logprobs: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """Mean and max |rollout - train| over the response tokens where ``mask`` is true."""
    if rollout_logprobs.shape != train_logprobs.shape or mask.shape != train_logprobs.shape:
        raise ValueError(
            f"shapes differ: rollout_logprobs {list(rollout_logprobs.shape)}, train_logprobs "
            f"{list(train_logprobs.shape)}, mask {list(mask.shape)}"
        )
    mask = mask.bool()
    if not mask.any():
        raise ValueError("mask selects no response token")
    diff = (rollout_logprobs.double() - train_logprobs.double()).abs()[mask]
    return {
        "rollout/logprob_abs_diff_mean": diff.mean().item(),
        "rollout/logprob_abs_diff_max": diff.max().item(),
    }
