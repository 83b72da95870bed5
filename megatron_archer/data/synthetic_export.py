"""Export the synthetic arithmetic task as a generic-schema jsonl, so the quick start and the tests
read it through the same loader as real data."""

from __future__ import annotations

import json
import os
from pathlib import Path

from megatron_archer.rewards.synthetic import arithmetic_problems

ARITHMETIC_DATA_SOURCE = "arithmetic"  # the built-in reward of the same name checks these answers


def write_arithmetic_jsonl(
    path: str | os.PathLike, n: int, seed: int = 0, num_operations: int = 2, max_operand: int = 9,
) -> Path:
    """Write `n` problems (`arithmetic_problems` arguments) as {prompt, answer, data_source} lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for problem in arithmetic_problems(n, seed, num_operations, max_operand):
            row = {"prompt": problem.prompt, "answer": problem.answer, "data_source": ARITHMETIC_DATA_SOURCE}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
