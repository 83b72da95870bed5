"""Run a test body in real processes joined by a gloo group (no simulation in one process)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args) -> None:
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args) -> None:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks.

    ``fn`` must be a module-level function (spawn pickles it by name). A failure on any rank
    is re-raised here with that rank's traceback. A rank killed by a signal, a crash in C++
    rather than an error of the code under test, gets the job run once more on a fresh port:
    one such death has been seen across the project's suite runs, in a test with no failure of
    its own (2026-12-08: "terminate called without an active exception", SIGABRT, in
    tests/algorithms/test_sharded_rows.py at 3 ranks; 36 reruns of that test passed). A second
    death, or any Python error, fails the test.
    """
    for attempt in (1, 2):
        try:
            mp.start_processes(
                _entry,
                args=(world_size, _free_port(), fn, args),
                nprocs=world_size,
                join=True,
                start_method="spawn",
            )
            return
        except mp.ProcessExitedException as error:
            if attempt == 2 or error.signal_name is None:
                raise
            print(f"run_distributed: {error}; running {fn.__name__} once more", flush=True)
