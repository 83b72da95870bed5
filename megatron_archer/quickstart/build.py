"""The quick start's inputs, built offline: a tiny random Qwen3 checkpoint with the tiny tokenizer,
and three arithmetic sets (warm start, RL prompts, held-out evaluation)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from megatron_archer.data import build_tiny_tokenizer
from megatron_archer.data.splits import SPLITS, split_of
from megatron_archer.data.stepwise_arithmetic import expression_of
from megatron_archer.data.synthetic_export import ARITHMETIC_DATA_SOURCE
from megatron_archer.rewards.synthetic import ArithmeticProblem, arithmetic_problems

_DRAWS_PER_PROBLEM = 50  # draws of the stream per problem asked before a split counts as too small


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
    """The jsonl files (generic schema, ``data_source: arithmetic``) and the warm-start problems.
    ``seen`` is the first ``eval`` RL problems: the same measurement on expressions RL trains on,
    for contrast with the held-out ``eval``."""

    sft: Path
    rl: Path
    eval: Path
    seen: Path
    sft_problems: tuple[ArithmeticProblem, ...]


def _write(path: Path, problems) -> Path:
    with path.open("w", encoding="utf-8") as out:
        for p in problems:
            out.write(json.dumps({"prompt": p.prompt, "answer": p.answer,
                                  "data_source": ARITHMETIC_DATA_SOURCE}) + "\n")
    return path


def split_problems(n: int, split: str, seed: int, num_operations: int, max_operand: int,
                   eval_fraction: float, *, distinct: bool = False) -> list[ArithmeticProblem]:
    """The first ``n`` problems of the ``arithmetic_problems`` stream of ``seed`` whose expression
    lies in ``split`` (``data.splits.split_of``); with ``distinct``, each expression once. Raises
    when the split's part of the expression space is too small for ``n``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1); got {eval_fraction}")
    limit = _DRAWS_PER_PROBLEM * n
    chosen, seen = [], set()
    for p in arithmetic_problems(limit, seed, num_operations, max_operand):
        if len(chosen) == n:
            break
        if split_of(p.expression, eval_fraction) != split or (distinct and p.expression in seen):
            continue
        chosen.append(p)
        seen.add(p.expression)
    if len(chosen) < n:
        raise ValueError(
            f"only {len(chosen)} {'distinct ' if distinct else ''}{split} problems in {limit} "
            f"draws of {num_operations} operation(s) on 1-{max_operand} at eval_fraction "
            f"{eval_fraction}, {n} asked: raise max_operand or eval_fraction, or ask fewer")
    return chosen


def write_datasets(out: str | Path, *, sft: int, rl: int, eval: int, num_operations: int,
                   max_operand: int, eval_fraction: float, seed: int = 0) -> QuickstartData:
    """Warm-start and RL problems from the ``train`` split of the stream of ``seed`` (the RL set
    is the first ``rl`` of it), ``eval`` distinct evaluation problems from the ``eval`` split of
    the stream of ``seed + 1``, and ``seen`` (``QuickstartData``). The split is of the expression
    space (by a hash of the text), so no evaluation expression occurs in the warm-start or RL
    data, whatever the seed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {"num_operations": num_operations, "max_operand": max_operand,
             "eval_fraction": eval_fraction}
    train = split_problems(max(sft, rl), "train", seed, **sizes)
    held = split_problems(eval, "eval", seed + 1, **sizes, distinct=True)
    return QuickstartData(
        sft=_write(out / "sft.jsonl", train[:sft]), rl=_write(out / "rl.jsonl", train[:rl]),
        eval=_write(out / "eval.jsonl", held),
        seen=_write(out / "seen.jsonl", train[:min(eval, rl)]), sft_problems=tuple(train[:sft]))


def file_expressions(path: Path) -> list[str]:
    """The expression of every problem in a jsonl file ``write_datasets`` wrote."""
    return [expression_of(json.loads(line)["prompt"]) for line in path.read_text().splitlines()]


def overlap(data: QuickstartData) -> float:
    """The share of evaluation problems whose expression also occurs in the warm-start or RL
    file (0 by construction; the summary reports it)."""
    seen = set(file_expressions(data.sft)) | set(file_expressions(data.rl))
    expressions = file_expressions(data.eval)
    return sum(e in seen for e in expressions) / max(len(expressions), 1)
