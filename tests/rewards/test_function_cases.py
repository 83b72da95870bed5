"""Function cases: the verdict is decided outside the program. The sandboxed run returns a plain
JSON value and the caller compares it, so the forgeries that pass assert cases (the completion
token read from the program's own code object, an object whose __eq__ is always true, patched
builtins) score 0; honest programs score the fraction of calls they get right; assert cases are
refused from an untrusted test spec."""

from __future__ import annotations

import json

import pytest

from megatron_archer.rewards.code_reward import (
    AssertCase,
    FunctionCase,
    code_reward,
    parse_cases,
    run_cases,
    same_value,
)
from tests.rewards.test_code_sandbox import LIMITS, needs_bwrap

ADD = {"fn_name": "add", "inputs": [[1, 2], [2, 2]], "outputs": [3, 4]}
ASSERTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]

TOKEN_LEAK = """
import sys, os, re
def add(a, b):
    return a - b
consts = sys._getframe(0).f_code.co_consts
toks = [c for c in consts if isinstance(c, str) and re.fullmatch(r"[0-9a-f]{32}", c)]
if toks:
    print(toks[-1]); sys.stdout.flush(); os._exit(0)
"""
ALWAYS_EQUAL = """
class Anything(int):
    def __eq__(self, other):
        return True
    __hash__ = int.__hash__
def add(a, b):
    return Anything(0)
"""
PATCHED = """
import builtins, json
builtins.type = lambda value: int            # fools a type check that looks builtins up late
builtins.isinstance = lambda value, kind: True
json.dumps = lambda value, **kw: "3"         # the caller does not trust the program's JSON
class Anything:
    def __eq__(self, other):
        return True
def add(a, b):
    return Anything()
"""


@needs_bwrap
@pytest.mark.parametrize("name, program", [("token leak", TOKEN_LEAK),
                                           ("always-equal object", ALWAYS_EQUAL),
                                           ("patched builtins", PATCHED)])
def test_forgeries_pass_assert_cases_but_not_function_cases(name, program):
    assert run_cases(program, [AssertCase(a) for a in ASSERTS], LIMITS).value > 0 or name != \
        "token leak", "the token leak forges trusted assert cases (why they need 'trusted')"
    reward = run_cases(program, parse_cases(ADD), LIMITS)
    assert reward.value == 0, (name, reward.reason)


@needs_bwrap
def test_honest_programs_score_the_calls_they_get_right():
    program = ("def add(a, b):\n    return a + b if a != 2 else 0\n"
               "if __name__ == '__main__':\n    print(add(int(input()), 1))\n")  # not run
    reward = run_cases(program, parse_cases(ADD), LIMITS)
    assert reward.value == 0.5 and reward.reason == "1/2 cases passed; case 2: wrong return value"
    response = "```python\ndef add(a, b):\n    print('side output is fine')\n    return a + b\n```"
    assert code_reward(response, json.dumps(ADD), LIMITS).value == 1.0
    # containers, dict keys, floats; a tuple is not JSON data; True is not 3
    cases = [FunctionCase("f", [[1, 2]], {"a": [1.5, None, "x"]}), FunctionCase("g", [], [1, 2]),
             FunctionCase("h", [], 3)]
    program = ("def f(x):\n    return {'a': [1.5, None, 'x']}\ndef g():\n    return (1, 2)\n"
               "def h():\n    return True\n")
    reward = run_cases(program, cases, LIMITS)
    assert reward.value == pytest.approx(1 / 3)
    assert "case 2: exited with code 1: TypeError: the return value is not plain JSON data" \
        in reward.reason
    assert run_cases("def f(x):\n    return float('nan')\n", cases[:1], LIMITS).value == 0
    missing = run_cases("def other():\n    return 1\n", cases[2:], LIMITS)
    assert missing.value == 0 and "AttributeError" in missing.reason


def test_comparison_and_spec_checks():
    assert same_value(1, 1.0) and same_value([1, {"a": 2}], [1.0, {"a": 2}])
    assert not same_value(True, 1) and not same_value(1, True) and not same_value(0, False)
    assert not same_value("1", 1) and not same_value({"a": 1}, {"a": 1, "b": 2})
    assert not same_value([1], [1, 2]) and not same_value(None, 0)
    with pytest.raises(ValueError, match='"asserts" can be passed by a wrong program'):
        parse_cases({"asserts": ASSERTS})
    assert len(parse_cases({"asserts": ASSERTS, "trusted": True})) == 2
    with pytest.raises(ValueError, match=r"inputs\[0\] of a fn_name test must be the list"):
        parse_cases({"fn_name": "add", "inputs": ["1 2"], "outputs": [3]})
    with pytest.raises(ValueError, match="function must be a Python identifier"):
        FunctionCase("os.system", [], 0)
    with pytest.raises(ValueError, match="Out of range float values"):
        FunctionCase("f", [], float("inf"))
