"""``actor.logprob_impl="fused"`` (log-probs from hidden states and the output weight, no logits)
equals the logits path at TP 1, TP 2 and PP 2, for untied and tied output weights: log-probs,
entropies, the step loss, the gradient norm and the weights after an optimiser step. Rows padded
to a multiple of 16 tokens (what fp8 needs) give the same results: the filler enters nothing."""

from __future__ import annotations

import pytest
import torch

from megatron_archer.actor import Actor, ActorConfig
from megatron_archer.models import hf_weight_buckets, load_hf_model
from tests.actor.common import make_batch
from tests.distributed import run_distributed
from tests.models.checkpoints import write_checkpoint
from tests.models.parallel import model_parallel

# fp32 throughout; the two paths differ in summation order only (observed ~1e-6)
TOLERANCE = 2e-5


def _loss_fn(mb, logp, entropy):
    weights = torch.linspace(-1.0, 1.0, logp.numel()).view_as(logp)
    return (weights * logp * mb.response_mask).sum() / 100 + 0.01 * (logp.square() * mb.response_mask).sum()


def _run(path, impl: str, multiple: int | None, batch):
    loaded = load_hf_model(path, params_dtype=torch.float32)
    actor = Actor(loaded.model, loaded.spec,
                  ActorConfig(max_tokens_per_micro_batch=40, lr=1e-2, logprob_impl=impl),
                  loaded.backend)
    if multiple is not None:
        actor.pack_multiple = multiple
        assert all(mb.num_tokens % multiple == 0 for mb in actor.micro_batches(batch))
    result = actor.compute_logprobs_and_entropy(batch)
    step = actor.train_step(batch, _loss_fn)
    weights = dict(pair for bucket in hf_weight_buckets(loaded.model, loaded.spec, loaded.backend)
                   for pair in bucket)
    return result, step, weights


def _worker(rank, world_size, checkpoints):
    batch = make_batch(5, seed=11)
    failures = []
    for case, path in checkpoints.items():
        for tp, pp in ((1, 1), (2, 1), (1, 2)):
            with model_parallel(tp, pp):
                base = _run(path, "logits", None, batch)
                for impl, multiple in (("fused", None), ("logits", 16), ("fused", 16)):
                    got = _run(path, impl, multiple, batch)
                    where = f"{case} tp={tp} pp={pp} {impl} multiple={multiple}"
                    for name in ("logp", "entropy"):
                        diff = (getattr(got[0], name) - getattr(base[0], name)).abs().max().item()
                        if diff > TOLERANCE:
                            failures.append(f"{where} {name}: {diff:.3g}")
                    if abs(got[1].loss - base[1].loss) > TOLERANCE * max(1.0, abs(base[1].loss)):
                        failures.append(f"{where} loss {got[1].loss} != {base[1].loss}")
                    if abs(got[1].grad_norm - base[1].grad_norm) > TOLERANCE * base[1].grad_norm:
                        failures.append(f"{where} grad_norm {got[1].grad_norm} != {base[1].grad_norm}")
                    for key, tensor in got[2].items():
                        diff = (tensor - base[2][key]).abs().max().item()
                        if diff > TOLERANCE:
                            failures.append(f"{where} {key}: {diff:.3g}")
                assert base[1].grad_norm > 0.1  # the gradient is not vacuous
    assert not failures, "; ".join(failures)


def test_fused_logprobs_and_padded_rows_equal_the_logits_path(tmp_path):
    checkpoints = {case: write_checkpoint(tmp_path / case, case) for case in ("qwen3", "qwen2_tied")}
    run_distributed(_worker, 2, checkpoints)


def test_logprob_impl_is_validated():
    with pytest.raises(ValueError, match="^logprob_impl must be one of logits, fused; got 'vocab'$"):
        ActorConfig(logprob_impl="vocab")
