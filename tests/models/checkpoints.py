"""Tiny random Hugging Face checkpoints of each supported family, written with save_pretrained.

Every parameter is redrawn after transformers' init (which zeroes biases and sets norms to one),
so a mapping that swaps, drops or misplaces any tensor changes the logits.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

_COMMON = dict(
    vocab_size=250, hidden_size=64, intermediate_size=96, num_hidden_layers=2, rms_norm_eps=1e-5
)

CASES: dict[str, tuple[type, dict]] = {
    # Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen: qkv bias, GQA 4:2
    "qwen2": (
        transformers.Qwen2Config,
        dict(num_attention_heads=4, num_key_value_heads=2, rope_parameters={
            "rope_type": "default", "rope_theta": 1e6}),
    ),
    # Qwen2.5 small sizes tie the LM head to the embedding
    "qwen2_tied": (
        transformers.Qwen2Config,
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    ),
    # Qwen3: q/k RMSNorm, head_dim * heads != hidden, GQA 8:2
    "qwen3": (
        transformers.Qwen3Config,
        dict(num_attention_heads=8, num_key_value_heads=2, head_dim=32),
    ),
    # Llama 3.1: llama3 RoPE scaling (head_dim 16 puts frequencies in all three bands)
    "llama3": (
        transformers.LlamaConfig,
        dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
             rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192}),
    ),
}  # fmt: skip

# Qwen3-MoE: 4 experts, top-2, every layer sparse (Qwen3-30B-A3B's pattern); kept out of CASES,
# whose tests train at tensor parallel 2 without sequence parallelism (megatron's MoE layer
# refuses that)
MOE_CASES: dict[str, tuple[type, dict]] = {
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        dict(num_attention_heads=8, num_key_value_heads=2, head_dim=32, num_experts=4,
             num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True,
             decoder_sparse_step=1, mlp_only_layers=[]),
    ),
}  # fmt: skip


def hf_config(case: str, **overrides) -> transformers.PretrainedConfig:
    config_cls, fields = {**CASES, **MOE_CASES}[case]
    return config_cls(**{**_COMMON, **fields, **overrides})


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Norms ~ 1 + N(0, 0.2), biases ~ N(0, 0.2), matrices ~ N(0, 1/fan_in), embeddings N(0, 1);
    transformers' stacked expert matrices [experts, out, in] as matrices."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.2 * noise)
            elif "embed_tokens" in name:
                param.copy_(noise)
            else:
                param.copy_(noise / param.shape[-1] ** 0.5)


def write_checkpoint(
    directory: Path, case: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides
) -> Path:
    """Save a random ``case`` model (config.json + model.safetensors) into ``directory``."""
    config = hf_config(case, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config)
    randomize_(model, seed)
    model.to(dtype).save_pretrained(directory)
    return directory


def hf_model(checkpoint: Path, dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    """transformers' model of the checkpoint in ``dtype``; mixture-of-experts models with the
    eager per-expert loop (the default grouped-GEMM kernel has no float64)."""
    config = transformers.AutoConfig.from_pretrained(checkpoint)
    eager = {"experts_implementation": "eager"} if getattr(config, "num_experts", 0) else {}
    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, **eager)


def hf_logits(checkpoint: Path, input_ids: torch.Tensor,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """transformers' own forward of the checkpoint in ``dtype``: [b, s, vocab]."""
    model = hf_model(checkpoint, dtype)
    with torch.no_grad():
        return model(input_ids=input_ids).logits
