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
from megatron_archer.models.layer_spec import Backend, decoder_block_spec
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
    are further TransformerConfig fields (recompute, fp8 recipe, sequence parallel, ...), applied
    last (an ``fp8`` among them needs the TE backend too).
    """
    chosen_fp8 = (overrides or {}).get("fp8", fp8)
    if chosen_fp8 is not None and backend != "te":
        raise ValueError(f"fp8={chosen_fp8!r} needs the Transformer Engine backend, got {backend!r}")
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("call megatron.core.parallel_state.initialize_model_parallel first")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    etp = parallel_state.get_expert_tensor_parallel_world_size()
    spec.validate_parallelism(tp, pp, ep, etp)
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
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        pipeline_dtype=params_dtype,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        fp8=fp8,
        use_cpu_initialization=compat.cpu_patches_needed(),
        perform_initialization=perform_initialization,
    )
    if spec.is_moe:
        fields.update(moe_fields(spec, backend, ep, etp))
    fields.update(overrides or {})
    return TransformerConfig(**fields)


def moe_fields(spec: ModelSpec, backend: Backend, expert_parallel: int,
               expert_tensor_parallel: int) -> dict[str, Any]:
    """TransformerConfig fields of a mixture-of-experts ``spec``, matching transformers'
    Qwen3-MoE block (docs/numerics.md §11).

    Router: logits in the activations' dtype, softmax scores in float32; with
    ``moe_norm_topk_prob`` the top-k weights are renormalised to sum to 1, which is megatron's
    softmax over the top-k logits (``moe_router_pre_softmax=False``); without it they are the
    full softmax's probabilities (``moe_router_pre_softmax=True``). Dropless (no capacity),
    alltoall dispatcher. The load-balancing loss is megatron's per-layer ``aux_loss`` with the
    checkpoint's coefficient, off at 0 (``config_overrides`` may set ``moe_aux_loss_coeff``).
    """
    coefficient = spec.router_aux_loss_coef
    return dict(
        num_moe_experts=spec.num_experts,
        moe_ffn_hidden_size=spec.moe_ffn_hidden_size,
        moe_router_topk=spec.moe_top_k,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not spec.moe_norm_topk_prob,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=coefficient,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=backend == "te",
        moe_layer_freq=[int(spec.is_moe_layer(i)) for i in range(spec.num_layers)],
        expert_model_parallel_size=expert_parallel,
        expert_tensor_parallel_size=expert_tensor_parallel,
    )


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
        transformer_layer_spec=decoder_block_spec(spec, backend, config),
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
    mark_tensor_parallel_params(model)
    # megatron's local norms are created in fp32 whatever params_dtype is; megatron casts the
    # whole module in its Float16Module wrapper, here it is done once so that every parameter,
    # and so every exported tensor, has params_dtype.
    return model.to(dtype=config.params_dtype)


def _sharded_linear_types() -> list[tuple[type, int]]:
    """(module type, partition dim of its weight) for megatron's tensor-parallel layers."""
    from megatron.core.tensor_parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
    )

    types = [(ColumnParallelLinear, 0), (VocabParallelEmbedding, 0), (RowParallelLinear, 1)]
    try:
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TELayerNormColumnParallelLinear,
            TERowParallelLinear,
        )
    except ImportError:
        return types
    te_types = [(TEColumnParallelLinear, 0), (TELayerNormColumnParallelLinear, 0),
                (TERowParallelLinear, 1)]
    # without Transformer Engine megatron still defines these names, as None
    return types + [(cls, dim) for cls, dim in te_types if isinstance(cls, type)]


def mark_tensor_parallel_params(model: torch.nn.Module) -> None:
    """Set megatron's ``tensor_model_parallel`` attributes on sharded weights that lack them.

    megatron's parallel layers set these attributes only inside their weight-initialisation
    helpers (megatron/core/tensor_parallel/layers.py), which ``perform_initialization=False``
    skips, as every loader does. Without them each sharded weight looks like a tensor-parallel
    duplicate, and the gradient norm (megatron's ``get_grad_norm_fp32`` as well as the CPU path)
    counts only tensor-parallel rank 0's shard. Attributes already present are kept.
    """
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    types = _sharded_linear_types()
    for module in model.modules():
        dim = next((d for cls, d in types if isinstance(module, cls)), None)
        weight = getattr(module, "weight", None)
        if dim is not None and weight is not None and not getattr(weight, "tensor_model_parallel", False):
            set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=dim, stride=1)
