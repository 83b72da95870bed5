"""Repetition ratio (docs/numerics.md §5, "repetition loops"): the share of responses stuck in a loop.

A response is looping when its second half is periodic: for some period p <= len(half) / 2,
every token of the second half equals the token p positions before it, so the same n-gram
(n = p) repeats at least twice to the end. Responses shorter than ``min_tokens`` never count.
"""

from __future__ import annotations

from collections.abc import Sequence


def is_looping(tokens: Sequence[int], min_tokens: int = 16) -> bool:
    """True when the last half of ``tokens`` is one n-gram repeated (see the module docstring)."""
    if len(tokens) < min_tokens:
        return False
    start = len(tokens) // 2
    half = len(tokens) - start
    for period in range(1, half // 2 + 1):
        if all(tokens[i] == tokens[i - period] for i in range(start, len(tokens))):
            return True
    return False


def repetition_ratio(responses: Sequence[Sequence[int]], min_tokens: int = 16) -> float:
    """Share of ``responses`` (token id lists) that are looping; 0 for none."""
    if not responses:
        return 0.0
    return sum(is_looping(r, min_tokens) for r in responses) / len(responses)
