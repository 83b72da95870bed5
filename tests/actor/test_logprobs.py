"""Actor log-probs and entropy of packed variable-length batches equal a float64 log_softmax of
transformers' logits (each sequence run alone, positions from 0), at TP 1, TP 2 and PP 2."""

from __future__ import annotations

import torch

from megatron_archer.actor import Actor, ActorConfig, ReferenceModel
from megatron_archer.models import load_hf_model
from tests.actor.common import hf_logprobs, make_batch
from tests.distributed import run_distributed
from tests.models.checkpoints import write_checkpoint
from tests.models.parallel import model_parallel

# fp32 model vs float64 reference of fp32 HF logits: observed ~1e-5 (TP changes summation order)
TOLERANCE = 1e-4


def _worker(rank, world_size, checkpoints):
    batch = make_batch(7, seed=3)
    config = ActorConfig(max_tokens_per_micro_batch=48, temperature=0.7)
    failures = []
    for case, path in checkpoints.items():
        expected = hf_logprobs(path, batch, temperature=0.7)
        for tp, pp in ((1, 1), (2, 1), (1, 2)):
            with model_parallel(tp, pp):
                loaded = load_hf_model(path, params_dtype=torch.float32)
                runner = (Actor if tp == 1 else ReferenceModel)(
                    loaded.model, loaded.spec, config, loaded.backend)
                assert len(runner.micro_batches(batch)) > 1  # really micro-batched
                result = runner.compute_logprobs_and_entropy(batch)
                assert result.mask.tolist() == batch.response_layout_mask().tolist()
                for i, (logp, entropy) in enumerate(expected):
                    n = logp.numel()
                    assert bool(result.mask[i, :n].all()) and not bool(result.mask[i, n:].any())
                    for name, got, want in (("logp", result.logp[i, :n], logp),
                                            ("entropy", result.entropy[i, :n], entropy)):
                        diff = (got.double() - want).abs().max().item()
                        if diff > TOLERANCE:
                            failures.append(f"{case} tp={tp} pp={pp} seq {i} {name}: {diff:.3g}")
                    assert torch.all(result.logp[i, n:] == 0)
    assert not failures, "; ".join(failures)


def test_logprobs_and_entropy_match_transformers(tmp_path):
    cases = ("qwen3", "qwen2_tied")
    checkpoints = {case: write_checkpoint(tmp_path / case, case) for case in cases}
    run_distributed(_worker, 2, checkpoints)
