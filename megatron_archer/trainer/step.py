"""The training phase of a step: old-policy and reference log-probs, advantages, and the
mini-batch updates with the configured objective (SPEC 2-5), with its SPEC 7 metrics.

Every rank holds the whole RolloutBatch (rank 0 broadcast it). Sequences are ordered group by
group; mini-batch u holds the sequences of groups [u m, (u + 1) m) (m = ``train.mini_batch_size``)
and data-parallel rank d trains on every dp-th of them, starting at d. Old log-probs and entropy
(and reference log-probs when a KL coefficient is non-zero) are computed for every mini-batch
before the first update; then ``train.epochs`` passes run one optimiser step per mini-batch.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from megatron_archer.actor import Actor, ReferenceModel, SequenceBatch
from megatron_archer.algorithms import (
    AlgorithmConfig,
    build_step_context,
    entropy_summary,
    group_advantages,
    loss_metric_sums,
    policy_loss,
    reduce_loss_metrics,
    select_tokens,
    selection_entropy,
)
from megatron_archer.algorithms.token_selection import class_constraints
from megatron_archer.rollout import logprob_gap
from megatron_archer.trainer.progress import progress
from megatron_archer.trainer.rollout_phase import Group


@dataclass
class MiniBatch:
    """This rank's share of one mini-batch and its per-token constants, [b, R] response layout."""

    batch: SequenceBatch
    advantages: torch.Tensor
    rollout_logp: torch.Tensor
    old_logp: torch.Tensor | None = None
    old_entropy: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None


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


def build_mini_batches(groups: list[Group], algorithm: AlgorithmConfig, mini_batch_size: int
                       ) -> list[MiniBatch]:
    """This data-parallel rank's share of every mini-batch, with GRPO-style advantages (SPEC 2)."""
    dp_rank = parallel_state.get_data_parallel_rank()
    dp = parallel_state.get_data_parallel_world_size()
    n = len(groups[0].samples)
    scores = torch.tensor([g.scores for g in groups], dtype=torch.float64)
    advantages = group_advantages(scores, algorithm.advantage).flatten().float()
    samples = [(g.prompt, s) for g in groups for s in g.samples]
    out = []
    for indices in plan_mini_batches(len(groups), n, mini_batch_size, dp):
        mine = indices[dp_rank::dp]
        ids, masks, rollout = [], [], []
        for i in mine:
            prompt, sample = samples[i]
            ids.append(torch.tensor([*prompt.input_ids, *sample.token_ids], dtype=torch.long))
            masks.append(torch.cat([torch.zeros(len(prompt.input_ids), dtype=torch.bool),
                                    torch.ones(len(sample.token_ids), dtype=torch.bool)]))
            rollout.append(torch.tensor(sample.logprobs, dtype=torch.float32))
        batch = SequenceBatch(ids, masks)
        rollout_logp = torch.nn.utils.rnn.pad_sequence(rollout, batch_first=True)
        out.append(MiniBatch(batch, advantages[mine], rollout_logp))
    return out


def compute_old_and_reference(actor: Actor, reference: ReferenceModel | None,
                              mini_batches: list[MiniBatch], offload_reference: bool) -> None:
    """Fill ``old_logp`` / ``old_entropy`` (and ``ref_logp``) of every mini-batch, forward only."""
    for mb in mini_batches:
        old = actor.compute_logprobs_and_entropy(mb.batch)
        mb.old_logp, mb.old_entropy = old.logp.cpu(), old.entropy.cpu()
        if reference is not None:
            mb.ref_logp = reference.compute_logprobs_and_entropy(mb.batch).logp.cpu()
    if reference is not None and offload_reference:
        reference.offload()


def _loss_fn(mb: MiniBatch, algorithm: AlgorithmConfig, ctx, device):
    selection, loss_config = algorithm.selection, algorithm.loss
    on = (lambda t: None if t is None else t.to(device) if device is not None else t)
    old_logp, old_entropy, advantages = on(mb.old_logp), on(mb.old_entropy), on(mb.advantages)
    ref_logp = on(mb.ref_logp)

    def loss_fn(micro, logp, entropy):
        mask = micro.response_mask
        chosen = selection_entropy(selection, entropy, micro.gather(old_entropy))
        tokens = select_tokens(chosen, mask, selection, loss_config, ctx.forking_threshold)
        out = policy_loss(
            logp, micro.gather(old_logp), micro.gather(advantages), mask, tokens, ctx,
            loss_config, ref_logp=None if ref_logp is None else micro.gather(ref_logp),
            entropy=entropy if loss_config.entropy_coef else None)
        return out.loss, loss_metric_sums(out.terms, tokens)

    return loss_fn


def train_on_mini_batches(actor: Actor, mini_batches: list[MiniBatch], algorithm: AlgorithmConfig,
                          epochs: int, show_progress: bool) -> dict[str, float]:
    """``epochs`` passes of one optimiser step per mini-batch; the step's actor metrics."""
    dp_group = parallel_state.get_data_parallel_group()
    sums, results = [], []
    updates = [(e, mb) for e in range(epochs) for mb in mini_batches]
    for _, mb in progress(updates, show_progress, desc="train", unit="update"):
        micro = actor.micro_batches(mb.batch)
        ctx = build_step_context([(m.gather(mb.old_entropy.to(m.response_mask.device)),
                                   m.response_mask) for m in micro], algorithm.selection, dp_group)
        result = actor.train_step(mb.batch, _loss_fn(mb, algorithm, ctx, actor.device))
        results.append(result)
        sums.extend({k: v for k, v in out.items() if k != "loss"}
                    for out in result.micro_batch_metrics)
    metrics = {
        "actor/loss": sum(r.loss for r in results) / len(results),
        "actor/grad_norm": sum(r.grad_norm for r in results) / len(results),
        "actor/grad_norm_max": max(r.grad_norm for r in results),
        "actor/lr": results[-1].lr,
        "actor/updates": float(len(results)),
        "actor/skipped_updates": float(sum(r.skipped for r in results)),
    }
    if parallel_state.is_pipeline_last_stage():
        metrics.update({f"actor/{k}": v for k, v in reduce_loss_metrics(sums, dp_group).items()})
    return _from_last_stage(metrics)


def _from_last_stage(metrics: dict) -> dict:
    """The last pipeline stage's metrics on every stage (loss metrics exist there only)."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return metrics
    box = [metrics]
    torch.distributed.broadcast_object_list(
        box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group())
    return box[0]


def rollout_batch_metrics(mini_batches: list[MiniBatch]) -> tuple[dict[str, float], torch.Tensor]:
    """Old-policy entropy statistics (global over data-parallel ranks), the train-vs-rollout
    log-prob gap (this rank's share) and this rank's response-token entropies (for histograms)."""
    masks = [mb.batch.response_layout_mask() for mb in mini_batches]
    metrics = entropy_summary([(mb.old_entropy, m) for mb, m in zip(mini_batches, masks)],
                              parallel_state.get_data_parallel_group())
    train = torch.cat([mb.old_logp[m] for mb, m in zip(mini_batches, masks)])
    rollout = torch.cat([mb.rollout_logp[m] for mb, m in zip(mini_batches, masks)])
    metrics.update(logprob_gap(rollout, train, torch.ones_like(train, dtype=torch.bool)))
    return metrics, torch.cat([mb.old_entropy[m] for mb, m in zip(mini_batches, masks)])


@contextmanager
def timed(times: dict[str, float], name: str):
    """Add the block's wall time to ``times[name]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        times[name] = times.get(name, 0.0) + time.perf_counter() - start
