"""A step whose loss or gradient is non-finite on one rank is skipped on every rank with weights,
AdamW state and schedule position unchanged; the reference model's log-probs stay frozen while
the actor trains (TP 2 and DP 2, qwen3)."""

from __future__ import annotations

import torch

from megatron_archer.actor import Actor, ActorConfig, ReferenceModel
from megatron_archer.models import load_hf_model
from tests.actor.common import make_batch
from tests.distributed import run_distributed
from tests.models.checkpoints import write_checkpoint
from tests.models.parallel import model_parallel
from tests.numerics import assert_as_accurate


def _loss(mb, logp, entropy):
    return torch.where(mb.response_mask, -logp, 0.0).sum() / 100.0


def _nan_loss_on(rank):
    def loss_fn(mb, logp, entropy):
        loss = _loss(mb, logp, entropy)
        return loss * float("nan") if torch.distributed.get_rank() == rank else loss
    return loss_fn


def _inf_grad_on(rank):
    def loss_fn(mb, logp, entropy):  # finite loss, infinite gradient
        if torch.distributed.get_rank() == rank:
            logp.register_hook(lambda g: g * float("inf"))
        return _loss(mb, logp, entropy)
    return loss_fn


def _snapshot(actor):
    params = [p.detach().clone() for c in actor.chunks for p in c.parameters()]
    state = [v.clone() for s in actor.optimizer.state.values() for v in s.values()
             if isinstance(v, torch.Tensor)]
    return params, state


def _worker(rank, world_size, path):
    batch = make_batch(6, seed=11)
    config = ActorConfig(max_tokens_per_micro_batch=40, lr=1e-2)
    for tp in (2, 1):
        with model_parallel(tp):
            loaded = load_hf_model(path, params_dtype=torch.float32)
            actor = Actor(loaded.model, loaded.spec, config, loaded.backend)
            ref_loaded = load_hf_model(path, params_dtype=torch.float32)
            reference = ReferenceModel(
                ref_loaded.model, ref_loaded.spec, config, ref_loaded.backend)
            assert not any(p.requires_grad for p in ref_loaded.model.parameters())
            ref_before = reference.compute_logprobs_and_entropy(batch)
            # same weights (frozen parameters may take other kernels): the actor as accurate as
            # the reference model against the reference model in float64 (tests/numerics.py)
            start = actor.compute_logprobs_and_entropy(batch).logp
            exact = load_hf_model(path, params_dtype=torch.float64)
            exact_logp = ReferenceModel(exact.model, exact.spec, config,
                                        exact.backend).compute_logprobs_and_entropy(batch).logp
            assert_as_accurate(start, ref_before.logp, exact_logp, "actor log-probs")

            assert not actor.train_step(batch, _loss).skipped
            for bad in (_nan_loss_on(1), _inf_grad_on(0)):
                before = _snapshot(actor)
                result = actor.train_step(batch, bad)
                assert result.skipped, (tp, rank)
                assert actor.steps_taken == 1
                after = _snapshot(actor)
                for old, new in zip(before[0] + before[1], after[0] + after[1]):
                    assert torch.equal(old, new)
                assert len(before[1]) > 0  # AdamW state exists and was compared
            result = actor.train_step(batch, _loss)
            assert not result.skipped and actor.steps_taken == 2 and result.lr == config.lr_at(1)

            ref_after = reference.compute_logprobs_and_entropy(batch)
            assert torch.equal(ref_after.logp, ref_before.logp)
            assert torch.equal(ref_after.entropy, ref_before.entropy)
            trained = actor.compute_logprobs_and_entropy(batch).logp
            assert (trained - ref_before.logp).abs().max() > 1e-2  # the actor did move


def test_nonfinite_step_skipped_and_reference_frozen(tmp_path):
    path = write_checkpoint(tmp_path / "qwen3", "qwen3")
    run_distributed(_worker, 2, path)
