"""Code reward: the fraction of test cases a response's program passes, each run in the sandbox.

The verdict must not be the program's to give: under RL a policy that can forge a pass is paid
for it. Three kinds of case:

- `IOCase` feeds stdin; the caller compares stdout (trailing whitespace of each line and trailing
  blank lines ignored).
- `FunctionCase` (LeetCode / LiveCodeBench style): the sandboxed run loads the program as a
  module, calls the named function on the case's arguments and writes the return value as
  strict JSON (null, bool, int, finite float, str, list, dict with str keys; anything else, an
  object with its own ``__eq__`` included, fails); the caller parses it and compares it with the
  expected value (``same_value``). The expected value never enters the sandbox, so a program can
  only pass by returning it.
- `AssertCase` appends assert-style test code to the program and passes when the run prints a
  random token after it. The program shares that interpreter: it can read the token from its own
  code object, return objects whose ``__eq__`` is always true, or patch what the asserts call, so
  these cases are accepted only from a test spec marked ``"trusted": true``.

Every case is a separate sandboxed run; the cases of a response run in parallel on the sandbox pool
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


@dataclass(frozen=True)
class FunctionCase:
    """Call the program's top-level `function` with the positional arguments `args` (a JSON
    list); passes when it returns `expected` (``same_value``)."""

    function: str
    args: tuple
    expected: object

    def __post_init__(self):
        if not isinstance(self.function, str) or not self.function.isidentifier():
            raise ValueError(f"function must be a Python identifier; got {self.function!r}")
        object.__setattr__(self, "args", tuple(self.args))
        json.dumps([list(self.args), self.expected], allow_nan=False)  # plain JSON only


Case = IOCase | FunctionCase | AssertCase


def parse_cases(tests: Sequence[Case] | Mapping | str) -> list[Case]:
    """Cases from a list of cases, or a mapping (or its JSON) in the shapes code datasets store:
    {"inputs": [stdin, ...], "outputs": [stdout, ...]}; with "fn_name", function cases
    {"fn_name": f, "inputs": [[arg, ...], ...], "outputs": [value, ...]}; and
    {"asserts": [...], "trusted": true} (assert cases are refused without "trusted")."""
    if isinstance(tests, str):
        tests = json.loads(tests)
    if isinstance(tests, Mapping):
        inputs, outputs = list(tests.get("inputs", [])), list(tests.get("outputs", []))
        if len(inputs) != len(outputs):
            raise ValueError(f"code tests have {len(inputs)} inputs but {len(outputs)} outputs")
        unknown = set(tests) - {"inputs", "outputs", "asserts", "fn_name", "trusted"}
        if unknown:
            raise ValueError(f"unknown keys in code tests: {sorted(unknown)}; expected "
                             f"inputs/outputs, fn_name, asserts, trusted")
        if "fn_name" in tests:
            for i, args in enumerate(inputs):
                if not isinstance(args, list):
                    raise ValueError(f"code tests: inputs[{i}] of a fn_name test must be the "
                                     f"list of the call's arguments; got {args!r}")
            cases = [FunctionCase(tests["fn_name"], a, out) for a, out in zip(inputs, outputs)]
        else:
            cases = [IOCase(i, o) for i, o in zip(inputs, outputs)]
        if tests.get("asserts") and tests.get("trusted") is not True:
            raise ValueError('code tests: "asserts" can be passed by a wrong program (it shares '
                             'the interpreter that runs them); use fn_name function cases, or '
                             'mark asserts from a trusted source with "trusted": true')
        return cases + [AssertCase(code) for code in tests.get("asserts", [])]
    cases = list(tests)
    for case in cases:
        if not isinstance(case, (IOCase, FunctionCase, AssertCase)):
            raise TypeError(f"a code test case must be an IOCase, FunctionCase or AssertCase, "
                            f"got {type(case).__name__}")
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


# The run of a FunctionCase. It keeps its own references to what it uses before the program
# runs (the program may patch builtins), loads the program as a module named "solution" (so an
# `if __name__ == "__main__":` block does not run), and writes the return value as the last line.
_CALL_HARNESS = """\
import json as _json, math as _math, sys as _sys, types as _types
_type, _float, _isfinite, _dumps = type, float, _math.isfinite, _json.dumps
_stdout = _sys.stdout
_PLAIN = (type(None), bool, int, float, str)

def _plain(value, depth=0):
    kind = _type(value)
    if depth > 100:
        return False
    if kind is list:
        return all(_plain(v, depth + 1) for v in value)
    if kind is dict:
        return all(_type(k) is str and _plain(v, depth + 1) for k, v in value.items())
    return kind in _PLAIN and (kind is not _float or _isfinite(value))

_module = _types.ModuleType("solution")
exec(compile({program!r}, "solution.py", "exec"), _module.__dict__)
_result = getattr(_module, {function!r})(*_json.loads({args!r}))
if not _plain(_result):
    raise TypeError("the return value is not plain JSON data: " + _type(_result).__name__)
_stdout.write("\\n" + {marker!r} + _dumps(_result, allow_nan=False) + "\\n")
_stdout.flush()
"""
_RESULT_MARKER = "__megatron_archer_result__ "


def _job(program: str, case: Case) -> tuple[str, str, str | None]:
    """(source, stdin, token) of the run for `case`; an AssertCase's run must print `token` last."""
    if isinstance(case, IOCase):
        return program, case.stdin, None
    if isinstance(case, FunctionCase):
        source = _CALL_HARNESS.format(program=program, function=case.function,
                                      args=json.dumps(list(case.args)), marker=_RESULT_MARKER)
        return source, "", None
    token = secrets.token_hex(16)
    return f"{program}\n\n{case.code}\nprint({token!r})\n", "", token


def _failure(result: SandboxResult, case: Case, token: str | None) -> str | None:
    """Why the run for `case` fails it, or None if it passes."""
    if result.status != OK:
        return result.describe()
    if isinstance(case, IOCase):
        return None if _normalize(result.stdout) == _normalize(case.expected_stdout) else "wrong output"
    if isinstance(case, FunctionCase):
        return _returned_failure(result.stdout, case.expected)
    lines = result.stdout.rstrip().splitlines()
    return None if lines and lines[-1] == token else "exited before the test code finished"


def _returned_failure(stdout: str, expected: object) -> str | None:
    """A FunctionCase's verdict from the run's last line: None when the value it returned equals
    `expected` (``same_value``), else why not."""
    lines = stdout.rstrip("\n").splitlines()
    if not lines or not lines[-1].startswith(_RESULT_MARKER):
        return "returned no value"
    try:
        value = json.loads(lines[-1][len(_RESULT_MARKER):], parse_constant=_refuse_constant)
    except ValueError:
        return "returned no plain JSON value"
    return None if same_value(value, expected) else "wrong return value"


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a plain JSON value")


def same_value(got: object, expected: object) -> bool:
    """Equality of plain JSON values where a bool equals only a bool (Python's True == 1 does not
    count) and numbers compare by value (1 equals 1.0)."""
    if isinstance(got, bool) or isinstance(expected, bool):
        return type(got) is type(expected) and got == expected
    if isinstance(got, (int, float)) and isinstance(expected, (int, float)):
        return got == expected
    if isinstance(got, list) and isinstance(expected, list):
        return len(got) == len(expected) and all(map(same_value, got, expected))
    if isinstance(got, dict) and isinstance(expected, dict):
        return got.keys() == expected.keys() and all(same_value(got[k], expected[k]) for k in got)
    return type(got) is type(expected) and got == expected


def _normalize(output: str) -> list[str]:
    lines = [line.rstrip() for line in output.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines
