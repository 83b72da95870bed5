"""The model's weights as a megatron-core distributed checkpoint, loadable at any parallel layout.

A model checkpoint directory holds::

    archer_model.json   format, version, params dtype, vocabulary padding rule, saved layout
    hf/                 the source's config.json and other non-weight files (tokenizer,
                        generation_config.json, ...): what rebuilds the ModelSpec (true vocab
                        size included) and what an HF export copies
    weights/            megatron.core.dist_checkpointing output of model.sharded_state_dict()

Weights are keyed by megatron's global sharded keys (layers stacked on a leading axis, TP shards
placed by global offsets), so a checkpoint written at one tensor/pipeline layout loads at
another. A trainer checkpoint adds its optimizer, RNG and data state beside these entries.

Facts (megatron-core 0.16.1, torch 2.13 CPU, gloo):

- ``dist_checkpointing.save`` needs its directory to exist. Its default and only sharded save
  backend is ``torch_dist`` (torch.distributed.checkpoint files ``__<rank>_<i>.distcp`` +
  ``.metadata``, ``common.pt``, ``metadata.json``). It always runs through the async writer, even
  with ``async_sharded_save=False`` (the default, used here): that writer calls CUDA in two places
  (``compat.dist_checkpoint_save_on_cpu``), starts a ``multiprocessing`` Manager with the *spawn*
  context (which re-imports ``__main__``: keep a script's top level light) and forks one writer
  process per file (2 per rank).
- Both run over gloo with CPU tensors, also in a one-rank group (``dist.HashStore``).
- Saves are spread over the data-parallel ranks (``parallel_save_strategy``: megatron's
  ``FullyParallelSaveStrategyWrapper`` around ``torch_dist``): each replicated tensor is written
  by one rank of its data-parallel group, chosen to balance bytes, instead of all by DP rank 0.
  Only metadata is exchanged (``all_gather_object``), so it runs over gloo too. With
  ``async_save=True`` the file writing is returned as megatron's ``AsyncRequest`` for the caller
  to run (``AsyncCallsQueue.schedule_async_request`` or ``execute_sync``; on CPU inside
  ``compat.dist_checkpoint_save_on_cpu``), ``metadata.json`` being written only when it is done.
- Loading (``TorchDistLoadShardedStrategy``) runs on CPU unpatched; the fully-parallel load
  wrappers exchange shards on CUDA and are not used.
- Embedding and output-layer tensors are saved with ``allow_shape_mismatch``: a checkpoint whose
  padded vocabulary (a multiple of 128 x tp) differs from the loading layout's loads, the extra
  rows zero-filled or dropped.
- The portable (local) layer spec saves its norms under the Transformer Engine names
  (``self_attention.linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``); its
  linears save empty ``_extra_state`` objects.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from torch import nn
from torch.distributed.checkpoint import FileSystemReader

from megatron_archer import compat
from megatron_archer.models.builder import build_gpt_model
from megatron_archer.models.hf_import import CheckpointError, LoadedModel
from megatron_archer.models.hf_save import non_weight_files
from megatron_archer.models.layer_spec import select_backend
from megatron_archer.models.spec import ModelSpec

FORMAT = "megatron-archer-model"
VERSION = 1
METADATA = "archer_model.json"
HF_DIR = "hf"
WEIGHTS_DIR = "weights"


@dataclass(frozen=True)
class ModelCheckpoint:
    """What a model checkpoint directory says about itself (read without loading weights)."""

    directory: Path
    spec: ModelSpec
    params_dtype: torch.dtype

    @property
    def hf_dir(self) -> Path:
        return self.directory / HF_DIR


def read_model_checkpoint(directory: str | Path) -> ModelCheckpoint:
    """Check that ``directory`` is a model checkpoint and read its spec and dtype."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory")
    if not (directory / METADATA).is_file():
        raise CheckpointError(
            f"{directory} is not a megatron-archer model checkpoint: no {METADATA}"
        )
    metadata = json.loads((directory / METADATA).read_text())
    if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
        raise CheckpointError(
            f"{directory / METADATA}: format {metadata.get('format')!r} version "
            f"{metadata.get('version')!r}, expected {FORMAT!r} version {VERSION}"
        )
    if not dist_checkpointing.check_is_distributed_checkpoint(str(directory / WEIGHTS_DIR)):
        raise CheckpointError(f"{directory / WEIGHTS_DIR} is not a megatron distributed checkpoint")
    spec = ModelSpec.from_pretrained(
        directory / HF_DIR, make_vocab_size_divisible_by=metadata["make_vocab_size_divisible_by"]
    )
    return ModelCheckpoint(directory, spec, getattr(torch, metadata["params_dtype"]))


def require_save_dependencies() -> None:
    """Raise, naming the package, when megatron's file writer cannot run: its worker processes
    measure their memory with psutil, and without it each worker raises before it reports, so
    the save waits for them forever. Call it before any work (the trainer does)."""
    try:
        import psutil  # noqa: F401
    except ImportError:
        raise RuntimeError("saving checkpoints needs psutil (megatron's checkpoint file writer "
                           "uses it): pip install psutil") from None


def parallel_save_strategy():
    """megatron's default sharded save strategy, spread over the data-parallel group (with
    context parallelism) so that replicated weights are written by all its ranks."""
    require_save_dependencies()
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )

    return FullyParallelSaveStrategyWrapper(
        get_default_save_sharded_strategy(),
        parallel_state.get_data_parallel_group(with_context_parallel=True))


@torch.no_grad()
def save_model_checkpoint(
    model: nn.Module, spec: ModelSpec, directory: str | Path, *, hf_source: str | Path,
    async_save: bool = False,
):
    """Every rank of the job: write ``model`` into the empty or missing ``directory``.

    ``hf_source`` is the HF checkpoint the model came from; its non-weight files are kept. The
    weights are written by every data-parallel rank (``parallel_save_strategy``). Returns None,
    or with ``async_save`` megatron's ``AsyncRequest`` that writes the weight files (see the
    module docstring); the checkpoint is complete once it has run.
    """
    directory = Path(directory)
    params_dtype = next(model.parameters()).dtype
    if dist.get_rank() == 0:
        (directory / WEIGHTS_DIR).mkdir(parents=True, exist_ok=True)
        (directory / HF_DIR).mkdir(exist_ok=True)
        for source in non_weight_files(Path(hf_source)):
            shutil.copy2(source, directory / HF_DIR / source.name)
        metadata = {
            "format": FORMAT,
            "version": VERSION,
            "params_dtype": str(params_dtype).removeprefix("torch."),
            "make_vocab_size_divisible_by": spec.make_vocab_size_divisible_by,
            "saved_layout": {
                "tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
                "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
                "expert_parallel": parallel_state.get_expert_model_parallel_world_size(),
            },
        }
        (directory / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
    dist.barrier()
    with compat.dist_checkpoint_save_on_cpu():
        return dist_checkpointing.save(
            model.sharded_state_dict(), str(directory / WEIGHTS_DIR),
            sharded_strategy=parallel_save_strategy(), async_sharded_save=async_save)


def check_distcp_files(directory: str | Path) -> None:
    """Raise CheckpointError naming the file if a ``torch_dist`` directory's index is unreadable
    or one of its data files is missing or shorter than the index says (a truncated copy, a full
    disk). Reads only the index and file sizes, so every rank can check before the collective
    load, which would otherwise fail on some ranks while the others wait."""
    directory = Path(directory)
    index = directory / ".metadata"
    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
    except FileNotFoundError:
        raise CheckpointError(f"{index}: missing (the index of a distributed checkpoint)") from None
    except Exception as error:  # noqa: BLE001 - a damaged pickle raises many kinds
        raise CheckpointError(f"{index}: unreadable ({type(error).__name__}: {error})") from None
    needed: dict[str, int] = {}
    for item in metadata.storage_data.values():
        end = item.offset + item.length
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {index})")
        if file.stat().st_size < size:
            raise CheckpointError(f"{file}: truncated, {file.stat().st_size} bytes where the "
                                  f"index needs {size}")


@torch.no_grad()
def load_model_weights(model: nn.Module, directory: str | Path) -> None:
    """Every rank of the job: copy the checkpoint's weights into this rank's shard of ``model``."""
    weights = str(Path(directory) / WEIGHTS_DIR)
    check_distcp_files(weights)
    state = dist_checkpointing.load(model.sharded_state_dict(), weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{weights}: missing {', '.join(missing) or 'nothing'}; "
            f"unexpected {', '.join(unexpected) or 'nothing'}"
        )


def load_model_checkpoint(
    directory: str | Path, *, backend: Literal["auto", "te", "local"] = "auto"
) -> LoadedModel:
    """Every rank of the job: this rank's GPTModel, in the saved dtype, with the saved weights."""
    checkpoint = read_model_checkpoint(directory)
    chosen = select_backend(backend, checkpoint.params_dtype)
    model = build_gpt_model(
        checkpoint.spec,
        backend=chosen,
        params_dtype=checkpoint.params_dtype,
        perform_initialization=False,
    )
    load_model_weights(model, directory)
    return LoadedModel(model=model, spec=checkpoint.spec, backend=chosen)
