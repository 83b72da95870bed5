"""The entropy statistics both papers report (docs/numerics.md §6), as pure functions of per-token arrays.

Inputs are 1-D float arrays of token entropies (nats), the tokens of all responses concatenated;
two arrays compared position by position hold two checkpoints' entropies of the same tokens. No
model is needed, so every number here is testable against a direct computation.

Conventions: percentiles are nearest-rank (``algorithms.metrics.entropy_summary``, the training
metric, compared in float32: float32(0.01) itself is not below 0.01); the top-rho set is exactly
k = ceil(rho n) positions (``order_stats.top_count``), ties at the cut to the earlier position, as
the forking-token selection of a micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from megatron_archer.algorithms.metrics import entropy_summary
from megatron_archer.algorithms.order_stats import top_count

PERCENTILES = (0.5, 0.8, 0.9, 0.95, 0.99)


def distribution_summary(entropy: np.ndarray, percentiles: Sequence[float] = PERCENTILES) -> dict:
    """Token count, mean, share below 0.01 (about 50% for Qwen3-8B), share above the 80th
    percentile and the nearest-rank percentiles (p80 = 0.672 there), keyed ``p50``, ``p80``, ...

    An empty input gives only ``count`` = 0.
    """
    values = torch.as_tensor(np.asarray(entropy, dtype=np.float32))
    summary = entropy_summary([(values, torch.ones_like(values, dtype=torch.bool))],
                              percentiles=percentiles)
    result = {"count": int(values.numel())}
    result.update({key.removeprefix("entropy/"): value for key, value in summary.items()})
    return result


@dataclass(frozen=True)
class TokenStat:
    """One vocabulary entry's occurrences among the response tokens and their mean entropy."""

    token_id: int
    count: int
    mean_entropy: float


def token_entropy_table(token_ids: np.ndarray, entropy: np.ndarray, min_count: int = 100,
                        top: int = 20) -> tuple[list[TokenStat], list[TokenStat]]:
    """The ``top`` highest- and lowest-mean-entropy token ids among those seen at least
    ``min_count`` times (docs/numerics.md §6: forks are words like "wait", "however", "thus").

    Highest first in the first list, lowest first in the second; ties in the mean go to the
    smaller token id. Means are float64 over the float32 entropies.
    """
    token_ids = np.asarray(token_ids, dtype=np.int64)
    entropy = np.asarray(entropy, dtype=np.float64)
    if token_ids.shape != entropy.shape:
        raise ValueError(f"token_ids {token_ids.shape} and entropy {entropy.shape} differ in shape")
    if len(token_ids) == 0:
        return [], []
    counts = np.bincount(token_ids)
    sums = np.bincount(token_ids, weights=entropy)
    frequent = np.flatnonzero(counts >= max(min_count, 1))
    means = sums[frequent] / counts[frequent]
    stats = [TokenStat(int(t), int(counts[t]), float(m)) for t, m in zip(frequent, means)]
    highest = sorted(stats, key=lambda s: (-s.mean_entropy, s.token_id))[:top]
    lowest = sorted(stats, key=lambda s: (s.mean_entropy, s.token_id))[:top]
    return highest, lowest


def _descending_order(entropy: np.ndarray) -> np.ndarray:
    """Positions by entropy, highest first, ties to the earlier position."""
    return np.argsort(-np.asarray(entropy, dtype=np.float64), kind="stable")


def top_positions(entropy: np.ndarray, rho: float = 0.2) -> np.ndarray:
    """Bool mask of the k = ceil(rho n) highest-entropy positions."""
    chosen = np.zeros(len(entropy), dtype=bool)
    chosen[_descending_order(entropy)[: top_count(rho, len(entropy))]] = True
    return chosen


def top_overlap(before: np.ndarray, after: np.ndarray, rho: float = 0.2) -> float:
    """Share of ``before``'s top-rho entropy positions that are also ``after``'s (both sets hold
    k positions, so the share is symmetric): RLVR keeps > 86% against its base model (docs/numerics.md §6)."""
    if len(before) != len(after):
        raise ValueError(f"entropy arrays differ in length: {len(before)} and {len(after)}")
    if len(before) == 0:
        return float("nan")
    a, b = top_positions(before, rho), top_positions(after, rho)
    return float((a & b).sum() / a.sum())


def percentile_bins(entropy: np.ndarray, num_bins: int = 20) -> np.ndarray:
    """Each position's entropy-percentile bin, 0 (lowest 100/num_bins %) .. num_bins - 1 (highest):
    the position of ascending rank r of n (ties: the earlier position ranks lower) goes to
    floor(r num_bins / n), so the bins hold equal counts (within one)."""
    n = len(entropy)
    ranks = np.empty(n, dtype=np.int64)
    ranks[np.argsort(np.asarray(entropy, dtype=np.float64), kind="stable")] = np.arange(n)
    return ranks * num_bins // max(n, 1)


def binned_change(before: np.ndarray, after: np.ndarray, num_bins: int = 20) -> np.ndarray:
    """[num_bins] mean of ``after - before`` over the positions of each of ``before``'s entropy
    percentile bins (5% bins by default, docs/numerics.md §6); NaN for a bin without positions."""
    if len(before) != len(after):
        raise ValueError(f"entropy arrays differ in length: {len(before)} and {len(after)}")
    bins = percentile_bins(before, num_bins)
    change = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    counts = np.bincount(bins, minlength=num_bins)
    sums = np.bincount(bins, weights=change, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
