"""The frozen reference policy for the KL term: same sharding as the actor, no gradients.

On CUDA its parameters can live in CPU memory between uses (``offload``; the next
``compute_logprobs_and_entropy`` brings them back); on CPU both are no-ops.
"""

from __future__ import annotations

import torch

from megatron_archer.actor.actor import LogprobResult, ModelRunner
from megatron_archer.actor.packing import SequenceBatch


class ReferenceModel(ModelRunner):
    """Frozen copy (``load_hf_model`` of the initial checkpoint): eval mode, requires_grad off."""

    def __init__(self, model, spec, config, backend: str):
        super().__init__(model, spec, config, backend)
        for chunk in self.chunks:
            chunk.eval()
            chunk.requires_grad_(False)
        self.offloaded = False

    def offload(self) -> None:
        """Move the parameters to CPU memory (CUDA only; a no-op on CPU)."""
        if self.on_cuda and not self.offloaded:
            for chunk in self.chunks:
                chunk.to("cpu")
            torch.cuda.empty_cache()
            self.offloaded = True

    def onload(self) -> None:
        """Bring the parameters back to the GPU (CUDA only; a no-op on CPU)."""
        if self.on_cuda and self.offloaded:
            for chunk in self.chunks:
                chunk.to(self.device)
            self.offloaded = False

    def compute_logprobs_and_entropy(self, batch: SequenceBatch) -> LogprobResult:
        self.onload()
        return super().compute_logprobs_and_entropy(batch)
