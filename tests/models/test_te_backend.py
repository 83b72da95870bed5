"""The Transformer Engine path: fp8 reaches megatron's config (any machine); TE-spec logits
and export match transformers / the checkpoint (CUDA with transformer_engine only, skipped
elsewhere)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from megatron_archer import compat
from megatron_archer.models import (
    ModelSpec,
    hf_weight_buckets,
    load_hf_model,
    transformer_config,
)
from megatron_archer.models.layer_spec import transformer_engine_available
from tests.distributed import run_distributed
from tests.models.checkpoints import hf_config, hf_logits, write_checkpoint
from tests.models.parallel import model_parallel

needs_te = pytest.mark.skipif(
    not (torch.cuda.is_available() and transformer_engine_available()),
    reason="Transformer Engine spec needs CUDA and transformer_engine",
)


def _fp8_worker(rank: int, world_size: int) -> None:
    spec = ModelSpec.from_hf_config(hf_config("qwen3", architectures=["Qwen3ForCausalLM"]))
    with model_parallel(1):
        config = transformer_config(spec, backend="te", params_dtype=torch.bfloat16, fp8="hybrid")
    assert (config.fp8, config.bf16, config.params_dtype) == ("hybrid", True, torch.bfloat16)


def test_fp8_option_reaches_transformer_config():
    run_distributed(_fp8_worker, 1)


def _te_worker(rank: int, world_size: int, checkpoints: dict) -> None:
    torch.cuda.set_device(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    input_ids = torch.randint(0, 250, (2, 32), generator=torch.Generator().manual_seed(1))
    with model_parallel(1):
        compat.model_parallel_seed(1234)
        for case, path in checkpoints.items():
            loaded = load_hf_model(path, backend="te", params_dtype=torch.float32)
            assert loaded.backend == "te"
            loaded.model.eval()
            ids = input_ids.cuda()
            with torch.no_grad():
                logits = loaded.model(ids, torch.arange(32, device="cuda").expand(2, 32), None)
            diff = (logits[..., :250].cpu() - hf_logits(path, input_ids)).abs().max().item()
            assert diff < 1e-3, f"{case}: max |diff| {diff:.3g}"
            original = load_file(path / "model.safetensors")
            exported = [pair for bucket in hf_weight_buckets(loaded.model, loaded.spec, "te")
                        for pair in bucket]  # fmt: skip
            assert {name for name, _ in exported} == set(original)
            for name, tensor in exported:
                assert torch.equal(tensor.cpu(), original[name]), f"{case} {name}"


@needs_te
def test_te_spec_logits_and_export(tmp_path):
    checkpoints = {
        case: write_checkpoint(tmp_path / case, case) for case in ("qwen2", "qwen3", "llama3")
    }
    run_distributed(_te_worker, 1, checkpoints)
