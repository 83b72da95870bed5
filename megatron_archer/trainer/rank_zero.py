"""Work done by global rank 0 alone, its result (or its failure) shared with every rank.

The rollout engine and the reward functions run on rank 0; if rank 0 raised alone the other
ranks would wait forever in their next collective, so a failure is broadcast and raised on every
rank together, with rank 0's message.

While rank 0 generates (hours at paper scale) the other ranks wait in that broadcast. They wait on
a CPU (gloo) group of their own, created once by ``init_control_group`` with its own timeout
(``parallel.rank_zero_timeout_minutes``), so no NCCL collective is pending meanwhile and NCCL's
watchdog (``parallel.timeout_minutes``) keeps its short timeout for training collectives.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")
_control_group = None


class RankZeroError(RuntimeError):
    """Rank 0's work failed; the message is rank 0's error."""


def init_control_group(timeout_minutes: float) -> None:
    """Create the gloo group for rank-0 exchanges, on every rank (a collective call)."""
    global _control_group
    if _control_group is not None:
        raise RuntimeError("the rank-zero control group exists already")
    _control_group = dist.new_group(backend="gloo", timeout=timedelta(minutes=timeout_minutes))


def destroy_control_group() -> None:
    global _control_group
    if _control_group is not None:
        dist.destroy_process_group(_control_group)
        _control_group = None


def control_group():
    """The gloo control group; None (the default group) before ``init_control_group``."""
    return _control_group


def control_barrier() -> None:
    """Every rank waits for every other, on the control group."""
    dist.barrier(group=_control_group)


def on_rank_zero(fn: Callable[[], T], share: bool = True) -> T | None:
    """Run ``fn`` on global rank 0; every rank gets its result (``share``) or None. When ``fn``
    raised there, rank 0 re-raises it and every other rank raises RankZeroError with its message.
    The other ranks wait on the control group (module docstring)."""
    result, error, status = None, None, [None]
    if dist.get_rank() == 0:
        try:
            result = fn()
            status[0] = ("ok", result if share else None)
        except Exception as exc:  # noqa: BLE001 - raised below, on every rank together
            error = exc
            status[0] = ("error", f"{type(exc).__name__}: {exc}")
    dist.broadcast_object_list(status, src=0, group=_control_group)
    kind, value = status[0]
    if kind == "error":
        if error is not None:
            raise error  # rank 0 keeps the original exception and its type
        raise RankZeroError(value)
    return result if dist.get_rank() == 0 else value
