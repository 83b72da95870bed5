"""Timeouts and progress of a paper-scale rollout: ``parallel.timeout_minutes`` reaches the
process group, ``parallel.rank_zero_timeout_minutes`` the gloo control group the other ranks wait
on, ``rollout.sglang`` timeouts the engine's call policies, and rollout progress follows
responses as they complete."""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from megatron_archer import distributed
from megatron_archer.trainer import load_config, rank_zero
from megatron_archer.trainer.engines import ResponseProgress, call_policies
from tests.trainer.common import CPU_CONFIG


def test_process_group_and_control_group_timeouts(monkeypatch):
    seen = {}
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: seen.update(init=k))
    monkeypatch.setattr(dist, "new_group", lambda **k: seen.update(new_group=k) or "group")
    config = load_config(CPU_CONFIG, ["parallel.timeout_minutes=45",
                                      "parallel.rank_zero_timeout_minutes=600"])
    distributed.init_process_group(config.parallel.timeout_minutes)
    assert seen["init"]["timeout"] == timedelta(minutes=45)
    rank_zero.init_control_group(config.parallel.rank_zero_timeout_minutes)
    try:
        assert seen["new_group"] == {"backend": "gloo", "timeout": timedelta(minutes=600)}
        assert rank_zero.control_group() == "group"
    finally:
        rank_zero._control_group = None


def test_engine_call_policies_follow_the_config():
    config = load_config(CPU_CONFIG, [
        "rollout.engine=sglang", "rollout.sglang.server_urls=[http://10.0.0.2:30000]",
        "rollout.sglang.request_timeout_s=7200", "rollout.sglang.request_attempts=2",
        "rollout.sglang.disk_update_timeout_s=5400", "rollout.sglang.update_timeout_s=900"])
    policies = call_policies(config.rollout.sglang)
    assert (policies.generate.timeout_s, policies.generate.attempts) == (7200, 2)
    assert policies.generate.idempotent and policies.control.idempotent
    assert (policies.update.timeout_s, policies.update.attempts, policies.update.idempotent) == (
        900, 1, False)
    assert (policies.disk_update.timeout_s, policies.disk_update.idempotent) == (5400, False)


class _Bar:
    def __init__(self, total, log):
        self.total, self.n, self.log = total, 0, log
        log.append(("open", total))

    def update(self, k):
        self.n += k
        self.log.append(("at", self.n))

    def close(self):
        self.log.append(("close", self.n))


def test_progress_follows_responses_with_one_bar_per_generation():
    log = []
    progress = ResponseProgress(bar=lambda total: _Bar(total, log))
    for done in (16, 32, 48):
        progress(done, 48)
    progress(8, 16)
    assert log == [("open", 48), ("at", 16), ("at", 32), ("at", 48), ("close", 48),
                   ("open", 16), ("at", 8)]


def _rank_zero_wait_worker(rank, world_size, port):
    import os
    import time

    import pytest
    import torch

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    distributed.init_process_group(timeout_minutes=0.05)  # 3 s for every default-group collective
    rank_zero.init_control_group(timeout_minutes=1.0)
    try:
        # rank 0 works 6 s alone, twice the default group's timeout: the others wait on the
        # control group and get its result
        assert rank_zero.on_rank_zero(lambda: time.sleep(6) or "rolled out") == "rolled out"
        # guard: the same wait in a default-group collective times out
        if rank == 0:
            time.sleep(6)
        with pytest.raises(RuntimeError, match="(?i)timed out|timeout|connection closed"):
            dist.broadcast_object_list([None], src=0)
    finally:
        rank_zero.destroy_control_group()
        dist.destroy_process_group()


def test_the_other_ranks_wait_for_rank_zero_on_the_control_group():
    """Real gloo processes: a rank-0 phase longer than ``parallel.timeout_minutes`` is waited
    out on the control group, where a default-group collective would time out."""
    import torch.multiprocessing as mp

    from tests.distributed import _free_port

    mp.start_processes(_rank_zero_wait_worker, args=(2, _free_port()), nprocs=2, join=True,
                       start_method="spawn")
