"""megatron's DistributedDataParallel gradient sync, ``finalize_model_grads`` and gradient norm,
emulated on CPU for the actor.

Megatron's DDP allocates its gradient buffers on CUDA and ``get_grad_norm_fp32`` all-reduces
through a CUDA tensor, so on CPU the actor leaves the model unwrapped, installs
``finalize_model_grads_cpu`` as ``config.finalize_model_grads_func`` (the schedule calls it after
the last backward) and computes the clipping norm with ``grad_norm_cpu``. Both work on
``param.grad`` with the same groups and the same arithmetic as megatron's CUDA path, so a CPU run
trains like a GPU one (tests/actor compare against a single-process transformers + AdamW loop).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _qk_or_sequence_parallel_partial(name: str, param: torch.nn.Parameter, config) -> bool:
    """Replicated over TP but with a per-rank partial gradient (summed in finalize_model_grads)."""
    return (config.sequence_parallel and getattr(param, "sequence_parallel", False)) or (
        config.qk_layernorm and ("q_layernorm" in name or "k_layernorm" in name)
    )


def finalize_model_grads_cpu(model_chunks, num_tokens=None, pg_collection=None,
                             force_all_reduce=False) -> None:
    """Replacement for megatron's DistributedDataParallel gradient sync + ``finalize_model_grads``.

    On CUDA, megatron's DDP all-reduces (or reduce-scatters) gradients over the data-parallel
    group, averaged (x 1/dp), and ``finalize_model_grads`` (megatron/core/distributed/
    finalize_model_grads.py) then sums over the tensor-parallel group the gradients of replicated
    parameters that each rank only sees partially (q/k layernorm weights act on the rank's own
    heads; sequence-parallel norms on its own tokens) and all-reduces the tied word-embedding
    gradient between the first and last pipeline stages. Megatron's DDP allocates its gradient
    buffers on CUDA, so on CPU the model is not wrapped and this function, installed as
    ``config.finalize_model_grads_func``, does the same on ``param.grad``: the schedule calls it
    after the last backward. ``num_tokens`` (per-token loss mode) is not supported.
    """
    from megatron.core import parallel_state

    if num_tokens is not None:
        raise NotImplementedError("calculate_per_token_loss is not supported on CPU")
    params = [
        (n, p) for chunk in model_chunks for n, p in chunk.named_parameters() if p.requires_grad
    ]
    for _, p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    config = model_chunks[0].config
    tp_group = parallel_state.get_tensor_model_parallel_group()
    partial = [p.grad for n, p in params if _qk_or_sequence_parallel_partial(n, p, config)]
    if partial and dist.get_world_size(tp_group) > 1:
        _all_reduce_coalesced(partial, tp_group)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        shared = []
        for chunk in model_chunks:
            if getattr(chunk, "share_embeddings_and_output_weights", False) and (
                chunk.pre_process or chunk.post_process
            ):
                shared.append(chunk.shared_embedding_or_output_weight().grad)
        if shared and parallel_state.is_rank_in_embedding_group():
            _all_reduce_coalesced(shared, parallel_state.get_embedding_group())
    # DDP's group is data x context parallel (its dp_cp group): under CP a rank's gradient
    # covers its own tokens only, and the sum over the group is the whole gradient. Experts split
    # by expert parallelism (megatron marks them allreduce=False) are summed over the expert
    # data-parallel group instead, the ranks holding the same experts; DDP scales them by the
    # same 1 / dp_cp (their tokens came from every rank of the expert-parallel group).
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    dp_size = dist.get_world_size(dp_group)
    expert_group = parallel_state.get_expert_data_parallel_group()
    dense = [p.grad for _, p in params if getattr(p, "allreduce", True)]
    experts = [p.grad for _, p in params if not getattr(p, "allreduce", True)]
    for grads, group in ((dense, dp_group), (experts, expert_group)):
        if grads and dist.get_world_size(group) > 1:
            _all_reduce_coalesced(grads, group)
    if dp_size > 1:
        for grad in dense + experts:
            grad.div_(dp_size)  # DDP's average; the actor's loss scale undoes it


def _all_reduce_coalesced(tensors: list[torch.Tensor], group) -> None:
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def grad_norm_cpu(model_chunks) -> float:
    """Replacement for megatron's ``get_grad_norm_fp32`` (megatron/core/optimizer/clip_grads.py),
    which all-reduces the norm through a tensor created on ``device="cuda"``.

    Global L2 norm of ``param.grad`` over the model-parallel (tensor x pipeline) group, counting
    each parameter once: tensor-parallel duplicates only on TP rank 0 and the pipeline copy of a
    tied embedding only once, as megatron's ``param_is_not_tensor_parallel_duplicate`` and
    ``param_is_not_shared`` decide. A mixture-of-experts model's experts are summed over the
    group whose ranks hold distinct expert shards (expert-tensor x expert x pipeline), as
    megatron's expert optimizer does, and added. Call after ``finalize_model_grads_cpu`` (every
    data-parallel rank then holds the same gradients).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    dense = torch.zeros((), dtype=torch.float64)
    experts = torch.zeros((), dtype=torch.float64)
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():
            if p.grad is None:
                continue
            if _is_expert(name):
                experts += p.grad.double().square().sum()
            elif param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p):
                dense += p.grad.double().square().sum()
    dist.all_reduce(dense, group=parallel_state.get_model_parallel_group())
    if model_chunks[0].config.num_moe_experts:
        dist.all_reduce(experts,
                        group=parallel_state.get_expert_tensor_model_pipeline_parallel_group())
    total = (dense + experts).item()
    return math.sqrt(total) if math.isfinite(total) else float("nan")


def _is_expert(name: str) -> bool:
    """An expert's weight (megatron's SequentialMLP / TEGroupedMLP live in ``mlp.experts``)."""
    return ".mlp.experts." in name
