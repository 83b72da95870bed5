"""Train-inference mismatch correction (docs/numerics.md §8): importance weights of the old policy against the
rollout engine's distribution, truncated or masked, and their metrics.

The engine samples y_t from pi_rollout (its kernels, its precision, possibly FP8 weights); the
loss treats them as samples of pi_old, Megatron's forward with the same weights. With
log w_t = clamp(logp_old_t - logp_rollout_t, -20, 20) (the clamp of docs/numerics.md §3's log-ratio):

- ``level="token"``: w_t per token;
- ``level="sequence"``: one w_i per response from its valid tokens, exp(mean_t log w_t)
  (``geometric_mean``) or exp(clamp(sum_t log w_t, -20, 20)) (``product``), on all its tokens;
- ``mode="truncate"``: the policy term L_t is multiplied by min(w, C), detached;
- ``mode="mask"``: by 1[1/C <= w <= C]; the masked tokens stay in the loss normalisers, or
  with ``mask_normalizer="drop"`` leave the step (``loss_tokens``: the caller builds the step
  context and the loss on that mask).

Per-token [B, T] layout with a bool response mask, as policy_loss; values outside the mask are
ignored. Every response lies whole in one micro-batch, so the per-response weights, and with them
the step loss, do not depend on how the step is split.

Asynchronous training (``rollout.async``): a sample comes from an older weight version; its
engine log-probs are that version's, pi_old is the trainer's weights at the start of the step,
so w also holds the staleness (``trainer.async_rollout``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_archer.algorithms.config import RolloutCorrectionConfig
from megatron_archer.algorithms.order_stats import kth_largest, top_count
from megatron_archer.algorithms.policy_loss import LOG_RATIO_BOUND
from megatron_archer.algorithms.sharded_rows import check_together, sharded_row_sums
from megatron_archer.algorithms.token_selection import TokenSelection
from megatron_archer.algorithms.validation import require_response_mask, require_token_tensor
from megatron_archer.distributed import all_reduce_

CLASSES = ("low", "high")  # as metrics.CLASSES: token_class 0 and 1


@dataclass(frozen=True)
class RolloutCorrection:
    """Detached per-token [B, T] results, 0 (False) outside the response mask.

    ``weight``: the factor on each token's policy term (min(w, C), or the 0/1 mask);
    ``ratio``: w at the configured level (a response's w_i on each of its tokens);
    ``corrected``: tokens whose weight differs from w, truncated (w > C) or masked.
    """

    weight: torch.Tensor
    ratio: torch.Tensor
    corrected: torch.Tensor


def log_importance_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor,
                           response_mask: torch.Tensor, config: RolloutCorrectionConfig,
                           cp_group=None) -> torch.Tensor:
    """float [B, T] log w at the configured level (module docstring), 0 outside the mask.

    ``cp_group``: the context-parallel group holding disjoint tokens of these responses (docs/numerics.md §9);
    a sequence-level w_i is then over all of response i's tokens.
    """
    def check() -> None:
        require_response_mask(response_mask)
        require_token_tensor("old_logp", old_logp, response_mask)
        require_token_tensor("rollout_logp", rollout_logp, response_mask)

    row_group = cp_group if config.level == "sequence" else None
    check_together(check, row_group)  # every CP rank raises together before the row sums
    dtype = torch.promote_types(old_logp.dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype)
    log_w = torch.where(response_mask, old_logp.detach().to(dtype) - rollout_logp.detach().to(dtype),
                        zero).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    if config.level == "token":
        return log_w
    total = sharded_row_sums(log_w, row_group)
    if config.sequence_ratio == "geometric_mean":
        per_response = total / sharded_row_sums(response_mask.to(dtype), row_group).clamp_min(1)
    else:
        per_response = total.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    return torch.where(response_mask, per_response[:, None].expand(response_mask.shape), zero)


def rollout_correction(old_logp: torch.Tensor, rollout_logp: torch.Tensor,
                       response_mask: torch.Tensor, config: RolloutCorrectionConfig,
                       cp_group=None) -> RolloutCorrection:
    """The correction weights of one micro-batch (module docstring); ``config.enabled`` is not
    consulted: the caller decides whether to correct. ``cp_group``: as ``log_importance_weights``."""
    log_w = log_importance_weights(old_logp, rollout_logp, response_mask, config, cp_group)
    ratio = torch.exp(log_w) * response_mask
    threshold = config.threshold
    if config.mode == "truncate":
        corrected = response_mask & (ratio > threshold)
        weight = torch.clamp(ratio, max=threshold)
    else:
        corrected = response_mask & ((ratio < 1.0 / threshold) | (ratio > threshold))
        weight = (response_mask & ~corrected).to(ratio.dtype)
    return RolloutCorrection(weight=weight, ratio=ratio, corrected=corrected)


def drops_tokens(config: RolloutCorrectionConfig) -> bool:
    """Masked tokens leave the step (``mask_normalizer="drop"``, the correction on)."""
    return config.enabled and config.mode == "mask" and config.mask_normalizer == "drop"


def loss_tokens(old_logp: torch.Tensor, rollout_logp: torch.Tensor, response_mask: torch.Tensor,
                config: RolloutCorrectionConfig, cp_group=None) -> torch.Tensor:
    """bool [B, T]: the tokens that enter the loss and every normaliser of the step: the response
    mask, less the masked ones when ``drops_tokens(config)``. The step context and the loss must
    both be built on it (the normalisers then count the kept tokens only)."""
    if not drops_tokens(config):
        return response_mask
    return response_mask & ~rollout_correction(old_logp, rollout_logp, response_mask, config,
                                               cp_group).corrected


def correction_metric_sums(correction: RolloutCorrection, selection: TokenSelection
                           ) -> dict[str, torch.Tensor]:
    """Per-class float64 sums of one micro-batch (added to ``loss_metric_sums``' dict): the
    weights w and the corrected tokens; ``metrics.reduce_loss_metrics`` turns them into
    ``<scope>/rollout_is_mean`` and ``<scope>/rollout_is_corrected_frac``. Under
    ``mask_normalizer="drop"`` the dropped tokens belong to no class: these then describe the kept
    tokens, and ``rollout_correction_summary``'s corrected share is the dropped share."""
    sums = {}
    for class_id, name in enumerate(CLASSES):
        members = selection.token_class == class_id
        sums[f"{name}/rollout_is"] = correction.ratio[members].sum()
        sums[f"{name}/rollout_is_corrected"] = (correction.corrected & members).sum()
    return {key: value.detach().to(torch.float64) for key, value in sums.items()}


def rollout_correction_summary(micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                               config: RolloutCorrectionConfig, group=None, cp_group=None
                               ) -> dict[str, float]:
    """Step metrics of w over all response tokens on all data-parallel ranks: mean, max, p99
    (nearest rank, float32, order_stats.kth_largest) and the corrected share.

    ``micro_batches``: this rank's ``(old_logp, rollout_logp, response_mask)``. Empty without
    valid tokens. Under context parallelism ``group`` is the DP x CP group and ``cp_group`` the
    context-parallel one (as ``step_context.build_step_context``).
    """
    ratios, corrected = [], 0
    for old_logp, rollout_logp, mask in micro_batches:
        correction = rollout_correction(old_logp, rollout_logp, mask, config, cp_group)
        ratios.append(correction.ratio[mask].to(torch.float32))
        corrected += int(correction.corrected.sum())
    local = torch.tensor([sum(r.numel() for r in ratios), sum(r.double().sum().item() for r in ratios),
                          corrected], dtype=torch.float64)
    count, total, corrected = all_reduce_(local, group).tolist()
    if count == 0:
        return {}
    n = int(count)
    largest, p99 = kth_largest(ratios, [1, n - top_count(0.99, n) + 1], group)
    return {"rollout_is/mean": total / count, "rollout_is/max": largest, "rollout_is/p99": p99,
            "rollout_is/corrected_share": corrected / count}
