"""The trainer's side of a colocated engine (one gloo process, the tiny CPU run): the engine is
built after the actor is loaded, each weight sync resumes the engine's weights, updates them and
only then resumes its cache, after every rank emptied its allocator cache and met at a barrier;
the servers the trainer started are stopped at the end of the run and when it fails."""

from __future__ import annotations

import pytest

from megatron_archer.rollout import LocalEngine
from megatron_archer.trainer import RolloutError, load_config, run_training
from tests.distributed import run_distributed
from tests.trainer.common import CPU_CONFIG, tiny_run

SMALL = ["parallel.tensor=1", "rollout.prompts_per_step=2", "rollout.n=2",
         "train.mini_batch_size=2", "reward.function=tests.trainer.rewards:digit_share",
         "algorithm.dynamic_sampling.enabled=false"]


class RecordingEngine(LocalEngine):
    """A local engine that logs the calls the trainer makes (into ``log``) and can fail."""

    def __init__(self, path, log, fail_at_generate=None):
        super().__init__(path)
        self.log, self.fail_at, self.generates = log, fail_at_generate, 0

    def generate(self, prompts, params):
        self.generates += 1
        self.log.append("generate")
        if self.generates == self.fail_at:
            raise ConnectionError("http://127.0.0.1:30000 went away")
        return super().generate(prompts, params)

    def release_memory(self):
        self.log.append("release")
        super().release_memory()

    def resume_memory(self, parts=("weights", "cache")):
        self.log.append(f"resume {'+'.join(parts)}")
        super().resume_memory(parts)

    def update_weights(self, buckets, version):
        self.log.append(f"update {version}")
        super().update_weights(buckets, version)

    def shutdown(self):
        self.log.append("shutdown")


def _lifecycle_worker(rank, world_size, overrides, model):
    from megatron_archer.trainer import loop

    log = []
    load = loop.load_hf_model
    loop.load_hf_model = lambda *a, **k: log.append("load model") or load(*a, **k)
    barrier = loop.control_barrier
    loop.control_barrier = lambda: log.append("barrier") or barrier()
    fail = [None]
    loop.build_engine = lambda config, weights_source=None: log.append("build engine") or \
        RecordingEngine(model, log, fail[0])

    run_training(load_config(CPU_CONFIG, overrides))
    sync = ["barrier", "resume weights", "update {}", "resume cache"]
    step = ["generate", "release", *sync]
    expected = ["load model", "load model", "barrier", "build engine"]  # actor, reference first
    for version in (1, 2):
        expected += [s.format(version) for s in step]
    assert log == [*expected, "shutdown"]

    log.clear()
    fail[0] = 2
    with pytest.raises(RolloutError, match="went away"):
        run_training(load_config(CPU_CONFIG, [*overrides, "logging.overwrite=true"]))
    assert log[-2:] == ["generate", "shutdown"], "stopped on error too"
    assert log.count("shutdown") == 1


def test_colocated_call_order_and_servers_stopped_at_the_end_and_on_error(tmp_path):
    overrides = [*tiny_run(tmp_path, prompts=8), *SMALL]
    run_distributed(_lifecycle_worker, 1, overrides, str(tmp_path / "model"))
