"""The train-versus-rollout log-prob gap (docs/numerics.md §7): how far the engine's log-probs of the
sampled tokens are from the trainer's for the same tokens at the same temperature."""

from __future__ import annotations

import torch

from megatron_archer.distributed import all_reduce_


def logprob_gap(
    rollout_logprobs: torch.Tensor, train_logprobs: torch.Tensor, mask: torch.Tensor, group=None
) -> dict[str, float]:
    """Mean and max |rollout - train| over the response tokens where ``mask`` is true, on every
    rank of ``group`` (each passes its own tokens; two all-reduces); None: this process only."""
    if rollout_logprobs.shape != train_logprobs.shape or mask.shape != train_logprobs.shape:
        raise ValueError(
            f"shapes differ: rollout_logprobs {list(rollout_logprobs.shape)}, train_logprobs "
            f"{list(train_logprobs.shape)}, mask {list(mask.shape)}"
        )
    mask = mask.bool()
    diff = (rollout_logprobs.double() - train_logprobs.double()).abs()[mask]
    sums = all_reduce_(torch.tensor([diff.sum().item(), diff.numel()], dtype=torch.float64), group)
    largest = all_reduce_(torch.tensor([diff.max().item() if diff.numel() else 0.0],
                                       dtype=torch.float64), group, op="max")
    total, count = sums.tolist()
    if count == 0:
        raise ValueError("mask selects no response token")
    return {
        "rollout/logprob_abs_diff_mean": total / count,
        "rollout/logprob_abs_diff_max": largest.item(),
    }
