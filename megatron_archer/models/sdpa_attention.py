"""Megatron ``core_attention`` computed by ``torch.nn.functional.scaled_dot_product_attention``.

Megatron's own local ``DotProductAttention`` draws its score buffer from a CUDA global memory
buffer and forks the CUDA RNG tracker for dropout, so it cannot run on CPU; Transformer Engine's
needs CUDA. This module has the same call signature and tensor layouts and runs on any device
torch supports (on CUDA, SDPA picks a flash or memory-efficient kernel), which makes it the
attention of the portable layer spec.

Packed rows take the same route as with Transformer Engine: megatron's ``PackedSeqParams`` with
``qkv_format="thd"`` and the row's ``cu_seqlens``. Megatron then hands this module query/key/value
as [t, heads, d] (batch dimension squeezed, RoPE already applied per sequence from position 0) and
reshapes the [t, heads * d] result back itself. Attention is computed per sequence (causal inside
it), so its cost is the sum of the squared sequence lengths, never the square of the row length.

Under context parallelism (``context_parallel_size`` > 1, packed rows only) each rank holds two
chunks of every sequence; ``cp_attention.context_parallel_attention`` gathers keys and values over
the CP group (``pg_collection.cp``, else megatron's) and masks by global positions.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPACoreAttention(MegatronModule):
    """Causal (or explicitly masked) attention on this rank's heads, grouped-query aware.

    Inputs follow Megatron. Unpacked: query [sq, b, heads_local, d], key/value [sk, b,
    groups_local, d], ``attention_mask`` None or bool [b, 1|heads, sq, sk] with True meaning
    "masked out" (it then replaces the causal rule, as in Megatron); output [sq, b, heads_local
    * d]. Packed (``packed_seq_params``, qkv_format "thd"): query [t, heads_local, d], key/value
    [t, groups_local, d], causal attention inside each sequence of ``cu_seqlens_q``; output
    [t, heads_local * d].
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        self.cp_size = config.context_parallel_size
        self.cp_group = getattr(pg_collection, "cp", None)
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError(
                "SDPACoreAttention does not support attention_bias; use the Transformer Engine "
                "layer spec")
        if packed_seq_params is not None:
            if attention_mask is not None:
                raise ValueError("SDPACoreAttention: packed_seq_params and attention_mask are "
                                 "exclusive (the packed sequences define the mask)")
            if self.cp_size > 1:
                return self._context_parallel(query, *_repeat_kv(query, key, value),
                                              packed_seq_params)
            return self._packed(query, key, value, _sequence_lengths(packed_seq_params))
        if self.cp_size > 1:
            raise ValueError("SDPACoreAttention supports context parallelism for packed (thd) "
                             "rows only: pass packed_seq_params")
        key, value = _repeat_kv(query, key, value)
        mask_type = attn_mask_type or self.attn_mask_type
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        context = self._sdpa(q, k, v, attention_mask=attention_mask,
                             causal=attention_mask is None and mask_type == AttnMaskType.causal)
        # [b, h, sq, d] -> [sq, b, h * d]
        sq, b = context.size(2), context.size(0)
        return context.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _packed(self, query, key, value, lengths: list[int]) -> torch.Tensor:
        """[t, h, d] packed sequences -> [t, h * d], causal attention inside each sequence."""
        t = query.size(0)
        if sum(lengths) != t:
            raise ValueError(f"SDPACoreAttention: cu_seqlens_q covers {sum(lengths)} tokens, the "
                             f"packed query has {t}")
        if not lengths:  # an empty micro-batch (t == 0)
            return query.flatten(1)
        if not NATIVE_GQA:
            key, value = _repeat_kv(query, key, value)
        gqa = key.size(1) != query.size(1)
        # [t, h, d] -> [h, t, d], one [1, h, s_i, d] slice per sequence; each result back as
        # [s_i, h, d], so the concatenation is the contiguous [t, h, d] output (no extra copy)
        q, k, v = (x.transpose(0, 1).split(lengths, dim=1) for x in (query, key, value))
        context = torch.cat([
            self._sdpa(qi[None], ki[None], vi[None], attention_mask=None, causal=True,
                       gqa=gqa)[0].transpose(0, 1)
            for qi, ki, vi in zip(q, k, v)
        ], dim=0)  # fmt: skip
        return context.flatten(1)

    def _context_parallel(self, query, key, value, packed_seq_params) -> torch.Tensor:
        """[t_local, h, d] of this CP rank's chunks -> [t_local, h * d] (module docstring)."""
        from megatron.core import parallel_state

        from megatron_archer.models.cp_attention import context_parallel_attention

        p = packed_seq_params
        _sequence_lengths(replace(p, cu_seqlens_q_padded=None, cu_seqlens_kv_padded=None))  # checks
        if p.cu_seqlens_q_padded is None or not torch.equal(p.cu_seqlens_kv_padded, p.cu_seqlens_q_padded):
            raise ValueError("SDPACoreAttention with context parallelism needs equal "
                             "cu_seqlens_q_padded and cu_seqlens_kv_padded (the CP split of each "
                             "sequence)")
        group = self.cp_group or parallel_state.get_context_parallel_group()
        return context_parallel_attention(
            query, key, value, p.cu_seqlens_q_padded, group,
            lambda q, k, v, masked: self._sdpa(q, k, v, attention_mask=masked, causal=False))

    def _sdpa(self, q, k, v, attention_mask, causal: bool, gqa: bool = False) -> torch.Tensor:
        """SDPA on [b, h, s, d]; ``gqa``: k/v hold fewer heads, each serving a block of query
        heads (SDPA's ``enable_gqa``, torch >= 2.5, saves the per-head copies of k and v)."""
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if attention_mask is None else ~attention_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal,
            scale=self.softmax_scale,
            **({"enable_gqa": True} if gqa else {}),
        )


# SDPA's own grouped-query attention (``enable_gqa``) exists from torch 2.5
NATIVE_GQA = torch.__version__ >= "2.5"


def _repeat_kv(query, key, value):
    """Grouped-query attention: each key/value head serves ``heads / groups`` query heads
    (the head dimension is -2 in both layouts)."""
    repeats = query.size(-2) // key.size(-2)
    if repeats == 1:
        return key, value
    return key.repeat_interleave(repeats, dim=-2), value.repeat_interleave(repeats, dim=-2)


def _sequence_lengths(packed_seq_params) -> list[int]:
    """The packed sequences' lengths, checked: self-attention over unpadded "thd" sequences."""
    p = packed_seq_params
    if p.qkv_format != "thd":
        raise ValueError(f"SDPACoreAttention: packed_seq_params.qkv_format={p.qkv_format!r}, "
                         f"expected 'thd'")
    padded = (p.cu_seqlens_q_padded, p.cu_seqlens_kv_padded)
    if any(x is not None and not torch.equal(x, p.cu_seqlens_q) for x in padded):
        raise NotImplementedError("SDPACoreAttention: padded packed sequences "
                                  "(cu_seqlens_*_padded != cu_seqlens_q) are not supported")
    if p.cu_seqlens_kv is not p.cu_seqlens_q and not torch.equal(p.cu_seqlens_kv, p.cu_seqlens_q):
        raise ValueError("SDPACoreAttention: cu_seqlens_kv differs from cu_seqlens_q "
                         "(self-attention only)")
    return torch.diff(p.cu_seqlens_q).tolist()
