"""``megatron-archer ablate`` end to end, shortened: 2 variants x 2 seeds of one RL step each
(torchrun, 2 processes, tensor parallel 2), from one tiny warm start. The report must agree with
the per-run summaries, its PNGs decode, and a second call runs only what is not finished."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml
from PIL import Image

import megatron_archer.quickstart.pipeline as pipeline
from megatron_archer.ablation.ablate import ablate
from megatron_archer.ablation.config import load_ablation_config
from megatron_archer.ablation.plan import Layout
from tests.ablation.common import tiny_ablation

VARIANTS = ("warm_start", "grpo", "archer")


def _summaries(layout: Layout, seeds) -> dict:
    return {v: {s: json.loads((layout.run_dir(v, s) / "summary.json").read_text())
                for s in seeds} for v in VARIANTS}


def _check_report(layout: Layout, report: dict, seeds) -> None:
    runs = _summaries(layout, seeds)
    on_disk = json.loads((layout.report / "summary.json").read_text())
    assert on_disk["table"] == json.loads(json.dumps(report["table"]))
    rows = {row["variant"]: row for row in csv.DictReader((layout.report / "table.csv").open())}
    assert list(rows) == list(VARIANTS)
    for variant in VARIANTS:
        per_seed = {
            "avg@2": [runs[variant][s]["eval"]["avg@2"] for s in seeds],
            "pass@2": [runs[variant][s]["eval"]["pass@2"] for s in seeds],
            "mean_response_length": [runs[variant][s]["eval"]["mean_response_length"]
                                     for s in seeds],
        }
        if variant != "warm_start":
            per_seed["top_overlap"] = [runs[variant][s]["entropy"]["top_overlap"] for s in seeds]
        for metric, values in per_seed.items():
            stat = on_disk["table"][variant][metric]
            assert stat["n"] == len(seeds) == int(rows[variant]["seeds"])
            assert stat["mean"] == pytest.approx(np.mean(values), abs=1e-12)
            assert stat["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
            assert float(rows[variant][f"{metric}_mean"]) == pytest.approx(stat["mean"], abs=1e-12)
            assert float(rows[variant][f"{metric}_std"]) == pytest.approx(stat["std"], abs=1e-12)
            assert stat["values"] == {str(s): v for s, v in zip(seeds, values)}
        if variant != "warm_start":
            band = on_disk["curves"][variant]
            for name in ("accuracy", "entropy"):
                values = [runs[variant][s]["curves"][name][0] for s in seeds]
                assert band[f"{name}_mean"][0] == pytest.approx(np.mean(values), abs=1e-12)
                assert band[f"{name}_std"][0] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    readme = (layout.report / "README.md").read_text()
    archer = on_disk["table"]["archer"]["avg@2"]
    assert f"| archer | {len(seeds)} | {100 * archer['mean']:.1f} ± {100 * archer['std']:.1f} |" \
        in readme
    for name in ("curves.png", "final.png"):
        with Image.open(layout.report / name) as image:
            image.load()
            assert image.size[0] > 600 and image.size[1] > 150


def test_ablation_report_and_resume(tmp_path, monkeypatch):
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(tiny_ablation(tmp_path / "out", seeds=[0, 1])))
    launched = []
    train = pipeline.torchrun_train
    monkeypatch.setattr(pipeline, "torchrun_train",
                        lambda config, *a, **k: (launched.append(str(config)), train(config, *a, **k)))

    first = ablate(load_ablation_config(path, ["seeds=[0]"]))
    layout = Layout(tmp_path / "out")
    assert first["ran"] == ["warm_start/seed_0", "grpo/seed_0", "archer/seed_0"]
    assert len(launched) == 2
    finished = {v: (layout.run_dir(v, 0) / "summary.json").stat().st_mtime_ns for v in VARIANTS}

    second = ablate(load_ablation_config(path))  # seeds 0 and 1: only seed 1 runs
    assert second["reused"] == ["warm_start/seed_0", "grpo/seed_0", "archer/seed_0"]
    assert second["ran"] == ["warm_start/seed_1", "grpo/seed_1", "archer/seed_1"]
    assert len(launched) == 4 and all("seed_1" in c for c in launched[2:])
    assert finished == {v: (layout.run_dir(v, 0) / "summary.json").stat().st_mtime_ns
                        for v in VARIANTS}
    _check_report(layout, second, [0, 1])

    # the runs really are different seeds of the same budget
    runs = _summaries(layout, [0, 1])
    assert runs["grpo"][0]["fingerprint"] != runs["grpo"][1]["fingerprint"]
    for variant in ("grpo", "archer"):
        experiment = yaml.safe_load((layout.run_dir(variant, 1) / "config.yaml").read_text())
        assert experiment["train"]["seed"] == experiment["rollout"]["seed"] == 1
        assert experiment["algorithm"]["dynamic_sampling"]["max_gen_rounds"] == 1
        assert experiment["parallel"]["tensor"] == 2

    # report only: nothing runs; an unfinished run is listed as missing
    (layout.run_dir("archer", 1) / "summary.json").unlink()
    partial = ablate(load_ablation_config(path), report_only=True)
    assert partial["ran"] == [] and partial["missing"] == ["archer/seed_1"]
    assert partial["table"]["archer"]["avg@2"]["n"] == 1
    assert len(launched) == 4

    # a finished run made with other settings is refused, not silently reused
    with pytest.raises(ValueError, match="made with other settings"):
        ablate(load_ablation_config(path, ["eval.k=3"]), report_only=True)
