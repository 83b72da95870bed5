"""A Qwen3-MoE actor (4 experts, top-2, 2 layers) at TP 1, EP 2 and TP 2 x EP 2 (sequence
parallel, experts unsplit: expert-tensor 1) in real gloo processes: log-probs and entropy equal
transformers', and three optimiser steps end with the parameters an independent transformers +
torch AdamW loop reaches. Equal means as accurate against transformers in float64 as
transformers in float32 is (tests/numerics.py)."""

from __future__ import annotations

import pytest
import torch
from megatron.core import parallel_state

from megatron_archer.actor import Actor, ActorConfig
from megatron_archer.actor.routing import replay_fields
from megatron_archer.models import hf_weight_buckets, load_hf_model
from tests.actor.common import hf_logprobs, make_batch
from tests.actor.test_train_step import (
    CONFIG,
    _advantages,
    _dp_share,
    _loss_fn,
    _reference,
    _step_failures,
)
from tests.distributed import run_distributed
from tests.models.checkpoints import write_checkpoint
from tests.models.parallel import model_parallel
from tests.numerics import accuracy_failure

# (tensor, expert, expert-tensor, sequence parallel) on 2 ranks; TP 1 runs data parallel 2
LAYOUTS = ((1, 1, 1, False), (1, 2, 1, False), (2, 2, 1, True))
# the reference (transformers) adds no load-balancing loss: megatron's is turned off
NO_AUX = {"moe_aux_loss_coeff": 0.0}


def _load(path, tp: int, sp: bool):
    return load_hf_model(path, params_dtype=torch.float32,
                         config_overrides={**NO_AUX, "sequence_parallel": sp})


def _logprob_worker(rank, world_size, path):
    batch = make_batch(7, seed=3)
    config = ActorConfig(max_tokens_per_micro_batch=48, temperature=0.7)
    baseline = hf_logprobs(path, batch, temperature=0.7)
    expected = hf_logprobs(path, batch, temperature=0.7, dtype=torch.float64)
    failures = []
    for tp, ep, etp, sp in LAYOUTS:
        with model_parallel(tp, expert_parallel=ep, expert_tensor_parallel=etp):
            loaded = _load(path, tp, sp)
            actor = Actor(loaded.model, loaded.spec, config, loaded.backend)
            assert len(actor.micro_batches(batch)) > 1  # really micro-batched
            result = actor.compute_logprobs_and_entropy(batch)
            for i, (logp, entropy, scale) in enumerate(expected):
                n = logp.numel()
                for name, got, base, want in (
                        ("logp", result.logp[i, :n], baseline[i][0], logp),
                        ("entropy", result.entropy[i, :n], baseline[i][1], entropy)):
                    failures.append(accuracy_failure(f"tp={tp} ep={ep} seq {i} {name}",
                                                     got, base, want, scale=scale))
    failures = [f for f in failures if f]
    assert not failures, "; ".join(failures)


def test_moe_logprobs_and_entropy_match_transformers(tmp_path):
    run_distributed(_logprob_worker, 2, write_checkpoint(tmp_path / "moe", "qwen3_moe"))


def _on_disk(state: dict[str, torch.Tensor], moe_size: int) -> dict[str, torch.Tensor]:
    """transformers' in-memory Qwen3-MoE state under the checkpoint's on-disk names: its
    stacked ``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj`` [E, H, I] per
    expert."""
    out = {}
    for name, tensor in state.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            for e, fused in enumerate(tensor):
                out[f"{prefix}{e}.gate_proj.weight"] = fused[:moe_size]
                out[f"{prefix}{e}.up_proj.weight"] = fused[moe_size:]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            for e, down in enumerate(tensor):
                out[f"{prefix}{e}.down_proj.weight"] = down
        else:
            out[name] = tensor
    return out


def _train_worker(rank, world_size, path, layouts):
    batch = make_batch(9, seed=5)
    # a budget of about one sequence: several micro-batches even on a quarter of the batch
    config = ActorConfig(**{**CONFIG, "max_tokens_per_micro_batch": 24})
    baseline = _reference(path, batch, config, torch.float32)
    expected, norms, losses = _reference(path, batch, config, torch.float64)
    baseline_weights, expected_weights = (_on_disk(w, 48) for w in (baseline[0], expected))
    advantages = _advantages(batch)
    failures = []
    for tp, ep, etp, sp, *pp in layouts:
        pp = pp[0] if pp else 1
        dp = world_size // (tp * pp)
        with model_parallel(tp, pp, expert_parallel=ep, expert_tensor_parallel=etp):
            loaded = _load(path, tp, sp)
            actor = Actor(loaded.model, loaded.spec, config, loaded.backend)
            share, adv = _dp_share(batch, advantages, parallel_state.get_data_parallel_rank(), dp)
            loss_fn = _loss_fn(sum(batch.response_counts), adv)
            failures += _step_failures(actor, share, loss_fn, f"tp={tp} pp={pp} ep={ep} dp={dp}",
                                       baseline, norms, losses)
            got = dict(pair for bucket in hf_weight_buckets(loaded.model, loaded.spec,
                                                            loaded.backend) for pair in bucket)
            assert set(got) == set(expected_weights)
            failures.extend(accuracy_failure(f"tp={tp} pp={pp} ep={ep} dp={dp} {name}", tensor,
                                             baseline_weights[name], expected_weights[name])
                            for name, tensor in got.items())
    failures = [f for f in failures if f]
    assert not failures, "; ".join(failures)
    assert max(norms) > config.clip_grad  # clipping was active


def test_moe_steps_equal_single_process_transformers(tmp_path):
    run_distributed(_train_worker, 2, write_checkpoint(tmp_path / "moe", "qwen3_moe"),
                    (*LAYOUTS, (1, 1, 1, False, 2)))  # the last at pipeline parallel 2


def test_moe_steps_with_expert_data_parallel_equal_transformers(tmp_path):
    """4 ranks: each expert is held by 2 of them (expert data parallel 2), whose gradients are
    summed over that group (megatron's DDP for allreduce=False parameters)."""
    run_distributed(_train_worker, 4, write_checkpoint(tmp_path / "moe", "qwen3_moe"),
                    ((1, 2, 1, False), (2, 2, 1, True)))


def _refusal_worker(rank, world_size, path):
    with model_parallel(2, expert_parallel=2, expert_tensor_parallel=1):
        loaded = _load(path, 2, False)
        with pytest.raises(ValueError, match="parallel.sequence_parallel=true"):
            Actor(loaded.model, loaded.spec, ActorConfig(), loaded.backend)


def test_moe_tensor_parallel_without_sequence_parallel_is_refused(tmp_path):
    run_distributed(_refusal_worker, 2, write_checkpoint(tmp_path / "moe", "qwen3_moe"))


def _replay_worker(rank, world_size, path):
    batch = make_batch(7, seed=4)
    # a learning rate too small to move a weight: the three steps below see the same model
    config = ActorConfig(max_tokens_per_micro_batch=48, lr=1e-30, weight_decay=0.0)
    for tp, ep, etp, sp in LAYOUTS[1:]:
        with model_parallel(tp, expert_parallel=ep, expert_tensor_parallel=etp):
            loaded = load_hf_model(path, params_dtype=torch.float32, config_overrides={
                **NO_AUX, **replay_fields(), "sequence_parallel": sp})
            actor = Actor(loaded.model, loaded.spec, config, loaded.backend)
            old = actor.compute_logprobs_and_entropy(batch)

            def loss_fn(mb, logp, entropy):
                return logp.sum() * 0.0

            differences = []

            def compare(mb, logp, entropy):
                want = mb.gather(old.logp.to(logp.device))
                differences.append((logp - want)[mb.response_mask].abs().max().item())
                return logp.sum() * 0.0

            same = actor.train_step(batch, compare, routing=old.routing, replay_routing=True)
            assert same.moe_metrics["moe/routing_mismatch_share"] == 0.0  # same weights
            # the replayed training forward computes the recorded forward's log-probs again
            assert max(differences) == 0.0, differences
            with torch.no_grad():  # the router drifts: many tokens choose other experts
                for name, param in loaded.model.named_parameters():
                    if name.endswith("mlp.router.weight"):
                        param.add_(0.5 * torch.randn(param.shape,
                                                     generator=torch.Generator().manual_seed(7)))
            drifted = actor.train_step(batch, loss_fn, routing=old.routing)
            replayed = actor.train_step(batch, loss_fn, routing=old.routing, replay_routing=True)
            share = drifted.moe_metrics["moe/routing_mismatch_share"]
            assert share > 0.05, f"tp={tp} ep={ep}: only {share} routed otherwise"
            assert replayed.moe_metrics["moe/routing_mismatch_share"] == 0.0
            loads = [v for k, v in replayed.moe_metrics.items() if "expert_load" in k]
            assert len(loads) == 2 and all(1.0 <= v <= 4.0 for v in loads)


def test_routing_replay_dispatches_to_the_recorded_experts(tmp_path):
    """The routing a forward recorded, replayed in a training forward after the router drifted:
    every token goes to the recorded experts (without replay, some go elsewhere), at EP 2 and at
    TP 2 x EP 2 with sequence parallelism."""
    run_distributed(_replay_worker, 2, write_checkpoint(tmp_path / "moe", "qwen3_moe"))
