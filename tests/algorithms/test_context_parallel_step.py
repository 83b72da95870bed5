"""The step loss under context parallelism (docs/numerics.md §3, 9), with real gloo processes: one rank,
(DP 2, CP 1), (DP 1, CP 2) and, on 4 ranks, (DP 2, CP 2) and (DP 1, CP 4) give the same step
loss, the same gradient after ``loss_scale`` (num_microbatches x DP), megatron's schedule (x CP,
1/num_microbatches) and DDP's average over DP x CP, the same per-token gradients and the same
metrics, for every selection method (Clip-Cov and KL-Cov included) and aggregation.

Under CP every rank of a CP group holds all of its replica's micro-batches in the same [B, T]
layout but only its own tokens (random per token, one response wholly on one rank, one cut in
contiguous chunks); the others' positions hold NaN, so a leak shows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_archer.algorithms import (
    AlgorithmConfig,
    Constraints,
    CovarianceTokens,
    ForkingConfig,
    LossConfig,
    SelectionConfig,
    build_step_context,
    entropy_summary,
    loss_metric_sums,
    policy_loss,
    reduce_loss_metrics,
    select_tokens,
    token_hash,
)
from megatron_archer.algorithms.config import COVARIANCE_METHODS
from megatron_archer.algorithms.rollout_correction import (
    correction_metric_sums,
    rollout_correction,
    rollout_correction_summary,
)
from tests.algorithms.test_split_invariance import AGGREGATIONS, CORRECTIONS, SALTS, SELECTIONS
from tests.distributed import run_distributed

SELECTIONS = {
    **SELECTIONS,
    "forking_micro_batch": SelectionConfig("forking", forking=ForkingConfig(rho=0.3, scope="micro_batch")),
    "forking_micro_batch_selected": SelectionConfig("forking", forking=ForkingConfig(
        rho=0.2, scope="micro_batch", normalizer="selected")),
}
SIZES = [3, 5, 2, 4]  # responses per micro-batch of the step
MAX_LEN = 13
FEATURES = 3  # logp = logp0 + f . theta: a shared "parameter" for the DDP-level gradient
KEYS = ("logp", "old", "ref", "rollout", "entropy")


def _micro_batches(seed):
    """The step's micro-batches as float64 [B, T] tensors (NaN in padding) and their owners' draw."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for index, size in enumerate(SIZES):
        lengths = torch.randint(1, MAX_LEN + 1, (size,), generator=gen)
        lengths[0] = 1 if index % 2 else MAX_LEN
        if size > 2:
            lengths[2] = 0  # a response without a scored token
        width = int(lengths.max())
        mask = torch.arange(width)[None, :] < lengths[:, None]
        logp = -3 * torch.rand(size, width, generator=gen, dtype=torch.float64)
        entropy = torch.rand(size, width, generator=gen, dtype=torch.float64)
        entropy[torch.rand(size, width, generator=gen) < 0.3] = 0.5  # ties across ranks
        entropy[torch.rand(size, width, generator=gen) < 0.2] = 0.0
        mb = dict(
            mask=mask, logp=logp, entropy=entropy,
            old=logp + 0.4 * torch.randn(size, width, generator=gen, dtype=torch.float64),
            ref=logp + 0.3 * torch.randn(size, width, generator=gen, dtype=torch.float64),
            rollout=logp + 0.5 * torch.randn(size, width, generator=gen, dtype=torch.float64),
            adv=torch.randn(size, generator=gen, dtype=torch.float64),
            feat=torch.randn(size, width, FEATURES, generator=gen, dtype=torch.float64),
            entropy_feat=0.1 * torch.randn(size, width, FEATURES, generator=gen, dtype=torch.float64),
            draw=torch.rand(size, width, generator=gen),
            # Clip-Cov / KL-Cov's per-token hash of (response id, position): kept by every share
            hash=token_hash(SALTS, torch.arange(size) + 16 * index, width),
        )
        for key in KEYS:
            mb[key] = torch.where(mask, mb[key], torch.full((), float("nan"), dtype=torch.float64))
        out.append(mb)
    return out


def _cp_share(mb, cp_size, cp_rank):
    """CP rank ``cp_rank``'s tokens of ``mb``: random per token, row 1 all on the last rank,
    the last row in contiguous chunks; NaN at the other ranks' tokens."""
    owner = (mb["draw"] * cp_size).long()
    owner[1] = cp_size - 1
    owner[-1] = torch.arange(owner.shape[1]) * cp_size // owner.shape[1]
    mine = mb["mask"] & (owner == cp_rank)
    share = dict(mb, mask=mine)
    for key in KEYS:
        share[key] = torch.where(mine, mb[key], torch.full((), float("nan"), dtype=torch.float64))
    return share


def _step(micro_batches, selection, loss_cfg, correction, group, cp_group):
    """This rank's summed micro-batch losses, theta's gradient after megatron's 1/M and DDP's
    average over ``group``, per-token log-prob gradients of the step loss, metrics, context."""
    size = 1 if group is None else dist.get_world_size(group)
    cp_size = 1 if cp_group is None else dist.get_world_size(cp_group)
    by_covariance = selection.method in COVARIANCE_METHODS  # docs/numerics.md §10
    ctx = build_step_context([(mb["entropy"], mb["mask"]) for mb in micro_batches], selection,
                             group, cp_group,
                             covariance=[CovarianceTokens(mb["old"], mb["adv"], mb["hash"])
                                         for mb in micro_batches] if by_covariance else None)
    theta = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
    total, token_grads, sums = 0.0, [], []
    for mb in micro_batches:
        leaf = mb["logp"].clone().requires_grad_(True)
        logp = leaf + (mb["feat"] * theta).sum(-1)
        current = CovarianceTokens(logp.detach(), mb["adv"], mb["hash"]) if by_covariance else None
        sel = select_tokens(mb["entropy"], mb["mask"], selection, loss_cfg, ctx.forking_threshold,
                            cp_group=cp_group, covariance=current, covariance_stats=ctx.covariance)
        entropy = mb["entropy"] + (mb["entropy_feat"] * theta).sum(-1)
        weights = rollout_correction(mb["old"], mb["rollout"], mb["mask"], correction, cp_group) \
            if correction.enabled else None
        out = policy_loss(logp, mb["old"], mb["adv"], mb["mask"], sel, ctx, loss_cfg,
                          ref_logp=mb["ref"], entropy=entropy,
                          rollout_weight=None if weights is None else weights.weight,
                          cp_group=cp_group)
        # what megatron's schedule does with the loss handed to it: x CP size, 1/num_microbatches
        (out.loss * ctx.loss_scale * cp_size / len(micro_batches)).backward()
        total += out.loss.item()
        token_grads.append(leaf.grad * len(micro_batches) / (ctx.loss_scale * cp_size))
        sums.append(loss_metric_sums(out.terms, sel))
        if weights is not None:
            sums[-1].update(correction_metric_sums(weights, sel))
    grad = theta.grad.clone()
    if group is not None:  # DDP: all-reduce, average over DP x CP
        dist.all_reduce(grad, group=group)
        grad /= size
        summed = torch.tensor([total], dtype=torch.float64)
        dist.all_reduce(summed, group=group)
        total = summed.item()
    metrics = reduce_loss_metrics(sums, group)
    if correction.enabled:
        metrics.update(rollout_correction_summary(
            [(mb["old"], mb["rollout"], mb["mask"]) for mb in micro_batches], correction, group,
            cp_group))
    metrics.update(entropy_summary([(mb["entropy"], mb["mask"]) for mb in micro_batches], group))
    return total, grad, token_grads, metrics, ctx


def _close(a, b, what, rel=1e-12):
    assert abs(a - b) <= rel * max(1.0, abs(b)), f"{what}: {a} != {b}"


def _cases(full: bool):
    no_correction = AlgorithmConfig().rollout_correction
    names = list(SELECTIONS)
    if full:
        cases = [(n, a, k, no_correction) for n in names for a in AGGREGATIONS
                 for k in ("token", "class_mean")]
        cases += [(n, AGGREGATIONS[(i + j) % 3], "class_mean" if "archer" in n else "token", c)
                  for i, n in enumerate(names) for j, c in enumerate(CORRECTIONS)]
        return cases
    return [(n, AGGREGATIONS[i % 3], "class_mean" if i % 2 else "token",
             CORRECTIONS[i % len(CORRECTIONS)] if i % 3 == 0 else no_correction)
            for i, n in enumerate(names)]


def _layouts(rank, world_size):
    """(name, this rank's micro-batch indices, CP size, CP rank, group, cp_group) per layout."""
    world = dist.group.WORLD
    if world_size == 2:
        return [("DP 2, CP 1", [2 * rank, 2 * rank + 1], 1, 0, world, None),
                ("DP 1, CP 2", [0, 1, 2, 3], 2, rank, world, world)]
    # (DP 2, CP 2): CP groups {0, 1} and {2, 3}, created on every rank in the same order
    cp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    replica = rank // 2
    return [("DP 2, CP 2", [2 * replica, 2 * replica + 1], 2, rank % 2, world, cp_groups[replica]),
            ("DP 1, CP 4", [0, 1, 2, 3], 4, rank, world, world)]


def _worker(rank, world_size, seed):
    step = _micro_batches(seed)
    layouts = [(name, [_cp_share(step[i], cp_size, cp_rank) for i in indices], cp_size, group,
                cp_group)
               for name, indices, cp_size, cp_rank, group, cp_group in _layouts(rank, world_size)]
    worst = 0.0
    for selection_name, aggregation, kl_aggregation, correction in _cases(world_size == 2):
        selection = SELECTIONS[selection_name]
        cfg = LossConfig(clip=Constraints(0.2, 0.28, 0.01), dual_clip=3.0,
                         kl_aggregation=kl_aggregation, entropy_coef=0.003, aggregation=aggregation,
                         norm_length=MAX_LEN if aggregation == "seq-mean-token-sum-norm" else None)
        want = _step(step, selection, cfg, correction, None, None)
        for layout, mine, cp_size, group, cp_group in layouts:
            what = f"{layout}: {selection_name} / {aggregation} / {kl_aggregation} / {correction}"
            loss, grad, token_grads, metrics, ctx = _step(mine, selection, cfg, correction,
                                                          group, cp_group)
            _close(loss, want[0], what)
            torch.testing.assert_close(grad, want[1], rtol=1e-9, atol=1e-12, msg=lambda m, what=what: f"{what}: {m}")
            worst = max(worst, ((grad - want[1]).abs() / want[1].abs().clamp_min(1e-12)).max().item())
            for share, got_grad in zip(mine, token_grads):
                index = next(i for i, mb in enumerate(step) if mb["draw"] is share["draw"])
                expected = torch.where(share["mask"], want[2][index], torch.zeros((), dtype=torch.float64))
                torch.testing.assert_close(torch.where(share["mask"], got_grad, 0.0), expected,
                                           rtol=1e-10, atol=1e-13, msg=lambda m, what=what: f"{what}: {m}")
            assert metrics.keys() == want[3].keys(), what
            for key in metrics:
                _close(metrics[key], want[3][key], f"{what}: {key}")
            assert ctx.forking_threshold == want[4].forking_threshold, what
            assert ctx.covariance == want[4].covariance, what  # bit for bit
            assert (ctx.num_tokens, ctx.num_sequences) == (want[4].num_tokens, want[4].num_sequences), what
            _close(ctx.num_selected, want[4].num_selected, what)
            for got_class, want_class in zip(ctx.class_tokens, want[4].class_tokens):
                _close(got_class, want_class, what)
            # num_microbatches x DP (megatron's schedule multiplies by the CP size itself)
            assert ctx.loss_scale == len(mine) * world_size // cp_size, what
    assert worst < 1e-9, worst
    if rank == 0:
        print(f"{world_size} ranks: largest relative gradient difference to one rank {worst:.2e}")


def test_step_under_context_parallelism_equals_one_rank_and_data_parallel():
    run_distributed(_worker, 2, 77)


def test_step_at_dp2_cp2_and_cp4_equals_one_rank():
    run_distributed(_worker, 4, 78)
