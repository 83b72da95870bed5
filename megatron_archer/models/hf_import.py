"""Load a Hugging Face safetensors checkpoint into this rank's shard of a megatron GPTModel.

Every rank reads only the tensors of its own pipeline stage (memory-mapped; of a
mixture-of-experts layer, only its own experts) and keeps its tensor-parallel (for an expert,
expert-tensor-parallel) shard. The checkpoint is checked as a whole before anything is written: a
missing, unexpected or wrongly shaped tensor is an error that names it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from torch import nn

from megatron_archer.models.builder import build_gpt_model
from megatron_archer.models.layer_spec import Backend, select_backend
from megatron_archer.models.spec import ModelSpec
from megatron_archer.models.weight_map import (
    global_named_parameters,
    shard_group,
    tied_output_mapping,
    to_shard,
    weight_mappings,
)

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
# Buffers some exporters wrote into checkpoints; megatron recomputes them.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """The checkpoint does not hold the tensors the config describes."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def require_hf_model_dir(path: str | Path, field: str) -> Path:
    """``path`` as a Hugging Face model directory (it holds config.json), or an error naming
    ``field``: a missing path, or one of this project's own checkpoints (a model checkpoint, or
    a trainer checkpoint's step directory) with the command that converts it."""
    from megatron_archer.models.dist_checkpoint import METADATA  # it imports this module

    path = Path(path)
    for model in (path, path / "model"):
        if (model / METADATA).is_file():
            raise ValueError(
                f"{field} {path} is a megatron-archer checkpoint, not a Hugging Face model: "
                f"convert it first: megatron-archer convert megatron-to-hf --megatron {model} "
                f"--out HF_DIR")
    if not path.is_dir():
        raise FileNotFoundError(f"{field} {path} does not exist or is not a directory")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{field} {path} has no config.json: not a Hugging Face model "
                                f"directory")
    return path


def require_tokenizer_dir(path: str | Path, field: str) -> Path:
    """``path`` holding a tokenizer's vocabulary (one of TOKENIZER_FILES), or FileNotFoundError
    naming ``field``: without one transformers builds an empty tokenizer and the run fails later
    on empty prompts."""
    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{field} {path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): save the "
            f"tokenizer there (tokenizer.save_pretrained) or point model.tokenizer at one")
    return path


class SafetensorsCheckpoint:
    """The tensors of a checkpoint directory: one ``model.safetensors`` or an index of shards."""

    def __init__(self, checkpoint_dir: str | Path):
        root = Path(checkpoint_dir)
        if (root / _INDEX).is_file():
            try:
                weight_map = json.loads((root / _INDEX).read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as error:
                raise CheckpointError(f"{root / _INDEX} is not a safetensors index ({error})") \
                    from None
            self._files = {name: root / file for name, file in weight_map.items()}
            for file in sorted(set(self._files.values())):
                with _open_safetensors(file):
                    pass
        elif (root / _SINGLE).is_file():
            with _open_safetensors(root / _SINGLE) as f:
                self._files = {name: root / _SINGLE for name in f.keys()}
        else:
            raise FileNotFoundError(f"{root}: neither {_INDEX} nor {_SINGLE} found")

    def names(self) -> set[str]:
        return set(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        with _open_safetensors(self._files[name]) as f:
            return tuple(f.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        with _open_safetensors(self._files[name]) as f:
            try:
                return f.get_tensor(name)
            except Exception as error:  # noqa: BLE001 - safetensors' own error types vary
                raise CheckpointError(f"{self._files[name]}: tensor {name} cannot be read "
                                      f"({error}); the file is truncated or damaged") from None


def _open_safetensors(path: Path):
    """``safe_open(path)``, or CheckpointError naming the file when it is missing, truncated,
    empty or not safetensors at all."""
    try:
        return safe_open(path, framework="pt")
    except Exception as error:  # noqa: BLE001 - SafetensorError is not a ValueError
        raise CheckpointError(f"{path} is not a readable safetensors file ({error}): it is "
                              f"truncated, empty or damaged") from None


def check_checkpoint(checkpoint: SafetensorsCheckpoint, spec: ModelSpec, backend: Backend) -> None:
    """Every tensor the spec needs is present with its shape, and nothing else is there."""
    mappings = weight_mappings(spec, backend)
    expected = {n: s for m in mappings for n, s in zip(m.hf_names, m.hf_shapes)}
    present = checkpoint.names()
    missing = sorted(set(expected) - present)
    if missing:
        raise CheckpointError(f"missing from the checkpoint: {', '.join(missing)}")
    tolerated = {"lm_head.weight"} if spec.tie_word_embeddings else set()
    unexpected = sorted(
        n for n in present - set(expected) - tolerated if not n.endswith(_IGNORED_SUFFIXES)
    )
    if unexpected:
        raise CheckpointError(f"not used by {spec.architecture}: {', '.join(unexpected)}")
    for name, shape in expected.items():
        found = checkpoint.shape(name)
        if found != tuple(shape):
            raise CheckpointError(
                f"{name}: checkpoint has shape {list(found)}, the config implies {list(shape)}"
            )


@torch.no_grad()
def load_hf_weights(
    model: nn.Module, spec: ModelSpec, backend: Backend, checkpoint_dir: str | Path
) -> None:
    """Copy the checkpoint into ``model`` (this rank's stage and shard), every parameter."""
    checkpoint = SafetensorsCheckpoint(checkpoint_dir)
    check_checkpoint(checkpoint, spec, backend)
    by_name = {m.megatron_name: m for m in weight_mappings(spec, backend)}
    if spec.tie_word_embeddings:
        by_name.setdefault("output_layer.weight", tied_output_mapping(spec))
    for name, param in global_named_parameters(model).items():
        mapping = by_name.get(name)
        if mapping is None:
            raise CheckpointError(f"megatron parameter {name} has no Hugging Face mapping")
        hf = [checkpoint.get(n) for n in mapping.hf_names]
        shard = to_shard(mapping, hf, spec, *shard_group(mapping))
        if shard.shape != param.shape:
            raise CheckpointError(
                f"{name}: shard from {', '.join(mapping.hf_names)} has shape "
                f"{list(shard.shape)}, the model parameter {list(param.shape)}"
            )
        param.copy_(shard)


@dataclass
class LoadedModel:
    """A megatron model built from a checkpoint, with what its import and export need."""

    model: nn.Module
    spec: ModelSpec
    backend: Backend


def load_hf_model(
    checkpoint_dir: str | Path,
    *,
    backend: Literal["auto", "te", "local"] = "auto",
    params_dtype: torch.dtype | None = None,
    fp8: Literal["e4m3", "hybrid"] | None = None,
    make_vocab_size_divisible_by: int = 128,
    config_overrides: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Spec from config.json, this rank's GPTModel, weights from the safetensors."""
    spec = ModelSpec.from_pretrained(
        checkpoint_dir, make_vocab_size_divisible_by=make_vocab_size_divisible_by
    )
    chosen = select_backend(backend, params_dtype or spec.dtype)
    model = build_gpt_model(
        spec,
        backend=chosen,
        params_dtype=params_dtype,
        fp8=fp8,
        perform_initialization=False,
        config_overrides=config_overrides,
    )
    load_hf_weights(model, spec, chosen, checkpoint_dir)
    return LoadedModel(model=model, spec=spec, backend=chosen)
