"""The training phase of a step: old-policy and reference log-probs, advantages, and the
mini-batch updates with the configured objective (docs/numerics.md §2-5), with its docs/numerics.md §7 metrics.

Global rank 0 holds the RolloutBatch and builds every data-parallel rank's share
(``build_shares``); ``rollout_share.scatter_shares`` delivers them. Sequences are ordered group
by group; mini-batch u holds the sequences of groups [u m, (u + 1) m) (m =
``train.mini_batch_size``), split over the data-parallel ranks by tokens (``split_by_tokens``:
long responses do not make stragglers; the objectives are split-invariant, so the gradient is
the same). Old log-probs and entropy (and reference log-probs when a KL coefficient is non-zero)
are computed for every mini-batch before the first update; then ``train.epochs`` passes run one
optimiser step per mini-batch.

The step's first update is on-policy: its old policy is the current one. With
``compute_old_and_reference(defer_first=True)`` its mini-batch skips the separate old-policy
forward when that forward and the update's training forward compute bitwise the same numbers
(``defers_old_forward``: one micro-batch, no dropout, one rank holding the step's tokens, one
pipeline stage, CPU): the update's loss function takes the old log-probs and entropy from its
own forward, detached, and builds the step context from them before the loss. Results are
identical (tests/trainer/test_deferred_old_forward.py); the forward is then timed in the train
phase, and the batch metrics (``rollout_batch_metrics``) are taken after training.

Non-finite values (``train.on_nonfinite``): a mini-batch whose old-policy or reference results
are non-finite on any rank is not trained on (its updates count as skipped, the tensor named);
an update whose training forward or gradient is non-finite is skipped by the actor on every
rank. With ``error`` either stops the run on every rank with the tensor and rank named.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_archer.actor import (
    Actor,
    ReferenceModel,
    SequenceBatch,
    plan_micro_batches,
    unwrap_chunk,
)
from megatron_archer.actor.packing import scatter_to_batch
from megatron_archer.algorithms import (
    AlgorithmConfig,
    CovarianceTokens,
    build_step_context,
    class_constraints,
    entropy_summary,
    group_advantages,
    loss_metric_sums,
    policy_loss,
    reduce_loss_metrics,
    select_tokens,
    selection_entropy,
    token_hash,
)
from megatron_archer.algorithms.config import COVARIANCE_METHODS
from megatron_archer.algorithms.covariance import content_ids
from megatron_archer.algorithms.metrics import CLASSES
from megatron_archer.algorithms.rollout_correction import (
    correction_metric_sums,
    drops_tokens,
    loss_tokens,
    rollout_correction,
    rollout_correction_summary,
)
from megatron_archer.distributed import all_reduce_
from megatron_archer.nonfinite import NonFiniteError, describe, first_ranks
from megatron_archer.rollout import logprob_gap
from megatron_archer.trainer.progress import progress
from megatron_archer.trainer.rollout_phase import Group

logger = logging.getLogger(__name__)


@dataclass
class MiniBatch:
    """This rank's share of one mini-batch and its per-token constants, [b, R] response layout."""

    batch: SequenceBatch
    advantages: torch.Tensor
    rollout_logp: torch.Tensor
    old_logp: torch.Tensor | None = None
    old_entropy: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    # the old-policy results come from the first update's forward (``defers_old_forward``)
    old_deferred: bool = False
    # [b] ids of the sequences from their content (``covariance.content_ids``), on first use
    sequence_ids: torch.Tensor | None = None
    # a mixture-of-experts model's routing in the old-policy forward (``actor.routing``)
    old_routing: list | None = None


def needs_reference(algorithm: AlgorithmConfig) -> bool:
    """A KL coefficient is non-zero for some token class."""
    low, high = class_constraints(algorithm.selection, algorithm.loss)
    return low.kl_coef > 0 or high.kl_coef > 0


def plan_mini_batches(num_groups: int, n: int, mini_batch_size: int, dp: int) -> list[list[int]]:
    """Sequence indices of each mini-batch (groups of ``mini_batch_size`` prompts); a last
    mini-batch with fewer sequences than data-parallel ranks joins the one before. Empty when the
    whole batch has fewer sequences than ranks."""
    plan = [list(range(g * n, min(g + mini_batch_size, num_groups) * n))
            for g in range(0, num_groups, mini_batch_size)]
    if plan and len(plan[-1]) < dp:
        last = plan.pop()
        if plan:
            plan[-1].extend(last)
        elif len(last) >= dp:
            plan.append(last)
    return plan


def split_by_tokens(indices: list[int], lengths: list[int], dp: int) -> list[list[int]]:
    """``indices`` over ``dp`` ranks balancing tokens: longest first, each to the rank with the
    fewest tokens so far (ties: the lower rank); every rank gets one when len(indices) >= dp.
    Each rank's indices in ascending order. Deterministic."""
    loads, shares = [0] * dp, [[] for _ in range(dp)]
    for i, length in sorted(zip(indices, lengths), key=lambda x: (-x[1], x[0])):
        rank = min(range(dp), key=lambda r: (loads[r], r))
        loads[rank] += length
        shares[rank].append(i)
    return [sorted(share) for share in shares]


def build_shares(groups: list[Group], algorithm: AlgorithmConfig, mini_batch_size: int, dp: int
                 ) -> list[list[MiniBatch]]:
    """Every data-parallel rank's share of every mini-batch, with group-relative advantages
    (docs/numerics.md §2) computed over whole groups first; ``[[]] * dp`` when no mini-batch can be formed."""
    if not groups:
        return [[] for _ in range(dp)]
    n = len(groups[0].samples)
    scores = torch.tensor([g.scores for g in groups], dtype=torch.float64)
    advantages = group_advantages(scores, algorithm.advantage).flatten().float()
    samples = [(g.prompt, s) for g in groups for s in g.samples]
    shares: list[list[MiniBatch]] = [[] for _ in range(dp)]
    for indices in plan_mini_batches(len(groups), n, mini_batch_size, dp):
        lengths = [len(samples[i][0].input_ids) + len(samples[i][1].token_ids) for i in indices]
        for rank, mine in enumerate(split_by_tokens(indices, lengths, dp)):
            shares[rank].append(_mini_batch([samples[i] for i in mine], advantages[mine]))
    return shares


def _mini_batch(samples, advantages: torch.Tensor) -> MiniBatch:
    """The samples' mini-batch; the engine's routing travels with it when the samples have it
    (``actor.routing_replay: rollout``): all of them or none."""
    ids, masks, rollout = [], [], []
    for prompt, sample in samples:
        ids.append(torch.tensor([*prompt.input_ids, *sample.token_ids], dtype=torch.long))
        masks.append(torch.cat([torch.zeros(len(prompt.input_ids), dtype=torch.bool),
                                torch.ones(len(sample.token_ids), dtype=torch.bool)]))
        rollout.append(torch.tensor(sample.logprobs, dtype=torch.float32))
    routing = [s.routing for _, s in samples]
    missing = sum(r is None for r in routing)
    if 0 < missing < len(routing):
        raise ValueError(f"{missing} of {len(routing)} samples of a mini-batch came back from the "
                         f"rollout engine without their routing (actor.routing_replay: rollout)")
    routing = None if missing else routing
    return MiniBatch(SequenceBatch(ids, masks, routing), advantages,
                     torch.nn.utils.rnn.pad_sequence(rollout, batch_first=True))


def runs_old_forward(algorithm: AlgorithmConfig) -> bool:
    """The old-policy forward runs: for the old log-probs (``old_logprobs: recompute``), or for
    the step-start entropy that every entropy-based selection method needs (the step context's
    forking threshold and class or selected-token counts; the selection's with ``entropy_source:
    old``), which the engine does not return. Clip-Cov and KL-Cov need only the old log-probs."""
    return algorithm.old_logprobs == "recompute" or algorithm.selection.uses_entropy


def defers_old_forward(actor: Actor, mb: MiniBatch, algorithm: AlgorithmConfig) -> bool:
    """Whether the step's first update, on ``mb``, can take its old-policy results from its own
    training forward (module docstring). The two forwards compute bitwise the same numbers when
    the update is one micro-batch (the step context, which needs every micro-batch's old entropy
    before the first loss, can then be built inside the loss function), the model has no dropout,
    one rank holds the step's tokens (no data- or context-parallel peer would have to join the
    context's collectives from inside the loss), there is one pipeline stage, and on CPU (where
    the equality is tested; on CUDA the kernels' training and inference paths are not known to
    agree bitwise, so the separate forward runs)."""
    if not runs_old_forward(algorithm) or actor.on_cuda:
        return False
    if parallel_state.get_pipeline_model_parallel_world_size() > 1 or \
            parallel_state.get_data_parallel_world_size(with_context_parallel=True) > 1:
        return False
    if any(unwrap_chunk(c).config.hidden_dropout or unwrap_chunk(c).config.attention_dropout
           for c in actor.chunks):
        return False
    try:
        plan = plan_micro_batches(mb.batch.lengths, actor.config.max_tokens_per_micro_batch)
    except ValueError:  # a sequence over the budget: the actor raises it in the update
        return False
    return len(plan) == 1


def _nonfinite_inputs(mb: MiniBatch) -> set[str]:
    """The per-token inputs of ``mb`` that hold NaN or inf at a response token."""
    mask = mb.batch.response_layout_mask()
    return {name for name, t in (("old_logp", mb.old_logp), ("old_entropy", mb.old_entropy),
                                 ("ref_logp", mb.ref_logp))
            if t is not None and not bool(torch.isfinite(t[mask]).all())}


def _set_old(mb: MiniBatch, logp: torch.Tensor, entropy: torch.Tensor,
             algorithm: AlgorithmConfig) -> None:
    """The old-policy results of ``mb`` from a forward's [B, R] results (the engine's log-probs
    instead with ``old_logprobs: rollout``)."""
    mb.old_logp = mb.rollout_logp if algorithm.old_logprobs == "rollout" else logp.cpu()
    mb.old_entropy = entropy.cpu()


def _old_forward(actor: Actor, mb: MiniBatch, algorithm: AlgorithmConfig) -> None:
    old = actor.compute_logprobs_and_entropy(mb.batch)
    _set_old(mb, old.logp, old.entropy, algorithm)
    mb.old_routing = old.routing


def compute_old_and_reference(actor: Actor, reference: ReferenceModel | None,
                              mini_batches: list[MiniBatch], offload_reference: bool, *,
                              algorithm: AlgorithmConfig = AlgorithmConfig(),
                              defer_first: bool = False) -> list[dict[str, int]]:
    """Fill ``old_logp`` / ``old_entropy`` (and ``ref_logp``) of every mini-batch, forward only.

    ``algorithm`` (default: recompute, no correction) sets the off-policy handling. With
    ``algorithm.old_logprobs: rollout`` the old log-probs are the engine's (docs/numerics.md §8); the
    forward then runs only for the entropy (``runs_old_forward``), and with selection ``none``
    not at all (``old_entropy`` stays None: no entropy metrics from it). ``defer_first``: the
    first mini-batch's old-policy forward is left to its update when ``defers_old_forward``
    allows and its other inputs are finite (``old_deferred`` set; ``train_on_mini_batches``
    fills the results). Returns, per mini-batch, the tensors found non-finite on some rank
    (``nonfinite.first_ranks``: the same on every rank; empty for a usable mini-batch)."""
    found = []
    for u, mb in enumerate(mini_batches):
        defer = defer_first and u == 0 and defers_old_forward(actor, mb, algorithm)
        if runs_old_forward(algorithm) and not defer:
            _old_forward(actor, mb, algorithm)
        if algorithm.old_logprobs == "rollout":
            mb.old_logp = mb.rollout_logp
        if reference is not None:
            mb.ref_logp = reference.compute_logprobs_and_entropy(mb.batch).logp.cpu()
        if defer and _nonfinite_inputs(mb):  # the forward runs after all: the same names
            _old_forward(actor, mb, algorithm)
            defer = False
        mb.old_deferred = defer
        found.append(_nonfinite_inputs(mb))
    if reference is not None and offload_reference:
        reference.offload()
    return first_ranks(found)


def _cp_group():
    """The context-parallel group when CP > 1, else None: a micro-batch's responses are then
    spread over its ranks, and the per-response statistics of the loss span them (docs/numerics.md §9)."""
    if parallel_state.get_context_parallel_world_size() == 1:
        return None
    return parallel_state.get_context_parallel_group()


def _loss_tokens(micro, mb: MiniBatch, algorithm: AlgorithmConfig) -> torch.Tensor:
    """The micro-batch's tokens in the loss and the step context: its response mask, less those
    the mismatch correction drops (``rollout_correction.mask_normalizer: drop``)."""
    mask, correction = micro.response_mask, algorithm.rollout_correction
    if not drops_tokens(correction):
        return mask
    return loss_tokens(micro.gather(mb.old_logp.to(mask.device)),
                       micro.gather(mb.rollout_logp.to(mask.device)), mask, correction, _cp_group())


def _covariance_tokens(micro, mb: MiniBatch, logp: torch.Tensor, salts: tuple[int, ...]
                       ) -> CovarianceTokens:
    """Clip-Cov / KL-Cov inputs of one micro-batch (docs/numerics.md §10): ``logp`` [b, R_mb]
    (detached), its advantages, and each token's hash of (``salts``, its sequence's content id,
    its position in the response), the same on every split of the step."""
    if mb.sequence_ids is None:
        mb.sequence_ids = content_ids(mb.batch.input_ids)
    device = micro.response_mask.device
    return CovarianceTokens(logp.detach(), micro.gather(mb.advantages.to(device)),
                            token_hash(salts, micro.gather(mb.sequence_ids).to(device),
                                       micro.response_mask.shape[1]))


def _step_context(micro, mb: MiniBatch, algorithm: AlgorithmConfig, dp_group,
                  salts: tuple[int, ...] = ()):
    """``build_step_context`` of one update from its micro-batches' old entropy (None with
    ``old_logprobs: rollout`` and selection ``none``), loss tokens and, for the covariance
    methods, old log-probs (``salts``: see ``_covariance_tokens``)."""
    old_entropy = mb.old_entropy
    covariance = None
    if algorithm.selection.method in COVARIANCE_METHODS:
        covariance = [_covariance_tokens(m, mb, m.gather(mb.old_logp.to(m.response_mask.device)),
                                         salts) for m in micro]
    return build_step_context([(None if old_entropy is None else
                                m.gather(old_entropy.to(m.response_mask.device)),
                                _loss_tokens(m, mb, algorithm)) for m in micro],
                              algorithm.selection, dp_group, _cp_group(), covariance=covariance)


def _on_policy_loss_fn(mb: MiniBatch, algorithm: AlgorithmConfig, dp_group, device,
                       salts: tuple[int, ...] = ()):
    """The loss function of a deferred mini-batch's first update (``defers_old_forward``: one
    micro-batch): this forward's log-probs and entropy, detached, become ``mb``'s old-policy
    results, then the step context is built from them and the usual loss (``_loss_fn``) runs.
    Non-finite old results raise NonFiniteError, so the actor skips the update."""
    width = mb.batch.response_layout_mask().shape[1]

    def loss_fn(micro, logp, entropy):
        def to_batch(t):
            return scatter_to_batch(len(mb.batch), [micro], [t.detach()], width)

        _set_old(mb, to_batch(logp), to_batch(entropy), algorithm)
        bad = _nonfinite_inputs(mb)
        if bad:
            name = "old_logp" if "old_logp" in bad else "old_entropy"
            raise NonFiniteError(name, f"{name} of the first update is non-finite")
        ctx = _step_context([micro], mb, algorithm, dp_group, salts)
        return _loss_fn(mb, algorithm, ctx, device, salts)(micro, logp, entropy)

    return loss_fn


def _loss_fn(mb: MiniBatch, algorithm: AlgorithmConfig, ctx, device, salts: tuple[int, ...] = ()):
    """The micro-batch loss: selection (by the current log-probs' covariance for Clip-Cov and
    KL-Cov, ``salts`` as in ``_step_context``), the mismatch correction from the engine's log-probs when
    ``algorithm.rollout_correction`` is enabled (docs/numerics.md §8), the policy loss, and its metric sums."""
    selection, loss_config = algorithm.selection, algorithm.loss
    correction = algorithm.rollout_correction

    def on(t):
        return None if t is None else t.to(device) if device is not None else t

    def gather(micro, t):
        return None if t is None else micro.gather(t)

    old_logp, old_entropy, advantages = on(mb.old_logp), on(mb.old_entropy), on(mb.advantages)
    ref_logp = on(mb.ref_logp)
    rollout_logp = on(mb.rollout_logp) if correction.enabled else None
    cp_group = _cp_group()

    def loss_fn(micro, logp, entropy):
        mask = _loss_tokens(micro, mb, algorithm)
        chosen = selection_entropy(selection, entropy, gather(micro, old_entropy))
        covariance = (_covariance_tokens(micro, mb, logp, salts)
                      if selection.method in COVARIANCE_METHODS else None)
        tokens = select_tokens(chosen, mask, selection, loss_config, ctx.forking_threshold,
                               cp_group=cp_group, covariance=covariance,
                               covariance_stats=ctx.covariance)
        weights = None if rollout_logp is None else rollout_correction(
            micro.gather(old_logp), micro.gather(rollout_logp), mask, correction, cp_group)
        out = policy_loss(
            logp, micro.gather(old_logp), micro.gather(advantages), mask, tokens, ctx,
            loss_config, ref_logp=gather(micro, ref_logp),
            entropy=entropy if loss_config.entropy_coef else None,
            rollout_weight=None if weights is None else weights.weight, cp_group=cp_group)
        sums = loss_metric_sums(out.terms, tokens)
        if weights is not None:
            sums.update(correction_metric_sums(weights, tokens))
        return out.loss, sums

    return loss_fn


def train_on_mini_batches(actor: Actor, mini_batches: list[MiniBatch], algorithm: AlgorithmConfig,
                          epochs: int, show_progress: bool, on_nonfinite: str = "skip",
                          unusable: list[dict[str, int]] | None = None,
                          salts: tuple[int, ...] = ()) -> dict[str, float]:
    """``epochs`` passes of one optimiser step per mini-batch; the step's actor metrics.

    ``unusable[u]`` names the non-finite inputs of mini-batch u (``compute_old_and_reference``):
    its updates are not run and count as skipped. A deferred mini-batch (``old_deferred``) gets
    its old-policy results from its first update; when they are non-finite, its entry of
    ``unusable`` is set in place, as ``compute_old_and_reference`` would have set it.
    ``on_nonfinite``: ``skip`` (count, log, go on) or ``error`` (raise NonFiniteError on every
    rank together, naming tensor and rank).
    The entropy carries a gradient exactly when the loss has an entropy bonus.

    The forking threshold (``ctx.forking_threshold``) is taken once per update from the *old*
    policy's entropy over the update's tokens on all ranks; with ``entropy_source: current``
    tokens are compared to it with the current policy's entropy, so the selected share moves
    away from rho as the policy changes within a step: ``actor/high/token_share_update_min`` /
    ``_max`` report the share each update actually selected.

    ``salts`` (the trainer's seed and step), with the epoch and mini-batch, seed the covariance
    methods' draw (docs/numerics.md §10): a new draw each update, the same on every split.
    """
    # every rank holding tokens of the step: data x context parallel (docs/numerics.md §9)
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    entropy_grad = algorithm.loss.entropy_coef > 0
    sums, results, update_sums, nonfinite = [], [], [], Counter()
    updates = [(e, u) for e in range(epochs) for u in range(len(mini_batches))]
    for epoch, u in progress(updates, show_progress, desc="train", unit="update"):
        mb, bad = mini_batches[u], unusable[u] if unusable else {}
        if not bad:
            micro, deferred = actor.micro_batches(mb.batch), mb.old_deferred
            update_salts = (*salts, epoch, u)
            loss_fn = (_on_policy_loss_fn(mb, algorithm, dp_group, actor.device, update_salts)
                       if deferred else
                       _loss_fn(mb, algorithm,
                                _step_context(micro, mb, algorithm, dp_group, update_salts),
                                actor.device, update_salts))
            # mixture of experts: the routing of the old-policy forward is compared with the
            # update's, and with ``actor.routing_replay: old`` replayed (a deferred first
            # update is its own old-policy forward); a batch carrying the engine's routing
            # (``routing_replay: rollout``) is compared with, and replays, that instead
            if actor.config.routing_replay == "rollout" and mb.batch.routing is None:
                raise ValueError("actor.routing_replay is 'rollout' but the rollout engine "
                                 "returned no routing with its samples")
            old_routing = None if mb.batch.routing is not None else mb.old_routing
            result = actor.train_step(
                mb.batch, loss_fn, entropy_grad=entropy_grad, micro_batches=micro,
                routing=old_routing, replay_routing=actor.config.routing_replay == "old"
                and old_routing is not None)
            bad = result.nonfinite
            if deferred:
                mb.old_deferred = False
                if result.skipped:  # perhaps before its loss saw the old results: the separate
                    # forward (the weights are unchanged) names them as it would have
                    found = compute_old_and_reference(actor, None, [mb], False,
                                                      algorithm=algorithm)[0]
                    if found and unusable:
                        unusable[u] = found
                    bad = found or bad
            if not result.skipped:
                results.append(result)
                mine = [{k: v for k, v in out.items() if k != "loss"}
                        for out in result.micro_batch_metrics]
                sums.extend(mine)
                update_sums.append([sum(m[f"{c}/tokens"] for m in mine) for c in CLASSES])
        if bad:
            if on_nonfinite == "error":
                raise NonFiniteError(next(iter(bad)), f"non-finite values in update {u} of the "
                                     f"step: {describe(bad)} (train.on_nonfinite=error)")
            nonfinite.update(bad.keys())
            if dist.get_rank() == 0:
                logger.warning("update %d skipped on every rank: non-finite %s", u, describe(bad))
    skipped = len(updates) - len(results)
    metrics = {"actor/updates": float(len(updates)), "actor/skipped_updates": float(skipped),
               **{f"actor/nonfinite/{name}": float(count) for name, count in nonfinite.items()}}
    if results:  # averages over the updates that ran (a skipped one has no usable norm)
        metrics.update({
            "actor/loss": sum(r.loss for r in results) / len(results),
            "actor/grad_norm": sum(r.grad_norm for r in results) / len(results),
            "actor/grad_norm_max": max(r.grad_norm for r in results),
            "actor/lr": results[-1].lr,
            **_moe_means(results),
        })
        if parallel_state.is_pipeline_last_stage():
            metrics.update({f"actor/{k}": v
                            for k, v in reduce_loss_metrics(sums, dp_group).items()})
            metrics.update(_update_shares(update_sums, dp_group))
    return _from_last_stage(metrics)


def _moe_means(results) -> dict[str, float]:
    """A mixture-of-experts model's routing metrics (actor.routing), each the mean over the
    updates that report it (a deferred first update has no recorded routing to compare)."""
    keys = sorted(set().union(*(r.moe_metrics for r in results)))
    return {key: sum(values) / len(values) for key in keys
            for values in [[r.moe_metrics[key] for r in results if key in r.moe_metrics]]}


def _update_shares(update_sums: list[list[torch.Tensor]], group) -> dict[str, float]:
    """Min and max over updates of the share of tokens in the high class (forking: selected;
    Archer: reasoning), each update's share over all data-parallel ranks; one all-reduce."""
    totals = all_reduce_(torch.tensor([[float(t) for t in row] for row in update_sums],
                                      dtype=torch.float64), group)
    shares = [high / (low + high) for low, high in totals.tolist() if low + high > 0]
    if not shares:
        return {}
    return {"actor/high/token_share_update_min": min(shares),
            "actor/high/token_share_update_max": max(shares)}


def _from_last_stage(metrics: dict) -> dict:
    """The last pipeline stage's metrics on every stage (loss metrics exist there only)."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return metrics
    box = [metrics]
    torch.distributed.broadcast_object_list(
        box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group())
    return box[0]


def rollout_batch_metrics(mini_batches: list[MiniBatch], unusable: Sequence[dict[str, int]],
                          algorithm: AlgorithmConfig = AlgorithmConfig()
                          ) -> tuple[dict[str, float], torch.Tensor]:
    """Old-policy entropy statistics and the train-vs-rollout log-prob gap, both over every
    data-parallel rank's usable mini-batches, and this rank's response-token entropies (for
    histograms). Without the old-policy forward (``runs_old_forward``) there is no entropy, and
    with ``old_logprobs: rollout`` no gap (pi_old is pi_rollout); with the mismatch correction
    on, the step summary of its weights (``rollout_is/*``, docs/numerics.md §8)."""
    usable = [mb for mb, bad in zip(mini_batches, unusable) if not bad]
    masks = [mb.batch.response_layout_mask() for mb in usable]
    group = parallel_state.get_data_parallel_group()
    with_entropy = runs_old_forward(algorithm)
    metrics = entropy_summary([(mb.old_entropy, m) for mb, m in zip(usable, masks)], group) \
        if with_entropy else {}
    if algorithm.rollout_correction.enabled:
        metrics.update(rollout_correction_summary(
            [(mb.old_logp, mb.rollout_logp, m) for mb, m in zip(usable, masks)],
            algorithm.rollout_correction, group))
    if not usable:
        return metrics, torch.zeros(0)
    if algorithm.old_logprobs == "recompute":
        train = torch.cat([mb.old_logp[m] for mb, m in zip(usable, masks)])
        rollout = torch.cat([mb.rollout_logp[m] for mb, m in zip(usable, masks)])
        metrics.update(logprob_gap(rollout, train, torch.ones_like(train, dtype=torch.bool), group))
    if not with_entropy:
        return metrics, torch.zeros(0)
    return metrics, torch.cat([mb.old_entropy[m] for mb, m in zip(usable, masks)])
