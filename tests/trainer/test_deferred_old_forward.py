"""The step's first update takes its old-policy results from its own training forward
(``compute_old_and_reference(defer_first=True)``, ``step.defers_old_forward``): on a real tiny
Qwen3 actor (gloo, 1 process at TP 1 and 2 processes at TP 2), the training phase gives bitwise
the same weights, old log-probs and entropy, batch metrics and actor metrics as with the separate
old-policy forward, one forward fewer, for Archer (reference and class-mean KL), forking tokens
with a global threshold from the old entropy, GRPO with the mismatch correction dropping tokens,
``old_logprobs: rollout`` and the fused log-prob op, over 2 epochs; NaN logits in the deferred
forward leave the mini-batch out with the same tensors named; the conditions that rule the
deferral out are honoured."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch

from megatron_archer.actor import Actor, ActorConfig, ReferenceModel
from megatron_archer.algorithms import preset
from megatron_archer.algorithms.config import RolloutCorrectionConfig
from megatron_archer.models import load_hf_model
from megatron_archer.trainer.step import (
    build_shares,
    compute_old_and_reference,
    defers_old_forward,
    needs_reference,
    rollout_batch_metrics,
    train_on_mini_batches,
)
from tests.distributed import run_distributed
from tests.models.checkpoints import write_checkpoint
from tests.models.parallel import model_parallel
from tests.trainer.common import random_groups


def _runner(cls, path, config):
    loaded = load_hf_model(path, params_dtype=torch.float32)
    return cls(loaded.model, loaded.spec, config, loaded.backend)


def _params(actor):
    return [p.detach().clone() for c in actor.chunks for p in c.parameters()]


def _poison(actor, mb):
    """NaN logits whenever the actor runs ``mb``'s packed row (its first update's forward)."""
    row = actor.micro_batches(mb.batch)[0].input_ids
    return actor.chunks[0].register_forward_hook(
        lambda m, args, out: out * math.nan if torch.equal(args[0], row) else out)


def _phase(path, shares, algorithm, config, defer, poison=False):
    """A fresh actor's old/reference phase, 2 epochs and the batch metrics (taken after training
    when deferring, as the trainer does); (old forwards, unusable, batch metrics, actor metrics,
    weights, mini-batches)."""
    actor, calls = _runner(Actor, path, config), []
    reference = _runner(ReferenceModel, path, config) if needs_reference(algorithm) else None
    forward = actor.compute_logprobs_and_entropy
    actor.compute_logprobs_and_entropy = lambda batch: calls.append(1) or forward(batch)
    shares = copy.deepcopy(shares)
    hook = _poison(actor, shares[0]) if poison else None
    unusable = compute_old_and_reference(actor, reference, shares, offload_reference=False,
                                         algorithm=algorithm, defer_first=defer)
    assert shares[0].old_deferred == defer and not shares[1].old_deferred
    batch_metrics = None if defer else rollout_batch_metrics(shares, unusable, algorithm)
    out = train_on_mini_batches(actor, shares, algorithm, 2, False, unusable=unusable)
    if hook is not None:
        hook.remove()
    if defer:
        batch_metrics = rollout_batch_metrics(shares, unusable, algorithm)
    assert not any(mb.old_deferred for mb in shares)
    return len(calls), unusable, batch_metrics, out, _params(actor), shares


def _same(a, b) -> bool:
    """Equal, NaN equal to NaN (dicts of floats, tensors, lists of them)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and torch.equal(a.nan_to_num(1e30), b.nan_to_num(1e30))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def _check_same(path, algorithm, config, name, poison=False) -> list[str]:
    """Both ways on the same mini-batches; what differs."""
    shares = build_shares(random_groups(4, 4, seed=7), algorithm, 2, 1)[0]
    calls_a, unusable_a, batch_a, out_a, params_a, mbs_a = _phase(
        path, shares, algorithm, config, False, poison)
    calls_b, unusable_b, batch_b, out_b, params_b, mbs_b = _phase(
        path, shares, algorithm, config, True, poison)
    failures = [f"{name}: {what}" for what, ok in (
        ("one old forward fewer", calls_b == calls_a - 1 + poison),  # poisoned: it runs after
        ("unusable", unusable_a == unusable_b),
        ("batch metrics", _same(batch_a, batch_b)),
        ("actor metrics", _same(out_a, out_b)),
        ("weights", _same(params_a, params_b)),
        ("old log-probs", _same([m.old_logp for m in mbs_a], [m.old_logp for m in mbs_b])),
        ("old entropy", _same([m.old_entropy for m in mbs_a], [m.old_entropy for m in mbs_b])),
    ) if not ok]
    if poison:  # the poisoned mini-batch is out, named as the separate forward names it
        assert unusable_b[0] == {"old_logp": 0, "old_entropy": 0}, unusable_b
        assert out_b["actor/skipped_updates"] == 2 and out_b["actor/nonfinite/old_logp"] == 2
    return failures


def _archer():
    return preset("archer")


def _single_process_worker(rank, world_size, path):
    with model_parallel(1):
        config = ActorConfig(max_tokens_per_micro_batch=4096, lr=1e-2)
        archer = _archer()
        forking = replace(preset("forking_80_20"),
                          selection=replace(preset("forking_80_20").selection, entropy_source="old"))
        masked = RolloutCorrectionConfig(True, "token", "mask", 1.5, mask_normalizer="drop")
        grpo = replace(preset("grpo"), rollout_correction=masked)
        rollout = replace(archer, old_logprobs="rollout")
        failures = []
        for name, algorithm, actor_config in (
                ("archer", archer, config), ("forking", forking, config),
                ("grpo + drop", grpo, config), ("archer rollout", rollout, config),
                ("archer fused", archer, replace(config, logprob_impl="fused"))):
            failures += _check_same(path, algorithm, actor_config, name)
        failures += _check_same(path, archer, config, "archer NaN logits", poison=True)
        assert not failures, "; ".join(failures)

        # ruled out: two micro-batches, no old-policy forward at all, dropout
        actor = _runner(Actor, path, replace(config, max_tokens_per_micro_batch=40))
        mb = build_shares(random_groups(4, 4, seed=7), archer, 2, 1)[0][0]
        assert len(actor.micro_batches(mb.batch)) > 1
        assert not defers_old_forward(actor, mb, archer)
        actor.config = config
        assert defers_old_forward(actor, mb, archer)
        plain = replace(preset("grpo"), old_logprobs="rollout")
        assert not defers_old_forward(actor, mb, plain)
        actor.chunks[0].config.hidden_dropout = 0.1
        assert not defers_old_forward(actor, mb, archer)


def _tensor_parallel_worker(rank, world_size, path):
    with model_parallel(2):
        config = ActorConfig(max_tokens_per_micro_batch=4096, lr=1e-2)
        failures = _check_same(path, _archer(), config, "archer tp 2")
        assert not failures, "; ".join(failures)
    with model_parallel(1):  # data parallel 2: the loss would need its peers' collectives
        actor = _runner(Actor, path, config)
        mb = build_shares(random_groups(4, 4, seed=7), _archer(), 2, 2)[rank][0]
        assert not defers_old_forward(actor, mb, _archer())


def test_deferred_old_forward_is_exact_single_process(tmp_path):
    run_distributed(_single_process_worker, 1, write_checkpoint(tmp_path / "qwen3", "qwen3"))


def test_deferred_old_forward_is_exact_at_tp2(tmp_path):
    run_distributed(_tensor_parallel_worker, 2, write_checkpoint(tmp_path / "qwen3", "qwen3"))
