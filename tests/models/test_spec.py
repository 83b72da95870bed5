"""ModelSpec derivation and the errors that name the offending config field."""

from __future__ import annotations

import pytest
import torch

from megatron_archer.models import (
    ModelSpec,
    UnsupportedModelError,
    select_backend,
    transformer_config,
)
from tests.models.checkpoints import hf_config


def _spec(case: str, architecture: str, **overrides) -> ModelSpec:
    return ModelSpec.from_hf_config(hf_config(case, architectures=[architecture], **overrides))


def test_families_map_to_their_switches():
    qwen2 = _spec("qwen2", "Qwen2ForCausalLM")
    assert (qwen2.qkv_bias, qwen2.qk_layernorm, qwen2.rope_theta) == (True, False, 1e6)
    qwen3 = _spec("qwen3", "Qwen3ForCausalLM")
    assert (qwen3.qkv_bias, qwen3.qk_layernorm, qwen3.head_dim) == (False, True, 32)
    llama = _spec("llama3", "LlamaForCausalLM")
    assert (llama.llama3_rope_factor, llama.rope_theta, llama.num_query_groups) == (8.0, 5e5, 2)
    assert _spec("qwen2_tied", "Qwen2ForCausalLM").tie_word_embeddings


def test_transformers_4_rope_fields_are_read():
    """A 4.x-style config: rope_theta and rope_scaling at the top level, no rope_parameters."""
    config = hf_config("llama3", architectures=["LlamaForCausalLM"])
    config.rope_parameters = None
    config.rope_theta = 5e5
    config.rope_scaling = {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }  # fmt: skip
    spec = ModelSpec.from_hf_config(config)
    assert (spec.rope_theta, spec.llama3_rope_factor) == (5e5, 32.0)


def test_padded_vocab_size_is_a_multiple_of_divisible_by_times_tp():
    spec = _spec("qwen2", "Qwen2ForCausalLM")
    assert [spec.padded_vocab_size(tp) for tp in (1, 2, 4)] == [256, 256, 512]
    fine = ModelSpec.from_hf_config(
        hf_config("qwen2", architectures=["Qwen2ForCausalLM"]), make_vocab_size_divisible_by=1
    )
    assert fine.padded_vocab_size(2) == 250 and fine.vocab_size == 250


@pytest.mark.parametrize(
    "architecture, overrides, field",
    [
        ("MistralForCausalLM", {}, "architectures"),
        ("LlamaForCausalLM", {"attention_bias": True}, "attention_bias"),
        ("LlamaForCausalLM", {"mlp_bias": True}, "mlp_bias"),
        ("LlamaForCausalLM", {"hidden_act": "gelu"}, "hidden_act"),
        ("Qwen2ForCausalLM", {"use_sliding_window": True}, "use_sliding_window"),
        ("LlamaForCausalLM", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4,
                                                  "factor": 4.0}}, "rope_type"),
        ("LlamaForCausalLM", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5,
                                                  "factor": 8.0, "low_freq_factor": 2.0,
                                                  "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 8192}},
         "low_freq_factor"),
    ],
)  # fmt: skip
def test_unsupported_configs_name_the_field(architecture, overrides, field):
    case = {"Qwen2ForCausalLM": "qwen2"}.get(architecture, "llama3")
    with pytest.raises(UnsupportedModelError, match=field):
        _spec(case, architecture, **overrides)


@pytest.mark.parametrize(
    "tp, pp, message",
    [
        (3, 1, "num_attention_heads=4 is not divisible by tensor-parallel size 3"),
        (4, 1, "num_key_value_heads=2 is not divisible by tensor-parallel size 4"),
        (1, 4, "num_hidden_layers=2 is not divisible by pipeline-parallel size 4"),
    ],
)
def test_parallel_sizes_that_do_not_divide_the_model(tp, pp, message):
    spec = _spec("qwen2", "Qwen2ForCausalLM")
    spec.validate_parallelism(2, 2)
    with pytest.raises(UnsupportedModelError, match=message):
        spec.validate_parallelism(tp, pp)


def test_intermediate_size_must_divide_by_tp():
    spec = _spec("qwen2", "Qwen2ForCausalLM", intermediate_size=97)
    with pytest.raises(UnsupportedModelError, match="intermediate_size=97"):
        spec.validate_parallelism(2)


def test_backend_selection_without_cuda_or_transformer_engine():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU choice")
    assert select_backend("auto") == "local"
    with pytest.raises(RuntimeError, match="transformer_engine"):
        select_backend("te")
    with pytest.raises(ValueError, match="fp8='hybrid' needs the Transformer Engine backend"):
        transformer_config(
            _spec("qwen2", "Qwen2ForCausalLM"),
            backend="local",
            params_dtype=torch.float32,
            fp8="hybrid",
        )


def test_qwen3_moe_fields_and_sparse_layers():
    """Which layers have experts follows transformers' Qwen3MoeDecoderLayer: not in
    mlp_only_layers and (i + 1) a multiple of decoder_sparse_step."""
    spec = _spec("qwen3_moe", "Qwen3MoeForCausalLM", router_aux_loss_coef=0.01)
    assert (spec.num_experts, spec.moe_top_k, spec.moe_ffn_hidden_size) == (4, 2, 48)
    assert (spec.moe_norm_topk_prob, spec.moe_layers, spec.router_aux_loss_coef) == (
        True, (0, 1), 0.01)
    assert spec.qk_layernorm and not spec.qkv_bias and spec.is_moe
    sparse = _spec("qwen3_moe", "Qwen3MoeForCausalLM", num_hidden_layers=6, decoder_sparse_step=2,
                   mlp_only_layers=[3], norm_topk_prob=False)
    assert sparse.moe_layers == (1, 5) and not sparse.moe_norm_topk_prob
    assert not _spec("qwen3", "Qwen3ForCausalLM").is_moe


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"num_experts_per_tok": 5}, "num_experts_per_tok=5 exceeds num_experts=4"),
        ({"mlp_only_layers": [0, 1]}, "leave no mixture-of-experts layer"),
        ({"decoder_sparse_step": 0}, "decoder_sparse_step=0"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)  # fmt: skip
def test_unsupported_moe_configs_name_the_field(overrides, field):
    with pytest.raises(UnsupportedModelError, match=field):
        _spec("qwen3_moe", "Qwen3MoeForCausalLM", **overrides)


@pytest.mark.parametrize(
    "tp, ep, etp, message",
    [
        (1, 3, 1, "num_experts=4 is not divisible by expert-parallel size 3"),
        (1, 2, 5, "moe_intermediate_size=48 is not divisible by expert-tensor-parallel size 5"),
        (1, 2, None, None),
        (2, 4, 1, None),
        (2, 2, None, None),  # expert-tensor defaults to tensor (48 / 2)
    ],
)  # fmt: skip
def test_expert_parallel_sizes_that_do_not_divide_the_model(tp, ep, etp, message):
    spec = _spec("qwen3_moe", "Qwen3MoeForCausalLM")
    if message is None:
        spec.validate_parallelism(tp, 1, ep, etp)
        return
    with pytest.raises(UnsupportedModelError, match=message):
        spec.validate_parallelism(tp, 1, ep, etp)


def test_expert_parallel_needs_a_moe_model():
    with pytest.raises(UnsupportedModelError, match="expert-parallel size 2 .* need a mixture"):
        _spec("qwen3", "Qwen3ForCausalLM").validate_parallelism(1, 1, 2)


def test_all_sparse_moe_model_ignores_the_unused_dense_intermediate_size():
    """Qwen3-30B-A3B's intermediate_size (6144) belongs to no layer: it need not divide by TP."""
    spec = _spec("qwen3_moe", "Qwen3MoeForCausalLM", intermediate_size=97)
    spec.validate_parallelism(2, 1, 2, 1)
    dense_first = _spec("qwen3_moe", "Qwen3MoeForCausalLM", intermediate_size=97,
                        mlp_only_layers=[0])
    with pytest.raises(UnsupportedModelError, match="intermediate_size=97"):
        dense_first.validate_parallelism(2, 1, 2, 1)
