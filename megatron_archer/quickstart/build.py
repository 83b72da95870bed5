"""The quick start's inputs, built offline: a tiny random Qwen3 checkpoint with the tiny tokenizer,
and the step-by-step arithmetic sets (warm start, RL prompts, held-out evaluation)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from megatron_archer.data import build_tiny_tokenizer
from megatron_archer.data.stepwise_arithmetic import (
    expression_of,
    stepwise_problems,
    write_stepwise_jsonl,
)


def build_base_model(out: str | Path, *, hidden: int = 128, layers: int = 2, heads: int = 4,
                     kv_heads: int = 2, head_dim: int = 32, intermediate: int = 384,
                     seed: int = 0) -> Path:
    """A randomly initialised (seeded) Qwen3 model of the given size with the tiny tokenizer,
    saved with ``save_pretrained`` (config.json, model.safetensors, tokenizer files)."""
    out = Path(out)
    tokenizer = build_tiny_tokenizer()
    config = transformers.Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, max_position_embeddings=256, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@dataclass(frozen=True)
class QuickstartData:
    """The jsonl files of the step-by-step task (generic schema, ``data_source:
    stepwise_arithmetic``). ``seen`` is the first ``eval`` RL problems: the same measurement on
    expressions RL trains on, for contrast with the held-out ``eval``."""

    sft: Path
    rl: Path
    eval: Path
    seen: Path


def write_datasets(out: str | Path, *, sft: int, rl: int, eval: int, min_operations: int = 2,
                   max_operations: int = 3, max_operand: int = 9, eval_fraction: float = 0.2,
                   seed: int = 0) -> QuickstartData:
    """Warm-start and RL problems from the ``train`` split of the step-by-step task's stream of
    ``seed`` (the RL set is the first ``rl`` of it), ``eval`` problems from its ``eval`` split,
    and ``seen`` (``QuickstartData``). The split is of the expression space (by a hash of the
    text), so no evaluation expression occurs in the warm-start or RL data, whatever the seed."""
    out = Path(out)
    difficulty = {"min_operations": min_operations, "max_operations": max_operations,
                  "max_operand": max_operand, "eval_fraction": eval_fraction}
    train = stepwise_problems(max(sft, rl), "train", seed, **difficulty)
    held = stepwise_problems(eval, "eval", seed, **difficulty)
    return QuickstartData(
        sft=write_stepwise_jsonl(out / "sft.jsonl", train[:sft]),
        rl=write_stepwise_jsonl(out / "rl.jsonl", train[:rl]),
        eval=write_stepwise_jsonl(out / "eval.jsonl", held),
        seen=write_stepwise_jsonl(out / "seen.jsonl", train[:min(eval, rl)]))


def file_expressions(path: Path) -> list[str]:
    """The expression of every problem in a jsonl file ``write_datasets`` wrote."""
    return [expression_of(json.loads(line)["prompt"]) for line in path.read_text().splitlines()]


def overlap(data: QuickstartData) -> float:
    """The share of evaluation problems whose expression also occurs in the warm-start or RL
    file (0 by construction; the summary reports it)."""
    seen = set(file_expressions(data.sft)) | set(file_expressions(data.rl))
    expressions = file_expressions(data.eval)
    return sum(e in seen for e in expressions) / max(len(expressions), 1)
