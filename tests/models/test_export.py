"""Export of a loaded model reproduces the checkpoint bit for bit, in bounded buckets,
at tensor parallel 2 and pipeline parallel 2 (gathered and broadcast to every rank); a model
that cannot be sharded or a mismatched checkpoint is refused by load_hf_model on every rank."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_archer.models import (
    CheckpointError,
    UnsupportedModelError,
    hf_weight_buckets,
    load_hf_model,
)
from tests.distributed import run_distributed
from tests.models.checkpoints import write_checkpoint
from tests.models.parallel import model_parallel

BUCKET_BYTES = 40_000  # below the embedding (64 KB fp32): forces oversize and multi-tensor buckets


def _check_export(checkpoint, loaded, layout: str) -> None:
    original = load_file(checkpoint / "model.safetensors")
    exported = []
    for bucket in hf_weight_buckets(loaded.model, loaded.spec, loaded.backend, BUCKET_BYTES):
        nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
        assert len(bucket) == 1 or nbytes <= BUCKET_BYTES, f"{layout}: bucket of {nbytes} bytes"
        exported += bucket
    names = [name for name, _ in exported]
    assert len(names) == len(set(names)), f"{layout}: a tensor was exported twice"
    assert set(names) == set(original), f"{layout}: {set(names) ^ set(original)}"
    for name, tensor in exported:
        expected = original[name]
        assert tensor.dtype == expected.dtype, f"{layout} {name}: dtype {tensor.dtype}"
        assert torch.equal(tensor, expected), f"{layout} {name}: values differ"


def _export_worker(rank: int, world_size: int, checkpoints: list, refused: dict) -> None:
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        with model_parallel(tp, pp):
            for checkpoint in checkpoints:
                loaded = load_hf_model(checkpoint)
                _check_export(checkpoint, loaded, f"{checkpoint.name} tp={tp} pp={pp}")
    # the errors reach the caller of load_hf_model on every rank, before any weight is written
    with model_parallel(2):
        with pytest.raises(UnsupportedModelError, match="num_key_value_heads=1 is not divisible"):
            load_hf_model(refused["one_kv_head"])
        with pytest.raises(CheckpointError, match=r"model\.norm\.weight: checkpoint has shape"):
            load_hf_model(refused["wrong_norm"])


def test_export_round_trip_and_load_refusals(tmp_path):
    checkpoints = [
        write_checkpoint(tmp_path / "qwen2", "qwen2"),
        write_checkpoint(tmp_path / "qwen2_tied_bf16", "qwen2_tied", dtype=torch.bfloat16),
        write_checkpoint(tmp_path / "qwen3", "qwen3"),
        write_checkpoint(tmp_path / "llama3", "llama3"),
    ]
    wrong_norm = write_checkpoint(tmp_path / "wrong_norm", "llama3")
    tensors = load_file(wrong_norm / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(63)
    save_file(tensors, wrong_norm / "model.safetensors", metadata={"format": "pt"})
    refused = {
        "one_kv_head": write_checkpoint(tmp_path / "kv1", "llama3", num_key_value_heads=1),
        "wrong_norm": wrong_norm,
    }
    run_distributed(_export_worker, 2, checkpoints, refused)
