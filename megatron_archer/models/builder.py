"""Build this rank's megatron-core ``GPTModel`` (its tensor and pipeline shard) from a ModelSpec.

Model-parallel groups must exist (``megatron.core.parallel_state.initialize_model_parallel``);
the model takes its tensor- and pipeline-parallel sizes from them. On a machine without CUDA the
compat patches are applied and parameters are created on CPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_archer import compat
from megatron_archer.models.layer_spec import Backend, transformer_layer_spec
from megatron_archer.models.spec import ModelSpec


def transformer_config(
    spec: ModelSpec,
    *,
    backend: Backend,
    params_dtype: torch.dtype,
    fp8: Literal["e4m3", "hybrid"] | None = None,
    perform_initialization: bool = True,
    overrides: Mapping[str, Any] | None = None,
) -> TransformerConfig:
    """Megatron's TransformerConfig for ``spec`` at the current parallel sizes.

    ``fp8`` ("e4m3" or "hybrid") is passed to megatron and needs the TE backend; ``overrides``
    are further TransformerConfig fields (recompute, sequence parallel, ...), applied last.
    """
    if fp8 is not None and backend != "te":
        raise ValueError(f"fp8={fp8!r} needs the Transformer Engine backend, got {backend!r}")
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("call megatron.core.parallel_state.initialize_model_parallel first")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    spec.validate_parallelism(tp, pp)
    fields: dict[str, Any] = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=spec.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=params_dtype,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        fp8=fp8,
        use_cpu_initialization=compat.cpu_patches_needed(),
        perform_initialization=perform_initialization,
    )
    fields.update(overrides or {})
    return TransformerConfig(**fields)


def build_gpt_model(
    spec: ModelSpec,
    *,
    backend: Backend,
    params_dtype: torch.dtype | None = None,
    fp8: Literal["e4m3", "hybrid"] | None = None,
    perform_initialization: bool = True,
    config_overrides: Mapping[str, Any] | None = None,
) -> GPTModel:
    """This rank's GPTModel: vocab-sharded logits [b, s, padded_vocab / tp] on the last stage.

    ``params_dtype`` (every parameter's dtype) defaults to the checkpoint's. With
    ``perform_initialization=False`` parameters are left uninitialised (for a loader that then
    writes every one of them); otherwise seed first with ``compat.model_parallel_seed``.
    """
    compat.apply_cpu_patches()
    config = transformer_config(
        spec,
        backend=backend,
        params_dtype=params_dtype or spec.dtype,
        fp8=fp8,
        perform_initialization=perform_initialization,
        overrides=config_overrides,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=transformer_layer_spec(spec, backend),
        vocab_size=spec.padded_vocab_size(config.tensor_model_parallel_size),
        max_sequence_length=spec.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=spec.rope_theta,
        rope_scaling=spec.llama3_rope_factor is not None,
        rope_scaling_factor=spec.llama3_rope_factor or 8.0,
    )
    # megatron's local norms are created in fp32 whatever params_dtype is; megatron casts the
    # whole module in its Float16Module wrapper, here it is done once so that every parameter,
    # and so every exported tensor, has params_dtype.
    return model.to(dtype=config.params_dtype)
