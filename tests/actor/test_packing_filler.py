"""Packed rows are never empty and can be padded to a token multiple (fp8 GEMMs need 16, sequence
parallelism the TP size): the filler is a sequence of its own, with no labels and no place in the
response layout."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from megatron_archer.actor.actor import pack_multiple
from megatron_archer.actor.packing import filler_tokens, pack, plan_micro_batches
from tests.actor.common import make_batch


def test_a_micro_batch_without_sequences_is_a_one_token_row():
    batch = make_batch(1, seed=2)
    plan = plan_micro_batches(batch.lengths, max_tokens=64, min_count=3)  # DP ranks need 3
    assert plan == [[0], [], []]
    for indices in plan[1:]:
        mb = pack(batch, indices)
        assert mb.num_tokens == 1 and mb.cu_seqlens.tolist() == [0, 1] and mb.max_seqlen == 1
        assert mb.labels.numel() == 0 and mb.response_mask.shape == (0, 0)


def test_rows_padded_to_a_multiple_keep_labels_and_layout():
    batch = make_batch(4, seed=9)
    plain = pack(batch, [0, 1])
    padded = pack(batch, [0, 1], multiple=16)
    n = plain.num_tokens
    assert padded.num_tokens % 16 == 0 and padded.num_tokens - n == filler_tokens(n, 16) > 0
    assert padded.cu_seqlens[:-1].tolist() == plain.cu_seqlens.tolist()
    assert padded.cu_seqlens[-1] == padded.num_tokens
    assert torch.equal(padded.input_ids[0, :n], plain.input_ids[0])
    assert torch.equal(padded.position_ids[0, n:], torch.arange(padded.num_tokens - n))
    for name in ("label_positions", "labels", "response_mask", "layout_index"):
        assert torch.equal(getattr(padded, name), getattr(plain, name)), name
    assert filler_tokens(32, 16) == 0 and filler_tokens(0, 16) == 16 and filler_tokens(0, 1) == 1


def test_the_row_multiple_covers_fp8_and_sequence_parallelism():
    def multiple(fp8, tp, sp, recipe="delayed"):
        return pack_multiple(SimpleNamespace(fp8=fp8, fp8_recipe=recipe,
                                             tensor_model_parallel_size=tp, sequence_parallel=sp))

    assert multiple(None, 4, False) == 1 and multiple("hybrid", 4, False) == 16
    assert multiple(None, 2, True) == 2 and multiple(None, 3, True) == 3
    assert multiple("hybrid", 4, False, "mxfp8") == 32
    # under SP each TP rank's fp8 linear sees n / TP rows: those must meet the recipe's alignment
    for tp in (2, 3, 4, 8):
        for recipe, align in (("delayed", 16), ("tensorwise", 16), ("blockwise", 16),
                              ("mxfp8", 32)):
            m = multiple("e4m3", tp, True, recipe)
            assert m % tp == 0 and (m // tp) % align == 0, (tp, recipe, m)
