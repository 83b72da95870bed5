"""ActorConfig validation (errors name the field), the lr schedule, and packing: token budget,
equal micro-batch counts, shifted labels and the response layout against a direct computation."""

from __future__ import annotations

import math
import re

import pytest
import torch

from megatron_archer.actor import ActorConfig, SequenceBatch, pack, plan_micro_batches
from megatron_archer.actor.packing import scatter_to_batch
from tests.actor.common import make_batch


@pytest.mark.parametrize("field, value", [
    ("max_tokens_per_micro_batch", 1), ("lr", 0.0), ("lr", float("nan")), ("weight_decay", -1.0),
    ("adam_beta1", 1.0), ("adam_beta2", -0.1), ("adam_eps", 0.0), ("clip_grad", -1.0),
    ("lr_schedule", "linear"), ("lr_warmup_steps", -1), ("min_lr", 1.0),
    ("params_dtype", "float16"), ("temperature", 0.0), ("logprob_chunk_size", 0),
    ("adam_eps", float("inf")), ("clip_grad", float("-inf")), ("logprob_impl", "vocab"),
    ("max_tokens_per_micro_batch", 8.0), ("routing_replay", "engine"),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must .*; got {re.escape(repr(value))}$"):
        ActorConfig(**{field: value})


def test_cosine_needs_decay_steps():
    with pytest.raises(ValueError, match=r"^lr_decay_steps must .* \(5\) .*; got 5$"):
        ActorConfig(lr_schedule="cosine", lr_warmup_steps=5, lr_decay_steps=5)


def test_lr_schedule():
    constant = ActorConfig(lr=1e-6)
    assert [constant.lr_at(s) for s in (0, 10)] == [1e-6, 1e-6]
    warm = ActorConfig(lr=1.0, lr_warmup_steps=3, lr_schedule="cosine", lr_decay_steps=13,
                       min_lr=0.1)
    assert [warm.lr_at(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert math.isclose(warm.lr_at(8), 0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert math.isclose(warm.lr_at(13), 0.1) and math.isclose(warm.lr_at(100), 0.1)


def test_plan_respects_budget_and_count():
    lengths = [30, 5, 17, 22, 9, 9, 40, 3]
    plan = plan_micro_batches(lengths, 40)
    assert sorted(i for mb in plan for i in mb) == list(range(8))
    assert all(sum(lengths[i] for i in mb) <= 40 for mb in plan)
    assert len(plan) == math.ceil(sum(lengths) / 40)  # first-fit decreasing is tight here
    more = plan_micro_batches(lengths, 40, min_count=6)
    assert len(more) == 6 and sorted(i for mb in more for i in mb) == list(range(8))
    assert plan_micro_batches([4], 40, min_count=3) == [[0], [], []]
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch=40"):
        plan_micro_batches([41], 40)


def test_batch_validation():
    ids = torch.arange(5)
    with pytest.raises(ValueError, match=r"response_mask\[0\]\[0\]"):
        SequenceBatch([ids], [torch.ones(5, dtype=torch.bool)])
    with pytest.raises(ValueError, match=r"response_mask\[0\] must be bool"):
        SequenceBatch([ids], [torch.ones(4, dtype=torch.bool)])
    with pytest.raises(ValueError, match="1 input_ids but 2"):
        SequenceBatch([ids], [ids.bool(), ids.bool()])
    mask = torch.arange(5) >= 2
    for routing in ([torch.zeros(4, 2, 2, dtype=torch.int16)] * 2, [torch.zeros(3, 2, 2)],
                    [torch.zeros(3, 2, 2, dtype=torch.int16)], [torch.zeros(4, 2)]):
        with pytest.raises(ValueError, match=r"routing"):
            SequenceBatch([ids], [mask], routing)
    for tokens in (4, 5):  # every token but the last (the engine's), or every token
        SequenceBatch([ids], [mask], [torch.zeros(tokens, 2, 2, dtype=torch.int16)])


def test_pack_labels_positions_and_layout():
    batch = make_batch(5, seed=2)
    indices = [0, 2, 3]
    mb = pack(batch, indices)
    row = mb.input_ids[0]
    assert torch.equal(row, torch.cat([batch.input_ids[i] for i in indices]))
    assert torch.equal(mb.position_ids[0], torch.cat(
        [torch.arange(batch.input_ids[i].numel()) for i in indices]))
    # every label is the token after its position, inside the same sequence, a response token
    assert torch.equal(mb.labels, row[mb.label_positions + 1])
    # to_layout puts sequence j's k-th scored token at [j, k]
    values = torch.arange(mb.labels.numel(), dtype=torch.float32) + 1
    layout = mb.to_layout(values)
    for j, i in enumerate(indices):
        want = batch.input_ids[i][batch.response_mask[i]]
        got = row[mb.label_positions + 1][layout[j][mb.response_mask[j]].long() - 1]
        assert torch.equal(got, want)
    params = mb.packed_seq_params()
    lengths = [batch.input_ids[i].numel() for i in indices]
    assert params.qkv_format == "thd" and params.max_seqlen_q == max(lengths)
    assert torch.diff(params.cu_seqlens_q).tolist() == lengths
    assert params.cu_seqlens_kv is params.cu_seqlens_q
    full = scatter_to_batch(len(batch), [mb], [layout], batch.response_layout_mask().shape[1])
    assert torch.equal(mb.gather(full), layout)
    assert torch.all(full[[1, 4]] == 0)
