"""A tiny ablation for tests: a 1-layer Qwen3, a few problems, one RL step per run."""

from __future__ import annotations

from pathlib import Path

EXPERIMENT = Path(__file__).parents[2] / "examples" / "ablations" / "experiment.yaml"

# digit_share gives an untrained model reward signal, so no step is skipped
OVERRIDES = ["train.steps=1", "rollout.prompts_per_step=4", "rollout.n=2",
             "train.mini_batch_size=2", "rollout.max_new_tokens=12",
             "reward.function=tests.trainer.rewards:digit_share", "logging.tensorboard=false"]


def tiny_ablation(out: Path, seeds=(0,), variants=None, **sections) -> dict:
    """The mapping of a 2-variant tiny ablation under ``out`` (``sections`` replace parts)."""
    config = {
        "experiment": str(EXPERIMENT), "out": str(out), "seeds": list(seeds),
        "overrides": list(OVERRIDES), "threads": 1,
        "task": {"sft_problems": 32, "rl_problems": 8, "eval_problems": 4},
        "model": {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 2, "head_dim": 16,
                  "intermediate": 64},
        "warm_start": {"steps": 2, "batch_size": 16},
        "eval": {"k": 2, "batch_prompts": 4},
        "entropy": {"prompts": 3, "samples_per_prompt": 1, "min_count": 1},
        "variants": variants or [{"name": "grpo", "algorithm": {"preset": "grpo"}},
                                 {"name": "archer", "algorithm": {"preset": "archer"}}],
    }
    config.update(sections)
    return config
