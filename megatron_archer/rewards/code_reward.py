"""Code reward: the fraction of test cases a response's program passes, each run in the sandbox.

Two kinds of case: `IOCase` feeds stdin and compares stdout (trailing whitespace of each line and
trailing blank lines ignored); `AssertCase` appends assert-style test code to the program, which
passes when the run ends normally and its last output line is a random token printed after the
test code, so a program that exits early (`sys.exit(0)`) does not pass. Every case is a separate
sandboxed run; the cases of a response run in parallel on the sandbox pool
(`code_sandbox.run_many`), and callers may score many responses from a thread pool.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from megatron_archer.rewards.code_sandbox import (
    OK,
    SandboxLimits,
    SandboxResult,
    run_many,
)
from megatron_archer.rewards.result import RewardResult

_CODE_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class IOCase:
    """Run the program on `stdin`; it passes when its stdout matches `expected_stdout`."""

    stdin: str
    expected_stdout: str


@dataclass(frozen=True)
class AssertCase:
    """Run the program followed by `code` (e.g. `assert add(1, 2) == 3`); passes when nothing fails."""

    code: str


Case = IOCase | AssertCase


def parse_cases(tests: Sequence[Case] | Mapping | str) -> list[Case]:
    """Cases from a list of cases, or a mapping (or its JSON) {"inputs": [...], "outputs": [...]}
    and/or {"asserts": [...]}, the shapes code datasets usually store."""
    if isinstance(tests, str):
        tests = json.loads(tests)
    if isinstance(tests, Mapping):
        inputs, outputs = list(tests.get("inputs", [])), list(tests.get("outputs", []))
        if len(inputs) != len(outputs):
            raise ValueError(f"code tests have {len(inputs)} inputs but {len(outputs)} outputs")
        unknown = set(tests) - {"inputs", "outputs", "asserts"}
        if unknown:
            raise ValueError(f"unknown keys in code tests: {sorted(unknown)}; expected inputs/outputs/asserts")
        cases = [IOCase(i, o) for i, o in zip(inputs, outputs)]
        return cases + [AssertCase(code) for code in tests.get("asserts", [])]
    cases = list(tests)
    for case in cases:
        if not isinstance(case, (IOCase, AssertCase)):
            raise TypeError(f"a code test case must be an IOCase or AssertCase, got {type(case).__name__}")
    return cases


def extract_program(response: str) -> str | None:
    """The last fenced Python (or unlabelled) code block of `response`, or None."""
    blocks = _CODE_BLOCK.findall(response)
    return blocks[-1] if blocks else None


def run_cases(program: str, cases: Sequence[Case], limits: SandboxLimits = SandboxLimits()) -> RewardResult:
    """Fraction of `cases` that `program` passes; the reason names the first failure."""
    if not cases:
        raise ValueError("no test cases to run the program against")
    jobs = [_job(program, case) for case in cases]
    results = run_many([(source, stdin) for source, stdin, _ in jobs], limits)
    failures = [_failure(result, case, token) for result, case, (_, _, token) in zip(results, cases, jobs)]
    passed = failures.count(None)
    first = next(((n, why) for n, why in enumerate(failures, 1) if why is not None), None)
    detail = f"; case {first[0]}: {first[1]}" if first else ""
    return RewardResult(passed / len(cases), f"{passed}/{len(cases)} cases passed{detail}")


def code_reward(
    response: str, tests: Sequence[Case] | Mapping | str, limits: SandboxLimits = SandboxLimits()
) -> RewardResult:
    """Reward for a response holding a program in a fenced code block, against `tests` (see `parse_cases`)."""
    cases = parse_cases(tests)
    program = extract_program(response)
    if program is None:
        return RewardResult(0.0, "no fenced code block in the response")
    return run_cases(program, cases, limits)


def _job(program: str, case: Case) -> tuple[str, str, str | None]:
    """(source, stdin, token) of the run for `case`; an AssertCase's run must print `token` last."""
    if isinstance(case, IOCase):
        return program, case.stdin, None
    token = secrets.token_hex(16)
    return f"{program}\n\n{case.code}\nprint({token!r})\n", "", token


def _failure(result: SandboxResult, case: Case, token: str | None) -> str | None:
    """Why the run for `case` fails it, or None if it passes."""
    if result.status != OK:
        return result.describe()
    if isinstance(case, IOCase):
        return None if _normalize(result.stdout) == _normalize(case.expected_stdout) else "wrong output"
    lines = result.stdout.rstrip().splitlines()
    return None if lines and lines[-1] == token else "exited before the test code finished"


def _normalize(output: str) -> list[str]:
    lines = [line.rstrip() for line in output.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines
