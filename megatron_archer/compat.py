"""Every CPU workaround for megatron-core, in one place, applied only where CUDA is absent.

megatron-core assumes CUDA in a few spots that a CPU GPTModel (portable layer spec, gloo) reaches.
Each patch below names the megatron code it replaces, why, and the megatron-core versions it was
checked against. They are installed once per process; none swaps anything per training call
(only the once-per-model-build embedding setup and the once-per-save checkpoint writer serve
CUDA requests on CPU for the duration of their call). On a machine with CUDA,
``apply_cpu_patches`` changes nothing but the one fix megatron needs wherever Transformer
Engine is absent (``_define_te_gemm_when_absent``) and megatron runs unchanged. Layer-spec choices (the SDPA
``core_attention`` instead of megatron's CUDA-buffered ``DotProductAttention``) are not patches:
they live in ``megatron_archer.models.layer_spec``; nor is the CPU emulation of megatron's DDP
gradient sync and gradient norm, which is the actor's (``megatron_archer.actor.cpu_ddp``).
"""

from __future__ import annotations

import contextlib

import torch

_applied = False


def cpu_patches_needed() -> bool:
    """True on a machine without CUDA: megatron's CUDA-only paths must be avoided."""
    return not torch.cuda.is_available()


def apply_cpu_patches() -> None:
    """Install the patches below once per process; with CUDA only the one for a missing
    Transformer Engine."""
    global _applied
    if _applied:
        return
    _define_te_gemm_when_absent()
    if not cpu_patches_needed():
        _applied = True
        return
    _patch_rotary_embedding_device()
    _patch_shared_embedding_sync()
    _patch_pipeline_schedules_device()
    _patch_sequence_parallel_device()
    _patch_rng_tracker_fork()
    _patch_moe_layer_device()
    _applied = True


def _define_te_gemm_when_absent() -> None:
    """megatron's MoE router runs without Transformer Engine.

    ``RouterGatingLinearFunction`` (megatron/core/transformer/moe/moe_utils.py) tests
    ``te_general_gemm is not None`` before its plain ``torch.mm`` fallback, but the module
    defines that name only when its ``import transformer_engine`` succeeds, so without TE
    every router forward raises NameError. The name is defined as None there when absent, which
    selects megatron's own fallback. Checked against megatron-core 0.16.1.
    """
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


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


def _patch_sequence_parallel_device() -> None:
    """megatron's sequence-parallel communication allocates its buffers on CPU.

    Under ``sequence_parallel`` the tensor-parallel mappings (megatron/core/tensor_parallel/
    mappings.py: gather / reduce-scatter along the sequence) and the parallel linears' forward and
    backward (tensor_parallel/layers.py, ``LinearWithGradAccumulationAndAsyncCommunication``)
    allocate their outputs with ``device=torch.cuda.current_device()``, some through megatron's
    ``GlobalMemoryBuffer`` (core/utils.py), which does the same: all raise without CUDA. As for
    the schedules, the module global ``torch`` of those three modules is replaced, once per
    process, by ``_TorchServedOnCpu`` (``current_device()`` -> CPU; everything else torch's own),
    so the collectives (``all_gather_into_tensor``, ``reduce_scatter_tensor`` over gloo) and the
    arithmetic are megatron's. The same serves the receive buffer of the expert-parallel
    all-to-all (``mappings.all_to_all``, a mixture-of-experts model's token dispatch). The other
    ``current_device()`` calls of those modules (parameters allocated without
    ``use_cpu_initialization``, batch helpers in utils) are served on CPU too; none is on the CPU
    path's way. Checked against megatron-core
    0.16.1, 0.17.1, 0.18.2 and 0.19.0 (5, 8 and 2-13 ``torch.cuda.current_device()`` calls).
    """
    from megatron.core import utils
    from megatron.core.tensor_parallel import layers, mappings

    for module in (mappings, layers, utils):
        module.torch = _TorchServedOnCpu()


def _patch_rng_tracker_fork() -> None:
    """megatron's CUDA RNG tracker's ``fork`` is a no-op context on CPU.

    With ``sequence_parallel`` the embedding's dropout and the whole transformer block run inside
    ``get_cuda_rng_tracker().fork()`` (models/common/embeddings/language_model_embedding.py,
    transformer/transformer_block.py), which switches to the tracker's model-parallel CUDA
    generator; that generator exists only after ``model_parallel_cuda_manual_seed``, which needs
    CUDA (``model_parallel_seed``), so ``fork`` raises. On CPU there is one generator, the default
    one, and the fork leaves it in use. Exact for the models built here, whose dropout is 0
    (``models.builder``); a CPU run with dropout would draw the same masks on every
    tensor-parallel rank's own tokens. Replaces ``CudaRNGStatesTracker.fork`` (tensor_parallel/
    random.py) once per process; checked against megatron-core 0.16.1, 0.17.1, 0.18.2 and 0.19.0.
    """
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()


class _CpuStream:
    """A stand-in for a CUDA stream on CPU, where every operation is already complete: waiting
    and synchronising do nothing, a recorded event is complete at once."""

    def wait_stream(self, stream) -> None:
        return None

    def record_event(self, event=None) -> _CpuStream:
        return self

    def synchronize(self) -> None:
        return None


_CPU_STREAM = _CpuStream()


class _CudaStreamsServedOnCpu(_CudaServedOnCpu):
    """``_CudaServedOnCpu`` plus streams: ``Stream()`` and ``current_stream()`` -> one
    ``_CpuStream``, ``stream(s)`` -> a no-op context."""

    @staticmethod
    def Stream(*args, **kwargs) -> _CpuStream:  # noqa: N802 - torch.cuda's name
        return _CPU_STREAM

    @staticmethod
    def current_stream(*args, **kwargs) -> _CpuStream:
        return _CPU_STREAM

    @staticmethod
    def stream(stream) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


class _TorchWithStreamsServedOnCpu(_TorchServedOnCpu):
    cuda = _CudaStreamsServedOnCpu()


def _patch_moe_layer_device() -> None:
    """megatron's MoE layer (router, alltoall token dispatcher, loss tracker) runs on CPU.

    ``MoEAlltoAllTokenDispatcher`` (megatron/core/transformer/moe/token_dispatcher.py) creates a
    side ``torch.cuda.Stream()`` in ``__init__`` for its device-to-host copies of the token
    counts, and ``_maybe_dtoh_and_synchronize`` compares it with ``torch.cuda.current_stream()``,
    enters ``torch.cuda.stream(...)`` and synchronises on an event it records: all raise without
    CUDA. On CPU nothing is asynchronous, so the module global ``torch`` of that module is
    replaced, once per process, by one whose ``cuda`` serves streams with a stand-in on which
    every wait is a no-op. The same copies turn the all-to-all split sizes into host (numpy)
    arrays, which ``all_to_all_single`` needs; megatron's ``maybe_move_tensor_to_cpu`` does that
    only for a CUDA tensor, so on CPU that module's reference to it is wrapped to convert a host
    tensor when numpy is asked for. The routing, permutation, all-to-all (gloo) and arithmetic
    are megatron's. The router (moe/router.py) moves its weight to ``torch.cuda.current_device()``
    at every ``gating`` call and allocates its token counters for the auxiliary losses there, and
    the auxiliary-loss tracker (moe/moe_utils.py, ``save_to_aux_losses_tracker``) allocates its
    per-layer values with ``torch.zeros(..., device="cuda")``: those two modules get
    ``_TorchServedOnCpu`` (``current_device()`` and ``zeros(device="cuda")`` served on CPU).
    Checked against megatron-core 0.16.1 (one ``Stream()``, one ``current_stream()`` pair and
    one ``stream()`` context in token_dispatcher.py; 6 ``current_device()`` calls in router.py;
    one CUDA ``zeros`` in moe_utils.py).
    """
    from megatron.core.transformer.moe import moe_utils, router, token_dispatcher

    token_dispatcher.torch = _TorchWithStreamsServedOnCpu()
    to_cpu = token_dispatcher.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        moved = to_cpu(tensor, as_numpy=as_numpy, record_stream=record_stream)
        return moved.numpy() if as_numpy and isinstance(moved, torch.Tensor) else moved

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    router.torch = moe_utils.torch = _TorchServedOnCpu()


def model_parallel_seed(seed: int) -> None:
    """Seed weight initialisation and dropout consistently across model-parallel ranks.

    megatron's ``model_parallel_cuda_manual_seed`` seeds CUDA generators and registers them with
    its CUDA RNG tracker, which needs CUDA. On CPU, weights are initialised with
    ``use_cpu_initialization`` (one master weight from the default generator, then sliced), so
    the same ``torch.manual_seed`` on every rank gives consistent shards; no CUDA tracker exists
    (megatron forks it around sequence-parallel regions: ``_patch_rng_tracker_fork``).
    Checked against megatron-core 0.16.1, 0.17.1, 0.18.2 and 0.19.0 (``torch.cuda.manual_seed``
    and the CUDA RNG tracker in each).
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
    patch. Checked against megatron-core 0.16.1, 0.17.1, 0.18.2 and 0.19.0 (the same two requests
    in ``preload_tensors`` and ``save_state_dict_async_finalize``).
    """
    if not cpu_patches_needed():
        yield
        return
    with _cuda_requests_served_on_cpu():
        yield
