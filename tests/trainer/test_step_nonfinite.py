"""The training phase on 2 real data-parallel ranks (gloo, TP 1): NaN logits on one rank skip
that update on both ranks (weights untouched, the tensor named) and the next update runs;
``on_nonfinite: error`` stops both ranks naming the tensor; non-finite old log-probs keep a
mini-batch out of training on every rank; an entropy bonus has a gradient; the data-parallel
split balances tokens and every rank's share survives the flat-tensor scatter intact."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from megatron_archer.actor import Actor, ActorConfig
from megatron_archer.algorithms import preset
from megatron_archer.models import load_hf_model
from megatron_archer.nonfinite import NonFiniteError
from megatron_archer.trainer.rollout_share import scatter_shares
from megatron_archer.trainer.step import (
    build_shares,
    compute_old_and_reference,
    rollout_batch_metrics,
    split_by_tokens,
    train_on_mini_batches,
)
from tests.distributed import run_distributed
from tests.models.checkpoints import write_checkpoint
from tests.models.parallel import model_parallel
from tests.trainer.common import random_groups


def _params(actor):
    return [p.detach().clone() for c in actor.chunks for p in c.parameters()]


def _nan_logits_on(actor, rank):
    """A forward hook making this rank's logits NaN (megatron's output layer returns (y, bias))."""
    layer = actor.chunks[0].output_layer
    if dist.get_rank() != rank:
        return None
    return layer.register_forward_hook(lambda m, i, out: (out[0] * math.nan, *out[1:]))


def _worker(rank, world_size, path):
    with model_parallel(1):  # data parallel 2
        algorithm = preset("archer")
        algorithm = replace(algorithm, loss=replace(algorithm.loss, kl_aggregation="token"),
                            selection=replace(algorithm.selection, archer=replace(
                                algorithm.selection.archer,
                                knowledge=replace(algorithm.selection.archer.knowledge, kl_coef=0.0))))
        shares = build_shares(random_groups(4, 4, seed=3), algorithm, 2, 2) if rank == 0 else None
        mini_batches, moved = scatter_shares(shares)
        assert moved > 0 and len(mini_batches) == 2
        every = [None, None]
        dist.all_gather_object(every, [(mb.batch.input_ids, mb.advantages, mb.rollout_logp)
                                       for mb in mini_batches])
        if rank == 0:  # each rank received exactly what rank 0 built for it
            for d in range(2):
                for got, built in zip(every[d], shares[d]):
                    assert all(torch.equal(a, b) for a, b in zip(got[0], built.batch.input_ids))
                    assert torch.equal(got[1], built.advantages)
                    assert torch.equal(got[2], built.rollout_logp)

        loaded = load_hf_model(path, params_dtype=torch.float32)
        actor = Actor(loaded.model, loaded.spec,
                      ActorConfig(max_tokens_per_micro_batch=24, lr=1e-2), loaded.backend)

        unusable = compute_old_and_reference(actor, None, mini_batches, offload_reference=False,
                                             algorithm=algorithm)
        assert unusable == [{}, {}]
        metrics, _ = rollout_batch_metrics(mini_batches, unusable, algorithm)
        # the train-vs-rollout gap is over both ranks' tokens: the same number on each
        gaps = [None, None]
        dist.all_gather_object(gaps, metrics["rollout/logprob_abs_diff_mean"])
        assert gaps[0] == gaps[1]

        # NaN logits on rank 1 during the first update: skipped on both ranks, second runs
        before = _params(actor)
        hook = _nan_logits_on(actor, 1)
        calls = []
        original = actor.train_step

        def train_step(*args, **kwargs):
            result = original(*args, **kwargs)
            calls.append(result)
            if hook is not None and len(calls) == 1:
                hook.remove()
            return result

        actor.train_step = train_step
        out = train_on_mini_batches(actor, mini_batches, algorithm, 1, False)
        assert calls[0].skipped and calls[0].nonfinite == {"logits": 1}, calls[0]
        assert not calls[1].skipped
        assert out["actor/skipped_updates"] == 1 and out["actor/nonfinite/logits"] == 1
        assert out["actor/updates"] == 2 and math.isfinite(out["actor/grad_norm"])
        assert actor.steps_taken == 1
        assert any(not torch.equal(a, b) for a, b in zip(before, _params(actor)))

        # on_nonfinite=error: every rank raises, naming the tensor and the rank
        hook = _nan_logits_on(actor, 0)
        calls.clear()
        with pytest.raises(NonFiniteError, match=r"logits \(first on global rank 0\)"):
            train_on_mini_batches(actor, mini_batches, algorithm, 1, False, on_nonfinite="error")
        if hook is not None:
            hook.remove()
        actor.train_step = original

        # non-finite old log-probs on rank 0's share of mini-batch 1: kept out on both ranks
        hook = _nan_logits_on(actor, 0)
        unusable = compute_old_and_reference(actor, None, mini_batches[1:], offload_reference=False,
                                             algorithm=algorithm)
        if hook is not None:
            hook.remove()
        assert unusable == [{"old_logp": 0, "old_entropy": 0}]
        steps = actor.steps_taken
        out = train_on_mini_batches(actor, mini_batches[1:], algorithm, 1, False,
                                    unusable=unusable)
        assert out["actor/skipped_updates"] == 1 and actor.steps_taken == steps
        assert "actor/grad_norm" not in out and out["actor/nonfinite/old_logp"] == 1

        # an entropy bonus alone (zero advantages) moves the weights: its gradient reaches them
        compute_old_and_reference(actor, None, mini_batches, offload_reference=False,
                                  algorithm=algorithm)
        for mb in mini_batches:
            mb.advantages = torch.zeros_like(mb.advantages)
        bonus = replace(algorithm, loss=replace(algorithm.loss, entropy_coef=0.1))
        out = train_on_mini_batches(actor, mini_batches[:1], bonus, 1, False)
        assert out["actor/grad_norm"] > 1e-4, out["actor/grad_norm"]
        out = train_on_mini_batches(actor, mini_batches[:1], algorithm, 1, False)
        assert out["actor/grad_norm"] == 0.0


def _fused_worker(rank, world_size, path):
    """``logprob_impl: fused``: NaN hidden states reach the fused head on rank 1 in the first
    update; it is skipped on both ranks with the logits named (a ValueError other than
    NonFiniteError would take rank 1 out of the schedule and leave rank 0 in the reduce)."""
    with model_parallel(1):  # data parallel 2
        algorithm = preset("dapo")  # no reference model
        shares = build_shares(random_groups(4, 4, seed=3), algorithm, 2, 2) if rank == 0 else None
        mini_batches, _ = scatter_shares(shares)
        loaded = load_hf_model(path, params_dtype=torch.float32)
        actor = Actor(loaded.model, loaded.spec, ActorConfig(
            max_tokens_per_micro_batch=24, lr=1e-2, logprob_impl="fused"), loaded.backend)
        compute_old_and_reference(actor, None, mini_batches, offload_reference=False,
                                  algorithm=algorithm)
        norm = actor.chunks[0].decoder.final_layernorm
        hook = norm.register_forward_hook(lambda m, i, out: out * math.nan) if rank == 1 else None
        calls, original = [], actor.train_step

        def train_step(*args, **kwargs):
            calls.append(original(*args, **kwargs))
            if hook is not None and len(calls) == 1:
                hook.remove()
            return calls[-1]

        actor.train_step = train_step
        out = train_on_mini_batches(actor, mini_batches, algorithm, 1, False)
        assert calls[0].skipped and calls[0].nonfinite == {"logits": 1}, calls[0]
        assert not calls[1].skipped and out["actor/skipped_updates"] == 1


def test_fused_logprobs_nonfinite_update_is_skipped_on_every_rank(tmp_path):
    run_distributed(_fused_worker, 2, write_checkpoint(tmp_path / "qwen3", "qwen3"))


def test_training_phase_on_two_data_parallel_ranks(tmp_path):
    path = write_checkpoint(tmp_path / "qwen3", "qwen3")
    run_distributed(_worker, 2, path)


def test_split_by_tokens_balances_tokens_and_gives_every_rank_one():
    lengths = [30, 5, 5, 5, 5, 5, 5]
    shares = split_by_tokens(list(range(7)), lengths, 2)
    assert shares == [[0], [1, 2, 3, 4, 5, 6]]  # 30 tokens each; by count it would be 4 + 3
    assert split_by_tokens([4, 9], [1, 1], 2) == [[4], [9]]
    loads = [sum(lengths[i] for i in s) for s in split_by_tokens(list(range(7)), lengths, 3)]
    assert max(loads) == 30 and min(loads) >= 10

