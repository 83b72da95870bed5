"""The reward of the step-by-step arithmetic task (``megatron_archer.data.stepwise_arithmetic``).

1 when the response commits to the right integer in a ``\\boxed{}``, else 0. Unlike the
one-operation task's ``arithmetic_reward``, a plain-text answer does not count: every
intermediate line ``a*b=c`` ends in a number, and a response cut off before its box must not be
credited for one of them.
"""

from __future__ import annotations

from megatron_archer.rewards.answer_extraction import last_boxed
from megatron_archer.rewards.result import RewardResult
from megatron_archer.rewards.synthetic import arithmetic_reward


def stepwise_arithmetic_reward(response: str, answer: str) -> RewardResult:
    """``arithmetic_reward`` of the response's last ``\\boxed{}``; 0 without one."""
    boxed = last_boxed(response)
    if not boxed:
        return RewardResult(0.0, "no \\boxed{} answer in the response")
    return arithmetic_reward(f"\\boxed{{{boxed}}}", answer)
