"""One rank of the job built through the job's own code, on the meta device, in a fake world.

What the trainer builds on a GPU rank (``trainer.loop.Trainer._build``, ``actor.Actor``): the
actor's GPTModel stage (``models.build_gpt_model`` with the config's recompute, fp8 and sequence
parallel fields), the reference model's when the loss has a KL term, megatron's
DistributedDataParallel with the actor's settings (``actor.ddp_config``), whose buffers are laid
out by megatron's own bucketing and padding, and the distributed optimizer's shard of each
buffer, from megatron's own range computation (``DistributedOptimizer._build_gbuf_range_map``;
the optimizer itself checks for CUDA tensors, so it is not constructed).

Layer spec: Transformer Engine's layers allocate on CUDA or on the CPU, never on the meta
device, so the stage is built with the portable spec, whose parameters have the same shapes
(``models.weight_map`` maps both to the same Hugging Face tensors). With ``model.backend: te``
the TransformerConfig the job would build, fp8 fields included, is constructed first, so its
errors are raised here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core import parallel_state

from megatron_archer.actor.actor import ddp_config
from megatron_archer.dryrun.world import cuda_allocations_on_meta, fake_rank
from megatron_archer.models import ModelSpec, build_gpt_model, transformer_config
from megatron_archer.models.weight_map import global_named_parameters
from megatron_archer.trainer.config import ParallelConfig

# TransformerConfig fields that only Transformer Engine's layers take
_TE_ONLY = ("fp8", "fp8_recipe", "fp8_margin", "fp8_amax_history_len", "fp8_amax_compute_algo")


@dataclass(frozen=True)
class BuildInputs:
    """What every rank's build needs: the model, the layout, the job's megatron fields."""

    spec: ModelSpec
    parallel: ParallelConfig
    world_size: int
    params_dtype: torch.dtype
    overrides: Mapping[str, Any]   # TransformerConfig fields from model and parallel sections
    te: bool                       # the job builds Transformer Engine layers
    reference: bool                # the job builds a reference model


@dataclass(frozen=True)
class Buffer:
    """One of megatron DDP's parameter-and-gradient buffers on this rank (elements)."""

    param_dtype: torch.dtype
    grad_dtype: torch.dtype
    numel: int                     # with megatron's padding
    numel_unpadded: int
    buckets: tuple[int, ...]       # each bucket's padded elements (one collective each)
    shard: int                     # this rank's distributed-optimizer shard: parameter elements
    expert: bool = False           # the experts' buffer (sharded over the expert-data group)

    @property
    def param_bytes(self) -> int:
        return self.numel * self.param_dtype.itemsize

    @property
    def grad_bytes(self) -> int:
        return self.numel * self.grad_dtype.itemsize


@dataclass(frozen=True)
class RankBuild:
    """What was built on one global rank."""

    rank: int
    pipeline: int
    tensor: int
    context: int
    data: int
    layers: tuple[int, ...]        # global 0-based indices of the stage's layers
    parameters: dict[str, int]     # global megatron name -> elements on this rank
    buffers: tuple[Buffer, ...]
    vocab_rows: int                # rows of this rank's output layer (0 off the last stage)
    reference_parameters: int


def build_rank(inputs: BuildInputs, rank: int) -> RankBuild:
    """Global rank ``rank``'s stage, reference, DDP buffers and optimizer shard (module
    docstring), in a fresh fake world; raises what the job's construction would raise."""
    with fake_rank(rank, inputs.world_size, inputs.parallel):
        if inputs.te:  # the job's TransformerConfig: its fp8 / recompute / SP checks
            transformer_config(inputs.spec, backend="te", params_dtype=inputs.params_dtype,
                               perform_initialization=False, overrides=inputs.overrides)
        portable = {k: v for k, v in inputs.overrides.items() if k not in _TE_ONLY}
        # parameters from torch.empty without a device, so on meta, on a CUDA machine too
        portable["use_cpu_initialization"] = True

        def stage():
            return build_gpt_model(inputs.spec, backend="local", params_dtype=inputs.params_dtype,
                                   perform_initialization=False, config_overrides=portable)

        with torch.device("meta"):
            model = stage()
            reference = stage() if inputs.reference else None
        parameters = {name: p.numel() for name, p in global_named_parameters(model).items()}
        output = getattr(model, "output_layer", None) if model.post_process else None
        build = RankBuild(
            rank=rank,
            pipeline=parallel_state.get_pipeline_model_parallel_rank(),
            tensor=parallel_state.get_tensor_model_parallel_rank(),
            context=parallel_state.get_context_parallel_rank(),
            data=parallel_state.get_data_parallel_rank(),
            layers=tuple(layer.layer_number - 1 for layer in model.decoder.layers),
            parameters=parameters,
            buffers=_ddp_buffers(model),
            vocab_rows=_output_rows(model, output),
            reference_parameters=sum(p.numel() for p in reference.parameters()) if reference else 0,
        )
    return build


def _output_rows(model, output) -> int:
    if output is None:
        return 0
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight().shape[0]
    return output.weight.shape[0]


def _ddp_buffers(model) -> tuple[Buffer, ...]:
    """megatron's DDP around ``model`` with the actor's settings, its buffers on meta."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    with cuda_allocations_on_meta():
        ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config(), module=model)
    out = []
    for expert, buffers in ((False, ddp.buffers), (True, ddp.expert_parallel_buffers)):
        for buffer in buffers:
            ranges = DistributedOptimizer._build_gbuf_range_map(buffer)
            shard = sum(len(r["param"]) for per_bucket in ranges.values()
                        for bucket in per_bucket for r in bucket["param_map"].values())
            out.append(Buffer(param_dtype=buffer.param_dtype, grad_dtype=buffer.grad_dtype,
                              numel=buffer.numel, numel_unpadded=buffer.numel_unpadded,
                              buckets=tuple(b.grad_data.numel() for b in buffer.buckets),
                              shard=shard, expert=expert))
    return tuple(out)
