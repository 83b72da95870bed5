"""Clipped policy loss with per-token constraints, KL and entropy terms (docs/numerics.md §3), aggregated so
that each micro-batch's loss is its exact share of the optimiser step's loss.

Layout: per-token tensors are [B, T] (B responses of one micro-batch, right-padded to T) with a
bool response mask; advantages are [B] (one per response) or [B, T]. Values outside the mask are
ignored (they may be -inf or NaN) and get zero gradient.

With l_t = pg_weight_t * c_t * L_t (L_t the clipped policy term of docs/numerics.md §3, c_t the mismatch
correction of docs/numerics.md §8, ``rollout_weight``, 1 without it) and g_t the regulariser
(beta_t KL_t under ``kl_aggregation="token"``, plus KL-Cov's kappa_t |logp_t - logp_old_t| of
docs/numerics.md §10, minus entropy_coef * H_t), the step loss is:

- ``token-mean``:   sum_t l_t / D + sum_t g_t / N
- ``seq-mean-token-mean``:   1/S sum_i ( sum_{t in i} l_t / d_i + sum_{t in i} g_t / |o_i| )
- ``seq-mean-token-sum-norm`` (Dr.GRPO):   1/(S L) sum_i sum_{t in i} (l_t + g_t)

N: valid tokens of the step; D: N, or the step's selected-token count when forking normalises by
selected tokens; S: responses of the step with a valid token; d_i: |o_i|, or the selected count of
response i (a response with none contributes 0), both over all of response i's tokens (on every
context-parallel rank, ``cp_group``); L: ``norm_length``. N, D and S come from the
StepContext (all micro-batches on all ranks). Under ``kl_aggregation="class_mean"`` (Archer's
code) the KL term is instead sum_c beta_c sum_t m_ct KL_t / N_c, with class memberships
m_high = high_share, m_low = 1 - high_share and N_c the step's class token counts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from megatron_archer.algorithms.config import LossConfig
from megatron_archer.algorithms.sharded_rows import check_together, sharded_row_sums
from megatron_archer.algorithms.step_context import StepContext
from megatron_archer.algorithms.token_selection import TokenSelection
from megatron_archer.algorithms.validation import (
    require_finite,
    require_response_mask,
    require_token_tensor,
)

LOG_RATIO_BOUND = 20.0  # |log r| and |logp_ref - logp| clamp, as public code (docs/numerics.md §3)
K3_BOUND = 10.0  # k3 clamp, as public code (docs/numerics.md §3)


@dataclass(frozen=True)
class LossTerms:
    """Detached per-token [B, T] by-products of the loss, for metrics.

    ``clipped_low``: A < 0 and r < 1 - eps_low; ``clipped_high``: A > 0 and r > 1 + eps_high (the
    clip is active and the token gets no gradient); ``dual_clipped``: A < 0 and r > c.
    ``kl`` is the KL estimate per token, None without reference log-probs.
    """

    ratio: torch.Tensor
    clipped_low: torch.Tensor
    clipped_high: torch.Tensor
    dual_clipped: torch.Tensor
    kl: torch.Tensor | None


@dataclass(frozen=True)
class PolicyLossOutput:
    """This micro-batch's share of the step loss (scalar, differentiable) and its per-token terms."""

    loss: torch.Tensor
    terms: LossTerms


def clipped_pg_loss(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: torch.Tensor | float,
    eps_high: torch.Tensor | float,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, LossTerms]:
    """Per-token L_t = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), dual clip min(L_t, -A c) for A < 0."""
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    lower = 1.0 - torch.as_tensor(eps_low, dtype=ratio.dtype)
    upper = 1.0 + torch.as_tensor(eps_high, dtype=ratio.dtype)
    loss = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, lower, upper))
    negative = advantages < 0
    if dual_clip is None:
        dual_clipped = torch.zeros_like(negative)
    else:
        loss = torch.where(negative, torch.minimum(loss, -advantages * dual_clip), loss)
        dual_clipped = negative & (ratio > dual_clip)
    ratio = ratio.detach()
    terms = LossTerms(
        ratio=ratio,
        clipped_low=negative & (ratio < lower),
        clipped_high=(advantages > 0) & (ratio > upper),
        dual_clipped=dual_clipped.detach(),
        kl=None,
    )
    return loss, terms


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate with d = logp_ref - logp: k1 = -d, k2 = d^2 / 2,
    k3 = exp(d) - d - 1 with d clamped to [-20, 20] and k3 to [-10, 10] (docs/numerics.md §3)."""
    d = ref_logp - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d.square()
    if estimator == "k3":
        d = d.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        return (torch.exp(d) - d - 1.0).clamp(-K3_BOUND, K3_BOUND)
    raise ValueError(f"kl_estimator must be one of k1, k2, k3; got {estimator!r}")


def _divide(total: torch.Tensor, count: float) -> torch.Tensor:
    """total / count, or a zero that keeps the graph when the step has nothing to count."""
    return total / count if count > 0 else total * 0.0


def _aggregate(terms: torch.Tensor, seq_counts: torch.Tensor, token_count: float,
               ctx: StepContext, config: LossConfig) -> torch.Tensor:
    """This micro-batch's share of the step aggregate of masked per-token ``terms`` (module docstring)."""
    if config.aggregation == "token-mean":
        return _divide(terms.sum(), token_count)
    seq_sums = terms.sum(dim=-1)
    if config.aggregation == "seq-mean-token-mean":
        seq_sums = seq_sums / torch.where(seq_counts > 0, seq_counts, torch.ones_like(seq_counts))
    else:
        seq_sums = seq_sums / config.norm_length
    return _divide(seq_sums.sum(), ctx.num_sequences)


def _class_mean_kl(kl: torch.Tensor, selection: TokenSelection, ctx: StepContext) -> torch.Tensor:
    """sum_c beta_c * (KL summed over class c) / (class c's token count in the step)."""
    low_coef, high_coef = selection.class_kl_coef
    low_tokens, high_tokens = ctx.class_tokens
    high = selection.high_share
    return (low_coef * _divide((kl * (1.0 - high)).sum(), low_tokens)
            + high_coef * _divide((kl * high).sum(), high_tokens))


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    selection: TokenSelection,
    ctx: StepContext,
    config: LossConfig,
    *,
    ref_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    rollout_weight: torch.Tensor | None = None,
    cp_group=None,
) -> PolicyLossOutput:
    """This micro-batch's share of the step loss; multiply by ``ctx.loss_scale`` for Megatron.

    ``logp`` carries the gradient; ``old_logp``, ``ref_logp`` and ``advantages`` are treated as
    constants. ``ref_logp`` is required when a KL coefficient is non-zero, ``entropy`` (the current
    policy's, with its gradient) when ``entropy_coef`` is. ``rollout_weight`` is the detached
    mismatch-correction factor on each token's policy term (docs/numerics.md §8, ``RolloutCorrection.weight``);
    the KL and entropy terms are not reweighted. Raises ValueError on non-finite inputs.
    ``cp_group``: the context-parallel group holding disjoint tokens of these responses (docs/numerics.md §9);
    the per-response counts |o_i| and d_i are then over all of a response's tokens.
    """
    def check() -> None:
        require_response_mask(response_mask)
        require_token_tensor("logp", logp, response_mask)
        require_token_tensor("old_logp", old_logp, response_mask)
        if advantages.shape not in (response_mask.shape[:1], response_mask.shape):
            raise ValueError(f"advantages must have shape [B] or [B, T] = "
                             f"{tuple(response_mask.shape)}; got {tuple(advantages.shape)}")
        expanded = advantages if advantages.dim() == 2 else advantages[:, None].expand(
            response_mask.shape)
        require_finite("advantages", expanded, response_mask)
        uses_kl = bool((selection.kl_coef != 0).any()) or any(c != 0 for c in selection.class_kl_coef)
        if uses_kl and ref_logp is None:
            raise ValueError("ref_logp is required: a KL coefficient is non-zero")
        if ref_logp is not None:
            require_token_tensor("ref_logp", ref_logp, response_mask)
        if config.entropy_coef != 0:
            if entropy is None:
                raise ValueError("entropy is required: entropy_coef is non-zero")
            require_token_tensor("entropy", entropy, response_mask)
        if rollout_weight is not None:
            require_token_tensor("rollout_weight", rollout_weight, response_mask)

    # per-response counts are the only collective: all ranks of the CP group raise together
    row_group = cp_group if config.aggregation == "seq-mean-token-mean" else None
    check_together(check, row_group)
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand(response_mask.shape)

    dtype = torch.promote_types(logp.dtype, torch.float32)
    valid = response_mask.to(dtype)

    def masked(x: torch.Tensor) -> torch.Tensor:
        return torch.where(response_mask, x.to(dtype), torch.zeros((), dtype=dtype))

    logp = masked(logp)
    pg, terms = clipped_pg_loss(logp - masked(old_logp.detach()), masked(advantages.detach()),
                                selection.eps_low, selection.eps_high, config.dual_clip)
    pg = pg * selection.pg_weight
    if rollout_weight is not None:
        pg = pg * masked(rollout_weight.detach())
    regulariser = torch.zeros_like(logp)
    kl = None
    if ref_logp is not None:
        kl = kl_penalty(logp, masked(ref_logp.detach()), config.kl_estimator) * valid
        if config.kl_aggregation == "token":
            regulariser = regulariser + selection.kl_coef * kl
    if selection.abs_kl_coef is not None:  # KL-Cov (docs/numerics.md §10)
        regulariser = regulariser + selection.abs_kl_coef * (logp - masked(old_logp.detach())).abs()
    if config.entropy_coef != 0:
        regulariser = regulariser - config.entropy_coef * masked(entropy)

    seq_counts = sharded_row_sums(valid, row_group)
    if selection.normalize_by_selected:
        pg_seq_counts = sharded_row_sums(selection.pg_weight, row_group)
        pg_token_count = ctx.num_selected
    else:
        pg_seq_counts, pg_token_count = seq_counts, ctx.num_tokens
    loss = (_aggregate(pg, pg_seq_counts, pg_token_count, ctx, config)
            + _aggregate(regulariser, seq_counts, ctx.num_tokens, ctx, config))
    if kl is not None and config.kl_aggregation == "class_mean":
        loss = loss + _class_mean_kl(kl, selection, ctx)
    # padding has A = 0 and r = 1, so only the ratio needs masking
    terms = replace(terms, ratio=terms.ratio * valid, kl=None if kl is None else kl.detach())
    return PolicyLossOutput(loss=loss, terms=terms)
