"""The actor under context parallelism (SPEC 9), real gloo processes, at CP 2 and at PP 2 x CP 2:
log-probs and entropy of a packed batch (responses cut by chunk boundaries) equal a transformers
float64 reference on every CP rank, from the logits and with ``logprob_impl: fused``, and three
optimiser steps end with the weights, gradient norms and losses of the single-process
transformers + AdamW loop (tests/actor/test_train_step.py's reference)."""

from __future__ import annotations

from dataclasses import replace

import torch

from megatron_archer.actor import Actor, ActorConfig
from megatron_archer.models import hf_weight_buckets, load_hf_model
from tests.actor.common import hf_logprobs, make_batch
from tests.actor.test_train_step import (
    CONFIG,
    STEPS,
    TOLERANCE,
    _advantages,
    _loss_fn,
    _reference,
)
from tests.distributed import run_distributed
from tests.models.checkpoints import write_checkpoint
from tests.models.parallel import model_parallel


def _worker(rank, world_size, path, pipeline):
    batch = make_batch(9, seed=5)
    config = ActorConfig(**CONFIG)
    expected, norms, losses = _reference(path, batch, config)
    cp_size, cp_rank = world_size // pipeline, rank % (world_size // pipeline)
    with model_parallel(1, pipeline, context_parallel=cp_size):
        loaded = load_hf_model(path, params_dtype=torch.float32)
        actor = Actor(loaded.model, loaded.spec, config, loaded.backend)
        micro = actor.micro_batches(batch)
        assert all(mb.cp_size == cp_size and mb.cp_rank == cp_rank for mb in micro)
        assert any(0 < int(mb.response_mask.sum()) < int(mb.full_response_mask.sum()) for mb in micro)

        reference = hf_logprobs(path, batch)
        fused = load_hf_model(path, params_dtype=torch.float32)
        fused_actor = Actor(fused.model, fused.spec, replace(config, logprob_impl="fused"),
                            fused.backend)
        for result in (actor.compute_logprobs_and_entropy(batch),
                       fused_actor.compute_logprobs_and_entropy(batch)):
            for i, (logp, entropy) in enumerate(reference):
                n = logp.numel()
                assert torch.allclose(result.logp[i, :n].double(), logp, atol=2e-5), i
                assert torch.allclose(result.entropy[i, :n].double(), entropy, atol=2e-5), i

        # this rank's share of the loss is over its own tokens; the actor's scale undoes DDP's
        # average over data x context parallel ranks
        loss_fn = _loss_fn(sum(batch.response_counts), _advantages(batch))
        for step in range(STEPS):
            out = actor.train_step(batch, loss_fn)
            assert not out.skipped
            assert abs(out.grad_norm - norms[step]) <= 1e-4 * norms[step], (step, out.grad_norm)
            assert abs(out.loss - losses[step]) <= 1e-5 * max(1, abs(losses[step])), step
        got = dict(pair for bucket in hf_weight_buckets(loaded.model, loaded.spec, loaded.backend)
                   for pair in bucket)
        worst = max((tensor - expected[name]).abs().max().item() for name, tensor in got.items())
        assert worst <= TOLERANCE, worst
        if rank == 0:
            print(f"PP {pipeline} x CP {cp_size}: weights after {STEPS} steps within {worst:.2g} "
                  f"of the reference")


def test_actor_at_cp2_equals_single_process_transformers(tmp_path):
    run_distributed(_worker, 2, write_checkpoint(tmp_path / "qwen3", "qwen3"), 1)


def test_actor_at_pp2_cp2_equals_single_process_transformers(tmp_path):
    run_distributed(_worker, 4, write_checkpoint(tmp_path / "qwen3", "qwen3"), 2)
