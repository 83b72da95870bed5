"""Which megatron layer implementation a model uses: Transformer Engine or the portable spec.

- ``"te"``: megatron's Transformer Engine spec (fused layernorm + linear, TE attention, fp8
  capable). Chosen automatically on CUDA when ``transformer_engine`` imports.
- ``"local"``: megatron's local spec (its own parallel linears) with ``core_attention`` replaced
  by ``SDPACoreAttention`` and every norm (per layer, q/k, final) by ``PortableRMSNorm``; runs on
  CPU and on CUDA without TE, with or without sequence parallelism.

The two differ in where the pre-attention and pre-MLP norms live (``NORM_PARAMS``), which the
Hugging Face weight mapping reads.

Mixture-of-experts layers (``ModelSpec.moe_layers``) take megatron's ``MoELayer`` as their MLP:
its top-k router, the alltoall token dispatcher and, on the local spec, ``SequentialMLP`` experts
(one pair of megatron parallel linears per expert); the TE spec uses TE's grouped-GEMM experts
(``TEGroupedMLP``). In both the pre-MLP norm of such a layer is ``MOE_PRE_MLP_NORM``, and expert
parameters are named by ``expert_param_name``.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_archer.models.sdpa_attention import SDPACoreAttention
from megatron_archer.models.spec import ModelSpec

Backend = Literal["te", "local"]

# backend -> parameter names (inside a layer) of the input norm and the pre-MLP norm
NORM_PARAMS: dict[str, tuple[str, str]] = {
    "te": ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"),
    "local": ("input_layernorm.weight", "pre_mlp_layernorm.weight"),
}
# the pre-MLP norm of a mixture-of-experts layer (a separate norm in both backends)
MOE_PRE_MLP_NORM = "pre_mlp_layernorm.weight"


def expert_param_name(backend: Backend, local_expert: int, linear: str) -> str:
    """Name inside a layer of ``linear`` ("linear_fc1" / "linear_fc2") of this rank's
    ``local_expert``: ``SequentialMLP`` (local) or ``TEGroupedMLP`` (te) naming."""
    if backend == "te":
        return f"mlp.experts.{linear}.weight{local_expert}"
    return f"mlp.experts.local_experts.{local_expert}.{linear}.weight"


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def select_backend(requested: Literal["auto", "te", "local"] = "auto",
                   params_dtype: torch.dtype | None = None) -> Backend:
    """``auto``: TE on CUDA when installed and ``params_dtype`` is not float32, else local (TE
    has no attention backend for packed float32 batches). ``te`` without CUDA and TE is an
    error."""
    te_usable = torch.cuda.is_available() and transformer_engine_available()
    if requested == "auto":
        return "te" if te_usable and params_dtype != torch.float32 else "local"
    if requested == "te" and not te_usable:
        raise RuntimeError("backend='te' needs CUDA and transformer_engine installed")
    if requested not in ("te", "local"):
        raise ValueError(f"backend={requested!r}: expected 'auto', 'te' or 'local'")
    return requested


class PortableRMSNorm(torch.nn.RMSNorm):
    """The local spec's RMSNorm, also under sequence parallelism.

    The numerics and the parameter (``weight``) are ``torch.nn.RMSNorm``'s, as megatron's
    ``WrappedTorchNorm`` builds it, but that wrapper refuses ``config.sequence_parallel``. Under
    sequence parallelism each tensor-parallel rank normalises only its own tokens, so its weight
    gradient is partial: the weight is marked ``sequence_parallel`` (as Transformer Engine's norms
    mark theirs), and megatron's ``finalize_model_grads`` (``actor.cpu_ddp`` on CPU) sums it over
    the tensor-parallel group. Megatron builds it with ``config``, ``hidden_size`` and ``eps``.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def transformer_layer_spec(spec: ModelSpec, backend: Backend, moe: bool = False) -> ModuleSpec:
    """The megatron ``ModuleSpec`` of one decoder layer of ``spec`` for ``backend``; ``moe``: a
    mixture-of-experts layer (``spec.num_experts`` experts)."""
    from megatron.core.models.gpt import gpt_layer_specs

    num_experts = spec.num_experts if moe else None
    if backend == "te":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=moe, qk_layernorm=spec.qk_layernorm
        )
    layer = gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=num_experts, qk_layernorm=spec.qk_layernorm, normalization="RMSNorm"
    )
    layer.submodules.input_layernorm = PortableRMSNorm
    layer.submodules.pre_mlp_layernorm = PortableRMSNorm
    attention = layer.submodules.self_attention.submodules
    attention.core_attention = SDPACoreAttention
    if spec.qk_layernorm:
        attention.q_layernorm = attention.k_layernorm = PortableRMSNorm
    return layer


def decoder_block_spec(spec: ModelSpec, backend: Backend,
                       config) -> ModuleSpec | TransformerBlockSubmodules:
    """What ``GPTModel(transformer_layer_spec=...)`` takes for this pipeline stage's decoder.

    TE, dense: the layer spec (megatron adds its TE final norm). Otherwise the stage's layers,
    each dense or mixture-of-experts as ``spec.moe_layers`` says, with ``PortableRMSNorm`` (local)
    or TE's norm as the final norm (megatron's local default is ``WrappedTorchNorm``).
    """
    if backend == "te" and not spec.is_moe:
        return transformer_layer_spec(spec, backend)
    offset = get_transformer_layer_offset(config)
    layers = [transformer_layer_spec(spec, backend, moe=spec.is_moe_layer(offset + i))
              for i in range(get_num_layers_to_build(config))]
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        return TransformerBlockSubmodules(layer_specs=layers, layer_norm=TENorm)
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=PortableRMSNorm)
