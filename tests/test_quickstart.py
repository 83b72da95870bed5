"""The quick start's code path (``megatron_archer.quickstart``), drastically shortened: a tiny
model, a few warm-start steps, one RL step under torchrun (2 processes, tensor parallel 2), the
conversion, both evaluations and the plot. It checks the outputs exist and are well formed; that
RL raises accuracy is a claim about the full run (``make quickstart``), reported in the README,
not asserted here."""

from __future__ import annotations

import json
import math
from collections import deque

import pytest
import torch
import transformers
from PIL import Image

from megatron_archer.data.splits import split_of
from megatron_archer.quickstart.build import file_expressions, overlap, write_datasets
from megatron_archer.quickstart.pipeline import Settings, parse_args, run
from megatron_archer.quickstart.plot import plot_curves, trailing_mean
from megatron_archer.trainer import load_config

# a reward with signal for a barely trained model, so the RL step is not skipped
RL = ["reward.function=tests.trainer.rewards:digit_share", "train.steps=1",
      "rollout.prompts_per_step=4", "rollout.n=2", "rollout.max_new_tokens=16",
      "train.mini_batch_size=2"]


def test_shortened_quickstart(tmp_path, capsys):
    out = tmp_path / "qs"
    settings = Settings(out=str(out), hidden=32, layers=2, intermediate=64, sft_problems=64,
                        rl_problems=16, eval_problems=6, sft_steps=3, sft_batch=16, k=2,
                        rl_overrides=RL, seed=3)
    summary = run(settings)

    for name in ("base", "warm_start", "final"):
        model = transformers.AutoModelForCausalLM.from_pretrained(out / name)
        assert model.config.model_type == "qwen3" and model.config.hidden_size == 32
        transformers.AutoTokenizer.from_pretrained(out / name)
    for stage in ("accuracy_before", "accuracy_after"):
        result = summary[stage]
        assert result["problems"] == 6 and result["k"] == 2
        assert 0.0 <= result["avg@2"] <= result["pass@2"] <= 1.0
    run_dir = out / "rl"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1]
    assert lines[0]["step/skipped"] == 0
    for key in ("reward/mean", "reward/accuracy", "entropy/mean"):
        assert math.isfinite(lines[0][key]), key
    resolved = load_config(run_dir / "config.yaml")
    assert resolved.parallel.tensor == 2 and resolved.algorithm.selection.method == "archer"
    assert resolved.rollout.engine == "local"
    # --seed seeds the RL run; the starting point (model, data, warm start) keeps base_seed 0
    assert resolved.train.seed == resolved.rollout.seed == resolved.data.seed == 3
    assert summary["settings"]["base_seed"] == 0
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    with Image.open(out / "curves.png") as image:
        image.load()
        assert image.size[0] > 300 and image.size[1] > 100
    assert json.loads((out / "summary.json").read_text())["outputs"]["curves"] == str(
        out / "curves.png")
    printed = capsys.readouterr().out
    assert "accuracy before" in printed and "-> after" in printed


def test_arguments():
    settings = parse_args(["--out", "x", "--sft-steps", "5", "train.steps=3"])
    assert settings.out == "x" and settings.sft_steps == 5
    assert settings.rl_overrides == ["train.steps=3"]
    with pytest.raises(SystemExit):
        parse_args(["--no-such-option", "1"])


def test_evaluation_expressions_are_held_out(tmp_path):
    """The documented run's evaluation set: none of its expressions in the warm-start or RL files
    (of any seed), read back from the files the runs consume; ``seen`` is the RL file's head."""
    s = Settings()
    sizes = {"sft": s.sft_problems, "rl": s.rl_problems, "eval": s.eval_problems,
             "min_operations": s.min_operations, "max_operations": s.max_operations,
             "max_operand": s.max_operand, "eval_fraction": s.eval_fraction}
    runs = [write_datasets(tmp_path / str(seed), **sizes, seed=seed) for seed in (0, 1)]
    training = {e for data in runs for path in (data.sft, data.rl) for e in file_expressions(path)}
    for data in runs:
        held = file_expressions(data.eval)
        assert len(held) == s.eval_problems
        assert training.isdisjoint(held) and overlap(data) == 0.0
        assert {split_of(e, s.eval_fraction) for e in held} == {"eval"}
        rl = data.rl.read_text().splitlines()
        assert len(rl) == s.rl_problems
        assert data.seen.read_text().splitlines() == rl[:s.eval_problems]
    # the split, not the seed, keeps the sets apart: the two seeds' streams differ
    assert file_expressions(runs[0].rl) != file_expressions(runs[1].rl)


def test_curves_of_a_long_run_add_a_trailing_mean(tmp_path):
    """From 20 steps each series gets its trailing mean over a tenth of the run (the mean of
    each step's value and the window - 1 before it; reference: exact sums, math.fsum, over a
    sliding deque); the PNG is written."""
    values = [float(v) for v in torch.rand(40, generator=torch.Generator().manual_seed(0),
                                           dtype=torch.float64)]
    for window in (1, 4, 40, 50):
        recent, expected = deque(maxlen=window), []
        for value in values:
            recent.append(value)
            expected.append(math.fsum(recent) / len(recent))
        # summing w non-negative doubles left to right: relative error below (w - 1) * 2**-53,
        # plus 2**-53 for the division
        assert trailing_mean(values, window) == pytest.approx(expected, rel=window * 2**-53, abs=0)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": i + 1, "reward/mean": v, "reward/accuracy": v,
                                           "entropy/mean": v, "entropy/p80": 2 * v}) + "\n"
                               for i, v in enumerate(values)))
    with Image.open(plot_curves(metrics, tmp_path / "curves.png", before=0.1, after=0.2)) as image:
        image.load()
        assert image.size[0] > 300 and image.size[1] > 100
