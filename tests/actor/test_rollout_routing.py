"""Rollout routing replay (``actor.routing_replay: rollout``) with a Qwen3-MoE model (4 experts,
top-2, 2 layers) in real gloo processes, at EP 2, TP 2 x EP 2 (sequence parallel), PP 2 and
CP 2: the local engine's recorded routing (prompt and response tokens) laid out on each rank
makes the training forward choose exactly the engine's experts; with the engine's routers
perturbed, some tokens route otherwise without replay and none with it (a recorded routing
passed with such a batch is refused); and the replayed forward's log-probs equal transformers'
forced to the same experts, as accurately as the engine's own (tests/numerics.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megatron_archer.actor import Actor, ActorConfig, SequenceBatch
from megatron_archer.actor.routing import replay_fields
from megatron_archer.models import load_hf_model
from megatron_archer.rollout.engine import SamplingParams
from megatron_archer.rollout.local_engine import LocalEngine
from tests.actor.common import hf_logprobs
from tests.distributed import run_distributed
from tests.models.checkpoints import write_checkpoint
from tests.models.parallel import model_parallel
from tests.numerics import accuracy_failure

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [42, 17, 3, 99, 5, 6, 7]]
# (tensor, pipeline, context, expert parallel, sequence parallel) on 2 ranks
LAYOUTS = ((1, 1, 1, 2, False), (2, 1, 1, 2, True), (1, 2, 1, 1, False), (1, 1, 2, 1, False))


def _rollout(path, perturb: bool):
    """The engine's samples of PROMPTS as a batch with their routing, and their log-probs; with
    ``perturb`` its routers are moved first, so it routes many tokens otherwise."""
    engine = LocalEngine(path, record_routing=True, threads=1)
    if perturb:
        with torch.no_grad():
            for name, param in engine.model.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    param.add_(0.5 * torch.randn(param.shape,
                                                 generator=torch.Generator().manual_seed(7)))
    groups = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, n=2, seed=3))
    pairs = [(prompt, s) for prompt, group in zip(PROMPTS, groups) for s in group]
    ids = [torch.tensor(prompt + s.token_ids) for prompt, s in pairs]
    for (prompt, s), row in zip(pairs, ids):  # every token the engine ran, no more
        assert s.routing.shape == (row.numel() - 1, 2, 2) and s.routing.dtype == torch.int16
    batch = SequenceBatch(ids, [torch.arange(len(r)) >= len(p) for r, (p, _) in zip(ids, pairs)],
                          routing=[s.routing for _, s in pairs])
    return batch, [torch.tensor(s.logprobs) for _, s in pairs]


def _zero_loss(mb, logp, entropy):
    return logp.sum() * 0.0


def _worker(rank, world_size, path):
    batch, engine_logp = _rollout(path, perturb=False)
    perturbed, _ = _rollout(path, perturb=True)
    forced = hf_logprobs(path, perturbed, dtype=torch.float32)
    forced64 = hf_logprobs(path, perturbed, dtype=torch.float64)
    own64 = hf_logprobs(path, batch, dtype=torch.float64)
    # a learning rate too small to move a weight: every call below sees the same model
    config = ActorConfig(max_tokens_per_micro_batch=32, lr=1e-30, weight_decay=0.0,
                         routing_replay="rollout")
    failures = []
    for tp, pp, cp, ep, sp in LAYOUTS:
        where = f"tp={tp} pp={pp} cp={cp} ep={ep}"
        with model_parallel(tp, pp, cp, expert_parallel=ep, expert_tensor_parallel=1):
            loaded = load_hf_model(path, params_dtype=torch.float32, config_overrides={
                "moe_aux_loss_coeff": 0.0, **replay_fields(), "sequence_parallel": sp})
            actor = Actor(loaded.model, loaded.spec, config, loaded.backend)
            assert len(actor.micro_batches(batch)) > 1  # really micro-batched
            # the engine's own routing replayed: its log-probs again
            result = actor.compute_logprobs_and_entropy(batch)
            for i, (want, _, scale) in enumerate(own64):
                n = want.numel()
                failures.append(accuracy_failure(f"{where} seq {i}", result.logp[i, :n],
                                                 engine_logp[i], want, scale=scale))
            # the perturbed engine's routing: replayed, the forward routes as the engine did and
            # computes transformers' forward forced to those experts
            result = actor.compute_logprobs_and_entropy(perturbed)
            for i, ((base, _, _), (want, _, scale)) in enumerate(zip(forced, forced64)):
                n = want.numel()
                failures.append(accuracy_failure(f"{where} perturbed seq {i}",
                                                 result.logp[i, :n], base, want, scale=scale))
            replayed = actor.train_step(perturbed, _zero_loss)
            assert replayed.moe_metrics["moe/routing_mismatch_share"] == 0.0, where
            actor.config = replace(config, routing_replay="none")
            drifted = actor.train_step(perturbed, _zero_loss)
            share = drifted.moe_metrics["moe/routing_mismatch_share"]
            assert share > 0.05, f"{where}: only {share} routed otherwise without replay"
            with pytest.raises(ValueError, match=r"carries the engine's routing .* routing=None"):
                actor.train_step(perturbed, _zero_loss, routing=result.routing)
    failures = [f for f in failures if f]
    assert not failures, "; ".join(failures)


def test_rollout_routing_replay_routes_as_the_engine(tmp_path):
    run_distributed(_worker, 2, write_checkpoint(tmp_path / "moe", "qwen3_moe"))
