"""A synthetic verifiable task for the CPU quick start and tests: multi-step integer arithmetic.

`arithmetic_problems(n, seed, ...)` makes n problems like "Compute (7 + 3) * 4 - 5. ..." with their
integer answers. Problem i depends only on (seed, difficulty, i), so the same arguments give the same
problems on every machine and Python version, and a longer list extends a shorter one. Difficulty is
the number of operations and the largest operand. `arithmetic_reward` checks the final answer
(`answer_extraction`) exactly, without the math-verify pool, so it is fast and deterministic.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from megatron_archer.rewards.answer_extraction import extract_final_answer
from megatron_archer.rewards.result import RewardResult, quote

PROMPT = "Compute {expression}. Show your steps, then put the final answer in \\boxed{{}}."
_INTEGER = re.compile(r"[+-]?\d+(?:\.0*)?")


@dataclass(frozen=True)
class ArithmeticProblem:
    """A prompt, the expression it asks about and the exact integer answer (as text)."""

    prompt: str
    expression: str
    answer: str


def arithmetic_problems(
    n: int, seed: int = 0, num_operations: int = 2, max_operand: int = 9
) -> list[ArithmeticProblem]:
    """`n` problems of `num_operations` operations (+, -, *) on integers in [1, max_operand]."""
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if num_operations < 1:
        raise ValueError(f"num_operations must be at least 1, got {num_operations}")
    if max_operand < 1:
        raise ValueError(f"max_operand must be at least 1, got {max_operand}")
    return [
        _problem(random.Random(f"arithmetic:{seed}:{num_operations}:{max_operand}:{i}"), num_operations, max_operand)
        for i in range(n)
    ]


def arithmetic_reward(response: str, answer: str) -> RewardResult:
    """1 when the response's final answer is the integer `answer` ("12", "+12", "12.0" all count)."""
    final = extract_final_answer(response)
    if final is None:
        return RewardResult(0.0, "no final answer found in the response")
    text = final.text.replace(",", "").replace(" ", "").strip("$")
    if not _INTEGER.fullmatch(text):
        return RewardResult(0.0, f"final answer {quote(final.text)} is not an integer")
    if int(float(text)) == int(answer):
        return RewardResult(1.0, f"correct: {quote(final.text)} ({final.source})")
    return RewardResult(0.0, f"wrong: {quote(final.text)} ({final.source}), expected {answer}")


def _problem(rng: random.Random, num_operations: int, max_operand: int) -> ArithmeticProblem:
    """Fold `num_operations` random operations into an expression, bracketing where precedence needs it."""
    value = rng.randint(1, max_operand)
    expression, is_sum = str(value), False
    for _ in range(num_operations):
        operand = rng.randint(1, max_operand)
        operator = rng.choice("+-*")
        if operator == "*" and is_sum:
            expression = f"({expression})"
        if rng.random() < 0.5 or operator == "-":  # the running expression on the left
            expression = f"{expression} {operator} {operand}"
        else:
            expression = f"{operand} {operator} {expression}"
        value = value + operand if operator == "+" else value - operand if operator == "-" else value * operand
        is_sum = operator != "*"
    return ArithmeticProblem(PROMPT.format(expression=expression), expression, str(value))
