"""Timeouts and progress of a paper-scale rollout: ``parallel.timeout_minutes`` reaches the
process group, ``parallel.rank_zero_timeout_minutes`` the gloo control group the other ranks wait
on, ``rollout.sglang`` timeouts the engine's call policies, and rollout progress follows
responses as they complete."""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from megatron_archer import distributed
from megatron_archer.trainer import load_config
from megatron_archer.trainer import rank_zero
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
