"""A run directory belongs to one run: a new run never writes over an earlier one's files.

An earlier run left a resolved config, metrics, TensorBoard events or checkpoints. A new run
(``checkpoint.resume`` off) in such a directory would truncate its metrics, overwrite its config,
purge its events and mix its checkpoints with the old ones, so it is refused before any work
starts, with the ways on: resume it, choose another ``logging.dir``, or say
``logging.overwrite=true``, which deletes exactly those files and nothing else of the user's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from megatron_archer.trainer.checkpoint import CHECKPOINTS_DIR

# what a run writes into its run directory (MetricsLogger, Trainer._open_run_dir)
RUN_FILES = ("config.yaml", "metrics.jsonl", "tensorboard")
RESUMED_CONFIGS = "config.resumed_step_*.yaml"


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
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"logging.dir {run_dir} is a file, not a directory")
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
