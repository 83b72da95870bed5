"""The whole model under context parallelism on CPU (docs/numerics.md §9), real gloo processes: megatron's
GPTModel at CP 2 (portable CP attention, megatron's thd RoPE per CP rank) on this rank's chunks
of a packed row of unequal sequences gives the unsplit model's logits at every real position, and
log-probs / entropy of the response tokens (labels across chunk boundaries included) and the
parameter gradient summed over the CP group equal the unsplit run's: each as accurate against the
unsplit model in float64 as the unsplit model in float32 is (tests/numerics.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_archer.actor.context_parallel import cp_rank_positions, split_for_context_parallel
from megatron_archer.actor.packing import pack
from megatron_archer.ops import vocab_parallel_logprobs_and_entropy
from tests.actor.common import make_batch
from tests.distributed import run_distributed
from tests.models.checkpoints import write_checkpoint
from tests.models.parallel import model_parallel
from tests.numerics import accuracy_failure


def _unsplit_positions(shard) -> torch.Tensor:
    """For each local position of ``shard``, its position in the unsplit row (-1: padding)."""
    real, padded = shard.cu_seqlens.long().cpu(), shard.cu_seqlens_padded.long().cpu()
    held = cp_rank_positions(padded, shard.cp_size, shard.cp_rank)
    sequence = torch.searchsorted(padded, held, right=True) - 1
    offset = held - padded[sequence]
    inside = offset < (real[1:] - real[:-1])[sequence]
    return torch.where(inside, real[sequence] + offset, -1)


def _run(model, mb, weight):
    """Logits, layout log-probs / entropy, and parameter gradients of sum(weight * logp)."""
    model.zero_grad()
    logits = model(mb.input_ids, mb.position_ids, attention_mask=None,
                   packed_seq_params=mb.packed_seq_params())
    logp, entropy = vocab_parallel_logprobs_and_entropy(
        logits[0, mb.label_positions], mb.labels,
        tp_group=parallel_state.get_tensor_model_parallel_group(), vocab_size=250)
    logp, entropy = mb.to_layout(logp), mb.to_layout(entropy)
    (logp * weight * mb.response_mask).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return logits.detach(), logp.detach(), entropy, grads


def _worker(rank, world_size, checkpoints):
    from megatron_archer.models import load_hf_model

    batch = make_batch(5, seed=21, min_len=3, max_len=29)
    mb = pack(batch, list(range(5)))
    weight = torch.randn(mb.response_mask.shape, generator=torch.Generator().manual_seed(3))
    failures = []
    for case, path in checkpoints.items():
        with model_parallel(1):
            base = _run(load_hf_model(path, params_dtype=torch.float32).model, mb, weight)
            want = _run(load_hf_model(path, params_dtype=torch.float64).model, mb, weight)
        with model_parallel(1, context_parallel=world_size):
            cp_group = parallel_state.get_context_parallel_group()
            shard = split_for_context_parallel(mb, world_size, rank)
            model = load_hf_model(path, params_dtype=torch.float32).model
            assert model.config.context_parallel_size == world_size
            logits, logp, entropy, grads = _run(model, shard, weight)
            source = _unsplit_positions(shard)
            real = source >= 0
            assert 0 < int(real.sum()) < mb.num_tokens and shard.response_mask.any()
            failures.append(accuracy_failure(f"{case}: logits", logits[0, real],
                                             base[0][0, source[real]], want[0][0, source[real]]))
            scale = want[0].abs().max().item()  # log-probs and entropy round at the logits' scale
            for i, name, got in ((1, "logp", logp), (2, "entropy", entropy)):
                summed = got.clone()
                dist.all_reduce(summed, group=cp_group)  # each token lives on one CP rank
                failures.append(accuracy_failure(f"{case}: {name}", summed, base[i], want[i],
                                                 scale=scale))
            for name, grad in grads.items():
                dist.all_reduce(grad, group=cp_group)  # what DDP reduces over DP x CP
                failures.append(accuracy_failure(f"{case}: grad {name}", grad, base[3][name],
                                                 want[3][name]))
    failures = [f for f in failures if f]
    assert not failures, "; ".join(failures)


def test_model_at_cp2_equals_the_unsplit_model(tmp_path):
    cases = ("qwen3", "llama3")  # q/k norms and GQA 8:2; llama3 RoPE scaling
    run_distributed(_worker, 2, {c: write_checkpoint(tmp_path / c, c) for c in cases})
