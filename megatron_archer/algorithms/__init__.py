"""RLVR objectives: advantages, entropy-based token selection (forking tokens, Archer), covariance-
based selection (Clip-Cov, KL-Cov), the clipped policy loss normalised over the whole optimiser
step, and its metrics (docs/numerics.md §§ 2 to 5, 7, 10).

Per optimiser step a trainer calls, on every data-parallel rank:

1. ``build_step_context(micro_batches, config.selection, group)`` once (global counts, threshold);
2. per micro-batch: ``select_tokens(selection_entropy(...), ...)``, ``policy_loss(...)``, ``loss_metric_sums(...)``;
   hand ``output.loss * ctx.loss_scale`` to Megatron;
3. ``reduce_loss_metrics(sums, group)`` and ``entropy_summary(...)`` for logging.
"""

from megatron_archer.algorithms.advantages import (
    DynamicSamplingResult,
    dynamic_sampling_filter,
    group_advantages,
    groups_with_signal,
    overlong_penalty,
)
from megatron_archer.algorithms.config import (
    AdvantageConfig,
    AlgorithmConfig,
    ArcherConfig,
    ClipCovConfig,
    Constraints,
    DynamicSamplingConfig,
    ForkingConfig,
    KLCovConfig,
    LossConfig,
    OverlongConfig,
    SelectionConfig,
    config_from_dict,
    preset,
)
from megatron_archer.algorithms.covariance import (
    CovarianceStats,
    CovarianceTokens,
    content_ids,
    token_hash,
)
from megatron_archer.algorithms.metrics import entropy_summary, loss_metric_sums, reduce_loss_metrics
from megatron_archer.algorithms.order_stats import kth_largest, top_count
from megatron_archer.algorithms.policy_loss import (
    LossTerms,
    PolicyLossOutput,
    clipped_pg_loss,
    kl_penalty,
    policy_loss,
)
from megatron_archer.algorithms.step_context import StepContext, build_step_context
from megatron_archer.algorithms.token_selection import (
    TokenSelection,
    class_constraints,
    classify_tokens,
    select_tokens,
    selection_entropy,
)

__all__ = [
    "AdvantageConfig", "AlgorithmConfig", "ArcherConfig", "ClipCovConfig", "Constraints",
    "CovarianceStats", "CovarianceTokens", "DynamicSamplingConfig", "DynamicSamplingResult",
    "ForkingConfig", "KLCovConfig", "LossConfig", "LossTerms", "OverlongConfig",
    "PolicyLossOutput", "SelectionConfig", "StepContext", "TokenSelection", "build_step_context",
    "class_constraints", "classify_tokens", "content_ids", "clipped_pg_loss", "config_from_dict",
    "dynamic_sampling_filter", "entropy_summary", "group_advantages", "groups_with_signal",
    "kl_penalty", "kth_largest", "loss_metric_sums", "overlong_penalty", "policy_loss", "preset",
    "reduce_loss_metrics", "select_tokens", "selection_entropy", "token_hash", "top_count",
]
