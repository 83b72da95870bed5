"""Context-parallel layout of a packed row (docs/numerics.md §9): which tokens each CP rank holds, and their labels.

With CP size N every sequence of a packed row (``packing.MicroBatch``, thd layout) is padded to a
multiple of 2N (2N x ``multiple``: ``multiple`` is the TP size under sequence parallelism, so
each rank's row splits evenly over TP) and cut into 2N equal chunks; CP rank i holds chunks i and
2N-1-i of every sequence, which balances causal attention work. Its local row is, sequence by
sequence, [chunk i, chunk 2N-1-i]: the layout of Transformer Engine's
``thd_get_partitioned_indices`` that megatron's thd RoPE (``rope_utils._get_thd_freqs_on_this_cp_rank``)
and TE's CP attention expect, given megatron's ``PackedSeqParams`` with the real ``cu_seqlens``
and the padded ``cu_seqlens_*_padded``.

Labels are taken from the unsplit row before splitting: the label of a chunk's last position is
the next chunk's first token, which another rank holds. Each label stays with the position that
predicts it, so every response token is scored on exactly one rank. Padding positions (at the
end of each sequence) are never label positions, so they enter no loss or metric.

A rank's ``ContextParallelMicroBatch`` keeps the micro-batch's [b, R_mb] response layout (the
same rows and columns on every CP rank) with ``response_mask`` True only at the tokens this rank
scores: the CP ranks hold disjoint parts of the same responses, whose union is the unsplit
micro-batch's mask. Per-response statistics over them are ``algorithms.sharded_rows``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch

from megatron_archer.actor.packing import MicroBatch


def cp_padded_lengths(lengths: Sequence[int], cp_size: int, multiple: int = 1) -> list[int]:
    """Each length rounded up to a multiple of 2 x ``cp_size`` x ``multiple`` (2N chunks, each a
    multiple of ``multiple`` tokens)."""
    if cp_size < 1 or multiple < 1:
        raise ValueError(f"cp_size and multiple must be >= 1; got {cp_size} and {multiple}")
    unit = 2 * cp_size * multiple
    return [-(-int(n) // unit) * unit for n in lengths]


def cp_rank_positions(padded_cu_seqlens: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions of the padded row that CP rank ``cp_rank`` holds, in its local order: per sequence
    chunk ``cp_rank`` then chunk 2N-1-``cp_rank`` of its 2N equal chunks (module docstring)."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be in [0, {cp_size}); got {cp_rank}")
    bounds = padded_cu_seqlens.tolist()
    pieces = []
    for start, end in pairwise(bounds):
        if (end - start) % (2 * cp_size):
            raise ValueError(f"a sequence of {end - start} padded tokens is not a multiple of "
                             f"2 x cp_size = {2 * cp_size}")
        chunk = (end - start) // (2 * cp_size)
        for index in (cp_rank, 2 * cp_size - 1 - cp_rank):
            pieces.append(torch.arange(start + index * chunk, start + (index + 1) * chunk))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


@dataclass(frozen=True)
class ContextParallelMicroBatch(MicroBatch):
    """One CP rank's share of a packed micro-batch (module docstring).

    ``input_ids``/``position_ids`` [1, n_pad / N]: this rank's tokens and their positions within
    their sequence; ``cu_seqlens`` the unsplit row's real sequence boundaries and
    ``cu_seqlens_padded`` the padded ones (both global, as megatron's PackedSeqParams takes them);
    ``label_positions`` local positions, ``labels`` their next tokens (from the unsplit row);
    ``response_mask`` [b, R_mb] True where this rank scores a token, ``full_response_mask`` the
    unsplit micro-batch's; ``layout_index`` where each local label lands in the layout.
    """

    cu_seqlens_padded: torch.Tensor
    full_response_mask: torch.Tensor
    cp_size: int
    cp_rank: int

    @property
    def max_seqlen(self) -> int:
        """The longest padded sequence (Transformer Engine sizes its CP work by the padded row)."""
        return int((self.cu_seqlens_padded[1:] - self.cu_seqlens_padded[:-1]).max())

    def packed_seq_params(self):
        """megatron's ``PackedSeqParams`` (thd) with the real and the padded boundaries: megatron's
        thd RoPE and TE's CP attention split each sequence by the padded ones."""
        from megatron.core.packed_seq_params import PackedSeqParams

        cu, padded, longest = self.cu_seqlens, self.cu_seqlens_padded, self.max_seqlen
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                               cu_seqlens_q_padded=padded, cu_seqlens_kv_padded=padded,
                               max_seqlen_q=longest, max_seqlen_kv=longest)


def split_for_context_parallel(mb: MicroBatch, cp_size: int, cp_rank: int,
                               multiple: int = 1) -> ContextParallelMicroBatch:
    """CP rank ``cp_rank``'s share of the unsplit packed row ``mb`` (module docstring).

    Every sequence of ``mb`` (its filler included) is padded at its end with token 0 to a multiple
    of 2 x ``cp_size`` x ``multiple``; labels come from ``mb`` itself, before splitting.
    """
    device = mb.input_ids.device
    real = mb.cu_seqlens.cpu().long()
    lengths = (real[1:] - real[:-1]).tolist()
    padded_lengths = cp_padded_lengths(lengths, cp_size, multiple)
    padded = torch.tensor([0] + padded_lengths).cumsum(0)
    sequence = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    # where each unsplit row position lands in the padded row
    to_padded = torch.arange(int(real[-1])) - real[sequence] + padded[sequence]
    ids = torch.zeros(int(padded[-1]), dtype=torch.long)
    ids[to_padded] = mb.input_ids[0].cpu()
    place = torch.zeros(int(padded[-1]), dtype=torch.long)  # position within its sequence
    place[to_padded] = mb.position_ids[0].cpu()
    pad_sequence = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(padded_lengths))
    is_pad = torch.ones(int(padded[-1]), dtype=torch.bool)
    is_pad[to_padded] = False
    place[is_pad] = (torch.arange(int(padded[-1])) - padded[pad_sequence])[is_pad]

    positions = cp_rank_positions(padded, cp_size, cp_rank)
    local_of = torch.full((int(padded[-1]),), -1, dtype=torch.long)
    local_of[positions] = torch.arange(positions.numel())
    label_local = local_of[to_padded[mb.label_positions.cpu()]]
    mine = label_local >= 0
    layout_index = mb.layout_index.cpu()[mine]
    local_mask = torch.zeros(mb.response_mask.numel(), dtype=torch.bool)
    local_mask[layout_index] = True
    return ContextParallelMicroBatch(
        indices=list(mb.indices),
        input_ids=ids[positions][None].to(device),
        position_ids=place[positions][None].to(device),
        cu_seqlens=mb.cu_seqlens,
        label_positions=label_local[mine].to(device),
        labels=mb.labels[mine.to(mb.labels.device)],
        response_mask=local_mask.view(mb.response_mask.shape).to(device),
        layout_index=layout_index.to(device),
        cu_seqlens_padded=padded.to(torch.int32).to(device),
        full_response_mask=mb.response_mask,
        cp_size=cp_size,
        cp_rank=cp_rank,
    )
