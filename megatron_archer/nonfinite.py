"""Non-finite numbers in training: one error type that names the tensor it was found in.

The checks (``ops.softmax_stats.finalize`` for logits, ``algorithms.validation`` for every
per-token input of the objectives) raise ``NonFiniteError``; the actor catches it inside
megatron's schedule, so no rank is left alone in a collective, and turns it into a policy for
every rank at once (``train.on_nonfinite``: skip the update or stop with the tensor named).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

# the tensors a step can report as non-finite; anything else is reported as "other"
TENSORS = ("logits", "logp", "entropy", "old_logp", "old_entropy", "ref_logp", "rollout_logp",
           "advantages", "loss", "grad_norm", "other")


class NonFiniteError(ValueError):
    """``tensor`` held NaN or inf where a finite value was required."""

    def __init__(self, tensor: str, message: str):
        super().__init__(message)
        self.tensor = tensor if tensor in TENSORS else "other"


def first_ranks(found: Sequence[set[str]]) -> list[dict[str, int]]:
    """Per item (an update, a mini-batch), each tensor name some rank found non-finite -> the
    lowest global rank that found it. One all-reduce (MIN) over the whole job, so every rank
    gets the same answer and can act on it together."""
    world = dist.get_world_size()
    ranks = torch.tensor([[dist.get_rank() if name in names else world for name in TENSORS]
                          for names in found], dtype=torch.int64).view(len(found), len(TENSORS))
    dist.all_reduce(ranks, op=dist.ReduceOp.MIN)
    return [{name: int(r) for name, r in zip(TENSORS, row) if r < world} for row in ranks.tolist()]


def describe(nonfinite: dict[str, int]) -> str:
    """``first_ranks``' answer for one item as one line."""
    return ", ".join(f"{name} (first on global rank {rank})" for name, rank in nonfinite.items())
