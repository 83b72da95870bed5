"""The context-parallel layout of a packed row (docs/numerics.md §9): chunk placement against megatron's own
helpers, labels across chunk boundaries, padding out of every label."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _get_thd_freqs_on_this_cp_rank
from megatron.core.utils import get_batch_on_this_cp_rank

from megatron_archer.actor.context_parallel import (
    cp_padded_lengths,
    cp_rank_positions,
    split_for_context_parallel,
)
from megatron_archer.actor.packing import pack
from tests.actor.common import make_batch


class _Group:
    """The rank and size megatron's helpers read from a CP group."""

    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def test_padded_lengths_are_multiples_of_2n_times_multiple():
    assert cp_padded_lengths([1, 4, 5, 8, 9], 2) == [4, 4, 8, 8, 12]
    assert cp_padded_lengths([1, 16, 17], 2, multiple=4) == [16, 16, 32]
    assert cp_padded_lengths([3], 1) == [4]
    with pytest.raises(ValueError, match="cp_size and multiple must be >= 1"):
        cp_padded_lengths([3], 0)


@pytest.mark.parametrize("cp_size", [1, 2, 3, 4])
def test_one_sequence_matches_megatron_get_batch_on_this_cp_rank(cp_size, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # read the group's rank
    row = torch.arange(100, 100 + 8 * cp_size * 3)[None]
    for rank in range(cp_size):
        want = get_batch_on_this_cp_rank({"tokens": row.clone()}, cp_group=_Group(rank, cp_size))
        positions = cp_rank_positions(torch.tensor([0, row.shape[1]]), cp_size, rank)
        assert torch.equal(row[0, positions], want["tokens"][0])


def test_ranks_partition_every_sequence_with_balanced_rows():
    padded = torch.tensor([0, 8, 12, 28, 32])
    for cp_size in (1, 2):
        held = [cp_rank_positions(padded, cp_size, r) for r in range(cp_size)]
        assert {h.numel() for h in held} == {32 // cp_size}
        assert torch.equal(torch.cat(held).sort().values, torch.arange(32))
    with pytest.raises(ValueError, match="not a multiple of 2 x cp_size = 4"):
        cp_rank_positions(torch.tensor([0, 6]), 2, 0)
    with pytest.raises(ValueError, match=r"cp_rank must be in \[0, 2\)"):
        cp_rank_positions(padded, 2, 2)


def _unsplit_scored(mb):
    """{layout index: (label, id of the predicting token, its position in its sequence)}."""
    ids, pos = mb.input_ids[0], mb.position_ids[0]
    return {int(i): (int(y), int(ids[p]), int(pos[p]))
            for i, y, p in zip(mb.layout_index, mb.labels, mb.label_positions)}


@pytest.mark.parametrize("cp_size, multiple, pack_multiple", [(2, 1, 1), (2, 2, 1), (3, 1, 16), (4, 2, 1)])
def test_every_label_on_exactly_one_rank_as_in_the_unsplit_row(cp_size, multiple, pack_multiple):
    batch = make_batch(5, seed=3, min_len=3, max_len=23)
    mb = pack(batch, [0, 1, 2, 3, 4], multiple=pack_multiple)
    want = _unsplit_scored(mb)
    got, masks, boundary_labels = {}, [], 0
    for rank in range(cp_size):
        shard = split_for_context_parallel(mb, cp_size, rank, multiple)
        assert shard.num_tokens == int(shard.cu_seqlens_padded[-1]) // cp_size
        assert shard.num_tokens % multiple == 0
        assert torch.equal(shard.cu_seqlens, mb.cu_seqlens)
        assert torch.equal(shard.full_response_mask, mb.response_mask)
        for i, y, p in zip(shard.layout_index, shard.labels, shard.label_positions):
            assert int(i) not in got, "a token scored on two ranks"
            got[int(i)] = (int(y), int(shard.input_ids[0, p]), int(shard.position_ids[0, p]))
            if p + 1 == shard.num_tokens or shard.position_ids[0, p + 1] != shard.position_ids[0, p] + 1:
                boundary_labels += 1  # the label lives on another chunk (another rank or ours)
        masks.append(shard.response_mask)
        assert torch.equal(shard.response_mask.flatten().nonzero().flatten().sort().values,
                           shard.layout_index.sort().values)
    assert got == want
    assert boundary_labels > 0  # responses cut by a chunk boundary are in the test
    assert torch.equal(torch.stack(masks).sum(0), mb.response_mask.long())


def test_positions_are_megatrons_thd_rope_positions_and_padding_is_never_scored():
    batch = make_batch(4, seed=8, min_len=3, max_len=19)
    mb = pack(batch, [0, 1, 2, 3])
    cp_size = 2
    for rank in range(cp_size):
        shard = split_for_context_parallel(mb, cp_size, rank, multiple=2)
        padded = shard.cu_seqlens_padded.long()
        local = (padded // cp_size).tolist()
        longest = int((padded[1:] - padded[:-1]).max())
        for s, (start, end) in enumerate(pairwise(local)):
            x = shard.position_ids[0, start:end]
            want = _get_thd_freqs_on_this_cp_rank(rank, cp_size, x, torch.arange(longest))
            assert torch.equal(x, want)
            real = int(mb.cu_seqlens[s + 1] - mb.cu_seqlens[s])
            pad = x >= real
            assert torch.all(shard.input_ids[0, start:end][pad] == 0)
            scored = shard.label_positions[(shard.label_positions >= start) & (shard.label_positions < end)]
            # a label position p predicts token p + 1 of its sequence: both real tokens
            assert torch.all(shard.position_ids[0, scored] + 1 < real)
        params = shard.packed_seq_params()
        assert torch.equal(params.cu_seqlens_q_padded, shard.cu_seqlens_padded)
        assert params.max_seqlen_q == longest


def test_a_micro_batch_without_sequences_splits_into_padding_only():
    batch = make_batch(1, seed=2)
    mb = pack(batch, [])
    for rank in range(2):
        shard = split_for_context_parallel(mb, 2, rank)
        assert shard.num_tokens == 2 and shard.labels.numel() == 0
        assert shard.response_mask.shape == (0, 0)
