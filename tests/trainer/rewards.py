"""A reward with signal for an untrained tiny model: the share of digits in the response."""

from megatron_archer.rewards import RewardResult


def digit_share(response: str, answer: str) -> RewardResult:
    digits = sum(c.isdigit() for c in response)
    return RewardResult(digits / max(len(response), 1), f"{digits} digits")
