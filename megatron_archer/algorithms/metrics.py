"""Step metrics the objective produces (docs/numerics.md §7), exact over micro-batches and data-parallel ranks.

Loss metrics are additive sums per micro-batch (``loss_metric_sums``), summed over the step's
micro-batches and all-reduced once (``reduce_loss_metrics``), so every share and mean is over all
tokens of the step, never a mean of per-micro-batch means. Entropy percentiles
(``entropy_summary``) are exact global order statistics (order_stats.kth_largest), in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_archer.algorithms.order_stats import kth_largest, top_count
from megatron_archer.algorithms.policy_loss import LossTerms
from megatron_archer.algorithms.token_selection import TokenSelection
from megatron_archer.distributed import all_reduce_

CLASSES = ("low", "high")  # token_class 0 and 1: knowledge / other, reasoning / forking
LOW_ENTROPY = 0.01  # the papers' "near-deterministic" entropy level (docs/numerics.md §6)


def loss_metric_sums(terms: LossTerms, selection: TokenSelection) -> dict[str, torch.Tensor]:
    """Per-class float64 sums of one micro-batch: tokens, active clips, ratio and KL."""
    sums = {}
    for class_id, name in enumerate(CLASSES):
        members = selection.token_class == class_id
        sums[f"{name}/tokens"] = members.sum()
        sums[f"{name}/clip_low"] = (terms.clipped_low & members).sum()
        sums[f"{name}/clip_high"] = (terms.clipped_high & members).sum()
        sums[f"{name}/dual_clip"] = (terms.dual_clipped & members).sum()
        sums[f"{name}/ratio"] = terms.ratio[members].sum()
        if terms.kl is not None:
            sums[f"{name}/kl"] = terms.kl[members].sum()
    return {key: value.detach().to(torch.float64) for key, value in sums.items()}


def reduce_loss_metrics(sums: Sequence[dict[str, torch.Tensor]], group=None) -> dict[str, float]:
    """Step metrics from every micro-batch's ``loss_metric_sums``, for ``all`` tokens and per class.

    ``<scope>/token_share``, ``clip_frac_low``, ``clip_frac_high``, ``dual_clip_frac``,
    ``ratio_mean``, ``kl_mean`` (with KL) and ``rollout_is_mean``, ``rollout_is_corrected_frac``
    (with the mismatch correction's sums); a class without tokens reports only its share.
    One all-reduce; every rank must pass sums with the same keys.
    """
    keys = sorted(sums[0])
    # a CPU control tensor whatever the sums' device (distributed.py's device rule)
    totals = all_reduce_(torch.stack([sum(s[key] for s in sums) for key in keys]).cpu(), group)
    total = dict(zip(keys, totals.tolist()))
    for field in ("tokens", "clip_low", "clip_high", "dual_clip", "ratio", "kl", "rollout_is",
                  "rollout_is_corrected"):
        if f"low/{field}" in total:
            total[f"all/{field}"] = total[f"low/{field}"] + total[f"high/{field}"]
    metrics = {}
    for scope in ("all", *CLASSES):
        tokens = total[f"{scope}/tokens"]
        metrics[f"{scope}/token_share"] = tokens / total["all/tokens"] if total["all/tokens"] else 0.0
        if tokens == 0:
            continue
        metrics[f"{scope}/clip_frac_low"] = total[f"{scope}/clip_low"] / tokens
        metrics[f"{scope}/clip_frac_high"] = total[f"{scope}/clip_high"] / tokens
        metrics[f"{scope}/dual_clip_frac"] = total[f"{scope}/dual_clip"] / tokens
        metrics[f"{scope}/ratio_mean"] = total[f"{scope}/ratio"] / tokens
        if f"{scope}/kl" in total:
            metrics[f"{scope}/kl_mean"] = total[f"{scope}/kl"] / tokens
        if f"{scope}/rollout_is" in total:  # rollout_correction.correction_metric_sums (docs/numerics.md §8)
            metrics[f"{scope}/rollout_is_mean"] = total[f"{scope}/rollout_is"] / tokens
            metrics[f"{scope}/rollout_is_corrected_frac"] = (
                total[f"{scope}/rollout_is_corrected"] / tokens)
    return metrics


def entropy_summary(
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    group=None,
    percentiles: Sequence[float] = (0.5, 0.8, 0.9, 0.99),
) -> dict[str, float]:
    """Entropy mean, percentiles, share below 0.01 and share above the 80th percentile (docs/numerics.md §6, 7).

    ``micro_batches`` are this rank's ``(entropy, response_mask)`` pairs. The p-th percentile is
    the nearest-rank one: the smallest value with at least ceil(p N) of the N values at or below
    it. Empty on a step without valid tokens.
    """
    if any(not 0.0 < p <= 1.0 for p in percentiles):
        raise ValueError(f"percentiles must be in (0, 1]; got {tuple(percentiles)}")
    values = [entropy.detach()[mask].to(torch.float32) for entropy, mask in micro_batches]
    local = torch.zeros(3, dtype=torch.float64)
    for v in values:
        local += torch.tensor([v.numel(), v.double().sum().item(), (v < LOW_ENTROPY).sum().item()],
                              dtype=torch.float64)
    count, total, below = all_reduce_(local, group).tolist()
    if count == 0:
        return {}
    n = int(count)
    wanted = sorted(set(percentiles) | {0.8})
    levels = kth_largest(values, [n - top_count(p, n) + 1 for p in wanted], group)
    by_percentile = dict(zip(wanted, levels))
    above = torch.tensor([sum(int((v > by_percentile[0.8]).sum()) for v in values)], dtype=torch.float64)
    summary = {
        "entropy/mean": total / count,
        "entropy/share_below_0.01": below / count,
        "entropy/share_above_p80": all_reduce_(above, group).item() / count,
    }
    summary.update({f"entropy/p{100 * p:g}": by_percentile[p] for p in percentiles})
    return summary
