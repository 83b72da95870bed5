"""The quick start's inputs, built offline: a tiny random Qwen3 checkpoint with the tiny tokenizer,
and three arithmetic sets (warm start, RL prompts, evaluation)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from megatron_archer.data import build_tiny_tokenizer
from megatron_archer.data.synthetic_export import ARITHMETIC_DATA_SOURCE
from megatron_archer.rewards.synthetic import ArithmeticProblem, arithmetic_problems


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
    """The three jsonl files (generic schema, ``data_source: arithmetic``) and their problems."""

    sft: Path
    rl: Path
    eval: Path
    sft_problems: tuple[ArithmeticProblem, ...]


def _write(path: Path, problems) -> Path:
    with path.open("w", encoding="utf-8") as out:
        for p in problems:
            out.write(json.dumps({"prompt": p.prompt, "answer": p.answer,
                                  "data_source": ARITHMETIC_DATA_SOURCE}) + "\n")
    return path


def write_datasets(out: str | Path, *, sft: int, rl: int, eval: int, num_operations: int,
                   max_operand: int, seed: int = 0) -> QuickstartData:
    """Warm-start and RL problems from ``seed`` (the RL set is the first ``rl`` of the same
    stream), the evaluation problems from ``seed + 1``. The task is small (one operation on
    operands up to 9 has 243 distinct expressions), so the evaluation set is a separate draw
    from the same distribution, not unseen expressions: ``overlap`` says how many recur."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train = arithmetic_problems(max(sft, rl), seed, num_operations, max_operand)
    held = arithmetic_problems(eval, seed + 1, num_operations, max_operand)
    return QuickstartData(
        sft=_write(out / "sft.jsonl", train[:sft]), rl=_write(out / "rl.jsonl", train[:rl]),
        eval=_write(out / "eval.jsonl", held), sft_problems=tuple(train[:sft]))


def overlap(data: QuickstartData) -> float:
    """The share of evaluation problems whose expression also occurs in the warm-start set."""
    seen = {p.expression for p in data.sft_problems}
    rows = [json.loads(line) for line in data.eval.read_text().splitlines()]
    expressions = [r["prompt"].split("Compute ", 1)[1].split(". Show", 1)[0] for r in rows]
    return sum(e in seen for e in expressions) / max(len(expressions), 1)
