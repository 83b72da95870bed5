"""Every CPU workaround for megatron-core, in one place, applied only where CUDA is absent.

megatron-core assumes CUDA in a few spots that a CPU GPTModel (portable layer spec, gloo) reaches.
Each patch below says what megatron does and why it is replaced. On a machine with CUDA,
``apply_cpu_patches`` does nothing and megatron runs unchanged. Layer-spec choices (the SDPA
``core_attention`` instead of megatron's CUDA-buffered ``DotProductAttention``) are not patches:
they live in ``megatron_archer.models.layer_spec``.
"""

from __future__ import annotations

import torch

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
    _applied = True


def _patch_rotary_embedding_device() -> None:
    """RoPE frequencies stay on the device they were created on.

    ``RotaryEmbedding.get_emb`` (megatron/core/models/common/embeddings/rotary_pos_embedding.py)
    moves ``inv_freq`` to ``torch.cuda.current_device()`` at the first forward whenever it is on
    CPU, which raises without CUDA. The replacement computes the same embedding from
    ``get_freqs_non_repeated`` without the move; the frequencies themselves (including llama3
    scaling, applied in ``__init__``) are megatron's.
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

    With ``share_embeddings_and_output_weights`` and more than one pipeline stage, the last stage
    holds a copy of the word embeddings; ``LanguageModule.setup_embeddings_and_output_layer``
    (megatron/core/models/common/language_module/language_module.py) all-reduces it over the
    embedding group after ``weight.data = weight.data.cuda()``, which raises without CUDA.
    The replacement runs megatron's method with ``Tensor.cuda`` made the identity for CPU tensors
    during the call only, so the all-reduce itself (gloo) is megatron's.
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
