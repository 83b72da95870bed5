"""SIGINT and SIGTERM stop a run at the next step boundary, on every rank together.

The handler only records the signal: no exception is raised in the middle of a step, a
collective or a checkpoint save (whose writer forks; CPython drops exceptions raised in at-fork
hooks, so a KeyboardInterrupt there could be swallowed and the run go on). After each step every
rank learns, in one all-reduce, whether any rank was signalled; then they save the step's
checkpoint together and leave with status 128 + the signal number (130 for SIGINT, 143 for
SIGTERM). A second signal, more than ``REPEAT_S`` after the first, stops the process at once (a
terminal's Ctrl-C reaches ``torchrun``'s workers directly and again through the agent, within
milliseconds: that counts as one).
"""

from __future__ import annotations

import signal
import threading
import time

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_S = 2.0


class StopSignals:
    """``with StopSignals() as stop:`` installs the handlers (main thread only; elsewhere it
    records nothing) and restores the previous ones on exit; ``stop.agreed(group)`` is the signal
    any rank of ``group`` received (0: none), the same on every rank."""

    def __init__(self):
        self.received = 0
        self._at = 0.0
        self._previous = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.received and now - self._at > REPEAT_S:  # asked twice: stop now
            self.__exit__()
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        if not self.received:
            self.received, self._at = signum, now
            rank = dist.get_rank() if dist.is_initialized() else 0
            print(f"[megatron-archer] rank {rank}: {signal.Signals(signum).name} received: "
                  f"stopping after this step, once its checkpoint is saved (send it again to "
                  f"stop at once)", flush=True)

    def agreed(self, group=None) -> int:
        """The signal number any rank received (the largest), or 0: one all-reduce."""
        flag = torch.tensor([self.received], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return int(flag.item())
