"""Portable context-parallel attention (docs/numerics.md §9) with real gloo processes: SDPACoreAttention at CP
3 and at CP 2 on a group without global rank 0, on packed rows of unequal sequences (1-token
ones, sequences cut by chunk boundaries, random padding) equals the unsplit packed attention in
float64, values and the gradients of query, key and value (the keys' gradient crosses ranks
through the all-gather)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_archer.actor.context_parallel import cp_padded_lengths, cp_rank_positions
from megatron_archer.models.sdpa_attention import SDPACoreAttention
from tests.distributed import run_distributed

HEADS, GROUPS, HEAD_DIM = 4, 2, 8


def _attention(cp_size: int, group=None) -> SDPACoreAttention:
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                               num_query_groups=GROUPS, kv_channels=HEAD_DIM, attention_dropout=0.0,
                               context_parallel_size=cp_size)
    return SDPACoreAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                             attention_type="self", pg_collection=SimpleNamespace(cp=group))


def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _check(rank, size, group, seed):
    """CP attention over ``group`` (``rank`` of ``size``) against the unsplit row."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [1, 7, 2 * size + 1, 1, 13, 2 * size]
    n = sum(lengths)
    q = torch.randn(n, HEADS, HEAD_DIM, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(n, GROUPS, HEAD_DIM, generator=gen, dtype=torch.float64) for _ in range(2))
    weight = torch.randn(n, HEADS * HEAD_DIM, generator=gen, dtype=torch.float64)
    real = _cu(lengths)
    unsplit = [x.clone().requires_grad_(True) for x in (q, k, v)]
    want = _attention(1)(*unsplit, None, packed_seq_params=PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=real, cu_seqlens_kv=real,
        max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths)))
    (want * weight).sum().backward()

    # the padded row (padding: random finite values at the end of each sequence), this rank's part
    padded_lengths = cp_padded_lengths(lengths, size)
    padded = _cu(padded_lengths)
    to_padded = torch.cat([torch.arange(a, a + m) for a, m in zip(padded[:-1].tolist(), lengths)])
    rows = []
    for x in (q, k, v):
        row = torch.randn(int(padded[-1]), *x.shape[1:], generator=gen, dtype=torch.float64)
        row[to_padded] = x
        rows.append(row)
    row_weight = torch.zeros(int(padded[-1]), HEADS * HEAD_DIM, dtype=torch.float64)
    row_weight[to_padded] = weight
    mine = cp_rank_positions(padded, size, rank)
    local = [row[mine].clone().requires_grad_(True) for row in rows]
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=real, cu_seqlens_kv=real,
                             cu_seqlens_q_padded=padded, cu_seqlens_kv_padded=padded,
                             max_seqlen_q=max(padded_lengths), max_seqlen_kv=max(padded_lengths))
    got = _attention(size, group)(*local, None, packed_seq_params=params)
    (got * row_weight[mine]).sum().backward()

    # compare at this rank's real positions
    is_real = torch.zeros(int(padded[-1]), dtype=torch.bool)
    is_real[to_padded] = True
    unsplit_of = torch.full((int(padded[-1]),), -1, dtype=torch.long)
    unsplit_of[to_padded] = torch.arange(n)
    held = is_real[mine]
    source = unsplit_of[mine[held]]
    assert held.any() and (~held).any() or size == 1
    torch.testing.assert_close(got[held], want.detach()[source], rtol=1e-12, atol=1e-12)
    for name, got_x, want_x in zip("qkv", local, unsplit):
        torch.testing.assert_close(got_x.grad[held], want_x.grad[source], rtol=1e-11, atol=1e-12,
                                   msg=lambda m, name=name: f"d{name}: {m}")
        assert torch.all(torch.isfinite(got_x.grad))

    with pytest.raises(ValueError, match="packed \\(thd\\) rows only"):
        _attention(size, group)(q[:, None], k[:, None], v[:, None], None)
    unpadded = PackedSeqParams(qkv_format="thd", cu_seqlens_q=real, cu_seqlens_kv=real)
    with pytest.raises(ValueError, match="needs equal cu_seqlens_q_padded"):
        _attention(size, group)(*local, None, packed_seq_params=unpadded)


def _worker(rank, world_size):
    _check(rank, world_size, dist.group.WORLD, 8)
    # a CP group that does not start at global rank 0 (as under DP x CP or PP x CP)
    pair = dist.new_group([1, 2])
    if rank in (1, 2):
        _check(rank - 1, 2, pair, 7)


def test_context_parallel_attention_equals_the_unsplit_row():
    run_distributed(_worker, 3)
