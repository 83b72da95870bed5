"""Export a megatron GPTModel as full Hugging Face tensors, in buckets of bounded size.

Every rank of the model-parallel group must iterate together: each parameter is all-gathered
over the tensor-parallel group and, with pipeline parallelism, broadcast from the stage that
holds it, so every rank receives every ``(hf_name, tensor)``. Only the current bucket is held, which
bounds the extra memory. Checkpoint export and rollout weight sync consume the same iterator.
A mixture-of-experts model's experts are gathered over the expert-tensor-parallel group and
broadcast from the expert-parallel rank that holds them, so the buckets carry each expert under
its Hugging Face on-disk names (``model.layers.N.mlp.experts.E.gate_proj.weight``, ...).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn

from megatron_archer.buckets import Bucket, bounded_buckets
from megatron_archer.models.layer_spec import Backend
from megatron_archer.models.spec import ModelSpec
from megatron_archer.models.weight_map import (
    Layout,
    WeightMapping,
    from_shards,
    global_named_parameters,
    shard_group,
    weight_mappings,
)


def hf_weight_buckets(
    model: nn.Module, spec: ModelSpec, backend: Backend, bucket_bytes: int = 512 << 20
) -> Iterator[Bucket]:
    """Yield lists of ``(hf_name, full_tensor)`` in checkpoint order, each at most
    ``bucket_bytes`` in total; a single tensor larger than that is a bucket of its own.

    Tensors have the parameters' dtype and device; HF tensors tied to others (a tied
    ``lm_head``) are not emitted, as ``save_pretrained`` does not write them. Every rank must
    iterate: the gathers are collective.
    """
    return bounded_buckets(_hf_tensors(model, spec, backend), bucket_bytes)


@torch.no_grad()
def _hf_tensors(model: nn.Module, spec: ModelSpec, backend: Backend) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, full_tensor)`` pairs in checkpoint order, gathered over TP and PP ranks."""
    local = global_named_parameters(model)
    mappings = weight_mappings(spec, backend)
    local_layers = {_layer_prefix(name) for name in local}
    # this stage's names: its own, and its layers' experts held by other expert-parallel ranks
    stage_names = set(local) | {m.megatron_name for m in mappings if m.expert is not None
                                and _layer_prefix(m.megatron_name) in local_layers}
    owners = _stage_owners(stage_names)
    some_param = next(iter(local.values()))
    for mapping in mappings:
        param = local.get(mapping.megatron_name)
        tensors = _full_tensors(mapping, param, spec) if param is not None else None
        if mapping.megatron_name in stage_names and mapping.expert is not None:
            tensors = _broadcast_from_expert_rank(tensors, mapping, spec, some_param)
        tensors = _broadcast_from_stage(
            tensors, owners[mapping.megatron_name], mapping, some_param
        )
        yield from zip(mapping.hf_names, tensors)


def _layer_prefix(name: str) -> str:
    """``decoder.layers.N.`` of a layer parameter's name, else the name itself."""
    return ".".join(name.split(".")[:3]) + "." if name.startswith("decoder.layers.") else name


def _full_tensors(
    mapping: WeightMapping, param: torch.Tensor, spec: ModelSpec
) -> list[torch.Tensor]:
    """The HF tensors of one parameter, gathered over the group it is split over (tensor
    parallel, or expert-tensor parallel for an expert)."""
    expert = mapping.expert is not None
    group = (parallel_state.get_expert_tensor_parallel_group() if expert
             else parallel_state.get_tensor_model_parallel_group())
    _, size = shard_group(mapping)
    if mapping.layout is Layout.REPLICATED or size == 1:
        shards = [param.detach()]
    else:
        shards = [torch.empty_like(param) for _ in range(size)]
        dist.all_gather(shards, param.detach().contiguous(), group=group)
    return from_shards(mapping, shards, spec)


def _broadcast_from_expert_rank(
    tensors: list[torch.Tensor] | None, mapping: WeightMapping, spec: ModelSpec,
    like: torch.Tensor
) -> list[torch.Tensor]:
    """With expert parallelism, every rank of the expert-parallel group receives the HF
    tensors of an expert from the rank that holds it."""
    size = parallel_state.get_expert_model_parallel_world_size()
    if size == 1:
        return tensors
    if tensors is None:
        tensors = [like.new_empty(shape) for shape in mapping.hf_shapes]
    group = parallel_state.get_expert_model_parallel_group()
    src = dist.get_global_rank(group, mapping.expert // (spec.num_experts // size))
    for tensor in tensors:
        dist.broadcast(tensor, src=src, group=group)
    return tensors


def _stage_owners(local_names: set[str]) -> dict[str, int]:
    """Pipeline stage holding each megatron parameter (the first, for a tied embedding)."""
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    if pp_size == 1:
        return dict.fromkeys(local_names, 0)
    per_stage: list[set[str]] = [set() for _ in range(pp_size)]
    dist.all_gather_object(
        per_stage, local_names, group=parallel_state.get_pipeline_model_parallel_group()
    )
    owners: dict[str, int] = {}
    for stage, names in enumerate(per_stage):
        for name in names:
            owners.setdefault(name, stage)
    return owners


def _broadcast_from_stage(
    tensors: list[torch.Tensor] | None, owner: int, mapping: WeightMapping, like: torch.Tensor
) -> list[torch.Tensor]:
    """With pipeline parallelism, every stage receives the owner stage's tensors."""
    group = parallel_state.get_pipeline_model_parallel_group()
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return tensors
    if tensors is None:
        tensors = [like.new_empty(shape) for shape in mapping.hf_shapes]
    src = dist.get_global_rank(group, owner)
    for tensor in tensors:
        dist.broadcast(tensor, src=src, group=group)
    return tensors
