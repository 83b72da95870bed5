"""Reward functions by built-in name or dotted path, and the RewardResult contract."""

import math

import pytest

from megatron_archer.rewards.registry import load_reward_fn
from megatron_archer.rewards.result import RewardResult


@pytest.mark.parametrize(
    "spec", ["tests.rewards.user_rewards:length_reward", "tests.rewards.user_rewards.length_reward"]
)
def test_user_function_by_dotted_path(spec):
    fn = load_reward_fn(spec)
    assert fn("abc", "3") == RewardResult(1.0, "length 3")
    assert fn("ab", "3") == RewardResult(0.0, "length 2")
    assert fn.__name__ == "length_reward"


def test_nested_attribute_after_colon():
    assert load_reward_fn("tests.rewards.user_rewards:Rewards.exact")("x", "x").reason == "exact match"


def test_builtin_names():
    assert load_reward_fn("arithmetic")(r"so \boxed{12}", "12").value == 1.0
    assert load_reward_fn("code").__name__ == "code_reward"
    assert load_reward_fn("math").__name__ == "math_reward"


@pytest.mark.parametrize(
    "spec, error, message",
    [
        ("nonsense", ValueError, "neither a built-in"),
        ("no_such_package_xyz.module:fn", ImportError, "cannot import module 'no_such_package_xyz.module'"),
        ("tests.rewards.user_rewards:missing", AttributeError, "has no attribute 'missing'"),
        ("tests.rewards.user_rewards:NOT_CALLABLE", TypeError, "is a int, not a function"),
    ],
)
def test_bad_specs_name_the_problem(spec, error, message):
    with pytest.raises(error, match=message):
        load_reward_fn(spec)


def test_a_function_not_returning_reward_result_fails_loudly():
    fn = load_reward_fn("tests.rewards.user_rewards:returns_float")
    with pytest.raises(TypeError, match="returned float; reward functions must return RewardResult"):
        fn("a", "b")


def test_reward_result_validates_its_fields():
    assert RewardResult(1, "ok").value == 1.0 and isinstance(RewardResult(1, "ok").value, float)
    with pytest.raises(ValueError, match="finite"):
        RewardResult(math.nan, "x")
    with pytest.raises(TypeError, match="must be a number"):
        RewardResult(True, "x")
    with pytest.raises(TypeError, match="reason must be a str"):
        RewardResult(0.5, None)
