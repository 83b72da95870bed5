"""Log-prob and entropy straight from hidden states and the LM-head weight (docs/numerics.md §1).

The logits z = hidden @ weight.T are never materialised: they are computed in tiles of
``chunk_size`` tokens x ``vocab_chunk_size`` vocabulary columns, each tile is reduced to the
per-token softmax statistics of ``softmax_stats`` and folded into running ones (an online
max / rescaled sums), and the exact full-vocabulary results come from the same two collectives
and ``finalize`` as ``vocab_parallel``. Backward recomputes every tile, turns it into
G = dL/dz with ``softmax_stats.logits_grad_``, and accumulates d_hidden += G @ W_tile and
d_W_tile += G.T @ h_tile.

Tensor parallelism (Megatron layout): ``weight`` is this rank's contiguous vocabulary slice
[V_local, H], ``hidden`` is replicated on every rank of ``tp_group`` (no sequence parallelism).
Each rank only sees its slice, so d_hidden is all-reduced over ``tp_group`` here: pass the hidden
states themselves, not Megatron's ``copy_to_tensor_model_parallel_region`` of them, whose
backward would all-reduce a second time.

Memory: one fp32 logits tile of ``chunk_size x vocab_chunk_size`` (two in backward with an
entropy gradient), the fp32 copies of the hidden and weight tiles it is computed from
(chunk_size x H, vocab_chunk_size x H; none for fp32 inputs), and fp32 gradient accumulators of
hidden's and weight's sizes; nothing of size tokens x V. Defaults: 1024 tokens x 4096 columns
(16 MiB per fp32 logits tile). The Triton forward needs no tile buffer at all, only 4 floats per
(token, vocabulary split).

On CUDA with Triton installed the tiles are computed by the kernels in ``triton_lm_head`` (same
statistics, same gradient formula); elsewhere by torch matmuls. -inf logits cannot arise from
finite weights: the only excluded columns are the vocabulary padding rows of ``weight``, which
take no part in the softmax and get zero gradient. Non-finite hidden or weight values (or
logits that overflow) are reported as errors.
"""

from __future__ import annotations

import math
import os

import torch

from megatron_archer import distributed
from megatron_archer.nonfinite import NonFiniteError
from megatron_archer.ops import softmax_stats
from megatron_archer.ops.vocab_shard import (
    VocabShard,
    check_float,
    check_labels,
    check_options,
    compute_dtype,
    vocab_shard,
)

DEFAULT_CHUNK_SIZE = 1024
DEFAULT_VOCAB_CHUNK_SIZE = 4096
IMPLEMENTATIONS = ("auto", "torch", "triton")


def _triton_backend():
    """The Triton kernels module, or None when triton is not installed (imported only on demand)."""
    try:
        from megatron_archer.ops import triton_lm_head
    except ImportError:
        return None
    return triton_lm_head


def _use_triton(implementation: str, hidden: torch.Tensor) -> bool:
    if implementation == "torch":
        return False
    if implementation == "auto":
        return hidden.is_cuda and hidden.dtype != torch.float64 and _triton_backend() is not None
    if _triton_backend() is None:
        raise RuntimeError("implementation='triton' was requested but triton is not installed")
    if hidden.dtype == torch.float64:
        raise TypeError("implementation='triton' supports bf16, fp16 and fp32 inputs, not fp64")
    if not hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "implementation='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton "
            "is imported, to run the kernels on CPU)"
        )
    return True


def _logits_tile(h: torch.Tensor, weight: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
    """Raw logits z = h @ weight[c0:c1].T of a tile, in h's (compute) dtype."""
    return h @ weight[c0:c1].to(h.dtype).T


def _torch_local_stats(hidden, weight, labels, shard: VocabShard, temperature, chunk, vchunk):
    """This rank's (m, s, b, z_y) per token, tile by tile with torch matmuls."""
    n, dtype = hidden.shape[0], compute_dtype(hidden.dtype)
    m = torch.full((n,), -math.inf, dtype=dtype, device=hidden.device)
    s, b, label_logit = (torch.zeros(n, dtype=dtype, device=hidden.device) for _ in range(3))
    for r0 in range(0, n, chunk):
        r1 = min(r0 + chunk, n)
        h = hidden[r0:r1].to(dtype)
        cols = shard.local_columns(labels[r0:r1])
        stats = (m[r0:r1], s[r0:r1], b[r0:r1])
        for c0 in range(0, shard.valid, vchunk):
            c1 = min(c0 + vchunk, shard.valid)
            z = _logits_tile(h, weight, c0, c1)
            label_logit[r0:r1] += softmax_stats.gather_labels(z, cols - c0)  # one tile holds it
            finite = torch.isfinite(z.amin(dim=-1))  # a -inf logit means a non-finite input
            tm, ts, tb = softmax_stats.slice_stats_(z, temperature)
            ts = ts.masked_fill(~finite, math.nan)
            stats = softmax_stats.merge(stats, (tm, ts, tb), temperature)
        m[r0:r1], s[r0:r1], b[r0:r1] = stats
    return m, s, b, label_logit


def _torch_tile_grad(
    h, weight, c0, c1, label_cols, m, log_s, entropy, grad_logp, grad_entropy, temperature
):
    """G = dL/dz [n, c1 - c0] of one recomputed tile, via ``softmax_stats.logits_grad_``."""
    logp = _logits_tile(h, weight, c0, c1).sub_(m.unsqueeze(-1))
    if temperature != 1.0:
        logp.div_(temperature)
    logp.sub_(log_s.unsqueeze(-1))  # (z - m) / T - log s: the exact shift first (softmax_stats)
    return softmax_stats.logits_grad_(
        logp, entropy, grad_logp, grad_entropy, label_cols, 1.0 / temperature
    )


def _check_finite_logits(s: torch.Tensor, dtype: torch.dtype) -> None:
    """Raise NonFiniteError("logits"), on every rank alike (``s`` is all-reduced), for tokens with a
    non-finite logit: the error the logits path raises, which the actor turns into a skip."""
    bad = ~torch.isfinite(s)
    if bad.any():
        where = bad.nonzero().flatten()[:5].tolist()
        raise NonFiniteError("logits",
            f"hidden @ weight.T is not finite for token(s) at flat index {where}: hidden and the "
            f"non-padding rows of weight must be finite, and their products must not overflow "
            f"{dtype}"
        )


class _FusedLMHead(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, labels, temperature, group, shard, tiles, entropy_grad, triton
    ):
        chunk, vchunk = tiles
        if triton:
            backend = _triton_backend()
            local = backend.local_stats(hidden, weight, labels, shard, temperature, vchunk)
        else:
            local = _torch_local_stats(hidden, weight, labels, shard, temperature, chunk, vchunk)
        m, s, b, label_logit = softmax_stats.all_reduce_stats(*local, group, temperature)
        _check_finite_logits(s, compute_dtype(hidden.dtype))
        _, entropy, logp = softmax_stats.finalize(m, s, b, label_logit, temperature)

        ctx.save_for_backward(hidden, weight, labels, m, s.log(), entropy)
        ctx.temperature, ctx.group, ctx.shard, ctx.tiles = temperature, group, shard, tiles
        ctx.entropy_grad, ctx.triton = entropy_grad, triton
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, labels, m, log_s, entropy = ctx.saved_tensors
        shard, temperature, (chunk, vchunk) = ctx.shard, ctx.temperature, ctx.tiles
        want_h, want_w = ctx.needs_input_grad[:2]
        dtype = compute_dtype(hidden.dtype)
        # Triton: h and W stay in their (bf16/fp16) dtype, so the tile recompute and the two
        # GEMMs run on tensor cores with fp32 accumulation, G rounded to the input dtype as in
        # megatron's own half-precision backward; the torch path computes in fp32 throughout.
        operand = hidden.dtype if ctx.triton else dtype
        tile_grad = _triton_backend().logits_grad if ctx.triton else _torch_tile_grad
        grad_logp = grad_logp.to(dtype).contiguous()  # may arrive expanded (stride 0)
        grad_entropy = grad_entropy.to(dtype).contiguous() if ctx.entropy_grad else None
        d_hidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if want_h else None
        d_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if want_w else None
        n = hidden.shape[0]
        for r0 in range(0, n, chunk):
            r1 = min(r0 + chunk, n)
            h = hidden[r0:r1].to(operand)
            cols = shard.local_columns(labels[r0:r1])  # no host sync per tile: elementwise
            per_row = (
                m[r0:r1],
                log_s[r0:r1],
                entropy[r0:r1],
                grad_logp[r0:r1],
                None if grad_entropy is None else grad_entropy[r0:r1],
            )
            for c0 in range(0, shard.valid, vchunk):
                c1 = min(c0 + vchunk, shard.valid)
                g = tile_grad(h, weight, c0, c1, cols - c0, *per_row, temperature).to(operand)
                if want_h:
                    d_hidden[r0:r1] += g @ weight[c0:c1].to(operand)
                if want_w:
                    d_weight[c0:c1] += g.T @ h
        if want_h:
            # hidden is replicated over the tensor-parallel ranks, each of which saw only its slice.
            d_hidden = distributed.all_reduce_(d_hidden, ctx.group).to(hidden.dtype)
        if want_w:
            d_weight = d_weight.to(weight.dtype)
        return d_hidden, d_weight, None, None, None, None, None, None, None


def fused_lm_head_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    tp_group=None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    entropy_grad: bool = False,
    implementation: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(logprobs, entropy)`` of ``softmax(hidden @ weight.T / temperature)``.

    The same results as ``vocab_parallel_logprobs_and_entropy(hidden @ weight.T, labels, ...)``
    without materialising the logits.

    Args:
        hidden: [..., H] in bf16/fp16/fp32/fp64, replicated on every rank of ``tp_group``.
        weight: [V_local, H] of hidden's dtype: this rank's contiguous slice of the (padded)
            LM-head weight, Megatron layout (the whole weight when ``tp_group`` is None).
        labels: [...] (hidden's leading shape) global token ids in [0, vocab_size), identical on
            every rank of the group.
        temperature: the sampling temperature T (docs/numerics.md §1: p = softmax(z / T)).
        tp_group: the tensor-parallel process group, or None for no tensor parallelism.
        vocab_size: the true vocabulary; weight rows past it are Megatron padding and excluded.
            None means no padding.
        chunk_size: tokens per tile (default 1024).
        vocab_chunk_size: vocabulary columns per tile (default 4096); on the Triton path also
            the forward kernel's vocabulary split (rounded up to its column block).
        entropy_grad: make entropy differentiable (entropy bonus); otherwise it is detached.
        implementation: "auto" (Triton for CUDA tensors when triton is installed, else torch),
            "torch", or "triton" (an error, never a silent fallback, if it cannot run).

    Returns:
        fp32 log-probs (differentiable) and entropies shaped like ``labels``, fp64 for fp64
        inputs. Gradients flow to ``hidden`` (all-reduced over ``tp_group``) and ``weight``
        (zero on padding rows) in their dtypes.
    """
    check_float("hidden", hidden)
    check_float("weight", weight)
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must be [V_local > 0, H], got {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} must end in weight's hidden size {weight.shape[1]} "
            f"(weight {tuple(weight.shape)})"
        )
    check_options(temperature, chunk_size)
    check_options(temperature, vocab_chunk_size, "vocab_chunk_size")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if not hidden.device == weight.device == labels.device:
        raise ValueError(
            f"hidden ({hidden.device}), weight ({weight.device}) and labels ({labels.device}) "
            f"must be on one device"
        )
    shard = vocab_shard(weight.shape[0], tp_group, vocab_size)
    check_labels(labels, hidden.shape[:-1], shard.vocab_size, like="hidden")
    triton = _use_triton(implementation, hidden)

    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1).long()
    if flat_labels.numel() == 0:  # same count on every rank, so skipping collectives is safe
        empty = (flat_hidden.sum(-1) + weight[:0].sum()).to(compute_dtype(hidden.dtype))
        return empty.reshape(labels.shape), empty.detach().reshape(labels.shape)
    tiles = (chunk_size or DEFAULT_CHUNK_SIZE, vocab_chunk_size or DEFAULT_VOCAB_CHUNK_SIZE)
    logp, entropy = _FusedLMHead.apply(
        flat_hidden, weight, flat_labels, float(temperature), tp_group, shard, tiles, entropy_grad,
        triton,
    )
    return logp.reshape(labels.shape), entropy.reshape(labels.shape)
