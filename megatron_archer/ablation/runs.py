"""One variant x seed: RL under torchrun from the warm start, the final checkpoint converted to
Hugging Face format, evaluated on the held-out problems (avg@k, pass@k at T = 1, mean length:
``trainer.evaluate``) and scored on the warm start's responses (top-rho entropy-position overlap
with the warm start: ``analysis.analyze_entropy``). ``summary.json`` in the run directory, written
last, marks the run finished; a run directory without one is removed and the run redone. The
warm start's row is evaluated the same way, per seed, without training."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

from megatron_archer.ablation.config import AblationConfig
from megatron_archer.ablation.plan import Layout, RunSpec
from megatron_archer.ablation.records import fingerprint, read_record, write_record
from megatron_archer.config_fields import to_plain
from megatron_archer.trainer.config import resolved_yaml

SUMMARY = "summary.json"
CURVES = {"accuracy": "reward/accuracy", "entropy": "entropy/mean"}  # from metrics.jsonl


def run_fingerprint(config: AblationConfig, spec: RunSpec, prepared: str) -> str:
    """What a run's summary depends on: the prepared start, its experiment, and what its
    evaluation reads (``trainer.evaluate``: model, data, rollout, reward, seed; so the warm
    start's rows survive a change of, say, ``train.steps``)."""
    experiment = None if spec.experiment is None else resolved_yaml(spec.experiment)
    e = spec.evaluation
    evaluation = [to_plain(getattr(e, name)) for name in ("model", "data", "rollout", "reward")]
    return fingerprint(prepared, experiment, evaluation, e.train.seed, asdict(config.eval),
                       asdict(config.entropy))


def read_curves(metrics_jsonl: Path) -> dict[str, list]:
    """Per step: rollout accuracy and mean token entropy (None where a step lacks it, e.g.
    the entropy of a skipped step, or a non-finite value logged as a string)."""
    records = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    curves: dict[str, list] = {"step": [r["step"] for r in records]}
    for name, key in CURVES.items():
        curves[name] = [r[key] if isinstance(r.get(key), (int, float)) else None for r in records]
    return curves


def _train_and_convert(spec: RunSpec, nproc: int) -> Path:
    from megatron_archer.models.convert import megatron_to_hf
    from megatron_archer.quickstart.pipeline import torchrun_train

    experiment = spec.run_dir / "experiment.yaml"
    experiment.write_text(resolved_yaml(spec.experiment))
    try:
        torchrun_train(experiment, [], nproc, tag="ablate")
    except subprocess.CalledProcessError as error:
        raise RuntimeError(f"run {spec.variant} seed {spec.seed} failed (torchrun exit status "
                           f"{error.returncode}; its output is above, its files in "
                           f"{spec.run_dir}); the next ablate call redoes it") from None
    steps = spec.experiment.train.steps
    final = spec.run_dir / "final"
    megatron_to_hf(spec.run_dir / "checkpoints" / f"step_{steps:08d}" / "model", final,
                   tensor_parallel=1)
    return final


def _entropy(config: AblationConfig, spec: RunSpec, final: Path) -> dict:
    from megatron_archer.analysis import AnalysisConfig, analyze_entropy

    layout = Layout(Path(config.out))
    result = analyze_entropy(AnalysisConfig(
        checkpoint=str(layout.warm_start), compare_checkpoint=str(final),
        responses=str(layout.warm_entropy / "responses.jsonl"),
        output_dir=str(spec.run_dir / "entropy"), template=spec.evaluation.data.template,
        rho=config.entropy.rho, min_count=config.entropy.min_count))
    comparison = result["comparison"]
    return {"top_overlap": comparison["top_overlap"], "rho": comparison["rho"],
            "mean_change": comparison["mean_change"], "distribution": comparison["distribution"]}


def run(config: AblationConfig, spec: RunSpec, prepared: str) -> tuple[dict, bool]:
    """The run's summary and whether it ran now (False: found finished, with these settings)."""
    from megatron_archer.quickstart.pipeline import Clock
    from megatron_archer.trainer.evaluate import evaluate

    expected = run_fingerprint(config, spec, prepared)
    path = spec.run_dir / SUMMARY
    found = read_record(path, expected, f"run {spec.variant} seed {spec.seed}")
    if found is not None:
        return found, False
    if spec.run_dir.exists():  # a run that stopped before its summary
        shutil.rmtree(spec.run_dir)
    spec.run_dir.mkdir(parents=True)
    clock = Clock(tag=f"ablate {spec.variant} seed {spec.seed}")
    summary = {"fingerprint": expected, "variant": spec.variant, "seed": spec.seed}
    model = Layout(Path(config.out)).warm_start
    if spec.experiment is not None:
        model = _train_and_convert(spec, config.nproc)
        clock.stage("train")
        summary["curves"] = read_curves(spec.run_dir / "metrics.jsonl")
    summary["eval"] = evaluate(spec.evaluation, k=config.eval.k, model_path=str(model))
    clock.stage("eval")
    if spec.experiment is not None:
        summary["entropy"] = _entropy(config, spec, model)
        clock.stage("entropy")
    summary["time"] = {**clock.stages, "total": clock.total()}
    write_record(path, summary)
    return summary, True
