"""What a Hugging Face decoder checkpoint is, as Megatron needs it: a typed, validated ModelSpec.

The supported families are RoPE decoders with RMSNorm and SwiGLU that differ only in a few
switches: Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen (bias on q, k, v), Qwen3 (RMSNorm on each
query and key head), Llama 3 (optionally "llama3" RoPE scaling), and Qwen3-MoE (Qwen3 attention;
the MLP of some or all layers a mixture of experts: a softmax top-k router, optionally
renormalised over the chosen experts, and SwiGLU experts). Anything the Megatron model would
compute differently from transformers is rejected here, with the config field that causes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

# architectures[0] of config.json -> (qkv bias, q/k RMSNorm)
_FAMILIES: dict[str, tuple[bool, bool]] = {
    "Qwen2ForCausalLM": (True, False),
    "Qwen3ForCausalLM": (False, True),
    "LlamaForCausalLM": (False, False),
    "Qwen3MoeForCausalLM": (False, True),
}
_MOE_FAMILIES = {"Qwen3MoeForCausalLM"}

# Megatron's RotaryEmbedding hard-codes these llama3 scaling constants (only `factor` is a
# parameter), so a checkpoint with other values would get different frequencies.
_MEGATRON_LLAMA3_CONSTANTS = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


class UnsupportedModelError(ValueError):
    """The checkpoint's config asks for something this Megatron model does not compute."""


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a supported checkpoint, in Megatron's terms.

    ``vocab_size`` is the true vocabulary; the model's embedding and output layer hold
    ``padded_vocab_size(tp)`` rows, the extra rows being padding that is never a token.

    Mixture of experts (``num_experts`` > 0): the layers in ``moe_layers`` (global indices) have
    ``num_experts`` SwiGLU experts of ``moe_ffn_hidden_size`` and a router choosing ``moe_top_k``
    of them per token from softmax scores; ``moe_norm_topk_prob`` renormalises the chosen
    scores to sum to 1 (Hugging Face's ``norm_topk_prob``). The other layers are dense with
    ``ffn_hidden_size``. ``router_aux_loss_coef`` is the checkpoint's load-balancing coefficient.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    norm_eps: float
    rope_theta: float
    llama3_rope_factor: float | None
    qkv_bias: bool
    qk_layernorm: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    dtype: torch.dtype
    make_vocab_size_divisible_by: int = 128
    num_experts: int = 0
    moe_top_k: int = 0
    moe_ffn_hidden_size: int = 0
    moe_norm_topk_prob: bool = False
    moe_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether global layer ``layer`` (0-based) has a mixture-of-experts MLP."""
        return layer in self.moe_layers

    @classmethod
    def from_hf_config(cls, config, make_vocab_size_divisible_by: int = 128) -> ModelSpec:
        """Derive and validate a spec from a transformers ``PretrainedConfig``."""
        architectures = getattr(config, "architectures", None) or []
        arch = architectures[0] if architectures else None
        if arch not in _FAMILIES:
            raise UnsupportedModelError(
                f"architectures={architectures!r}: supported are {sorted(_FAMILIES)}"
            )
        qkv_bias, qk_layernorm = _FAMILIES[arch]
        _require(config, "hidden_act", "silu")
        _require(config, "attention_bias", False)
        _require(config, "mlp_bias", False)
        _require(config, "use_sliding_window", False)
        _require(config, "attention_dropout", 0.0)
        if getattr(config, "num_key_value_heads", None) is None:
            raise UnsupportedModelError("num_key_value_heads: missing from the config")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        theta, llama3_factor = _rope(config)
        # transformers 5 names it dtype; 4.x torch_dtype (deprecated, with a warning, in 5)
        dtype = config.dtype if hasattr(config, "dtype") else getattr(config, "torch_dtype", None)
        spec = cls(
            architecture=arch,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            ffn_hidden_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_attention_heads=heads,
            num_query_groups=config.num_key_value_heads,
            head_dim=head_dim,
            norm_eps=config.rms_norm_eps,
            rope_theta=theta,
            llama3_rope_factor=llama3_factor,
            qkv_bias=qkv_bias,
            qk_layernorm=qk_layernorm,
            tie_word_embeddings=bool(config.tie_word_embeddings),
            max_position_embeddings=config.max_position_embeddings,
            dtype=_as_dtype(dtype),
            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
            **(_moe_fields(config) if arch in _MOE_FAMILIES else {}),
        )
        spec.validate()
        return spec

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, **kwargs) -> ModelSpec:
        """Read ``config.json`` of a checkpoint directory (no network)."""
        import json

        from transformers import AutoConfig

        path = Path(checkpoint_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: not a Hugging Face model directory")
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
        config = AutoConfig.from_pretrained(str(checkpoint_dir), local_files_only=True)
        return cls.from_hf_config(config, **kwargs)

    def validate(self) -> None:
        """Checks that need no parallel layout."""
        positive = (
            "vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
            "num_query_groups", "head_dim", "make_vocab_size_divisible_by",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise UnsupportedModelError(f"{name}={getattr(self, name)} must be positive")
        if self.num_attention_heads % self.num_query_groups:
            raise UnsupportedModelError(
                f"num_key_value_heads={self.num_query_groups} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.is_moe:
            for name in ("moe_top_k", "moe_ffn_hidden_size"):
                if getattr(self, name) <= 0:
                    raise UnsupportedModelError(f"{name}={getattr(self, name)} must be positive")
            if self.moe_top_k > self.num_experts:
                raise UnsupportedModelError(
                    f"num_experts_per_tok={self.moe_top_k} exceeds num_experts={self.num_experts}")
            if not self.moe_layers:
                raise UnsupportedModelError(
                    "decoder_sparse_step / mlp_only_layers leave no mixture-of-experts layer")

    def validate_parallelism(self, tensor_parallel: int, pipeline_parallel: int = 1,
                             expert_parallel: int = 1,
                             expert_tensor_parallel: int | None = None) -> None:
        """Megatron's sharding rules for this model at the given sizes, naming the field.

        ``expert_tensor_parallel`` (the experts' own tensor-parallel size) defaults to
        ``tensor_parallel``, as in megatron."""
        etp = tensor_parallel if expert_tensor_parallel is None else expert_tensor_parallel
        if min(tensor_parallel, pipeline_parallel, expert_parallel, etp) < 1:
            raise ValueError("tensor, pipeline, expert and expert-tensor parallel sizes must "
                             "be >= 1")
        per_rank = {
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_query_groups,
        }
        if len(self.moe_layers) < self.num_layers:  # some layer has a dense MLP
            per_rank["intermediate_size"] = self.ffn_hidden_size
        for field_name, value in per_rank.items():
            if value % tensor_parallel:
                raise UnsupportedModelError(
                    f"{field_name}={value} is not divisible by tensor-parallel size "
                    f"{tensor_parallel}"
                )
        if self.num_layers % pipeline_parallel:
            raise UnsupportedModelError(
                f"num_hidden_layers={self.num_layers} is not divisible by pipeline-parallel "
                f"size {pipeline_parallel}"
            )
        if not self.is_moe:
            if expert_parallel > 1 or etp != tensor_parallel:
                raise UnsupportedModelError(
                    f"{self.architecture} has no experts: expert-parallel size "
                    f"{expert_parallel} and expert-tensor-parallel size {etp} need a "
                    f"mixture-of-experts model (leave them at 1 and the tensor-parallel size)")
            return
        if self.num_experts % expert_parallel:
            raise UnsupportedModelError(
                f"num_experts={self.num_experts} is not divisible by expert-parallel size "
                f"{expert_parallel}")
        if self.moe_ffn_hidden_size % etp:
            raise UnsupportedModelError(
                f"moe_intermediate_size={self.moe_ffn_hidden_size} is not divisible by "
                f"expert-tensor-parallel size {etp}")

    def padded_vocab_size(self, tensor_parallel: int) -> int:
        """Rows of the embedding / output layer: Megatron's multiple of divisible_by x tp."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return math.ceil(self.vocab_size / multiple) * multiple


def _moe_fields(config) -> dict:
    """The mixture-of-experts fields of a Qwen3-MoE config: which layers have experts follows
    transformers' ``Qwen3MoeDecoderLayer`` (not in ``mlp_only_layers`` and (i + 1) a multiple
    of ``decoder_sparse_step``)."""
    experts = getattr(config, "num_experts", None) or 0
    step = getattr(config, "decoder_sparse_step", 1)
    if not isinstance(step, int) or step < 1:
        raise UnsupportedModelError(f"decoder_sparse_step={step!r} must be a positive integer")
    dense = set(getattr(config, "mlp_only_layers", None) or ())
    layers = tuple(i for i in range(config.num_hidden_layers)
                   if experts > 0 and i not in dense and (i + 1) % step == 0)
    return dict(
        num_experts=experts,
        moe_top_k=config.num_experts_per_tok,
        moe_ffn_hidden_size=config.moe_intermediate_size,
        moe_norm_topk_prob=bool(config.norm_topk_prob),
        moe_layers=layers,
        router_aux_loss_coef=float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0),
    )


def _require(config, field_name: str, supported) -> None:
    value = getattr(config, field_name, supported)
    if value != supported:
        raise UnsupportedModelError(f"{field_name}={value!r}: only {supported!r} is supported")


def _rope(config) -> tuple[float, float | None]:
    """(theta, llama3 factor or None) from transformers 5 ``rope_parameters`` or 4.x fields."""
    params = getattr(config, "rope_parameters", None)
    if params is None:  # transformers 4.x: rope_theta and rope_scaling at the top level
        params = dict(getattr(config, "rope_scaling", None) or {})
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError(
            f"rope_parameters.partial_rotary_factor={params['partial_rotary_factor']}: "
            "only 1.0 is supported"
        )
    theta = float(params["rope_theta"])
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        for key, value in _MEGATRON_LLAMA3_CONSTANTS.items():
            if params.get(key) != value:
                raise UnsupportedModelError(
                    f"rope_parameters.{key}={params.get(key)!r}: Megatron's llama3 RoPE "
                    f"scaling fixes it at {value}"
                )
        return theta, float(params["factor"])
    raise UnsupportedModelError(
        f"rope_parameters.rope_type={rope_type!r}: supported are 'default' and 'llama3'"
    )


def _as_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, str(dtype).removeprefix("torch."))

