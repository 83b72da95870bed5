"""Evaluation as the papers report it: k samples per problem at temperature 1 with the local
engine; avg@k = mean over problems of the share of correct samples, pass@k = share of problems
with at least one correct sample (exact with n = k samples), mean response length in tokens.
A sample is correct when its reward is > 0 (``rollout_phase.RolloutBatch.metrics``'s accuracy).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from megatron_archer.data import load_prompt_set
from megatron_archer.models import require_hf_model_dir
from megatron_archer.rollout import LocalEngine
from megatron_archer.trainer.config import ExperimentConfig
from megatron_archer.trainer.loop import load_tokenizer
from megatron_archer.trainer.progress import progress
from megatron_archer.trainer.reward_scoring import RewardScorer


def evaluate(config: ExperimentConfig, k: int = 8, limit: int | None = None,
             model_path: str | None = None) -> dict[str, float]:
    """avg@k, pass@k and mean length of ``model_path`` (default ``config.model.path``) on the
    config's data set (its first ``limit`` problems), in batches of ``rollout.prompts_per_step``."""
    if k < 1 or (limit is not None and limit < 1):
        raise ValueError(f"k and limit must be >= 1; got k={k}, limit={limit}")
    require_hf_model_dir(model_path or config.model.path, "--model" if model_path else "model.path")
    tokenizer = load_tokenizer(config)
    prompts = list(load_prompt_set(config.data, tokenizer).prompts)[:limit]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = LocalEngine(model_path or config.model.path, device=device,
                         dtype=getattr(torch, config.rollout.dtype))
    stop = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    params = replace(config.rollout.sampling_params(stop, config.train.seed), n=k,
                     temperature=1.0, top_p=1.0, top_k=-1)
    scorer = RewardScorer(config.reward, tokenizer)
    size = config.rollout.prompts_per_step
    correct, lengths = [], []
    for start in progress(range(0, len(prompts), size), config.logging.progress, desc="eval",
                          unit="batch"):
        batch = prompts[start:start + size]
        samples = engine.generate([list(p.input_ids) for p in batch], params)
        flat = [s for group in samples for s in group]
        results = scorer.score([p for p in batch for _ in range(k)], [s.token_ids for s in flat])
        correct.extend([r.value > 0 for r in results[i * k:(i + 1) * k]] for i in range(len(batch)))
        lengths.extend(len(s.token_ids) for s in flat)
    return {
        f"avg@{k}": sum(sum(c) / k for c in correct) / len(correct),
        f"pass@{k}": sum(any(c) for c in correct) / len(correct),
        "mean_response_length": sum(lengths) / len(lengths),
        "problems": len(correct),
        "k": k,
    }
