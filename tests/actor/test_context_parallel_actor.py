"""The actor under context parallelism (docs/numerics.md §9), real gloo processes, at CP 2 and at PP 2 x CP 2:
log-probs and entropy of a packed batch (responses cut by chunk boundaries) are as accurate
against transformers in float64 as transformers in float32 is, on every CP rank, from the logits
and with ``logprob_impl: fused``; so are the weights, gradient norms and losses of three optimiser
steps against the single-process transformers + AdamW loop (tests/actor/test_train_step.py's
reference, run in float32 and float64)."""

from __future__ import annotations

from dataclasses import replace

import torch

from megatron_archer.actor import Actor, ActorConfig
from megatron_archer.models import hf_weight_buckets, load_hf_model
from tests.actor.common import hf_logprobs, make_batch
from tests.actor.test_train_step import (
    CONFIG,
    STEPS,
    _advantages,
    _loss_fn,
    _reference,
)
from tests.distributed import run_distributed
from tests.models.checkpoints import write_checkpoint
from tests.models.parallel import model_parallel
from tests.numerics import accuracy_failure


def _worker(rank, world_size, path, pipeline):
    batch = make_batch(9, seed=5)
    config = ActorConfig(**CONFIG)
    baseline = _reference(path, batch, config, torch.float32)
    expected, norms, losses = _reference(path, batch, config, torch.float64)
    failures = []
    cp_size, cp_rank = world_size // pipeline, rank % (world_size // pipeline)
    with model_parallel(1, pipeline, context_parallel=cp_size):
        loaded = load_hf_model(path, params_dtype=torch.float32)
        actor = Actor(loaded.model, loaded.spec, config, loaded.backend)
        micro = actor.micro_batches(batch)
        assert all(mb.cp_size == cp_size and mb.cp_rank == cp_rank for mb in micro)
        assert any(0 < int(mb.response_mask.sum()) < int(mb.full_response_mask.sum()) for mb in micro)

        reference = hf_logprobs(path, batch, dtype=torch.float64)
        base = hf_logprobs(path, batch)
        fused = load_hf_model(path, params_dtype=torch.float32)
        fused_actor = Actor(fused.model, fused.spec, replace(config, logprob_impl="fused"),
                            fused.backend)
        for impl, result in (("logits", actor.compute_logprobs_and_entropy(batch)),
                             ("fused", fused_actor.compute_logprobs_and_entropy(batch))):
            for i, (logp, entropy, scale) in enumerate(reference):
                n = logp.numel()
                failures.append(accuracy_failure(f"{impl} seq {i} logp", result.logp[i, :n],
                                                 base[i][0], logp, scale=scale))
                failures.append(accuracy_failure(f"{impl} seq {i} entropy", result.entropy[i, :n],
                                                 base[i][1], entropy, scale=scale))

        # this rank's share of the loss is over its own tokens; the actor's scale undoes DDP's
        # average over data x context parallel ranks
        loss_fn = _loss_fn(sum(batch.response_counts), _advantages(batch))
        for step in range(STEPS):
            out = actor.train_step(batch, loss_fn)
            assert not out.skipped
            failures.append(accuracy_failure(f"step {step} grad_norm", out.grad_norm,
                                             baseline[1][step], norms[step]))
            failures.append(accuracy_failure(f"step {step} loss", out.loss, baseline[2][step],
                                             losses[step]))
        got = dict(pair for bucket in hf_weight_buckets(loaded.model, loaded.spec, loaded.backend)
                   for pair in bucket)
        failures.extend(accuracy_failure(name, tensor, baseline[0][name], expected[name])
                        for name, tensor in got.items())
    failures = [f"PP {pipeline} x CP {cp_size} {f}" for f in failures if f]
    assert not failures, "; ".join(failures)


def test_actor_at_cp2_equals_single_process_transformers(tmp_path):
    run_distributed(_worker, 2, write_checkpoint(tmp_path / "qwen3", "qwen3"), 1)


def test_actor_at_pp2_cp2_equals_single_process_transformers(tmp_path):
    run_distributed(_worker, 4, write_checkpoint(tmp_path / "qwen3", "qwen3"), 2)
