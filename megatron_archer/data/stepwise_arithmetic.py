"""A reasoning-shaped synthetic task: multi-step arithmetic, answered step by step.

A problem is an expression of ``+ - *`` on integers in [1, max_operand] with the usual precedence
and no brackets, e.g. ``3 + 4 * 2 - 5``. Its solution reduces the expression one operation per
line, products first (leftmost first), then sums and differences left to right, and ends with the
answer in ``\\boxed{}``::

    4*2=8
    3+8=11
    11-5=6
    \\boxed{6}

Most tokens follow from what came before (operands copied from the expression or from the
previous line, ``=``, the newline, the boxed copy of the last result); the few genuine choices are
the digits of each result. That is the entropy structure the papers describe for LLM reasoning:
a minority of "forking" positions among many near-deterministic ones.

Splits: every expression belongs to ``train`` or ``eval`` by a hash of its text
(``data.splits.split_of``), so evaluation problems are different expressions from the warm-start
and RL problems by construction, not a separate draw of the same ones. Problem i of a stream
depends only on (seed, split, difficulty, i), identically on every machine.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from megatron_archer.data.records import PromptRecord
from megatron_archer.data.splits import SPLITS, split_of
from megatron_archer.rewards.synthetic import PROMPT

STEPWISE_DATA_SOURCE = "stepwise_arithmetic"  # the built-in reward of the same name checks these
OPERATORS = "+-*"
_PROMPT_HEAD, _PROMPT_TAIL = PROMPT.format(expression="\0").split("\0")
_MAX_DRAWS = 10_000  # rejection sampling per problem; a split this rare is a configuration error


@dataclass(frozen=True)
class StepwiseProblem:
    """A prompt, its expression, the exact integer answer (as text) and the step-by-step solution."""

    prompt: str
    expression: str
    answer: str
    solution: str


def solve(expression: str) -> tuple[list[str], int]:
    """The lines ``a*b=c`` that reduce ``expression`` (tokens separated by single spaces), the
    leftmost product first while there is one, then the leftmost sum or difference; and its value."""
    tokens = expression.split(" ")
    if len(tokens) % 2 == 0 or any(tokens[i] not in OPERATORS for i in range(1, len(tokens), 2)):
        raise ValueError(f"expression {expression!r} is not 'a op b op c ...' with op in + - *")
    values = [int(t) for t in tokens[0::2]]
    operators = tokens[1::2]
    steps = []
    while operators:
        i = operators.index("*") if "*" in operators else 0
        a, op, b = values[i], operators[i], values[i + 1]
        result = a * b if op == "*" else a + b if op == "+" else a - b
        steps.append(f"{a}{op}{b}={result}")
        values[i:i + 2] = [result]
        del operators[i]
    return steps, values[0]


def solution_text(expression: str) -> str:
    """The full response the warm start teaches: one step per line, then ``\\boxed{answer}``."""
    steps, value = solve(expression)
    return "\n".join([*steps, f"\\boxed{{{value}}}"])


def expression_of(question: str) -> str:
    """The expression of a prompt this module wrote (``PROMPT`` around it)."""
    if not (question.startswith(_PROMPT_HEAD) and question.endswith(_PROMPT_TAIL)):
        raise ValueError(f"not a stepwise arithmetic prompt: {question!r}")
    return question[len(_PROMPT_HEAD):len(question) - len(_PROMPT_TAIL)]


def solution_target(record: PromptRecord) -> str:
    """The warm-start target of a prompt record of this task (``quickstart.warm_start``)."""
    return solution_text(expression_of(record.question))


def stepwise_problems(n: int, split: str, seed: int = 0, min_operations: int = 2,
                      max_operations: int = 3, max_operand: int = 9,
                      eval_fraction: float = 0.2) -> list[StepwiseProblem]:
    """``n`` problems of ``split`` with min..max operations (uniform); see the module docstring."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if not 1 <= min_operations <= max_operations:
        raise ValueError(f"need 1 <= min_operations <= max_operations; got {min_operations}, "
                         f"{max_operations}")
    if max_operand < 1:
        raise ValueError(f"max_operand must be at least 1, got {max_operand}")
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1); got {eval_fraction}")
    key = f"stepwise:{seed}:{split}:{min_operations}:{max_operations}:{max_operand}:{eval_fraction}"
    return [_problem(random.Random(f"{key}:{i}"), split, min_operations, max_operations,
                     max_operand, eval_fraction) for i in range(n)]


def _problem(rng: random.Random, split: str, min_operations: int, max_operations: int,
             max_operand: int, eval_fraction: float) -> StepwiseProblem:
    """Draw expressions until one lies in ``split``."""
    for _ in range(_MAX_DRAWS):
        count = rng.randint(min_operations, max_operations)
        parts = [str(rng.randint(1, max_operand))]
        for _ in range(count):
            parts += [rng.choice(OPERATORS), str(rng.randint(1, max_operand))]
        expression = " ".join(parts)
        if split_of(expression, eval_fraction) == split:
            return StepwiseProblem(PROMPT.format(expression=expression), expression,
                                   str(solve(expression)[1]), solution_text(expression))
    raise ValueError(f"no {split} expression in {_MAX_DRAWS} draws (eval_fraction "
                     f"{eval_fraction}, max_operand {max_operand})")


def write_stepwise_jsonl(path: str | os.PathLike, problems: list[StepwiseProblem]) -> Path:
    """``problems`` as generic-schema lines {prompt, answer, data_source}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for p in problems:
            out.write(json.dumps({"prompt": p.prompt, "answer": p.answer,
                                  "data_source": STEPWISE_DATA_SOURCE}) + "\n")
    return path
