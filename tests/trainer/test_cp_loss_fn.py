"""The trainer's loss functions under context parallelism (2 gloo ranks, no model): for Archer
with the sequence-level mismatch correction (docs/numerics.md §8), truncated and masked with dropped tokens,
the loss shares that ``trainer.step``'s ``_step_context`` / ``_loss_fn`` give each CP rank's half of
the packed micro-batches sum to the CP 1 loss, and so do their gradients. A sequence's weight is
the geometric mean of its token ratios, which span both CP ranks: without the CP group each rank
would weigh (and mask) a response by its own half. One micro-batch holds no response token at all
(a [1, 0] response layout: Archer's quantile has no tokens to rank there)."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_archer.actor.context_parallel import split_for_context_parallel
from megatron_archer.actor.packing import SequenceBatch, pack
from megatron_archer.algorithms import preset
from megatron_archer.algorithms.config import RolloutCorrectionConfig
from megatron_archer.trainer.step import MiniBatch, _loss_fn, _step_context
from tests.actor.common import make_batch
from tests.distributed import run_distributed
from tests.models.parallel import model_parallel

CORRECTIONS = {
    "truncate": RolloutCorrectionConfig(enabled=True, level="sequence", mode="truncate",
                                        threshold=1.05),
    "mask_drop": RolloutCorrectionConfig(enabled=True, level="sequence", mode="mask",
                                         threshold=1.05, mask_normalizer="drop"),
}


def _mini_batch() -> MiniBatch:
    """Six sequences with responses and a seventh without any response token (its micro-batch
    has the [1, 0] response layout, the others' quantiles and counts must not mind)."""
    some = make_batch(6, seed=4, min_len=4, max_len=26)
    batch = SequenceBatch([*some.input_ids, torch.arange(5)],
                          [*some.response_mask, torch.zeros(5, dtype=torch.bool)])
    mask = batch.response_layout_mask()
    # float64: the CP split sums each rank's share apart, and in float32 that reordering alone
    # moves the loss by up to ~n eps relative; in float64 the 1e-6 bound below leaves only the
    # split's own mistakes (a token counted twice or dropped moves it by ~1e-2)
    g = torch.Generator().manual_seed(8)
    old = -torch.rand(mask.shape, generator=g, dtype=torch.float64) * 3
    # engine log-probs off by up to +-0.2: some responses' geometric-mean ratio leaves [1/C, C]
    rollout = old + 0.4 * (torch.rand(mask.shape, generator=g, dtype=torch.float64) - 0.5)
    return MiniBatch(batch, torch.randn(len(batch), generator=g, dtype=torch.float64), rollout,
                     old_logp=old,
                     old_entropy=torch.rand(mask.shape, generator=g, dtype=torch.float64) * 2,
                     ref_logp=old + 0.1 * torch.randn(mask.shape, generator=g, dtype=torch.float64))


def step_shares(mb, algorithm, plans, cp_size, cp_rank, group, logp, salts=()):
    """This rank's summed loss shares over the micro-batches ``plans`` at the current policy
    ``logp`` [B, R], d/d(logp), and the high-class token count."""
    micro = [pack(mb.batch, p) for p in plans]
    if cp_size > 1:
        micro = [split_for_context_parallel(m, cp_size, cp_rank) for m in micro]
    logp = logp.clone().requires_grad_()
    ctx = _step_context(micro, mb, algorithm, group, salts)
    loss_fn = _loss_fn(mb, algorithm, ctx, None, salts)
    total, high = 0.0, 0.0
    for m in micro:
        loss, sums = loss_fn(m, torch.where(m.response_mask, m.gather(logp), 0.0),
                             m.gather(mb.old_entropy))
        total = total + loss
        high += float(sums["high/tokens"])
    total.backward()
    return total.detach(), logp.grad, high


def summed_share_failures(name: str, got, want) -> list[str]:
    """Where this rank's loss and gradient shares, summed over the ranks, miss the one-rank step."""
    failures = []
    for label, part, expected in (("loss", got[0], want[0]), ("grad", got[1], want[1])):
        summed = part.clone()
        dist.all_reduce(summed)  # the step is the sum of every CP rank's shares
        diff = (summed - expected).abs().max().item()
        if diff > 1e-6 * (1 + expected.abs().max().item()):
            failures.append(f"{name}: {label} off by {diff:.3g}")
    return failures


def _worker(rank, world_size):
    mb, plans = _mini_batch(), [[0, 3, 5], [1, 2, 4], [6]]
    assert pack(mb.batch, plans[-1]).response_mask.shape == (1, 0)
    logp = mb.old_logp + 0.05  # the current policy, near the old one
    failures = []
    for name, correction in CORRECTIONS.items():
        algorithm = replace(preset("archer"), rollout_correction=correction)
        with model_parallel(1):  # CP 1: the whole step on this rank alone
            want = step_shares(mb, algorithm, plans, 1, 0, None, logp)
        with model_parallel(1, context_parallel=world_size):
            got = step_shares(mb, algorithm, plans, world_size, rank,
                              parallel_state.get_data_parallel_group(with_context_parallel=True),
                              logp)
        failures += summed_share_failures(name, got, want)
    assert not failures, "; ".join(failures)


def test_loss_shares_at_cp2_sum_to_the_cp1_loss_with_sequence_level_correction():
    run_distributed(_worker, 2)
