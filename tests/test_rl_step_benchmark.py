"""benchmarks/rl_step.py's pieces that need no run: its overrides make a valid config with the
benchmark's work, and the summary drops warm-up steps and takes median/min/max over runs."""

from __future__ import annotations

import pytest

from benchmarks.rl_step import CONFIG, format_table, our_overrides, summarise
from megatron_archer.trainer import load_config


def test_overrides_load_with_the_benchmark_work(tmp_path):
    work = {"model": str(tmp_path / "model"), "data": str(tmp_path / "rl.jsonl")}
    config = load_config(CONFIG, our_overrides(work, 2, 7, tmp_path / "run"))
    assert config.parallel.tensor == 2 and config.train.steps == 7
    assert (config.rollout.prompts_per_step, config.rollout.n) == (16, 8)
    assert config.rollout.max_new_tokens == 10 and config.train.mini_batch_size == 8
    assert not config.algorithm.dynamic_sampling.enabled and not config.data.shuffle
    assert config.checkpoint.interval == 0 and not config.logging.tensorboard


def test_summary_drops_warmup_and_pools_runs():
    def run(*steps):
        return [{"step": s, "rollout": s / 4, "train": s / 2, "other": s / 4} for s in steps]

    table = summarise({"trl": [run(9.0, 1.0, 3.0), run(9.0, 2.0)],
                       "tp1": [run(9.0, 0.5, 1.5)]}, warmup=1)
    assert table["trl"]["median"] == 2.0 and table["trl"]["steps"] == 3
    assert (table["trl"]["min"], table["trl"]["max"]) == (1.0, 3.0)
    assert table["tp1"]["median"] == 1.0 and table["tp1"]["train"] == 0.5
    assert "| 0.50 |" in format_table(table)  # ours / TRL
    with pytest.raises(ValueError, match="--steps must exceed --warmup=3"):
        summarise({"trl": [run(1.0, 2.0)]}, warmup=3)
