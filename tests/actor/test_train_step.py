"""Optimiser steps: the actor at TP 2, DP 2 and PP 2 ends with the parameters that an independent
transformers + torch AdamW loop reaches on the same global batch and loss (so TP 2 == TP 1 and
DP 2 == DP 1 through a common reference); a non-finite step is skipped on every rank."""

from __future__ import annotations

import math

import torch
import transformers

from megatron_archer.actor import Actor, ActorConfig, SequenceBatch
from megatron_archer.models import hf_weight_buckets, load_hf_model
from tests.actor.common import make_batch
from tests.distributed import run_distributed
from tests.models.checkpoints import hf_model, write_checkpoint
from tests.models.parallel import model_parallel
from tests.numerics import accuracy_failure

STEPS = 3
# fp32 megatron and fp32 transformers differ by summation order only: megatron is held to
# transformers' own float32 error against transformers in float64 (tests/numerics.py). adam_eps
# 1e-4 keeps the step smooth in the gradient: with a tiny eps a near-zero gradient element, whose
# sign is rounding noise, would be normalised up to a full lr-sized update in either direction.
CONFIG = dict(max_tokens_per_micro_batch=40, lr=1e-2, weight_decay=0.1, adam_eps=1e-4,
              clip_grad=0.5, lr_warmup_steps=1)


def _advantages(batch: SequenceBatch) -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, len(batch))


def _token_loss(logp, advantage):
    """Per-token terms of the test loss: a policy-gradient term and a non-linear one."""
    return -advantage * logp + 0.05 * logp.square()


def _reference(path, batch: SequenceBatch, config: ActorConfig, dtype: torch.dtype):
    """transformers + torch AdamW, one process, no megatron: the step loss over all tokens."""
    model = hf_model(path, dtype)
    named = dict(model.named_parameters())
    no_decay = [p for n, p in named.items() if n.endswith(".bias") or p.dim() == 1]
    decay = [p for n, p in named.items() if not (n.endswith(".bias") or p.dim() == 1)]
    optimizer = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
        weight_decay=config.weight_decay)
    advantages = _advantages(batch)
    total_tokens = sum(batch.response_counts)
    norms, losses = [], []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = 0.0
        for i, (ids, mask) in enumerate(zip(batch.input_ids, batch.response_mask)):
            logits = model(input_ids=ids[None]).logits[0, :-1] / config.temperature
            logp = torch.log_softmax(logits, -1).gather(-1, ids[1:, None])[:, 0][mask[1:]]
            loss = loss + _token_loss(logp, advantages[i]).sum() / total_tokens
        loss.backward()
        norm = math.sqrt(sum(p.grad.square().sum().item() for p in model.parameters()))
        coef = config.clip_grad / (norm + 1e-6)
        if coef < 1:
            for p in model.parameters():
                p.grad.mul_(coef)
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        optimizer.step()
        norms.append(norm)
        losses.append(loss.item())
    return {n: p.detach().clone() for n, p in model.state_dict().items()}, norms, losses


def _loss_fn(total_tokens, advantages):
    def loss_fn(mb, logp, entropy):
        adv = mb.gather(advantages)[:, None]
        terms = torch.where(mb.response_mask, _token_loss(logp, adv), 0.0)
        return terms.sum() / total_tokens, {"tokens": int(mb.response_mask.sum())}
    return loss_fn


def _dp_share(batch: SequenceBatch, advantages, rank: int, dp: int):
    keep = list(range(rank, len(batch), dp))
    share = SequenceBatch([batch.input_ids[i] for i in keep],
                          [batch.response_mask[i] for i in keep])
    return share, advantages[keep]


def _step_failures(actor: Actor, share: SequenceBatch, loss_fn, where: str, baseline, norms,
                   losses) -> list:
    """STEPS micro-batched steps of ``actor``: each step's gradient norm and loss against the
    float64 reference's, with ``baseline`` (float32 ``_reference``) setting the accuracy."""
    failures = []
    for step in range(STEPS):
        result = actor.train_step(share, loss_fn)
        assert not result.skipped and result.num_micro_batches > 1
        failures.append(accuracy_failure(f"{where} step {step} grad_norm", result.grad_norm,
                                         baseline[1][step], norms[step]))
        failures.append(accuracy_failure(f"{where} step {step} loss", result.loss,
                                         baseline[2][step], losses[step]))
        assert result.lr == actor.config.lr_at(step)
    return failures


def _train_worker(rank, world_size, path):
    batch = make_batch(9, seed=5)
    config = ActorConfig(**CONFIG)
    baseline = _reference(path, batch, config, torch.float32)
    expected, norms, losses = _reference(path, batch, config, torch.float64)
    advantages = _advantages(batch)
    failures = []
    for tp, pp in ((2, 1), (1, 1), (1, 2)):
        dp = world_size // (tp * pp)
        with model_parallel(tp, pp):
            loaded = load_hf_model(path, params_dtype=torch.float32)
            actor = Actor(loaded.model, loaded.spec, config, loaded.backend)
            share, adv = _dp_share(batch, advantages, rank // (tp * pp) if dp > 1 else 0, dp)
            loss_fn = _loss_fn(sum(batch.response_counts), adv)
            failures += _step_failures(actor, share, loss_fn, f"tp={tp} pp={pp} dp={dp}",
                                       baseline, norms, losses)
            got = dict(pair for bucket in hf_weight_buckets(loaded.model, loaded.spec,
                                                            loaded.backend) for pair in bucket)
            failures.extend(accuracy_failure(f"tp={tp} pp={pp} dp={dp} {name}", tensor,
                                             baseline[0][name], expected[name])
                            for name, tensor in got.items())
    failures = [f for f in failures if f]
    assert not failures, "; ".join(failures)
    # not vacuous: clipping was active and the weights moved by several lr-sized steps
    assert max(norms) > config.clip_grad
    start = transformers.AutoModelForCausalLM.from_pretrained(path).state_dict()
    moved = max((expected[n] - start[n]).abs().max().item() for n in expected)
    assert moved > config.lr


def test_tp2_dp2_pp2_steps_equal_single_process_transformers(tmp_path):
    path = write_checkpoint(tmp_path / "qwen3", "qwen3")
    run_distributed(_train_worker, 2, path)
