"""Export of a loaded model reproduces the checkpoint bit for bit, in bounded buckets,
at tensor parallel 2 and pipeline parallel 2 (gathered and broadcast to every rank)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from megatron_archer.models import hf_weight_buckets, load_hf_model
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


def _export_worker(rank: int, world_size: int, checkpoints: list) -> None:
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        with model_parallel(tp, pp):
            for checkpoint in checkpoints:
                loaded = load_hf_model(checkpoint)
                _check_export(checkpoint, loaded, f"{checkpoint.name} tp={tp} pp={pp}")


def test_export_reproduces_checkpoint_bitwise(tmp_path):
    checkpoints = [
        write_checkpoint(tmp_path / "qwen2", "qwen2"),
        write_checkpoint(tmp_path / "qwen2_tied_bf16", "qwen2_tied", dtype=torch.bfloat16),
        write_checkpoint(tmp_path / "qwen3", "qwen3"),
        write_checkpoint(tmp_path / "llama3", "llama3"),
    ]
    run_distributed(_export_worker, 2, checkpoints)
