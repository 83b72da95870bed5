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
from tests.numerics import accuracy_failure


def _worker(rank, world_size, checkpoints):
    batch = make_batch(7, seed=3)
    config = ActorConfig(max_tokens_per_micro_batch=48, temperature=0.7)
    failures = []
    for case, path in checkpoints.items():
        # megatron in fp32 is held to transformers' own fp32 error against transformers in
        # float64 (tests/numerics.py)
        baseline = hf_logprobs(path, batch, temperature=0.7)
        expected = hf_logprobs(path, batch, temperature=0.7, dtype=torch.float64)
        for tp, pp in ((1, 1), (2, 1), (1, 2)):
            with model_parallel(tp, pp):
                loaded = load_hf_model(path, params_dtype=torch.float32)
                runner = (Actor if tp == 1 else ReferenceModel)(
                    loaded.model, loaded.spec, config, loaded.backend)
                assert len(runner.micro_batches(batch)) > 1  # really micro-batched
                result = runner.compute_logprobs_and_entropy(batch)
                assert result.mask.tolist() == batch.response_layout_mask().tolist()
                for i, (logp, entropy, scale) in enumerate(expected):
                    n = logp.numel()
                    assert bool(result.mask[i, :n].all()) and not bool(result.mask[i, n:].any())
                    for name, got, base, want in (
                            ("logp", result.logp[i, :n], baseline[i][0], logp),
                            ("entropy", result.entropy[i, :n], baseline[i][1], entropy)):
                        failures.append(accuracy_failure(f"{case} tp={tp} pp={pp} seq {i} {name}",
                                                         got, base, want, scale=scale))
                    assert torch.all(result.logp[i, n:] == 0)
    failures = [f for f in failures if f]
    assert not failures, "; ".join(failures)


def test_logprobs_and_entropy_match_transformers(tmp_path):
    cases = ("qwen3", "qwen2_tied")
    checkpoints = {case: write_checkpoint(tmp_path / case, case) for case in cases}
    run_distributed(_worker, 2, checkpoints)
