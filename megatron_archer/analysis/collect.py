"""Per-token entropy of saved responses under a checkpoint, with the actor's vocab-parallel op.

The entropy is the one training selects tokens by (docs/numerics.md §6): H_t of softmax(z_t) at temperature 1,
computed by ``ModelRunner.compute_logprobs_and_entropy`` on packed micro-batches, so any tensor or
pipeline layout gives the same numbers. A single process runs in a 1-rank group
(``model_parallel_groups``); under a launcher (torchrun) every rank passes the same responses
(the analysis does not split them over data-parallel ranks).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_archer.actor import ActorConfig, ModelRunner, ReferenceModel, SequenceBatch
from megatron_archer.analysis.responses import Response
from megatron_archer.distributed import init_process_group
from megatron_archer.models import load_hf_model


@contextmanager
def model_parallel_groups(tensor_parallel: int = 1, pipeline_parallel: int = 1) -> Iterator[None]:
    """torch.distributed and megatron's model-parallel groups for an analysis run.

    Uses the launcher's world when torch.distributed is initialised or torchrun's ``RANK`` is set,
    else a 1-rank group on this process (gloo on CPU, nccl on CUDA). Whatever this context
    creates it destroys on exit; groups that already existed are left alone.
    """
    created_world = not dist.is_initialized()
    if created_world:
        init_process_group()
    created_model_parallel = not parallel_state.model_parallel_is_initialized()
    if created_model_parallel:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel,
            pipeline_model_parallel_size=pipeline_parallel)
    try:
        yield
    finally:
        if created_model_parallel:
            parallel_state.destroy_model_parallel()
        if created_world:
            dist.destroy_process_group()


def load_runner(checkpoint: str | Path, max_tokens_per_micro_batch: int = 8192,
                params_dtype: torch.dtype = torch.float32) -> ReferenceModel:
    """This rank's frozen model of a Hugging Face ``checkpoint``, scoring at temperature 1."""
    loaded = load_hf_model(checkpoint, params_dtype=params_dtype)
    config = ActorConfig(max_tokens_per_micro_batch=max_tokens_per_micro_batch, temperature=1.0,
                         params_dtype="bfloat16" if params_dtype == torch.bfloat16 else "float32")
    return ReferenceModel(loaded.model, loaded.spec, config, loaded.backend)


def collect_entropy(runner: ModelRunner, responses: Sequence[Response]) -> list[np.ndarray]:
    """float32 entropy of every response token, one array per response (empty for an empty
    response). A sequence longer than the runner's micro-batch budget is an error."""
    scored = [i for i, r in enumerate(responses) if r.response_ids]
    result = [np.zeros(0, dtype=np.float32) for _ in responses]
    if not scored:
        return result
    ids, masks = [], []
    for i in scored:
        prompt, response = responses[i].prompt_ids, responses[i].response_ids
        ids.append(torch.tensor(prompt + response, dtype=torch.long))
        masks.append(torch.arange(len(prompt) + len(response)) >= len(prompt))
    out = runner.compute_logprobs_and_entropy(SequenceBatch(input_ids=ids, response_mask=masks))
    entropy = out.entropy.float().cpu().numpy()
    for row, i in enumerate(scored):
        result[i] = entropy[row, : len(responses[i].response_ids)].copy()
    return result
