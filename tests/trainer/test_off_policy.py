"""Off-policy handling in the training phase (docs/numerics.md §8), on a real tiny Qwen3 actor (gloo, 1 rank):
``old_logprobs: rollout`` skips the old-policy forward (selection ``none``) or runs it for the
entropy only (Archer), and trains exactly like ``recompute`` when the engine's log-probs are the
trainer's; the mismatch correction is wired into the loss and its metrics (w = 1 changes
nothing; a perturbed engine is corrected and reported; dropped tokens leave the normaliser)."""

from __future__ import annotations

import copy
import time
from dataclasses import replace

import pytest
import torch

from megatron_archer.actor import Actor, ActorConfig
from megatron_archer.algorithms import AlgorithmConfig, Constraints, LossConfig, preset
from megatron_archer.algorithms.config import RolloutCorrectionConfig
from megatron_archer.algorithms.rollout_correction import rollout_correction
from megatron_archer.models import load_hf_model
from megatron_archer.trainer.step import (
    build_shares,
    compute_old_and_reference,
    rollout_batch_metrics,
    train_on_mini_batches,
)
from tests.distributed import run_distributed
from tests.models.checkpoints import write_checkpoint
from tests.models.parallel import model_parallel
from tests.trainer.common import random_groups


def _actor(path):
    loaded = load_hf_model(path, params_dtype=torch.float32)
    return Actor(loaded.model, loaded.spec, ActorConfig(max_tokens_per_micro_batch=24, lr=1e-2),
                 loaded.backend)


def _params(actor):
    return [p.detach().clone() for c in actor.chunks for p in c.parameters()]


def _agreeing_shares(path, algorithm):
    """Mini-batches whose engine log-probs are exactly the trainer's at step start."""
    groups = random_groups(4, 4, seed=5, max_length=11, engine_logprobs=False)
    shares = build_shares(groups, algorithm, 2, 1)[0]
    compute_old_and_reference(_actor(path), None, shares, offload_reference=False)
    for mb in shares:
        mb.rollout_logp = mb.old_logp.clone()
        mb.old_logp = mb.old_entropy = None
    return shares


def _train(path, shares, algorithm):
    """A fresh actor's old/reference phase and one epoch; (calls to the old forward, seconds of
    the log-prob phase, batch metrics, actor metrics, parameters after)."""
    actor, calls = _actor(path), []
    forward = actor.compute_logprobs_and_entropy
    actor.compute_logprobs_and_entropy = lambda batch: calls.append(1) or forward(batch)
    shares = copy.deepcopy(shares)
    start = time.perf_counter()
    unusable = compute_old_and_reference(actor, None, shares, offload_reference=False,
                                         algorithm=algorithm)
    seconds = time.perf_counter() - start
    batch_metrics, _ = rollout_batch_metrics(shares, unusable, algorithm)
    out = train_on_mini_batches(actor, shares, algorithm, 1, False, unusable=unusable)
    return len(calls), seconds, batch_metrics, out, _params(actor), shares


def _worker(rank, world_size, path):
    with model_parallel(1):
        plain = AlgorithmConfig(loss=LossConfig(clip=Constraints(0.2, 0.28, 0.0)))
        archer = preset("archer")
        archer = replace(archer, loss=replace(archer.loss, kl_aggregation="token"),
                         selection=replace(archer.selection, archer=replace(
                             archer.selection.archer,
                             knowledge=replace(archer.selection.archer.knowledge, kl_coef=0.0))))
        for name, algorithm, rollout_forwards in (("none", plain, 0), ("archer", archer, 2)):
            shares = _agreeing_shares(path, algorithm)
            calls, t_recompute, metrics_a, out_a, params_a, _ = _train(path, shares, algorithm)
            assert calls == len(shares) == 2 and metrics_a["rollout/logprob_abs_diff_max"] == 0
            from_rollout = replace(algorithm, old_logprobs="rollout")
            calls, t_rollout, metrics_b, out_b, params_b, trained = _train(path, shares, from_rollout)
            # selection none: no forward at all; Archer: the forward only for its entropy
            assert calls == rollout_forwards, (name, calls)
            assert all(torch.equal(mb.old_logp, mb.rollout_logp) for mb in trained)
            assert ("entropy/mean" in metrics_b) == (rollout_forwards > 0), metrics_b
            assert not any(k.startswith("rollout/logprob") for k in metrics_b), metrics_b
            assert out_b["actor/loss"] == out_a["actor/loss"], (name, out_a, out_b)
            assert all(torch.equal(a, b) for a, b in zip(params_a, params_b)), name
            print(f"{name}: log-prob phase {t_recompute * 1e3:.1f} ms (recompute) vs "
                  f"{t_rollout * 1e3:.1f} ms (rollout)")

        # the correction with w = 1 (engine == trainer) changes nothing and reports w = 1
        shares = _agreeing_shares(path, archer)
        corrected = replace(archer, rollout_correction=RolloutCorrectionConfig(True))
        _, _, _, out_a, params_a, _ = _train(path, shares, archer)
        _, _, metrics, out_b, params_b, _ = _train(path, shares, corrected)
        assert out_b["actor/loss"] == out_a["actor/loss"]
        assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))
        assert metrics["rollout_is/mean"] == pytest.approx(1.0, abs=1e-6)
        assert metrics["rollout_is/max"] == 1.0 and metrics["rollout_is/corrected_share"] == 0.0
        assert out_b["actor/all/rollout_is_mean"] == pytest.approx(1.0, abs=1e-6)
        assert out_b["actor/high/rollout_is_corrected_frac"] == 0.0

        # a perturbed engine: w != 1, some tokens truncated at C = 2, the update differs
        g = torch.Generator().manual_seed(7)
        for mb in shares:
            mb.rollout_logp = mb.rollout_logp - 1.5 * torch.rand(mb.rollout_logp.shape, generator=g)
        _, _, _, out_c, params_c, _ = _train(path, shares, archer)
        _, _, metrics, out_d, params_d, _ = _train(path, shares, corrected)
        assert out_c["actor/loss"] == out_a["actor/loss"]  # uncorrected: the engine is unused
        assert out_d["actor/loss"] != out_c["actor/loss"]
        assert 1.0 < metrics["rollout_is/mean"] and metrics["rollout_is/max"] > 2.0
        assert 0.0 < metrics["rollout_is/corrected_share"] < 1.0
        assert 0.0 < out_d["actor/all/rollout_is_corrected_frac"] < 1.0
        assert any(not torch.equal(a, b) for a, b in zip(params_c, params_d))

        # mask_normalizer drop: masked tokens leave the step context and the loss; for a pure
        # token-mean policy loss on one mini-batch, the loss is the keep loss rescaled to them
        masked = RolloutCorrectionConfig(True, "token", "mask", 1.5)
        keep = replace(plain, rollout_correction=masked)
        drop = replace(plain, rollout_correction=replace(masked, mask_normalizer="drop"))
        _, _, _, out_keep, _, trained = _train(path, shares[:1], keep)
        _, _, metrics, out_drop, _, _ = _train(path, shares[:1], drop)
        mb = trained[0]
        mask = mb.batch.response_layout_mask()
        corrected = rollout_correction(mb.old_logp, mb.rollout_logp, mask, masked).corrected
        n_all, n_kept = int(mask.sum()), int((mask & ~corrected).sum())
        assert 0 < n_kept < n_all
        assert metrics["rollout_is/corrected_share"] == pytest.approx(1 - n_kept / n_all)
        assert out_drop["actor/loss"] * n_kept == pytest.approx(out_keep["actor/loss"] * n_all, rel=1e-5)
        assert out_drop["actor/all/rollout_is_corrected_frac"] == 0.0  # the kept tokens only


def test_old_logprobs_from_rollout_and_the_correction_in_the_training_phase(tmp_path):
    path = write_checkpoint(tmp_path / "qwen3", "qwen3")
    run_distributed(_worker, 1, path)
