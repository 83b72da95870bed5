"""``actor.logprob_impl="fused"`` (log-probs from hidden states and the output weight, no logits)
equals the logits path at TP 1, TP 2 and PP 2, for untied and tied output weights: log-probs,
entropies, the step loss, the gradient norm and each weight's update in an optimiser step, each
as accurate against the logits path run in float64 as the float32 logits path is. Rows padded
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
from tests.numerics import accuracy_failure


def _loss_fn(mb, logp, entropy):
    weights = torch.linspace(-1.0, 1.0, logp.numel()).view_as(logp)
    return (weights * logp * mb.response_mask).sum() / 100 + 0.01 * (logp.square() * mb.response_mask).sum()


def _run(path, impl: str, multiple: int | None, batch, dtype=torch.float32):
    """Log-probs, the step's result and each weight's update. adam_eps 1 makes the first Adam step
    lr g / (|g| + 1), smooth in the gradient: with a small eps it is lr sign(g), and a
    gradient element near zero flips by rounding alone, moving that weight by 2 lr. lr 1 keeps the
    update well above the float32 rounding of the weights it is added to."""
    loaded = load_hf_model(path, params_dtype=dtype)
    actor = Actor(loaded.model, loaded.spec,
                  ActorConfig(max_tokens_per_micro_batch=40, lr=1.0, adam_eps=1.0,
                              logprob_impl=impl),
                  loaded.backend)
    if multiple is not None:
        actor.pack_multiple = multiple
        assert all(mb.num_tokens % multiple == 0 for mb in actor.micro_batches(batch))
    before = _weights(loaded)
    result = actor.compute_logprobs_and_entropy(batch)
    step = actor.train_step(batch, _loss_fn)
    return result, step, {name: w - before[name] for name, w in _weights(loaded).items()}


def _weights(loaded) -> dict[str, torch.Tensor]:
    return {name: w.clone() for bucket in hf_weight_buckets(loaded.model, loaded.spec,
                                                           loaded.backend) for name, w in bucket}


def _worker(rank, world_size, checkpoints):
    batch = make_batch(5, seed=11)
    failures = []
    for case, path in checkpoints.items():
        for tp, pp in ((1, 1), (2, 1), (1, 2)):
            with model_parallel(tp, pp):
                # fp32 paths differ in summation order only: each is held to the logits path's
                # own error against the logits path in float64 (tests/numerics.py)
                base = _run(path, "logits", None, batch)
                ref = _run(path, "logits", None, batch, torch.float64)
                for impl, multiple in (("fused", None), ("logits", 16), ("fused", 16)):
                    got = _run(path, impl, multiple, batch)
                    where = f"{case} tp={tp} pp={pp} {impl} multiple={multiple}"
                    for name in ("logp", "entropy"):
                        failures.append(accuracy_failure(f"{where} {name}", *(
                            getattr(run[0], name) for run in (got, base, ref))))
                    for name in ("loss", "grad_norm"):
                        failures.append(accuracy_failure(f"{where} {name}", *(
                            getattr(run[1], name) for run in (got, base, ref))))
                    failures.extend(accuracy_failure(f"{where} update {key}", tensor, base[2][key],
                                                     ref[2][key])
                                    for key, tensor in got[2].items())
                assert base[1].grad_norm > 0.1  # the gradient is not vacuous
    failures = [f for f in failures if f]
    assert not failures, "; ".join(failures)


def test_fused_logprobs_and_padded_rows_equal_the_logits_path(tmp_path):
    checkpoints = {case: write_checkpoint(tmp_path / case, case) for case in ("qwen3", "qwen2_tied")}
    run_distributed(_worker, 2, checkpoints)


def test_logprob_impl_is_validated():
    with pytest.raises(ValueError, match="^logprob_impl must be one of logits, fused; got 'vocab'$"):
        ActorConfig(logprob_impl="vocab")
