"""Which tokens carry policy gradient, and under which clip range and KL coefficient (docs/numerics.md §4, 5).

Inputs are [B, T] tensors: a detached per-token entropy (the one ``SelectionConfig.entropy_source``
names) and the bool response mask. Every method maps entropy to two per-token quantities:

- ``pg_weight``: how much of the token's policy-gradient term enters the loss;
- ``high_share``: membership in the high-entropy class (1: reasoning / forking, 0: knowledge /
  other), which interpolates the per-class constraints ``low + high_share * (high - low)``.

Methods:

- ``none``: every valid token, weight 1, class "low", constraints ``LossConfig.clip``.
- ``forking``, scope ``global``: the class is ``H >= tau`` in float32 with tau the step's global
  k-th largest entropy, k = ceil(rho N) (``StepContext.forking_threshold``); tokens tied with tau
  are all selected (the paper's indicator 1[H >= tau]).
- ``forking``, scope ``micro_batch``: exactly k = ceil(rho n) tokens of the micro-batch's n valid
  tokens, as torch.topk in the authors' code; ties at the cut go to the earlier position.
  ``keep="bottom"`` gives the gradient to the other tokens instead (the paper's ablation).
- ``archer``: H > q_i, q_i the per-response ``quantile`` (linear interpolation); all tokens weight 1.
- ``archer_soft``: high_share = clamp((u - quantile) / soft_width + 1/2, 0, 1), u the token's
  mid-rank fraction of entropy within its response; all tokens weight 1.
- ``clip_cov`` / ``kl_cov`` select by the covariance of log-prob and advantage instead of
  entropy (``covariance.covariance_selection``, docs/numerics.md §10): class "high" is the tokens
  Clip-Cov takes out of the policy gradient (weight 0) or KL-Cov penalises with
  ``kl_cov.coef`` * |logp - logp_old| (``abs_kl_coef``; weight 1).

Under context parallelism (``cp_group``) a response's tokens are spread over the CP ranks; the
per-response statistics and a micro-batch's top-k are exact over all of them (docs/numerics.md §9).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_archer.algorithms.config import (
    COVARIANCE_METHODS,
    Constraints,
    LossConfig,
    SelectionConfig,
)
from megatron_archer.algorithms.covariance import (
    CovarianceStats,
    CovarianceTokens,
    covariance_selection,
)
from megatron_archer.algorithms.order_stats import row_rank_fraction, top_count
from megatron_archer.algorithms.sharded_rows import check_together, sharded_row_quantile, sharded_rows
from megatron_archer.algorithms.validation import require_response_mask, require_token_tensor


@dataclass(frozen=True)
class TokenSelection:
    """Per-token [B, T] outputs of the selection; every tensor is 0 outside the response mask.

    ``token_class`` is 1 (high entropy), 0 (low) or -1 (not a response token), for metrics.
    ``class_kl_coef`` is (low, high), for the class-mean KL. ``normalize_by_selected`` divides the
    policy-gradient sum by the selected rather than all tokens (forking's ``normalizer``).
    ``abs_kl_coef``: KL-Cov's per-token coefficient of |logp - logp_old| (None for the others).
    """

    pg_weight: torch.Tensor
    high_share: torch.Tensor
    token_class: torch.Tensor
    eps_low: torch.Tensor
    eps_high: torch.Tensor
    kl_coef: torch.Tensor
    class_kl_coef: tuple[float, float]
    normalize_by_selected: bool
    abs_kl_coef: torch.Tensor | None = None


def _top_micro_batch(entropy: torch.Tensor, mask: torch.Tensor, rho: float) -> torch.Tensor:
    """Bool [B, T]: the k = ceil(rho n) highest-entropy valid tokens, earlier position first on ties."""
    valid = entropy[mask]
    k = top_count(rho, valid.numel())
    chosen = torch.zeros_like(valid, dtype=torch.bool)
    chosen[torch.sort(valid, descending=True, stable=True).indices[:k]] = True
    top = torch.zeros_like(mask)
    top[mask] = chosen
    return top


def classify_tokens(
    entropy: torch.Tensor | None,
    response_mask: torch.Tensor,
    selection: SelectionConfig,
    forking_threshold: float | None = None,
    cp_group=None,
    *,
    covariance: CovarianceTokens | None = None,
    covariance_stats: CovarianceStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pg_weight, high_share), float [B, T], from the detached entropy (None allowed for ``none``
    and the covariance methods, which need ``covariance`` and the step's ``covariance_stats``).

    ``cp_group``: the context-parallel group whose ranks hold disjoint tokens of these same
    responses (``response_mask`` True at this rank's tokens, docs/numerics.md §9): per-response quantiles and
    ranks, and a micro-batch's top-k, are then those of the whole responses (``sharded_rows``).
    """
    require_response_mask(response_mask)
    valid = response_mask.float() if entropy is None else response_mask.to(
        torch.promote_types(entropy.dtype, torch.float32))
    if selection.method == "none":
        return valid, torch.zeros_like(valid)
    if selection.method in COVARIANCE_METHODS:
        if covariance is None or covariance_stats is None:
            raise ValueError(f"selection method {selection.method!r} needs the micro-batch's "
                             f"covariance inputs and the step's covariance_stats")
        covariance.check(response_mask)
        valid = response_mask.to(torch.promote_types(covariance.logp.dtype, torch.float32))
        chosen = covariance_selection(covariance, response_mask, selection,
                                      covariance_stats).to(valid.dtype)
        return (valid - chosen if selection.method == "clip_cov" else valid), chosen
    if entropy is None:
        raise ValueError(f"entropy is required by selection method {selection.method!r}")
    uses_rows = selection.method != "forking" or selection.forking.scope != "global"
    check_together(lambda: require_token_tensor("entropy", entropy, response_mask),
                   cp_group if uses_rows else None)
    entropy = entropy.detach().to(valid.dtype)
    if selection.method == "forking":
        forking = selection.forking
        if forking.scope == "global":
            if forking_threshold is None:
                raise ValueError("forking with scope 'global' needs the step's forking_threshold "
                                 "(StepContext.forking_threshold)")
            top = response_mask & (entropy.to(torch.float32) >= forking_threshold)
        else:
            top = response_mask & _top_micro_batch(*sharded_rows(entropy, response_mask, cp_group),
                                                   forking.rho)
        high = top.to(valid.dtype)
        return (high if forking.keep == "top" else valid - high), high
    archer = selection.archer
    if selection.method == "archer":
        quantile = sharded_row_quantile(entropy, response_mask, archer.quantile, cp_group)
        return valid, (response_mask & (entropy > quantile[:, None])).to(valid.dtype)
    rank = response_mask * row_rank_fraction(*sharded_rows(entropy, response_mask, cp_group))
    ramp = ((rank - archer.quantile) / archer.soft_width + 0.5).clamp(0.0, 1.0)
    return valid, ramp * valid


def selection_entropy(
    selection: SelectionConfig, current: torch.Tensor | None, old: torch.Tensor | None
) -> torch.Tensor | None:
    """The detached entropy to select with, per ``entropy_source``: the current policy's from the
    training forward, or the old policy's computed once per batch. None allowed only for the
    methods that do not select by entropy (``none``, ``clip_cov``, ``kl_cov``)."""
    chosen = current if selection.entropy_source == "current" else old
    if chosen is None and selection.uses_entropy:
        raise ValueError(f"entropy_source {selection.entropy_source!r} needs the "
                         f"{selection.entropy_source} policy's entropy")
    return None if chosen is None else chosen.detach()


def class_constraints(selection: SelectionConfig, loss: LossConfig) -> tuple[Constraints, Constraints]:
    """(low, high) class constraints: Archer's knowledge / reasoning, else ``loss.clip`` for both."""
    if selection.method in ("archer", "archer_soft"):
        return selection.archer.knowledge, selection.archer.reasoning
    return loss.clip, loss.clip


def select_tokens(
    entropy: torch.Tensor | None,
    response_mask: torch.Tensor,
    selection: SelectionConfig,
    loss: LossConfig,
    forking_threshold: float | None = None,
    cp_group=None,
    *,
    covariance: CovarianceTokens | None = None,
    covariance_stats: CovarianceStats | None = None,
) -> TokenSelection:
    """Per-token policy-gradient weight, class, clip range and KL coefficient for one micro-batch
    (``cp_group``, ``covariance``, ``covariance_stats``: see ``classify_tokens``; for the
    covariance methods ``covariance.logp`` is the current policy's, detached)."""
    pg_weight, high_share = classify_tokens(entropy, response_mask, selection, forking_threshold,
                                            cp_group, covariance=covariance,
                                            covariance_stats=covariance_stats)
    low, high = class_constraints(selection, loss)

    def per_token(low_value: float, high_value: float) -> torch.Tensor:
        # exact at high_share 0 and 1, so hard classes get exactly their class's constants
        return (low_value * (1.0 - high_share) + high_value * high_share) * response_mask

    token_class = torch.where(response_mask, (high_share >= 0.5).long(), -1)
    return TokenSelection(
        pg_weight=pg_weight,
        high_share=high_share,
        token_class=token_class,
        eps_low=per_token(low.eps_low, high.eps_low),
        eps_high=per_token(low.eps_high, high.eps_high),
        kl_coef=per_token(low.kl_coef, high.kl_coef),
        class_kl_coef=(low.kl_coef, high.kl_coef),
        normalize_by_selected=(selection.method == "forking"
                               and selection.forking.normalizer == "selected"),
        abs_kl_coef=(selection.kl_cov.coef * high_share if selection.method == "kl_cov" else None),
    )
