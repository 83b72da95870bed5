"""Portable context-parallel attention for packed (thd) rows: all-gather keys and values over the
CP group, causal mask by global positions inside each sequence (docs/numerics.md §9).

Each CP rank holds, per sequence, chunks i and 2N-1-i of its 2N chunks
(``actor.context_parallel``). Its queries need the keys and values of every earlier position of
their sequence, some of which other ranks hold, so keys and values are all-gathered (autograd:
the gradient of the gather is the sum of every rank's gradient for this rank's part, a
reduce-scatter; ``torch.distributed.nn.functional.all_gather`` is not used because its gloo
backward scatters from group ranks as if they were global ranks, which fails on a CP group that
does not start at global rank 0), put back in the padded row's order,
and each sequence's local queries attend to its keys at global positions <= their own. This is
megatron's "all_gather" CP communication pattern without Transformer Engine: O(row) key/value
memory per rank, balanced causal work. Transformer Engine's CP attention replaces it on CUDA.

Padding positions sit at the end of each padded sequence, after every real token, so no real
query sees them; padding queries see real keys and yield finite values that no loss reads.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from megatron_archer.actor.context_parallel import cp_rank_positions

# (query [1, h, sq, d], key, value [1, h, sk, d], mask [sq, sk] True = masked out) -> [1, h, sq, d]
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class _GatherRanks(torch.autograd.Function):
    """[t, ...] on every rank of ``group`` -> [size x t, ...] in rank order; backward: the sum over
    ranks of the gradient of this rank's part (reduce-scatter)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        out = local.new_empty((size * local.shape[0], *local.shape[1:]))
        dist.all_gather_into_tensor(out, local.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size = dist.get_world_size(ctx.group)
        part = grad.new_empty((grad.shape[0] // size, *grad.shape[1:]))
        dist.reduce_scatter_tensor(part, grad.contiguous(), group=ctx.group)
        return part, None


def _padded_row(local: torch.Tensor, padded_cu_seqlens: torch.Tensor, group) -> torch.Tensor:
    """[t_local, ...] of every CP rank -> the padded row [t_padded, ...] in sequence order."""
    size = dist.get_world_size(group)
    gathered = _GatherRanks.apply(local, group)  # rank by rank
    held = torch.cat([cp_rank_positions(padded_cu_seqlens, size, j) for j in range(size)])
    order = torch.empty_like(held)
    order[held] = torch.arange(held.numel())
    return gathered[order.to(local.device)]


def context_parallel_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               padded_cu_seqlens: torch.Tensor, group, attend: Attend
                               ) -> torch.Tensor:
    """This rank's [t_local, h, d] queries over its sequences' keys on every CP rank -> [t_local, h * d].

    ``key``/``value`` have the query's head count (grouped-query heads already repeated);
    ``padded_cu_seqlens`` are the padded row's global sequence boundaries
    (``PackedSeqParams.cu_seqlens_q_padded``).
    """
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    padded = padded_cu_seqlens.cpu().long()
    if int(padded[-1]) != size * query.size(0):
        raise ValueError(f"context-parallel attention: cu_seqlens_q_padded covers {int(padded[-1])} "
                         f"tokens, {size} ranks x {query.size(0)} local queries hold "
                         f"{size * query.size(0)}")
    full_key = _padded_row(key, padded, group)
    full_value = _padded_row(value, padded, group)
    mine = cp_rank_positions(padded, size, rank)
    outputs, start = [], 0
    for seq_start, seq_end in zip(padded[:-1].tolist(), padded[1:].tolist()):
        count = (seq_end - seq_start) // size
        q_pos = mine[start:start + count] - seq_start  # positions inside the sequence
        k_pos = torch.arange(seq_end - seq_start)
        masked = (k_pos[None, :] > q_pos[:, None]).to(query.device)
        # [s, h, d] -> [1, h, s, d]
        q = query[start:start + count].transpose(0, 1)[None]
        k, v = (x[seq_start:seq_end].transpose(0, 1)[None] for x in (full_key, full_value))
        outputs.append(attend(q, k, v, masked)[0].transpose(0, 1))
        start += count
    return torch.cat(outputs).flatten(1)
