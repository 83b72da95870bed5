"""Every CPU workaround for megatron-core, in one place, applied only where CUDA is absent.

megatron-core assumes CUDA in a few spots that a CPU GPTModel (portable layer spec, gloo) reaches.
Each patch below names the megatron code it replaces, why, and the megatron-core versions it was
checked against. They are installed once per process; none swaps anything per training call
(only the once-per-model-build embedding setup and the once-per-save checkpoint writer serve
CUDA requests on CPU for the duration of their call). On a machine with CUDA,
``apply_cpu_patches`` does nothing and megatron runs unchanged. Layer-spec choices (the SDPA
``core_attention`` instead of megatron's CUDA-buffered ``DotProductAttention``) are not patches:
they live in ``megatron_archer.models.layer_spec``.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

_applied = False


def cpu_patches_needed() -> bool:
    """True on a machine without CUDA: megatron's CUDA-only paths must be avoided."""
    return not torch.cuda.is_available()


def apply_cpu_patches() -> None:
    """Install the patches below once per process; a no-op when CUDA is available."""
    global _applied
    if _applied or not cpu_patches_needed():
        return
    _patch_rotary_embedding_device()
    _patch_shared_embedding_sync()
    _patch_pipeline_schedules_device()
    _applied = True


def _patch_rotary_embedding_device() -> None:
    """RoPE frequencies stay on the device they were created on.

    Replaces ``RotaryEmbedding.get_emb`` (megatron/core/models/common/embeddings/
    rotary_pos_embedding.py), which moves ``inv_freq`` to ``torch.cuda.current_device()`` at the
    first forward whenever it is on CPU, which raises without CUDA. The replacement computes the
    same embedding from ``get_freqs_non_repeated`` without the move; the frequencies themselves
    (including llama3 scaling, applied in ``__init__``) are megatron's. Checked against
    megatron-core 0.16.1, 0.17.1, 0.18.2 and 0.19.0 (the same ``get_emb`` body in each).
    Installed once per process, on the class.
    """
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        if self.rotary_interleaved:
            emb = torch.stack((freqs, freqs), dim=-1).view(freqs.shape[0], -1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb[:, None, None, :]  # [seq, 1, 1, dim]

    RotaryEmbedding.get_emb = get_emb


def _patch_shared_embedding_sync() -> None:
    """Tied embeddings under pipeline parallelism are synchronised on their own device.

    Wraps ``LanguageModule.setup_embeddings_and_output_layer`` (megatron/core/models/common/
    language_module/language_module.py): with ``share_embeddings_and_output_weights`` and more
    than one pipeline stage, the last stage holds a copy of the word embeddings, which megatron
    all-reduces over the embedding group after ``weight.data = weight.data.cuda()``; that raises
    without CUDA. The wrapper runs megatron's method with ``Tensor.cuda`` made the identity for
    the duration of the call, so the all-reduce itself (gloo) is megatron's. Checked against
    megatron-core 0.16.1, 0.17.1, 0.18.2 and 0.19.0. The method runs once per model build, so
    the per-call swap costs nothing per step.
    """
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule.setup_embeddings_and_output_layer

    def setup_embeddings_and_output_layer(self) -> None:
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda tensor, *args, **kwargs: tensor
        try:
            original(self)
        finally:
            torch.Tensor.cuda = cuda

    LanguageModule.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer


_torch_zeros = torch.zeros


def _cpu_zeros(*args, **kwargs) -> torch.Tensor:
    """``torch.zeros`` with a CUDA ``device`` request served on CPU."""
    device = kwargs.get("device")
    if device is not None and torch.device(device).type == "cuda":
        kwargs["device"] = "cpu"
    return _torch_zeros(*args, **kwargs)


class _CudaServedOnCpu:
    """``torch.cuda`` with ``current_device()`` -> the CPU device and ``synchronize()`` -> no-op;
    every other attribute is ``torch.cuda``'s."""

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(*args, **kwargs) -> None:
        return None

    def __getattr__(self, name: str):
        return getattr(torch.cuda, name)


class _TorchServedOnCpu:
    """``torch`` with ``zeros(device="cuda")`` -> CPU and ``cuda`` -> ``_CudaServedOnCpu``; every
    other attribute is torch's own (the same objects: ``torch.Tensor``, ``torch.distributed``...).
    """

    zeros = staticmethod(_cpu_zeros)
    cuda = _CudaServedOnCpu()

    def __getattr__(self, name: str):
        return getattr(torch, name)


@contextlib.contextmanager
def _cuda_requests_served_on_cpu():
    """During the block, process-wide: ``torch.zeros(..., device="cuda")`` -> CPU,
    ``torch.cuda.current_device()`` -> the CPU device, ``torch.cuda.synchronize()`` -> nothing.
    Only reached without CUDA, where each of them would raise."""
    zeros = torch.zeros
    current_device, synchronize = torch.cuda.current_device, torch.cuda.synchronize
    torch.zeros = _cpu_zeros
    torch.cuda.current_device = _CudaServedOnCpu.current_device
    torch.cuda.synchronize = _CudaServedOnCpu.synchronize
    try:
        yield
    finally:
        torch.zeros, torch.cuda.current_device, torch.cuda.synchronize = (
            zeros, current_device, synchronize)


def _patch_pipeline_schedules_device() -> None:
    """megatron's forward-backward schedules run on CPU tensors and gloo.

    ``forward_backward_no_pipelining`` and both pipelined schedules
    (megatron/core/pipeline_parallel/schedules.py) create their token counter with
    ``torch.zeros([], device="cuda")``, and the pipeline p2p layer (p2p_communication.py)
    allocates its receive buffers and shape messages on ``torch.cuda.current_device()`` and calls
    ``torch.cuda.synchronize()``: all raise without CUDA. Those two modules are the only callers
    on the schedules' path (checked in megatron-core 0.16.1, 0.17.1, 0.18.2 and 0.19.0: the
    same three requests, nothing else CUDA-bound outside CUDA-graph and autocast options the CPU
    path leaves off). Their module global ``torch`` is replaced, once per process, by
    ``_TorchServedOnCpu``, which serves exactly those requests on CPU and forwards everything
    else to torch. Nothing is patched per call and nothing outside the two modules changes
    (the model's forward and the loss see torch itself). The schedules themselves (micro-batch
    order, 1F1B, loss division by the number of micro-batches, p2p over gloo,
    ``finalize_model_grads_func``) are megatron's.
    """
    from megatron.core.pipeline_parallel import p2p_communication, schedules

    for module in (schedules, p2p_communication):
        module.torch = _TorchServedOnCpu()


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
    # covers its own tokens only, and the sum over the group is the whole gradient
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    dp_size = dist.get_world_size(dp_group)
    if dp_size > 1:
        grads = [p.grad for _, p in params]
        _all_reduce_coalesced(grads, dp_group)
        for grad in grads:
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
    ``param_is_not_shared`` decide. Call after ``finalize_model_grads_cpu`` (every data-parallel
    rank then holds the same gradients).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    total = torch.zeros((), dtype=torch.float64)
    for chunk in model_chunks:
        for p in chunk.parameters():
            if p.grad is not None and param_is_not_shared(p) and (
                param_is_not_tensor_parallel_duplicate(p)
            ):
                total += p.grad.double().square().sum()
    dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return math.sqrt(total.item()) if math.isfinite(total.item()) else float("nan")


def model_parallel_seed(seed: int) -> None:
    """Seed weight initialisation and dropout consistently across model-parallel ranks.

    megatron's ``model_parallel_cuda_manual_seed`` seeds CUDA generators and registers them with
    its CUDA RNG tracker, which needs CUDA. On CPU, weights are initialised with
    ``use_cpu_initialization`` (one master weight from the default generator, then sliced), so
    the same ``torch.manual_seed`` on every rank gives consistent shards; no CUDA tracker exists
    (megatron forks it only for sequence-parallel dropout, which the CPU path does not use).
    """
    if cpu_patches_needed():
        torch.manual_seed(seed)
    else:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)


@contextlib.contextmanager
def dist_checkpoint_save_on_cpu():
    """Around ``megatron.core.dist_checkpointing.save``: CPU tensors are saved over gloo.

    The ``torch_dist`` save strategy (megatron/core/dist_checkpointing/strategies/torch.py) goes
    through ``FileSystemWriterAsync`` even for a synchronous save: its ``preload_tensors`` calls
    ``torch.cuda.synchronize()`` and ``save_state_dict_async_finalize`` (state_dict_saver.py)
    broadcasts its failure flag in a tensor on ``torch.cuda.current_device()``; both raise without
    CUDA. During the call they are served on CPU (``_cuda_requests_served_on_cpu``); the planning,
    the files and the metadata are megatron's. A no-op when CUDA is available. Loading needs no
    patch.
    """
    if not cpu_patches_needed():
        yield
        return
    with _cuda_requests_served_on_cpu():
        yield
