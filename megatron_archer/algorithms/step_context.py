"""Quantities of the whole optimiser step, computed once at its start over all data-parallel ranks.

The token-mean loss of docs/numerics.md §3 divides by the number of valid tokens of the *step* (all
micro-batches, all data-parallel ranks), and global forking selection (docs/numerics.md §4) needs the step's
top-rho entropy threshold. Neither is known inside one micro-batch, so the trainer calls
``build_step_context`` once per optimiser step with every micro-batch this rank will train on, and
passes the result to ``select_tokens`` and ``policy_loss``. Each micro-batch's loss is then its
exact share of the step loss: the per-micro-batch losses summed over micro-batches and ranks give
the step loss, whatever the split.

Which entropy: the step context sees the entropy available at step start, the old policy's
(computed once per batch with the old log-probs; it equals the current policy's at the first
update of a batch). With ``entropy_source="old"`` the training forward selects with that same
entropy and everything is exact. With ``entropy_source="current"`` the forward compares the
current entropy against the step-start threshold, while the normalisers (selected-token count,
per-class token counts) stay the step-start ones: a loss normaliser must be a constant of the
step, or the gradient would depend on how the step is split. With micro-batch scope the selected
count, k = ceil(rho n) per micro-batch, does not depend on entropy and is always exact.

Megatron divides each micro-batch loss by the number of micro-batches and DDP averages gradients
over data-parallel ranks; multiply the loss by ``StepContext.loss_scale`` before handing it over.

Context parallelism (docs/numerics.md §9): the step's tokens are spread over DP x CP ranks, and the CP ranks of
one data-parallel replica hold disjoint tokens of the same responses. ``group`` is then the
DP x CP group (megatron's ``get_data_parallel_group(with_context_parallel=True)``), so token
counts, selected counts and the forking threshold are over DP x CP; ``cp_group`` makes each
response count once in the sequence count and its per-response statistics exact over its CP
ranks. DDP averages gradients over DP x CP; megatron's schedule already multiplies each loss by
the CP size (``forward_step_calc_loss``, for a loss function returning (loss, metrics)), so
``loss_scale`` stays num_microbatches x DP: together they undo both averages exactly.

Clip-Cov and KL-Cov (docs/numerics.md §10) take their step constants (the centring means and
thresholds, ``StepContext.covariance``) from the old policy's log-probs the same way: exact at
the first update of a batch, where the old policy is the current one, then compared against each
token's current covariance in the forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_archer.algorithms.config import COVARIANCE_METHODS, SelectionConfig
from megatron_archer.algorithms.covariance import CovarianceStats, CovarianceTokens, covariance_stats
from megatron_archer.algorithms.order_stats import kth_largest, top_count
from megatron_archer.algorithms.sharded_rows import sharded_row_sums
from megatron_archer.algorithms.token_selection import classify_tokens
from megatron_archer.algorithms.validation import require_response_mask, require_token_tensor
from megatron_archer.distributed import all_reduce_, rank_and_size


@dataclass(frozen=True)
class StepContext:
    """Global counts of one optimiser step (sums over all micro-batches on all ranks).

    ``num_selected`` is the summed policy-gradient weight; ``class_tokens`` the token count of the
    (low, high) entropy classes (fractional under ``archer_soft``); ``forking_threshold`` the
    global forking tau (None unless forking with global scope); ``covariance`` the step constants
    of Clip-Cov and KL-Cov (None for the other methods).
    """

    num_tokens: float
    num_sequences: float
    num_selected: float
    class_tokens: tuple[float, float]
    forking_threshold: float | None
    num_microbatches: int
    dp_size: int  # data-parallel ranks (without context parallelism, see the module docstring)
    covariance: CovarianceStats | None = None

    @property
    def loss_scale(self) -> int:
        """num_microbatches * dp_size: undoes Megatron's 1/num_microbatches and DDP's 1/dp_size."""
        return self.num_microbatches * self.dp_size


def _input_problem(micro_batches, selection: SelectionConfig, covariance) -> str | None:
    """Why this rank's step inputs are invalid (bad mask, missing or non-finite entropy or
    covariance inputs), or None."""
    if not micro_batches:
        return "micro_batches is empty: a step needs at least one micro-batch"
    by_covariance = selection.method in COVARIANCE_METHODS
    if by_covariance and (covariance is None or len(covariance) != len(micro_batches)):
        return (f"selection method {selection.method!r} needs covariance inputs for each of the "
                f"{len(micro_batches)} micro-batches")
    try:
        for index, (entropy, mask) in enumerate(micro_batches):
            require_response_mask(mask)
            if entropy is None and selection.uses_entropy:
                raise ValueError(f"entropy is required by selection method {selection.method!r}")
            if entropy is not None:
                require_token_tensor(f"entropy (micro-batch {index})", entropy, mask)
            if by_covariance:
                covariance[index].check(mask, f" (micro-batch {index})")
    except ValueError as error:
        return str(error)
    return None


def build_step_context(
    micro_batches: Sequence[tuple[torch.Tensor | None, torch.Tensor]],
    selection: SelectionConfig,
    group=None,
    cp_group=None,
    *,
    covariance: Sequence[CovarianceTokens] | None = None,
) -> StepContext:
    """The StepContext of one optimiser step from this rank's ``(entropy, response_mask)`` pairs.

    ``entropy`` is the detached [B, T] entropy available at step start (see the module docstring);
    it may be None when the selection method is ``none``. ``group`` is the data-parallel group
    (None: one process), the DP x CP group under context parallelism with ``cp_group`` the
    context-parallel one (module docstring). Every rank must call this with the same number of
    micro-batches; costs a few small all-reduces, plus 32 for a global forking threshold.
    ``covariance``: per micro-batch, the old policy's ``CovarianceTokens`` (required by Clip-Cov
    and KL-Cov, ignored otherwise; ``covariance.covariance_stats`` lists their collectives).
    """
    _, group_size = rank_and_size(group)
    cp_rank, cp_size = rank_and_size(cp_group)
    if group_size % cp_size:
        raise ValueError(f"group has {group_size} ranks, not a multiple of cp_group's {cp_size}: "
                         "pass the data x context parallel group as group")
    dp_size = group_size // cp_size
    count = len(micro_batches)
    problem = _input_problem(micro_batches, selection, covariance)
    # one max-reduce: equal micro-batch counts, and every rank raises when any rank's input is bad
    # (a rank that raised alone would leave the others waiting in the next collective)
    flags = all_reduce_(torch.tensor([count, -count, problem is not None], dtype=torch.int64), group,
                        op="max")
    if flags[2]:
        raise ValueError(problem or "another data-parallel rank passed invalid step inputs")
    if flags[0] != -flags[1]:
        raise ValueError(f"ranks disagree on the number of micro-batches "
                         f"({-int(flags[1])} to {int(flags[0])}); Megatron needs the same count")

    # control values on the CPU, moved there explicitly (distributed.py's device rule)
    sizes = torch.zeros(2, dtype=torch.float64)
    for _, mask in micro_batches:
        # a response held by several CP ranks counts once: on CP rank 0, if any rank has a token
        row_tokens = sharded_row_sums(mask.to(torch.int64), cp_group)
        held = int((row_tokens > 0).sum()) if cp_rank == 0 else 0
        sizes += torch.tensor([mask.sum().item(), held], dtype=torch.float64)
    num_tokens, num_sequences = all_reduce_(sizes, group).tolist()

    threshold = None
    if selection.method == "forking" and selection.forking.scope == "global":
        k = top_count(selection.forking.rho, int(num_tokens))
        threshold = kth_largest([entropy[mask] for entropy, mask in micro_batches], [k], group)[0]

    stats = None
    if selection.method in COVARIANCE_METHODS:
        stats = covariance_stats(list(zip(covariance, (m for _, m in micro_batches))), selection,
                                 int(num_tokens), group)

    masses = torch.zeros(3, dtype=torch.float64)
    for index, (entropy, mask) in enumerate(micro_batches):
        pg_weight, high = classify_tokens(
            entropy, mask, selection, threshold, cp_group,
            covariance=None if stats is None else covariance[index], covariance_stats=stats)
        masses += torch.stack(
            [pg_weight.sum(), (mask.to(high.dtype) - high).sum(), high.sum()]).double().cpu()
    num_selected, low_tokens, high_tokens = all_reduce_(masses, group).tolist()
    return StepContext(
        num_tokens=num_tokens,
        num_sequences=num_sequences,
        num_selected=num_selected,
        class_tokens=(low_tokens, high_tokens),
        forking_threshold=threshold,
        num_microbatches=count,
        dp_size=dp_size,
        covariance=stats,
    )
