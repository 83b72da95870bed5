"""Reward functions a user might write, loaded by dotted path in test_registry."""

from megatron_archer.rewards.result import RewardResult


def length_reward(response: str, reference: str) -> RewardResult:
    return RewardResult(float(len(response) == int(reference)), f"length {len(response)}")


class Rewards:
    @staticmethod
    def exact(response: str, reference: str) -> RewardResult:
        return RewardResult(float(response == reference), "exact match" if response == reference else "differs")


def returns_float(response: str, reference: str) -> float:
    return 1.0


NOT_CALLABLE = 3
