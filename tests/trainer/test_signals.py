"""SIGINT and SIGTERM sent to a real run stop it after the step in progress, with that step's
checkpoint saved, one line saying so, status 130 / 143, and a resume that continues from it; the
same under torchrun with 2 processes (the agent forwards the signal to both ranks)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_archer.trainer.checkpoint import latest_checkpoint, step_dir
from tests.trainer.common import CPU_CONFIG, tiny_run

BIN = Path(sys.executable).parent


def _steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _interrupt(command: list[str], run: Path, signum: int) -> tuple[int, str, int]:
    """Start ``command``, send ``signum`` once step 1 is logged; (status, output, steps seen)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    deadline = time.monotonic() + 240
    while not _steps(run) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    seen = len(_steps(run))
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=240)
    return proc.returncode, out, seen


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_after_the_step_with_its_checkpoint(tmp_path, signum):
    run = tmp_path / "run"
    overrides = [*tiny_run(tmp_path, prompts=8), "parallel.tensor=1", "train.steps=40",
                 "checkpoint.interval=0", "logging.tensorboard=false"]
    status, out, seen = _interrupt([str(BIN / "megatron-archer"), "train", str(CPU_CONFIG),
                                    *overrides], run, signum)
    name = signal.Signals(signum).name
    assert status == 128 + signum, out[-3000:]
    steps = _steps(run)
    last = steps[-1]
    assert steps == list(range(1, last + 1)) and seen <= last < 40
    assert latest_checkpoint(run) == step_dir(run, last)  # saved on the way out (interval 0)
    assert f"rank 0: {name} received: stopping after this step" in out
    assert f"interrupted by {name}: step {last}: " in out and str(step_dir(run, last)) in out
    assert "Traceback" not in out, out[-3000:]

    resumed = subprocess.run([str(BIN / "megatron-archer"), "train", str(CPU_CONFIG), *overrides,
                              f"train.steps={last + 1}", "checkpoint.resume=true"],
                             capture_output=True, text=True, timeout=240,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"resumed from {step_dir(run, last)} at step {last}" in resumed.stdout
    assert _steps(run) == list(range(1, last + 2))


def test_sigint_to_torchrun_stops_both_ranks_after_the_step(tmp_path):
    run = tmp_path / "run"
    overrides = [*tiny_run(tmp_path, prompts=8), "parallel.tensor=1", "train.steps=40",
                 "checkpoint.interval=0", "logging.tensorboard=false"]
    torchrun = shutil.which("torchrun", path=str(BIN)) or "torchrun"
    status, out, _ = _interrupt([torchrun, "--nproc-per-node", "2", str(BIN / "megatron-archer"),
                                 "train", str(CPU_CONFIG), *overrides], run, signal.SIGINT)
    assert status != 0
    last = _steps(run)[-1]
    assert latest_checkpoint(run) == step_dir(run, last)
    assert "rank 0: SIGINT received" in out and "rank 1: SIGINT received" in out, out[-3000:]
    assert f"interrupted by SIGINT: step {last}: " in out


def test_ranks_die_with_a_killed_torchrun(tmp_path):
    """kill -9 of the launcher: the kernel sends each rank SIGTERM (parent-death signal); they
    stop after the step in progress instead of writing on into the run directory."""
    import psutil

    run = tmp_path / "run"
    overrides = [*tiny_run(tmp_path, prompts=8), "parallel.tensor=1", "train.steps=40",
                 "checkpoint.interval=0", "logging.tensorboard=false"]
    torchrun = shutil.which("torchrun", path=str(BIN)) or "torchrun"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.Popen([torchrun, "--nproc-per-node", "2", str(BIN / "megatron-archer"),
                             "train", str(CPU_CONFIG), *overrides], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 240
    while not _steps(run) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    ranks = psutil.Process(proc.pid).children()
    assert len(ranks) == 2 and proc.poll() is None
    proc.kill()
    proc.wait()
    gone, alive = psutil.wait_procs(ranks, timeout=120)
    assert not alive, f"ranks still running after their launcher died: {alive}"
    last = _steps(run)[-1]
    assert last < 40 and latest_checkpoint(run) == step_dir(run, last)
