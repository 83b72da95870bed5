"""A tiny run directory for trainer tests: Qwen3 checkpoint with the tiny tokenizer, arithmetic data."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from megatron_archer.data import build_tiny_tokenizer, write_arithmetic_jsonl
from megatron_archer.rollout import Sample
from megatron_archer.trainer.rollout_phase import Group
from tests.models.checkpoints import write_checkpoint

CPU_CONFIG = Path(__file__).parents[2] / "examples" / "configs" / "archer_arithmetic_cpu.yaml"


def tiny_run(tmp_path: Path, prompts: int = 32, case: str = "qwen3") -> list[str]:
    """Write the model (tests/models/checkpoints.py's ``case``) and data under ``tmp_path``; the
    overrides pointing the CPU config at them."""
    tokenizer = build_tiny_tokenizer()
    model = write_checkpoint(tmp_path / "model", case, vocab_size=len(tokenizer))
    tokenizer.save_pretrained(model)
    data = write_arithmetic_jsonl(tmp_path / "arithmetic.jsonl", prompts)
    return [f"model.path={model}", f"data.path={data}", f"logging.dir={tmp_path / 'run'}",
            "logging.progress=false"]


def random_groups(num_groups: int, n: int, seed: int, max_length: int = 13,
                  engine_logprobs: bool = True) -> list[Group]:
    """Random 4-token prompts with ``n`` responses of 1..``max_length`` tokens (vocabulary 250),
    rewards alternating 0/1 (every group has a signal); the engine's log-probs are random
    negatives, or 0 with ``engine_logprobs=False`` (the test sets its own)."""
    g = torch.Generator().manual_seed(seed)
    groups = []
    for _ in range(num_groups):
        prompt = SimpleNamespace(input_ids=tuple(torch.randint(0, 250, (4,), generator=g).tolist()))
        samples = []
        for _ in range(n):
            length = int(torch.randint(1, max_length + 1, (), generator=g))
            logprobs = (-torch.rand(length, generator=g)).tolist() if engine_logprobs \
                else [0.0] * length
            samples.append(Sample(token_ids=torch.randint(0, 250, (length,), generator=g).tolist(),
                                  logprobs=logprobs, finish_reason="stop"))
        rewards = [float(k % 2) for k in range(n)]
        groups.append(Group(prompt, samples, rewards, rewards))
    return groups
