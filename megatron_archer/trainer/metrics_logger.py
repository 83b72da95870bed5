"""Step metrics out of the run, on global rank 0: one JSON line per step (``metrics.jsonl``),
TensorBoard scalars and histograms (``tensorboard/``), and one summary line on stdout.

A run that starts at step k (0, or the step it resumed from) continues both logs: records of
steps <= k are kept, those of later steps (written by a run that stopped before checkpointing
them, and about to be run again) are dropped, from ``metrics.jsonl`` and, with TensorBoard's
``purge_step``, from the TensorBoard view.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# (metric, label, format) of the summary line, in order; absent metrics are left out
SUMMARY = (
    ("reward/mean", "reward", ".3f"), ("reward/accuracy", "acc", ".3f"),
    ("response/length_mean", "len", ".1f"), ("entropy/mean", "H", ".3f"),
    ("dynamic_sampling/keep_rate", "keep", ".2f"), ("actor/grad_norm", "gnorm", ".3g"),
    ("actor/all/kl_mean", "kl", ".3g"), ("rollout/logprob_abs_diff_mean", "gap", ".2g"),
    ("perf/tokens_per_s", "tok/s", ".0f"), ("time/step", "s", ".1f"),
)


@contextmanager
def timed(times: dict[str, float], name: str) -> Iterator[None]:
    """Add the block's wall time to ``times[name]`` (the step's ``time/...`` metrics)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        times[name] = times.get(name, 0.0) + time.perf_counter() - start


class MetricsLogger:
    """Writes under ``run_dir``; ``log(step, scalars, histograms)`` once per step."""

    def __init__(self, run_dir: str | Path, *, tensorboard: bool, jsonl: bool, total_steps: int,
                 start_step: int = 0):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.total_steps = total_steps
        self.jsonl = None
        if jsonl:
            path = self.run_dir / "metrics.jsonl"
            _drop_records_after(path, start_step)
            self.jsonl = path.open("a")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"),
                                        purge_step=start_step + 1)

    def log(self, step: int, scalars: dict[str, float],
            histograms: dict[str, torch.Tensor] | None = None) -> None:
        if self.jsonl is not None:
            record = {"step": step, **{k: _json_number(v) for k, v in sorted(scalars.items())}}
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
            for key, values in (histograms or {}).items():
                if values.numel():
                    self.writer.add_histogram(key, values.float(), step)
            self.writer.flush()
        print(summary_line(step, self.total_steps, scalars), flush=True)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()


def _drop_records_after(path: Path, step: int) -> None:
    """Rewrite ``path`` (if it exists) without the records of steps after ``step`` and without a
    line cut short by a crash, atomically."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]
    if len(kept) < len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def summary_line(step: int, total_steps: int, scalars: dict[str, float]) -> str:
    """``step 3/10 | reward 0.250 | acc 0.250 | len 18.2 | ...`` (skipped steps say so)."""
    parts = [f"step {step}/{total_steps}"]
    if scalars.get("step/skipped"):
        parts.append("SKIPPED (no group with reward signal)")
    parts += [f"{label} {scalars[key]:{fmt}}" for key, label, fmt in SUMMARY if key in scalars]
    return " | ".join(parts)


def _json_number(value: float):
    """Non-finite floats as strings (JSON has no NaN), everything else as a float."""
    value = float(value)
    return value if math.isfinite(value) else str(value)
