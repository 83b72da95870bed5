"""Log-prob of the sampled token and entropy, on vocabulary-sharded logits (docs/numerics.md §1).

Each tensor-parallel rank holds logits [..., V_local] for its contiguous slice of the vocabulary.
The op never gathers the vocabulary: every rank reduces its slice to three numbers per token
(``softmax_stats``) and two collectives of O(tokens) floats per call (MAX, then one packed SUM)
give every rank the exact full-vocabulary log-probs and entropies.

Memory: rows are processed ``chunk_size`` at a time, so the fp32 working set is one chunk x
V_local (one fp32 copy of the shard when ``chunk_size`` is None). Backward recomputes each
chunk's softmax from the saved logits instead of keeping fp32 probabilities; an entropy
gradient needs two buffers, so backward then works on half-chunks. The caller's logits are
never written to.
"""

from __future__ import annotations

import torch

from megatron_archer.ops import softmax_stats
from megatron_archer.ops.vocab_shard import (
    VocabShard,
    check_float,
    check_labels,
    check_options,
    compute_dtype,
    vocab_shard,
)


def _chunks(n: int, chunk_size: int | None):
    step = n if chunk_size is None else chunk_size
    return [(r0, min(r0 + step, n)) for r0 in range(0, n, max(step, 1))]


def _chunk_copy(logits: torch.Tensor, r0: int, r1: int, shard: VocabShard) -> torch.Tensor:
    """A fresh compute-dtype buffer of rows [r0, r1) of the real (non-padding) columns."""
    return logits[r0:r1, : shard.valid].to(compute_dtype(logits.dtype), copy=True)


class _LogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, temperature, group, shard, chunk_size, entropy_grad):
        n = logits.shape[0]
        dtype = compute_dtype(logits.dtype)
        m, s, b = (torch.empty(n, dtype=dtype, device=logits.device) for _ in range(3))
        for r0, r1 in _chunks(n, chunk_size):
            m[r0:r1], s[r0:r1], b[r0:r1] = softmax_stats.slice_stats_(
                _chunk_copy(logits, r0, r1, shard), temperature
            )
        label_logit = softmax_stats.gather_labels(logits[:, : shard.valid],
                                                  shard.local_columns(labels)).to(dtype)

        m, s, b, label_logit = softmax_stats.all_reduce_stats(m, s, b, label_logit, group, temperature)
        _, entropy, logp = softmax_stats.finalize(m, s, b, label_logit, temperature)

        ctx.save_for_backward(logits, labels, m, s.log(), entropy)
        ctx.temperature, ctx.shard, ctx.chunk_size = temperature, shard, chunk_size
        ctx.entropy_grad = entropy_grad
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, labels, m, log_s, entropy = ctx.saved_tensors
        shard, temperature = ctx.shard, ctx.temperature
        grad = torch.empty_like(logits)
        grad[:, shard.valid :] = 0  # padding columns take no part in the softmax
        n = logits.shape[0]
        chunk = ctx.chunk_size or n
        if ctx.entropy_grad:
            chunk = (chunk + 1) // 2  # two buffers per half-chunk: still one chunk of fp32
        else:
            grad_entropy = None
        cols = shard.local_columns(labels)
        for r0, r1 in _chunks(n, chunk):
            logp = _chunk_copy(logits, r0, r1, shard).sub_(m[r0:r1].unsqueeze(-1))
            if temperature != 1.0:
                logp.div_(temperature)
            logp.sub_(log_s[r0:r1].unsqueeze(-1))  # (z - m) / T - log s, exact shift first
            grad[r0:r1, : shard.valid].copy_(softmax_stats.logits_grad_(
                logp,
                entropy[r0:r1],
                grad_logp[r0:r1],
                None if grad_entropy is None else grad_entropy[r0:r1],
                cols[r0:r1],
                1.0 / temperature,
            ))
        return grad, None, None, None, None, None, None


def vocab_parallel_logprobs_and_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    tp_group=None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(logprobs, entropy)`` of ``softmax(logits / temperature)``, shaped like ``labels``.

    Args:
        logits: [..., V_local] in bf16/fp16/fp32/fp64, this rank's contiguous vocabulary slice
            (the whole vocabulary when ``tp_group`` is None). A contiguous tensor avoids a copy.
        labels: [...] global token ids in [0, vocab_size), identical on every rank of the group.
        temperature: the sampling temperature T (docs/numerics.md §1: p = softmax(z / T)).
        tp_group: the tensor-parallel process group, or None for no tensor parallelism.
        vocab_size: the true vocabulary; columns past it are Megatron padding and are excluded.
            None means no padding.
        chunk_size: tokens per fp32 working chunk (memory bound chunk x V_local); None: one chunk.
        entropy_grad: make entropy differentiable (entropy bonus); otherwise it is detached.

    Returns:
        fp32 log-probs (differentiable) and entropies, fp64 for fp64 logits.
    """
    check_float("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary dimension, got {tuple(logits.shape)}")
    check_options(temperature, chunk_size)
    shard = vocab_shard(logits.shape[-1], tp_group, vocab_size)
    check_labels(labels, logits.shape[:-1], shard.vocab_size)
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but logits on {logits.device}")

    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1).long()
    if flat_labels.numel() == 0:  # same count on every rank, so skipping collectives is safe
        empty = flat_logits.sum(-1).to(compute_dtype(logits.dtype))  # keeps the autograd link
        return empty.reshape(labels.shape), empty.detach().reshape(labels.shape)
    logp, entropy = _LogprobEntropy.apply(
        flat_logits, flat_labels, float(temperature), tp_group, shard, chunk_size, entropy_grad
    )
    return logp.reshape(labels.shape), entropy.reshape(labels.shape)
