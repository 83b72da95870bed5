"""Logits of the megatron model equal transformers' own forward, at tensor parallel 1 and 2;
so do the gradients of a loss on them (every parameter, mapped back to its HF tensor). Equal means
as accurate against transformers in float64 as transformers in float32 is (tests/numerics.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import transformers
from megatron.core import parallel_state

from megatron_archer.models import load_hf_model
from megatron_archer.models.weight_map import (
    Layout,
    from_shards,
    global_named_parameters,
    weight_mappings,
)
from tests.distributed import run_distributed
from tests.models.checkpoints import CASES, hf_logits, write_checkpoint
from tests.models.parallel import gather_vocab, model_parallel
from tests.numerics import accuracy_failure

# what the llama3 guard must exceed: far above any float32 rounding of these logits (|z| < 100)
TOLERANCE = 1e-4


def _parity_worker(rank: int, world_size: int, checkpoints: dict) -> None:
    input_ids = torch.randint(0, 250, (2, 32), generator=torch.Generator().manual_seed(1))
    position_ids = torch.arange(32).expand(2, 32)
    failures = []
    for tp in (1, 2):
        with model_parallel(tp):
            for case, path in checkpoints.items():
                loaded = load_hf_model(path, params_dtype=torch.float32)
                loaded.model.eval()
                with torch.no_grad():
                    local = loaded.model(input_ids, position_ids, None)
                vocab = loaded.spec.vocab_size
                assert local.shape == (2, 32, loaded.spec.padded_vocab_size(tp) // tp)
                logits = gather_vocab(local)
                failures.append(accuracy_failure(
                    f"{case} tp={tp} logits", logits[..., :vocab], hf_logits(path, input_ids),
                    hf_logits(path, input_ids, torch.float64)))
                assert torch.all(logits[..., vocab:] == 0), "padding rows must stay zero"
    failures = [f for f in failures if f]
    assert not failures, "; ".join(failures)


def _hf_grads(loaded) -> dict[str, torch.Tensor]:
    """The megatron gradients, gathered over tensor parallelism and named as HF tensors.

    q/k layernorm weights are replicated but each rank only sees its own heads: megatron sums
    their gradients over the tensor-parallel group in ``finalize_model_grads`` after backward
    (the training step's job, not the model's), so the comparison does the same.
    """
    group = parallel_state.get_tensor_model_parallel_group()
    local = global_named_parameters(loaded.model)
    grads = {}
    for mapping in weight_mappings(loaded.spec, loaded.backend):
        grad = local[mapping.megatron_name].grad
        if "q_layernorm" in mapping.megatron_name or "k_layernorm" in mapping.megatron_name:
            dist.all_reduce(grad, group=group)
        shards = [grad]
        if mapping.layout is not Layout.REPLICATED:
            shards = [torch.empty_like(grad) for _ in range(dist.get_world_size(group))]
            dist.all_gather(shards, grad, group=group)
        grads.update(zip(mapping.hf_names, from_shards(mapping, shards, loaded.spec)))
    return grads


def _gradient_worker(rank: int, world_size: int, checkpoints: dict) -> None:
    input_ids = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(2))
    weights = torch.randn(2, 16, 250, generator=torch.Generator().manual_seed(3))
    padded = torch.nn.functional.pad(weights, (0, 6))  # zero weight on the 6 padding columns
    failures = []
    with model_parallel(2):
        for case, path in checkpoints.items():
            references = [transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
                          for dtype in (torch.float32, torch.float64)]
            for reference in references:
                (reference(input_ids=input_ids).logits * weights.to(reference.dtype)).sum().backward()
            loaded = load_hf_model(path, params_dtype=torch.float32)
            local = loaded.model(input_ids, torch.arange(16).expand(2, 16), None)
            # each rank's loss term on its vocab shard; megatron's backward sums over ranks
            (local * padded.chunk(2, dim=-1)[rank]).sum().backward()
            failures.extend(accuracy_failure(f"{case} {name}", grad, *(
                reference.get_parameter(name).grad for reference in references))
                for name, grad in _hf_grads(loaded).items())
    failures = [f for f in failures if f]
    assert not failures, "; ".join(failures)


def test_gradients_match_transformers_tp2(tmp_path):
    checkpoints = {case: write_checkpoint(tmp_path / case, case) for case in CASES}
    run_distributed(_gradient_worker, 2, checkpoints)


def test_logits_match_transformers_tp1_tp2(tmp_path):
    checkpoints = {case: write_checkpoint(tmp_path / case, case) for case in CASES}
    run_distributed(_parity_worker, 2, checkpoints)


def test_llama3_rope_scaling_is_visible_in_the_parity_inputs(tmp_path):
    """Guard against a vacuous parity test: on these inputs, dropping llama3 scaling from the
    reference changes the logits far beyond the tolerance."""
    scaled = write_checkpoint(tmp_path / "scaled", "llama3")
    plain = write_checkpoint(
        tmp_path / "plain", "llama3", rope_parameters={"rope_type": "default", "rope_theta": 5e5}
    )
    input_ids = torch.randint(0, 250, (2, 32), generator=torch.Generator().manual_seed(1))
    difference = (hf_logits(scaled, input_ids) - hf_logits(plain, input_ids)).abs().max()
    assert difference > 10 * TOLERANCE
