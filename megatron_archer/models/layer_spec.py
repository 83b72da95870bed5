"""Which megatron layer implementation a model uses: Transformer Engine or the portable spec.

- ``"te"``: megatron's Transformer Engine spec (fused layernorm + linear, TE attention, fp8
  capable). Chosen automatically on CUDA when ``transformer_engine`` imports.
- ``"local"``: megatron's local spec (its own parallel linears) with ``core_attention`` replaced
  by ``SDPACoreAttention`` and every norm (per layer, q/k, final) by ``PortableRMSNorm``; runs on
  CPU and on CUDA without TE, with or without sequence parallelism.

The two differ in where the pre-attention and pre-MLP norms live (``NORM_PARAMS``), which the
Hugging Face weight mapping reads.
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

from megatron_archer.models.sdpa_attention import SDPACoreAttention
from megatron_archer.models.spec import ModelSpec

Backend = Literal["te", "local"]

# backend -> parameter names (inside a layer) of the input norm and the pre-MLP norm
NORM_PARAMS: dict[str, tuple[str, str]] = {
    "te": ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"),
    "local": ("input_layernorm.weight", "pre_mlp_layernorm.weight"),
}


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


def transformer_layer_spec(spec: ModelSpec, backend: Backend) -> ModuleSpec:
    """The megatron ``ModuleSpec`` of one decoder layer of ``spec`` for ``backend``."""
    from megatron.core.models.gpt import gpt_layer_specs

    if backend == "te":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=spec.qk_layernorm
        )
    layer = gpt_layer_specs.get_gpt_layer_local_spec(
        qk_layernorm=spec.qk_layernorm, normalization="RMSNorm"
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

    TE: the layer spec (megatron adds its TE final norm). Local: the stage's layers with
    ``PortableRMSNorm`` as the final norm (megatron's default there is ``WrappedTorchNorm``).
    """
    layer = transformer_layer_spec(spec, backend)
    if backend == "te":
        return layer
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config),
                                      layer_norm=PortableRMSNorm)
