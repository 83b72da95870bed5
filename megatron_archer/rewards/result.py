"""The value every reward function returns: a number and a short reason that says why."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RewardResult:
    """A finite reward and a short human-readable reason (logged next to the sample)."""

    value: float
    reason: str

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)):
            raise TypeError(f"RewardResult.value must be a number, got {type(self.value).__name__}")
        if not math.isfinite(self.value):
            raise ValueError(f"RewardResult.value must be finite, got {self.value}")
        if not isinstance(self.reason, str):
            raise TypeError(f"RewardResult.reason must be a str, got {type(self.reason).__name__}")
        object.__setattr__(self, "value", float(self.value))


def quote(text: str, limit: int = 80) -> str:
    """`text` on one line, cut to `limit` characters, in quotes: for citing model output in reasons."""
    text = " ".join(text.split())
    return "'" + (text if len(text) <= limit else text[: limit - 3] + "...") + "'"
