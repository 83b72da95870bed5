"""Name, shape and layout mapping between Hugging Face tensors and megatron GPTModel parameters.

Written here rather than taken from mbridge: mbridge assumes Transformer Engine parameter names
and CUDA, and on CPU needed patches to the layer spec, the norm names, RoPE and model placement
(PLATFORM.md). The mapping for the supported families is small (one table below), and owning it
lets the same code serve both layer specs (``NORM_PARAMS``) and both homes without a dependency
that tracks megatron releases on its own schedule.

Every mapping converts between the full HF tensors and one tensor-parallel rank's shard:

- ``REPLICATED`` norms: every rank holds the whole tensor.
- ``ROW``: contiguous split along dim 1 (RowParallelLinear).
- ``VOCAB``: rows padded with zeros to the padded vocabulary, then split along dim 0.
- ``QKV``: megatron's fused ``linear_qkv`` groups rows per query group g as
  [q heads of g, k_g, v_g]; a rank holds a contiguous run of whole groups.
- ``GATE_UP``: megatron's fused ``linear_fc1`` holds [gate_r; up_r] on rank r (the MLP splits
  its local output in two halves), so the gathered tensor is not [gate; up].

Mixture-of-experts layers map the router (``mlp.router.weight`` <- ``mlp.gate.weight``,
replicated) and each expert E (``linear_fc1`` <- ``mlp.experts.E.{gate,up}_proj.weight`` as
``GATE_UP``, ``linear_fc2`` <- ``mlp.experts.E.down_proj.weight`` as ``ROW``): the per-expert
names Hugging Face checkpoints hold on disk (and SGLang and vLLM load), whatever layout
transformers uses in memory. An expert's mapping has ``expert`` = E, its name uses the global
expert number (``global_named_parameters`` renames this rank's local experts), it lives on
expert-parallel rank E // (experts per rank) and is split over the expert-tensor-parallel group
(``shard_group``).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import torch
from torch import nn

from megatron_archer.models.layer_spec import (
    MOE_PRE_MLP_NORM,
    NORM_PARAMS,
    Backend,
    expert_param_name,
)
from megatron_archer.models.spec import ModelSpec


class Layout(enum.Enum):
    REPLICATED = "replicated"
    ROW = "row"
    VOCAB = "vocab"
    QKV = "qkv"
    GATE_UP = "gate_up"


@dataclass(frozen=True)
class WeightMapping:
    """One megatron parameter (global layer numbering) and the HF tensors it is made of."""

    megatron_name: str
    hf_names: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    layout: Layout
    expert: int | None = None  # the global expert number of an expert's linear


def shard_group(mapping: WeightMapping) -> tuple[int, int]:
    """(rank, size) in the group a mapping's tensor is split over: tensor parallel, or for an
    expert's linear expert-tensor parallel. Model-parallel groups must exist."""
    from megatron.core import parallel_state

    if mapping.expert is not None:
        return (parallel_state.get_expert_tensor_parallel_rank(),
                parallel_state.get_expert_tensor_parallel_world_size())
    return (parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


def weight_mappings(spec: ModelSpec, backend: Backend) -> list[WeightMapping]:
    """All parameters of the full model, each HF tensor once, in checkpoint order."""
    h, f, d = spec.hidden_size, spec.ffn_hidden_size, spec.head_dim
    q_rows, kv_rows = spec.num_attention_heads * d, spec.num_query_groups * d
    input_norm, mlp_norm = NORM_PARAMS[backend]
    out = [
        WeightMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
                      ((spec.vocab_size, h),), Layout.VOCAB),
    ]  # fmt: skip
    for i in range(spec.num_layers):
        mg, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        attn = hf + "self_attn."
        out.append(WeightMapping(mg + input_norm, (hf + "input_layernorm.weight",), ((h,),),
                                 Layout.REPLICATED))  # fmt: skip
        qkv = tuple(attn + f"{p}_proj." for p in "qkv")
        out.append(WeightMapping(mg + "self_attention.linear_qkv.weight",
                                 tuple(n + "weight" for n in qkv),
                                 ((q_rows, h), (kv_rows, h), (kv_rows, h)),
                                 Layout.QKV))  # fmt: skip
        if spec.qkv_bias:
            out.append(WeightMapping(mg + "self_attention.linear_qkv.bias",
                                     tuple(n + "bias" for n in qkv),
                                     ((q_rows,), (kv_rows,), (kv_rows,)), Layout.QKV))  # fmt: skip
        if spec.qk_layernorm:
            for mg_norm, hf_norm in (("q_layernorm", "q_norm"), ("k_layernorm", "k_norm")):
                out.append(WeightMapping(mg + f"self_attention.{mg_norm}.weight",
                                         (attn + f"{hf_norm}.weight",), ((d,),),
                                         Layout.REPLICATED))  # fmt: skip
        out += [
            WeightMapping(mg + "self_attention.linear_proj.weight", (attn + "o_proj.weight",),
                          ((h, q_rows),), Layout.ROW),
        ]
        if spec.is_moe_layer(i):
            out += _moe_mappings(spec, backend, mg, hf)
            continue
        out += [
            WeightMapping(mg + mlp_norm, (hf + "post_attention_layernorm.weight",), ((h,),),
                          Layout.REPLICATED),
            WeightMapping(mg + "mlp.linear_fc1.weight",
                          (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
                          ((f, h), (f, h)), Layout.GATE_UP),
            WeightMapping(mg + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",),
                          ((h, f),), Layout.ROW),
        ]  # fmt: skip
    out.append(WeightMapping("decoder.final_layernorm.weight", ("model.norm.weight",), ((h,),),
                             Layout.REPLICATED))  # fmt: skip
    if not spec.tie_word_embeddings:
        out.append(WeightMapping("output_layer.weight", ("lm_head.weight",),
                                 ((spec.vocab_size, h),), Layout.VOCAB))  # fmt: skip
    return out


def _moe_mappings(spec: ModelSpec, backend: Backend, mg: str, hf: str) -> list[WeightMapping]:
    """The pre-MLP norm, router and experts of mixture-of-experts layer prefixes mg / hf."""
    h, f = spec.hidden_size, spec.moe_ffn_hidden_size
    out = [
        WeightMapping(mg + MOE_PRE_MLP_NORM, (hf + "post_attention_layernorm.weight",), ((h,),),
                      Layout.REPLICATED),
        WeightMapping(mg + "mlp.router.weight", (hf + "mlp.gate.weight",),
                      ((spec.num_experts, h),), Layout.REPLICATED),
    ]  # fmt: skip
    for e in range(spec.num_experts):
        expert = f"{hf}mlp.experts.{e}."
        out += [
            WeightMapping(mg + expert_param_name(backend, e, "linear_fc1"),
                          (expert + "gate_proj.weight", expert + "up_proj.weight"),
                          ((f, h), (f, h)), Layout.GATE_UP, expert=e),
            WeightMapping(mg + expert_param_name(backend, e, "linear_fc2"),
                          (expert + "down_proj.weight",), ((h, f),), Layout.ROW, expert=e),
        ]  # fmt: skip
    return out


def tied_output_mapping(spec: ModelSpec) -> WeightMapping:
    """With tied embeddings, a last pipeline stage without the embedding holds a copy of it."""
    return WeightMapping("output_layer.weight", ("model.embed_tokens.weight",),
                         ((spec.vocab_size, spec.hidden_size),), Layout.VOCAB)  # fmt: skip


def to_shard(
    mapping: WeightMapping, hf: list[torch.Tensor], spec: ModelSpec, rank: int, size: int
) -> torch.Tensor:
    """Tensor-parallel rank ``rank``'s shard of the megatron parameter, from full HF tensors."""
    layout = mapping.layout
    if layout is Layout.REPLICATED:
        return hf[0]
    if layout is Layout.ROW:
        return hf[0].chunk(size, dim=1)[rank]
    if layout is Layout.VOCAB:
        padded = hf[0].new_zeros((spec.padded_vocab_size(size), *hf[0].shape[1:]))
        padded[: spec.vocab_size] = hf[0]
        return padded.chunk(size, dim=0)[rank]
    if layout is Layout.GATE_UP:
        return torch.cat([t.chunk(size, dim=0)[rank] for t in hf], dim=0)
    # QKV: [groups, rows per group, ...] per tensor, this rank's groups, fused per group
    groups = spec.num_query_groups
    q, k, v = (t.reshape(groups, -1, *t.shape[1:]) for t in hf)
    per_rank = groups // size
    own = slice(rank * per_rank, (rank + 1) * per_rank)
    fused = torch.cat([q[own], k[own], v[own]], dim=1)
    return fused.reshape(-1, *hf[0].shape[1:])


def from_shards(
    mapping: WeightMapping, shards: list[torch.Tensor], spec: ModelSpec
) -> list[torch.Tensor]:
    """Full HF tensors from every tensor-parallel rank's shard (in rank order)."""
    layout = mapping.layout
    if layout is Layout.REPLICATED:
        return [shards[0].clone()]
    if layout is Layout.ROW:
        return [torch.cat(shards, dim=1)]
    if layout is Layout.VOCAB:
        return [torch.cat(shards, dim=0)[: spec.vocab_size].clone()]
    if layout is Layout.GATE_UP:
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]
    # QKV
    d = spec.head_dim
    q_per_group = spec.num_attention_heads // spec.num_query_groups * d
    parts: list[list[torch.Tensor]] = [[], [], []]
    for shard in shards:
        grouped = shard.reshape(-1, q_per_group + 2 * d, *shard.shape[1:])
        for part, piece in zip(parts, grouped.split([q_per_group, d, d], dim=1)):
            part.append(piece.reshape(-1, *shard.shape[1:]))
    return [torch.cat(part, dim=0) for part in parts]


# a local expert's linear: SequentialMLP (local) or TEGroupedMLP (te) naming; groups: the text
# before the local expert number, the number, the text after it
_LOCAL_EXPERT = (re.compile(r"^(mlp\.experts\.local_experts\.)(\d+)(\..+)$"),
                 re.compile(r"^(mlp\.experts\.linear_fc[12]\.weight)(\d+)()$"))


def global_named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """This stage's parameters named with global layer numbers (``decoder.layers.<global>.``)
    and, for this expert-parallel rank's experts, global expert numbers."""
    offsets = {
        f"decoder.layers.{i}.": f"decoder.layers.{layer.layer_number - 1}."
        for i, layer in enumerate(model.decoder.layers)
    }
    first_expert = _first_local_expert(model)
    named = {}
    for name, param in model.named_parameters():
        if name.startswith("decoder.layers."):
            local_prefix = ".".join(name.split(".")[:3]) + "."
            rest = name[len(local_prefix) :]
            match = next((m for m in (p.match(rest) for p in _LOCAL_EXPERT) if m), None)
            if match:
                head, number, tail = match.groups()
                rest = f"{head}{first_expert + int(number)}{tail}"
            name = offsets[local_prefix] + rest
        named[name] = param
    return named


def _first_local_expert(model: nn.Module) -> int:
    """Global number of this rank's first expert: experts are split evenly over the
    expert-parallel ranks in order."""
    experts = getattr(getattr(model, "config", None), "num_moe_experts", None)
    if not experts:
        return 0
    from megatron.core import parallel_state

    ep = parallel_state.get_expert_model_parallel_world_size()
    return parallel_state.get_expert_model_parallel_rank() * (experts // ep)
