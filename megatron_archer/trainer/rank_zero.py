"""Work done by global rank 0 alone, its result (or its failure) shared with every rank.

The rollout engine and the reward functions run on rank 0; if rank 0 raised alone the other
ranks would wait forever in their next collective, so a failure is broadcast and raised on every
rank together, with rank 0's message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


class RankZeroError(RuntimeError):
    """Rank 0's work failed; the message is rank 0's error."""


def on_rank_zero(fn: Callable[[], T], share: bool = True) -> T | None:
    """Run ``fn`` on global rank 0; every rank gets its result (``share``) or None. When ``fn``
    raised there, rank 0 re-raises it and every other rank raises RankZeroError with its message."""
    result, error, status = None, None, [None]
    if dist.get_rank() == 0:
        try:
            result = fn()
            status[0] = ("ok", result if share else None)
        except Exception as exc:  # noqa: BLE001 - raised below, on every rank together
            error = exc
            status[0] = ("error", f"{type(exc).__name__}: {exc}")
    dist.broadcast_object_list(status, src=0)
    kind, value = status[0]
    if kind == "error":
        if error is not None:
            raise error  # rank 0 keeps the original exception and its type
        raise RankZeroError(value)
    return result if dist.get_rank() == 0 else value
