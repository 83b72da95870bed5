"""Which part of the vocabulary this rank holds, and the input checks both log-prob ops share.

Megatron splits the (padded) vocabulary into equal contiguous slices, rank r holding ids
[r * V_local, (r + 1) * V_local). Ids at or past the true ``vocab_size`` are padding: they are
not tokens and never enter the softmax (docs/numerics.md §1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_archer import distributed

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice: global id of local column 0, columns held, columns that are real."""

    start: int
    local_size: int
    valid: int
    vocab_size: int

    def local_columns(self, labels: torch.Tensor) -> torch.Tensor:
        """Per label, its local column where its id falls in this slice, else -1. Elementwise:
        no host synchronisation (a boolean index or ``nonzero`` would wait for the GPU)."""
        owned = (labels >= self.start) & (labels < self.start + self.valid)
        return torch.where(owned, labels - self.start, -1)


def vocab_shard(local_size: int, group, vocab_size: int | None) -> VocabShard:
    """The slice of rank ``group.rank()``; ``vocab_size=None`` means no padding."""
    rank, size = distributed.rank_and_size(group)
    padded = local_size * size
    if vocab_size is None:
        vocab_size = padded
    if not 0 < vocab_size <= padded:
        raise ValueError(
            f"vocab_size={vocab_size} must be in [1, {padded}] (local vocab {local_size} x "
            f"tensor-parallel size {size})"
        )
    start = rank * local_size
    valid = min(max(vocab_size - start, 0), local_size)
    return VocabShard(start=start, local_size=local_size, valid=valid, vocab_size=vocab_size)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reductions run in fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_float(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be bf16, fp16, fp32 or fp64, got {tensor.dtype}")


def check_labels(
    labels: torch.Tensor, expected_shape: torch.Size, vocab_size: int, like: str = "logits"
) -> None:
    """Integer dtype, the leading shape of the tensor named ``like``, ids inside [0, vocab_size)."""
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of token ids, got {labels.dtype}")
    if labels.shape != expected_shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match {like}'s leading shape "
            f"{tuple(expected_shape)}"
        )
    bad = (labels < 0) | (labels >= vocab_size)
    if bad.any():
        first = bad.flatten().nonzero()[0].item()
        raise ValueError(
            f"labels: token id {labels.flatten()[first].item()} at flat index {first} is outside "
            f"the vocabulary [0, {vocab_size})"
        )


def check_options(temperature: float, chunk_size: int | None, name: str = "chunk_size") -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"{name} must be a positive int or None, got {chunk_size!r}")
