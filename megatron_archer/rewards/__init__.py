"""Verifiable rewards: math answers, code run in a sandbox, a synthetic arithmetic task, user functions.

Every reward function takes (response, reference) and returns a RewardResult(value, reason).
"""

from megatron_archer.rewards.answer_extraction import FinalAnswer, extract_final_answer
from megatron_archer.rewards.code_reward import (
    AssertCase,
    FunctionCase,
    IOCase,
    code_reward,
    run_cases,
)
from megatron_archer.rewards.code_sandbox import (
    SandboxLimits,
    SandboxResult,
    SandboxUnavailable,
    configure_sandbox,
    run_many,
    run_python,
)
from megatron_archer.rewards.math_reward import MathVerifier, math_reward
from megatron_archer.rewards.registry import BUILTIN_REWARDS, RewardFn, load_reward_fn
from megatron_archer.rewards.result import RewardResult
from megatron_archer.rewards.synthetic import ArithmeticProblem, arithmetic_problems, arithmetic_reward

__all__ = [
    "ArithmeticProblem",
    "AssertCase",
    "FunctionCase",
    "BUILTIN_REWARDS",
    "FinalAnswer",
    "IOCase",
    "MathVerifier",
    "RewardFn",
    "RewardResult",
    "SandboxLimits",
    "SandboxResult",
    "SandboxUnavailable",
    "arithmetic_problems",
    "arithmetic_reward",
    "code_reward",
    "configure_sandbox",
    "extract_final_answer",
    "load_reward_fn",
    "math_reward",
    "run_cases",
    "run_many",
    "run_python",
]
