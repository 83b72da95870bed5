"""Reward functions by name: the built-ins ("math", "code", "arithmetic", "stepwise_arithmetic")
or a user's dotted path.

A reward function takes (response: str, reference) and returns a RewardResult. Users point a run at
their own with "package.module:function" or "package.module.function"; `load_reward_fn` imports it
and wraps it so a wrong return type fails loudly, naming the function, instead of training on it.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

from megatron_archer.rewards.result import RewardResult

RewardFn = Callable[[str, Any], RewardResult]

BUILTIN_REWARDS = {
    "math": "megatron_archer.rewards.math_reward:math_reward",
    "code": "megatron_archer.rewards.code_reward:code_reward",
    "arithmetic": "megatron_archer.rewards.synthetic:arithmetic_reward",
    "stepwise_arithmetic": "megatron_archer.rewards.stepwise_arithmetic:stepwise_arithmetic_reward",
}


def load_reward_fn(spec: str) -> RewardFn:
    """The reward function named by `spec`: a built-in name or "module:attr" / "module.attr"."""
    path = BUILTIN_REWARDS.get(spec, spec)
    if ":" in path:
        module_name, _, attribute = path.partition(":")
    else:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise ValueError(
            f"reward {spec!r} is neither a built-in ({', '.join(BUILTIN_REWARDS)}) "
            "nor a dotted path like 'package.module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ImportError(f"reward {spec!r}: cannot import module {module_name!r} ({error})") from error
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise AttributeError(f"reward {spec!r}: module {module_name!r} has no attribute {attribute!r}") from None
    if not callable(target):
        raise TypeError(f"reward {spec!r}: {attribute!r} is a {type(target).__name__}, not a function")
    return _checked(target, spec)


def _checked(fn: Callable[..., Any], spec: str) -> RewardFn:
    @functools.wraps(fn)
    def reward(response: str, reference: Any) -> RewardResult:
        result = fn(response, reference)
        if not isinstance(result, RewardResult):
            raise TypeError(
                f"reward {spec!r} returned {type(result).__name__}; reward functions must return "
                "RewardResult(value, reason)"
            )
        return result

    return reward
