"""Rewards for trainer tests: one with signal for an untrained tiny model, one without."""

from megatron_archer.rewards import RewardResult


def digit_share(response: str, answer: str) -> RewardResult:
    """The share of digits in the response."""
    digits = sum(c.isdigit() for c in response)
    return RewardResult(digits / max(len(response), 1), f"{digits} digits")


def constant(response: str, answer: str) -> RewardResult:
    """No signal: every group is all-equal, so dynamic sampling keeps none."""
    return RewardResult(1.0, "constant")
