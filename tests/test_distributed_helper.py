"""tests/distributed.run_distributed: a rank killed by a signal runs the job once more, a
second death and a Python error fail (real spawned gloo ranks)."""

from __future__ import annotations

import os

import pytest
import torch.multiprocessing as mp

from tests.distributed import run_distributed


def _abort_first_time(rank, world_size, marker):
    if rank == 1 and not os.path.exists(marker):
        open(marker, "w").close()
        os.abort()  # SIGABRT, as a C++ std::terminate


def _abort_always(rank, world_size):
    if rank == 1:
        os.abort()


def _raise(rank, world_size):
    if rank == 1:
        raise ValueError("rank 1 failed")


def test_a_signal_death_runs_the_job_once_more(tmp_path, capsys):
    run_distributed(_abort_first_time, 2, str(tmp_path / "aborted"))
    assert "running _abort_first_time once more" in capsys.readouterr().out
    with pytest.raises(mp.ProcessExitedException, match="SIGABRT"):
        run_distributed(_abort_always, 2)
    capsys.readouterr()
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 failed"):
        run_distributed(_raise, 2)
    assert "once more" not in capsys.readouterr().out  # a Python error is not retried
