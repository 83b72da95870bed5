"""The CPU quick start end to end: 2 gloo processes, tensor parallel 2, Archer on the arithmetic
prompts with the local engine, 2 steps (examples/configs/archer_arithmetic_cpu.yaml)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from megatron_archer.trainer import load_config, run_training
from tests.distributed import run_distributed
from tests.trainer.common import CPU_CONFIG, tiny_run

# a reward with signal for an untrained model, so dynamic sampling keeps groups and updates run
REWARD = "reward.function=tests.trainer.rewards:digit_share"


def _train_worker(rank, world_size, overrides, initial):
    trainer = run_training(load_config(CPU_CONFIG, overrides))
    if rank == 0:
        assert trainer.engine.weight_version == 2
        engine = dict(trainer.engine.model.named_parameters())
        moved = max((engine[n].detach() - t).abs().max().item() for n, t in initial.items())
        assert moved > 1e-4, moved  # the engine holds updated weights


def test_two_steps_tp2_archer(tmp_path):
    overrides = [*tiny_run(tmp_path), REWARD]
    start = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    run_distributed(_train_worker, 2, overrides, start)

    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    for line in lines:
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in line.values()), line
        assert line["step/skipped"] == 0 and line["actor/updates"] == 2
        # SPEC 7: per-class shares / clips / ratio / KL, entropy, gap, keep rate, phases
        for key in ("reward/mean", "reward/accuracy", "response/length_mean",
                    "response/length_max", "response/clipped_share", "response/repetition_ratio",
                    "entropy/mean", "entropy/p80", "actor/high/token_share",
                    "actor/low/clip_frac_low", "actor/high/clip_frac_high",
                    "actor/low/ratio_mean", "actor/low/kl_mean", "actor/grad_norm", "actor/lr",
                    "dynamic_sampling/keep_rate", "perf/tokens_per_s", "time/rollout",
                    "time/reward", "time/logprob", "time/train", "time/weight_sync"):
            assert key in line, key
        # Archer's split at the per-response 0.8 quantile: about 20% high-entropy tokens
        assert 0.1 < line["actor/high/token_share"] < 0.35
        # the engine's log-probs are the actor's: same weights (step 2: after the first sync)
        assert line["rollout/logprob_abs_diff_mean"] < 1e-3
    resolved = load_config(run / "config.yaml")
    assert resolved.algorithm.selection.method == "archer"
    assert resolved.parallel.tensor == 2
    pytest.importorskip("tensorboard")
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
