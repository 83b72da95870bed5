"""Clip-Cov and KL-Cov through the trainer's loss functions (docs/numerics.md §10): with 2 gloo ranks
as context-parallel halves of the packed micro-batches, the loss shares that ``trainer.step``'s
``_step_context`` / ``_loss_fn`` give sum to the single-rank loss and gradient; the token hashes
come from each sequence's content, so both ranks draw the same tokens; the draw changes with the
salts (a new one each update)."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_archer.algorithms import ClipCovConfig, KLCovConfig, SelectionConfig, preset
from tests.distributed import run_distributed
from tests.models.parallel import model_parallel
from tests.trainer.test_cp_loss_fn import _mini_batch, step_shares, summed_share_failures

SELECTIONS = {  # budgets large enough that the toy step's draw and ranking decide something
    "clip_cov": SelectionConfig("clip_cov", clip_cov=ClipCovConfig(ratio=0.05, lb=0.1, ub=3.0)),
    "kl_cov": SelectionConfig("kl_cov", kl_cov=KLCovConfig(ratio=0.1, coef=0.5)),
}


def _worker(rank, world_size):
    mb, plans = _mini_batch(), [[0, 3, 5], [1, 2, 4], [6]]
    logp = mb.old_logp + 0.05 * torch.sin(torch.arange(mb.old_logp.numel()).view(
        mb.old_logp.shape).double())  # the current policy, near the old one
    failures = []
    for name, selection in SELECTIONS.items():
        algorithm = replace(preset("dapo"), selection=selection)
        with model_parallel(1):
            want = step_shares(mb, algorithm, plans, 1, 0, None, logp, (5, 1, 0, 0))
            other = step_shares(mb, algorithm, plans, 1, 0, None, logp, (5, 1, 0, 1))
        tokens = int(mb.batch.response_layout_mask().sum())
        if not 0 < want[2] < tokens:
            failures.append(f"{name}: {want[2]} of {tokens} tokens selected, the case is not reached")
        if name == "clip_cov" and torch.equal(want[1], other[1]):
            failures.append("clip_cov: another update's salts drew the same tokens")
        with model_parallel(1, context_parallel=world_size):
            got = step_shares(mb, algorithm, plans, world_size, rank,
                              parallel_state.get_data_parallel_group(with_context_parallel=True),
                              logp, (5, 1, 0, 0))
        failures += summed_share_failures(name, got, want)
        high = torch.tensor([got[2]], dtype=torch.float64)
        dist.all_reduce(high)
        if high.item() != want[2]:
            failures.append(f"{name}: {high.item()} tokens selected over CP ranks, {want[2]} on one")
    assert not failures, "; ".join(failures)


def test_covariance_methods_through_the_trainer_loss_at_cp2_equal_cp1():
    run_distributed(_worker, 2)
