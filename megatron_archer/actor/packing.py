"""Sequences -> packed micro-batches by a token budget, and per-token results back to sequences.

A batch is a list of sequences (prompt + response token ids) with a response mask per token.
Micro-batches are formed by a token budget (``max_tokens``), not a fixed count: sequences are
placed whole, largest first, into the first micro-batch with room (first-fit decreasing), and
each micro-batch is one packed row of its sequences concatenated, with no padding. Position ids
restart at 0 in every sequence, and attention is restricted to each sequence by its ``cu_seqlens``
(megatron's ``PackedSeqParams``, qkv_format "thd", for either attention backend).

Labels are shifted: the log-prob of token t + 1 comes from position t. Only response tokens are
scored; they are returned in the *response layout*: [B, R] right-padded, row i holding sequence
i's response tokens in order (R = the most response tokens of any sequence), with a bool mask.
That is the [B, T] layout of ``megatron_archer.algorithms`` (T = R). A micro-batch's view of a
batch-level [B, R] tensor is ``micro_batch.gather(tensor)``: its rows, first ``R_mb`` columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceBatch:
    """Sequences of token ids and their response masks (1-D, equal lengths per sequence).

    ``response_mask[i][t]`` is True when token t of sequence i is a response token to be scored
    (its log-prob comes from position t - 1); token 0 cannot be scored.

    ``routing`` (mixture of experts, optional): per sequence, the experts the rollout engine
    routed its tokens to, [tokens, num_layers, top_k] integers for its first ``tokens`` tokens
    (every token but the last, which the engine never runs: its own or its length; a dense
    layer's rows are ignored). ``actor.routing`` replays them.
    """

    input_ids: Sequence[torch.Tensor]
    response_mask: Sequence[torch.Tensor]
    routing: Sequence[torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if len(self.input_ids) == 0:
            raise ValueError("SequenceBatch.input_ids is empty")
        if len(self.input_ids) != len(self.response_mask):
            raise ValueError(
                f"SequenceBatch has {len(self.input_ids)} input_ids but "
                f"{len(self.response_mask)} response_mask entries"
            )
        for i, (ids, mask) in enumerate(zip(self.input_ids, self.response_mask)):
            if ids.dim() != 1 or ids.numel() < 2 or ids.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"input_ids[{i}] must be a 1-D integer tensor of >= 2 tokens, "
                                 f"got {ids.dtype} {tuple(ids.shape)}")
            if mask.dtype != torch.bool or mask.shape != ids.shape:
                raise ValueError(f"response_mask[{i}] must be bool with input_ids[{i}]'s shape "
                                 f"{tuple(ids.shape)}, got {mask.dtype} {tuple(mask.shape)}")
            if bool(mask[0]):
                raise ValueError(f"response_mask[{i}][0] is True: the first token has no context")
        if self.routing is not None:
            if len(self.routing) != len(self.input_ids):
                raise ValueError(f"SequenceBatch has {len(self.input_ids)} input_ids but "
                                 f"{len(self.routing)} routing entries")
            for i, (ids, experts) in enumerate(zip(self.input_ids, self.routing)):
                if experts.dim() != 3 or experts.dtype.is_floating_point or \
                        experts.shape[0] not in (ids.numel() - 1, ids.numel()):
                    raise ValueError(
                        f"routing[{i}] must be [tokens, layers, top_k] integers for "
                        f"{ids.numel() - 1} or {ids.numel()} tokens, got {experts.dtype} "
                        f"{tuple(experts.shape)}")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [int(ids.numel()) for ids in self.input_ids]

    @property
    def response_counts(self) -> list[int]:
        return [int(mask.sum()) for mask in self.response_mask]

    def response_layout_mask(self) -> torch.Tensor:
        """The batch's [B, R] response-layout mask."""
        return _layout_mask(self.response_counts)


def _layout_mask(counts: Sequence[int]) -> torch.Tensor:
    width = max(counts, default=0)
    return torch.arange(width)[None, :] < torch.tensor(counts, dtype=torch.long)[:, None]


def plan_micro_batches(
    lengths: Sequence[int], max_tokens: int, min_count: int = 1
) -> list[list[int]]:
    """Indices of the sequences in each micro-batch, every micro-batch within ``max_tokens``.

    First-fit decreasing; then, until there are ``min_count`` micro-batches (data-parallel ranks
    must agree on the count), the micro-batch with the most tokens is split in two, or one without
    sequences (``[]``) is added when no micro-batch has two; ``pack`` makes that a one-token
    filler row, never an empty one. Deterministic for given inputs.
    """
    too_long = [i for i, n in enumerate(lengths) if n > max_tokens]
    if too_long:
        raise ValueError(
            f"sequence {too_long[0]} has {lengths[too_long[0]]} tokens, more than "
            f"ActorConfig.max_tokens_per_micro_batch={max_tokens}"
        )
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, load in enumerate(loads):
            if load + lengths[i] <= max_tokens:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    while len(bins) < min_count:
        splittable = [b for b in range(len(bins)) if len(bins[b]) > 1]
        if not splittable:
            bins.append([])
            loads.append(0)
            continue
        b = max(splittable, key=lambda b: loads[b])
        first, second, l1, l2 = [], [], 0, 0
        for i in bins[b]:  # already largest first: greedy balance
            if l1 <= l2:
                first.append(i)
                l1 += lengths[i]
            else:
                second.append(i)
                l2 += lengths[i]
        bins[b], loads[b] = first, l1
        bins.append(second)
        loads.append(l2)
    return [sorted(b) for b in bins]


@dataclass(frozen=True)
class MicroBatch:
    """One packed row of whole sequences.

    ``input_ids``/``position_ids``: [1, n]; ``cu_seqlens``: [b + 1] int32 sequence boundaries in
    the row; ``label_positions``: [k] row positions whose next token is a response token,
    ``labels`` [k] those next tokens; ``response_mask`` [b, R_mb] the micro-batch's response
    layout, ``layout_index`` [k] where each label lands in it (flattened).
    """

    indices: list[int]
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    label_positions: torch.Tensor
    labels: torch.Tensor
    response_mask: torch.Tensor
    layout_index: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def max_seqlen(self) -> int:
        return int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())

    def gather(self, batch_tensor: torch.Tensor) -> torch.Tensor:
        """This micro-batch's [b, R_mb] view of a batch-level [B, R(, ...)] or [B] tensor."""
        rows = batch_tensor[self.indices]
        return rows if rows.dim() == 1 else rows[:, : self.response_mask.shape[1]]

    def to_layout(self, values: torch.Tensor) -> torch.Tensor:
        """[k] per-label values -> [b, R_mb], zero outside the mask (differentiable)."""
        out = values.new_zeros(self.response_mask.numel())
        out = out.index_put((self.layout_index,), values)
        return out.view(self.response_mask.shape)

    def packed_seq_params(self):
        """megatron's ``PackedSeqParams`` of this row (qkv_format "thd", self-attention): every
        attention backend (Transformer Engine, ``SDPACoreAttention``) attends causally inside each
        sequence, and megatron's RoPE restarts positions at each sequence start."""
        from megatron.core.packed_seq_params import PackedSeqParams

        cu, longest = self.cu_seqlens, self.max_seqlen
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                               max_seqlen_q=longest, max_seqlen_kv=longest)


def filler_tokens(num_tokens: int, multiple: int) -> int:
    """Tokens of the filler sequence that ends a row of ``num_tokens``: up to a multiple of
    ``multiple`` (fp8 GEMMs need 16), and one token for a row without sequences, so that no row,
    ``cu_seqlens`` or ``max_seqlen`` is ever empty (Transformer Engine and megatron's thd RoPE
    reject that)."""
    return (-num_tokens) % multiple or (multiple if num_tokens == 0 else 0)


def pack(batch: SequenceBatch, indices: list[int], device=None, multiple: int = 1) -> MicroBatch:
    """Pack ``batch``'s sequences ``indices`` into one row (see the module docstring).

    The row's length is a multiple of ``multiple``: a filler sequence of token 0
    (``filler_tokens``) follows the real ones, with its own ``cu_seqlens`` entry so that no real
    token attends to it. It has no labels and no place in the response layout, so it enters no
    loss and no metric.
    """
    ids = [batch.input_ids[i].long() for i in indices]
    masks = [batch.response_mask[i] for i in indices]
    lengths = [int(x.numel()) for x in ids]
    filler = filler_tokens(sum(lengths), multiple)
    offsets = [0]
    for n in lengths + ([filler] if filler else []):
        offsets.append(offsets[-1] + n)
    counts = [int(m.sum()) for m in masks]
    width = max(counts, default=0)
    positions, layout = [], []
    for row, (offset, mask) in enumerate(zip(offsets, masks)):
        scored = torch.nonzero(mask, as_tuple=False).flatten()  # tokens t >= 1
        positions.append(offset + scored - 1)
        layout.append(row * width + torch.arange(scored.numel()))

    def cat(xs, dtype):
        return torch.cat(xs) if xs else torch.zeros(0, dtype=dtype)

    input_ids = cat(ids + [torch.zeros(filler, dtype=torch.long)], torch.long)
    label_positions = cat(positions, torch.long)
    return MicroBatch(
        indices=list(indices),
        input_ids=input_ids[None].to(device),
        position_ids=cat([torch.arange(n) for n in lengths + [filler]], torch.long)[None].to(device),
        cu_seqlens=torch.tensor(offsets, dtype=torch.int32).to(device),
        label_positions=label_positions.to(device),
        labels=input_ids[label_positions + 1].to(device),
        response_mask=_layout_mask(counts).view(len(indices), width).to(device),
        layout_index=cat(layout, torch.long).to(device),
    )


def scatter_to_batch(
    batch_size: int, micro_batches: Sequence[MicroBatch], values: Sequence[torch.Tensor], width: int
) -> torch.Tensor:
    """Per-micro-batch [b, R_mb] results -> the batch's [B, R] response layout (zeros outside)."""
    dtype = values[0].dtype if values else torch.float32
    out = torch.zeros(batch_size, width, dtype=dtype, device=values[0].device if values else None)
    for mb, value in zip(micro_batches, values):
        if mb.indices:
            out[mb.indices, : value.shape[1]] = value
    return out
