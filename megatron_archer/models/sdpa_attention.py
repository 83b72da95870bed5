"""Megatron ``core_attention`` computed by ``torch.nn.functional.scaled_dot_product_attention``.

Megatron's own local ``DotProductAttention`` draws its score buffer from a CUDA global memory
buffer and forks the CUDA RNG tracker for dropout, so it cannot run on CPU; Transformer Engine's
needs CUDA. This module has the same call signature and tensor layout and runs on any device
torch supports (on CUDA, SDPA picks a flash or memory-efficient kernel), which makes it the
attention of the portable layer spec.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPACoreAttention(MegatronModule):
    """Causal (or explicitly masked) attention on this rank's heads, grouped-query aware.

    Inputs follow Megatron: query [sq, b, heads_local, d], key/value [sk, b, groups_local, d],
    ``attention_mask`` None or bool [b, 1|heads, sq, sk] with True meaning "masked out" (it then
    replaces the causal rule, as in Megatron). Output [sq, b, heads_local * d].
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
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism")
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
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError(
                "SDPACoreAttention supports neither packed sequences nor attention_bias; "
                "use the Transformer Engine layer spec"
            )
        mask_type = attn_mask_type or self.attn_mask_type
        repeats = query.size(2) // key.size(2)
        if repeats > 1:  # grouped-query attention: each key/value head serves `repeats` queries
            key = key.repeat_interleave(repeats, dim=2)
            value = value.repeat_interleave(repeats, dim=2)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        context = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if attention_mask is None else ~attention_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attention_mask is None and mask_type == AttnMaskType.causal,
            scale=self.softmax_scale,
        )
        # [b, h, sq, d] -> [sq, b, h * d]
        sq, b = context.size(2), context.size(0)
        return context.permute(2, 0, 1, 3).reshape(sq, b, -1)
