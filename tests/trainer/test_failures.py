"""Failures at run start and mid-run give clear errors (one gloo process, tensor parallel 1)."""

from __future__ import annotations

import pytest

from megatron_archer.data import MalformedDataError
from megatron_archer.rollout import LocalEngine
from megatron_archer.trainer import RolloutError, load_config, run_training
from tests.distributed import run_distributed
from tests.trainer.common import CPU_CONFIG, tiny_run

SMALL = ["parallel.tensor=1", "rollout.prompts_per_step=2", "rollout.n=2",
         "train.mini_batch_size=2", "reward.function=tests.trainer.rewards:digit_share"]


class DyingEngine(LocalEngine):
    """Serves one generate call, then fails as a crashed server would."""

    calls = 0

    def generate(self, prompts, params):
        DyingEngine.calls += 1
        if DyingEngine.calls > 1:
            raise ConnectionError("server at 127.0.0.1:30000 closed the connection")
        return super().generate(prompts, params)


def _failures_worker(rank, world_size, overrides, model, data_dir):
    config = load_config(CPU_CONFIG, overrides)
    with pytest.raises(RolloutError, match=r"rollout engine DyingEngine failed at step 2, "
                                           r"generation round 1: ConnectionError: server at"):
        run_training(config, engine=DyingEngine(model))
    overrides = [*overrides, "logging.overwrite=true"]  # the dead run's step 1 is logged there

    with pytest.raises(FileNotFoundError, match="prompt file .*missing.jsonl does not exist"):
        run_training(load_config(CPU_CONFIG, [*overrides, f"data.path={data_dir}/missing.jsonl"]))

    bad = data_dir / "bad.jsonl"
    bad.write_text('{"prompt": "1 + 1", "answer": "2"}\nnot json\n{"answer": "3"}\n')
    with pytest.raises(MalformedDataError, match="2 malformed row.*line 2.*line 3"):
        run_training(load_config(CPU_CONFIG, [*overrides, f"data.path={bad}",
                                              "data.on_malformed=error"]))


def test_engine_death_missing_file_malformed_rows(tmp_path):
    overrides = [*tiny_run(tmp_path, prompts=8), *SMALL]
    run_distributed(_failures_worker, 1, overrides, str(tmp_path / "model"), tmp_path)
