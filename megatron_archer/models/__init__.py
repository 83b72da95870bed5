"""Megatron-core GPT models from Hugging Face checkpoints: spec, layer specs, import, export.

Modules: ``spec`` (ModelSpec from config.json), ``layer_spec`` (Transformer Engine or portable),
``sdpa_attention`` (portable core attention), ``builder`` (TransformerConfig + GPTModel),
``weight_map`` (HF <-> megatron names, shapes, tensor-parallel layouts), ``hf_import``,
``hf_export``, ``hf_save`` (HF directory writer), ``output_dir`` (atomic output directories),
``dist_checkpoint`` (weights as a megatron distributed checkpoint, any layout), ``convert``
(HF <-> megatron checkpoints; tools/convert_checkpoint.py). CPU workarounds for megatron are in
``megatron_archer.compat``.
"""

from megatron_archer.models.builder import build_gpt_model, transformer_config
from megatron_archer.models.hf_export import hf_weight_buckets
from megatron_archer.models.hf_import import (
    CheckpointError,
    LoadedModel,
    load_hf_model,
    load_hf_weights,
    require_hf_model_dir,
    require_tokenizer_dir,
)
from megatron_archer.models.layer_spec import select_backend, transformer_layer_spec
from megatron_archer.models.spec import ModelSpec, UnsupportedModelError

__all__ = [
    "CheckpointError",
    "LoadedModel",
    "ModelSpec",
    "UnsupportedModelError",
    "build_gpt_model",
    "hf_weight_buckets",
    "load_hf_model",
    "load_hf_weights",
    "require_hf_model_dir",
    "require_tokenizer_dir",
    "select_backend",
    "transformer_config",
    "transformer_layer_spec",
]
