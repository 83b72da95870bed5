"""SDPACoreAttention on packed rows (PackedSeqParams, "thd"): per-sequence attention equals the
block-diagonal causal mask over the whole row (the previous implementation) and a float64
reference, values and gradients, on random rows with 1-token sequences; the whole model gives the
same logits and gradients both ways at tensor parallel 1 and 2 (real gloo processes); bad packed
inputs are refused with a message naming the problem."""

from __future__ import annotations

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_archer.models.sdpa_attention import SDPACoreAttention
from tests.distributed import run_distributed
from tests.models.checkpoints import write_checkpoint
from tests.models.parallel import model_parallel
from tests.numerics import accuracy_failure, assert_as_accurate

HEADS, GROUPS, HEAD_DIM = 4, 2, 16


def _attention() -> SDPACoreAttention:
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM,
                               num_attention_heads=HEADS, num_query_groups=GROUPS,
                               kv_channels=HEAD_DIM, attention_dropout=0.0)
    return SDPACoreAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                             attention_type="self")


def _packed(lengths: list[int]) -> PackedSeqParams:
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))


def block_causal_mask(lengths: list[int]) -> torch.Tensor:
    """[1, 1, n, n] bool, True = masked out: causal inside each sequence, nothing across (the
    mask the portable path used before packed sequences)."""
    seq_id = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(len(seq_id))
    allowed = (seq_id[:, None] == seq_id[None, :]) & (pos[None, :] <= pos[:, None])
    return (~allowed)[None, None]


def _reference(q, k, v, lengths) -> torch.Tensor:
    """float64 softmax(q k^T / sqrt(d) masked) v over the whole row: [n, h, d] -> [n, h * d]."""
    q, k, v = (x.double() for x in (q, k, v))
    k, v = (x.repeat_interleave(HEADS // GROUPS, dim=1) for x in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q, k) / HEAD_DIM**0.5
    scores = scores.masked_fill(block_causal_mask(lengths)[0], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(q.shape[0], -1)


def _random_lengths(generator: torch.Generator) -> list[int]:
    lengths = torch.randint(1, 40, (int(torch.randint(1, 9, (), generator=generator)),),
                            generator=generator).tolist()
    return lengths + [1] if 1 not in lengths else lengths  # always a 1-token sequence


@pytest.mark.parametrize("native_gqa", [True, False])  # SDPA's enable_gqa, or k/v repeated
@pytest.mark.parametrize("seed", range(6))
def test_packed_equals_block_mask_and_float64(seed, native_gqa, monkeypatch):
    from megatron_archer.models import sdpa_attention

    monkeypatch.setattr(sdpa_attention, "NATIVE_GQA", native_gqa)
    generator = torch.Generator().manual_seed(seed)
    lengths = _random_lengths(generator)
    lengths.insert(int(torch.randint(0, len(lengths), (), generator=generator)), 1)
    n = sum(lengths)
    attention = _attention()
    q = (3 * torch.randn(n, HEADS, HEAD_DIM, generator=generator)).requires_grad_()
    k = (3 * torch.randn(n, GROUPS, HEAD_DIM, generator=generator)).requires_grad_()
    v = torch.randn(n, GROUPS, HEAD_DIM, generator=generator).requires_grad_()
    weight = torch.randn(n, HEADS * HEAD_DIM, generator=generator)

    packed = attention(q, k, v, None, packed_seq_params=_packed(lengths))
    grads_packed = torch.autograd.grad((packed * weight).sum(), (q, k, v))
    # the previous path: [n, 1, h, d] with the row's block-diagonal mask
    masked = attention(q[:, None], k[:, None], v[:, None], block_causal_mask(lengths))[:, 0]
    grads_masked = torch.autograd.grad((masked * weight).sum(), (q, k, v))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    reference = _reference(q64, k64, v64, lengths)
    grads_reference = torch.autograd.grad((reference * weight.double()).sum(), (q64, k64, v64))

    assert packed.shape == (n, HEADS * HEAD_DIM)
    # both float32 paths sum in their own order: packed must be as accurate as the block mask
    assert_as_accurate(packed, masked, reference, "output")
    for name, got, old, want in zip("qkv", grads_packed, grads_masked, grads_reference):
        assert_as_accurate(got, old, want, f"d{name}")


def test_empty_row_and_refusals():
    attention = _attention()
    empty = torch.zeros(0, HEADS, HEAD_DIM)
    cu = torch.zeros(1, dtype=torch.int32)
    out = attention(empty, empty[:, :GROUPS], empty[:, :GROUPS], None, packed_seq_params=(
        PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=0,
                        max_seqlen_kv=0)))
    assert out.shape == (0, HEADS * HEAD_DIM)

    q, kv = torch.randn(5, HEADS, HEAD_DIM), torch.randn(5, GROUPS, HEAD_DIM)
    good = _packed([2, 3])
    cases = {
        "qkv_format='sbhd'": PackedSeqParams(**{**vars(good), "qkv_format": "sbhd"}),
        "cu_seqlens_kv differs": PackedSeqParams(**{**vars(good), "cu_seqlens_kv": _packed(
            [3, 2]).cu_seqlens_q}),
        "padded packed sequences": PackedSeqParams(**{**vars(good), "cu_seqlens_q_padded": (
            _packed([2, 4]).cu_seqlens_q)}),
        "covers 4 tokens, the packed query has 5": _packed([1, 3]),
    }
    for message, params in cases.items():
        with pytest.raises((ValueError, NotImplementedError), match=message):
            attention(q, kv, kv, None, packed_seq_params=params)
    with pytest.raises(ValueError, match="packed_seq_params and attention_mask are exclusive"):
        attention(q, kv, kv, block_causal_mask([2, 3]), packed_seq_params=good)


def _model_worker(rank: int, world_size: int, checkpoints: dict) -> None:
    from megatron_archer.models import load_hf_model

    generator = torch.Generator().manual_seed(11)
    lengths = [7, 1, 12, 1, 5, 9]
    n = sum(lengths)
    ids = torch.randint(0, 250, (1, n), generator=generator)
    row_positions = torch.arange(n)[None]
    seq_positions = torch.cat([torch.arange(m) for m in lengths])[None]
    failures = []
    for case, path in checkpoints.items():
        for tp in (1, 2):
            with model_parallel(tp):
                weight, results = None, []
                for dtype, kwargs, positions in (
                    (torch.float32, dict(attention_mask=block_causal_mask(lengths)), row_positions),
                    (torch.float32, dict(attention_mask=None, packed_seq_params=_packed(lengths)),
                     seq_positions),
                    (torch.float64, dict(attention_mask=block_causal_mask(lengths)), row_positions),
                ):
                    model = load_hf_model(path, params_dtype=dtype).model
                    logits = model(ids, positions, **kwargs)
                    if weight is None:
                        weight = torch.randn(logits.shape, generator=generator)
                    (logits * weight.to(dtype)).sum().backward()
                    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
                    results.append((logits.detach(), grads))
                (old_logits, old_grads), (logits, grads), (ref_logits, ref_grads) = results
                # the packed row is as accurate as the block mask against float64
                failures.append(accuracy_failure(f"{case} tp={tp} logits", logits, old_logits,
                                                 ref_logits))
                failures.extend(accuracy_failure(f"{case} tp={tp} grad {name}", grad,
                                                 old_grads[name], ref_grads[name])
                                for name, grad in grads.items())
    failures = [f for f in failures if f]
    assert not failures, "; ".join(failures)


def test_model_packed_equals_block_mask_tp1_tp2(tmp_path):
    cases = ("qwen3", "llama3")  # q/k norms and GQA 8:2; llama3 RoPE scaling
    run_distributed(_model_worker, 2, {c: write_checkpoint(tmp_path / c, c) for c in cases})
