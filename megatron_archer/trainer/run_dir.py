"""A run directory belongs to one run: a new run never writes over an earlier one's files.

An earlier run left a resolved config, metrics, TensorBoard events or checkpoints. A new run
(``checkpoint.resume`` off) in such a directory would truncate its metrics, overwrite its config,
purge its events and mix its checkpoints with the old ones, so it is refused before any work
starts, with the ways on: resume it, choose another ``logging.dir``, or say
``logging.overwrite=true``, which deletes exactly those files and nothing else of the user's.

While a run writes into its directory it holds a lock there (``RunLock``): a second job, a
resume started while the first still runs for instance, is refused with the holder's host and
pid. The lock is the kernel's (``flock``), so it ends with the holder's process however that
dies, and a lock file left by a dead job is simply taken over.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
from pathlib import Path

from megatron_archer.trainer.checkpoint import CHECKPOINTS_DIR

# what a run writes into its run directory (MetricsLogger, Trainer._open_run_dir)
RUN_FILES = ("config.yaml", "metrics.jsonl", "tensorboard")
RESUMED_CONFIGS = "config.resumed_step_*.yaml"
LOCK_FILE = ".megatron-archer.lock"


def _not_a_file(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"logging.dir {run_dir} is a file, not a directory")


def earlier_run(run_dir: Path, checkpoint_root: Path) -> list[Path]:
    """The files and folders an earlier run left in ``run_dir`` and ``checkpoint_root``."""
    found = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    found += sorted(run_dir.glob(RESUMED_CONFIGS))
    checkpoints = checkpoint_root / CHECKPOINTS_DIR
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        found.append(checkpoints)
    return found


def claim(run_dir: Path, checkpoint_root: Path, *, resume: bool, overwrite: bool) -> list[Path]:
    """Make ``run_dir`` this run's: nothing to do when resuming or when no earlier run is there;
    with ``overwrite`` the earlier run's files are deleted (returned); otherwise ValueError."""
    _not_a_file(run_dir)
    found = [] if resume else earlier_run(run_dir, checkpoint_root)
    if found and not overwrite:
        names = ", ".join(str(p.relative_to(run_dir) if p.is_relative_to(run_dir) else p)
                          for p in found)
        raise ValueError(
            f"logging.dir {run_dir} holds an earlier run ({names}): continue it with "
            f"checkpoint.resume=true, start over with logging.overwrite=true (deletes those), or "
            f"choose another logging.dir")
    for path in found:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return found


class RunLock:
    """An exclusive lock on ``run_dir`` for this process (``release`` or process exit ends it);
    ValueError naming the holder when another process has it."""

    def __init__(self, run_dir: Path):
        _not_a_file(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / LOCK_FILE
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 256, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise ValueError(f"logging.dir {run_dir} is in use by another run ({holder}): wait "
                             f"for it to end or stop it, or choose another logging.dir") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"host {socket.gethostname()}, pid {os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
