"""Where an ablation's files go and the experiment config of every run.

Every RL run starts from the same warm start and trains on the same prompts for the same number of
steps with the same rollout budget: ``rollout.prompts_per_step`` x ``rollout.n`` responses of at
most ``rollout.max_new_tokens`` a step, in one generation round (dynamic sampling, where a
variant enables it, filters that round's groups without drawing more:
``algorithm.dynamic_sampling.max_gen_rounds`` is set to 1, and a variant asking for more is
refused). A run differs from another of the same variant only in its seed (``train.seed``,
``rollout.seed``, ``data.seed``). Every evaluation uses the shared settings only, so all
checkpoints are evaluated alike.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from megatron_archer.ablation.config import WARM_START, AblationConfig, Variant
from megatron_archer.trainer.config import ExperimentConfig, load_config, read_yaml_file

BUDGET_FIELDS = ("train.steps", "rollout.prompts_per_step", "rollout.n", "rollout.max_new_tokens")


@dataclass(frozen=True)
class Layout:
    """The output directory: ``prepare/`` (base model, data, warm start, its entropy report),
    ``runs/<variant>/seed_<s>/`` (one run each, ``warm_start`` included) and ``report/``."""

    root: Path

    @property
    def prepare(self) -> Path:
        return self.root / "prepare"

    @property
    def base_model(self) -> Path:
        return self.prepare / "base"

    @property
    def warm_start(self) -> Path:
        return self.prepare / "warm_start"

    @property
    def warm_entropy(self) -> Path:
        return self.prepare / "entropy"

    @property
    def prepared(self) -> Path:
        return self.prepare / "prepared.json"

    def data(self, name: str) -> Path:
        """``sft``, ``rl`` or ``eval``: the jsonl of that set."""
        return self.prepare / "data" / f"{name}.jsonl"

    def run_dir(self, variant: str, seed: int) -> Path:
        return self.root / "runs" / variant / f"seed_{seed}"

    @property
    def report(self) -> Path:
        return self.root / "report"


@dataclass(frozen=True)
class RunSpec:
    """One variant x seed: its RL experiment (None for the warm start's row, evaluated only) and
    the evaluation config (held-out problems, the shared settings, the seed)."""

    variant: str
    seed: int
    run_dir: Path
    experiment: ExperimentConfig | None
    evaluation: ExperimentConfig


def _get(config: ExperimentConfig, dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(config, section), name)


def base_experiment(config: AblationConfig, overrides: list[str]) -> ExperimentConfig:
    """The experiment YAML with the shared and the given overrides; refuses an ``algorithm``
    section there (the variants define the algorithm)."""
    path = Path(config.experiment)
    if not path.is_file():
        raise FileNotFoundError(f"experiment {path} does not exist")
    if "algorithm" in (read_yaml_file(path) or {}):
        raise ValueError(f"experiment {path} has an algorithm section: remove it, each variant's "
                         f"algorithm is its own")
    return load_config(path, [*config.overrides, *overrides])


def evaluation_config(config: AblationConfig, seed: int) -> ExperimentConfig:
    """The evaluation of every checkpoint of ``seed``: held-out problems, shared settings."""
    layout = Layout(Path(config.out))
    return base_experiment(config, [
        f"model.path={layout.warm_start}", f"data.path={layout.data('eval')}",
        f"rollout.prompts_per_step={config.eval.batch_prompts}", "train.mini_batch_size=1",
        f"train.seed={seed}", "logging.progress=false"])


def _variant_overrides(config: AblationConfig, variant: Variant, index: int, seed: int,
                       run_dir: Path) -> list[str]:
    layout = Layout(Path(config.out))
    sampling = variant.algorithm.get("dynamic_sampling") or {}
    rounds = sampling.get("max_gen_rounds", 1) if isinstance(sampling, Mapping) else 1
    if rounds != 1:
        raise ValueError(f"variants[{index}].algorithm.dynamic_sampling.max_gen_rounds must be 1 "
                         f"(one generation round a step, so every run has the same rollout "
                         f"budget); got {rounds!r}")
    return [*variant.overrides, f"algorithm={json.dumps(dict(variant.algorithm))}",
            "algorithm.dynamic_sampling.max_gen_rounds=1",
            f"model.path={layout.warm_start}", f"data.path={layout.data('rl')}",
            f"logging.dir={run_dir}", f"train.seed={seed}", f"rollout.seed={seed}",
            f"data.seed={seed}", "logging.progress=false", "checkpoint.resume=false",
            "checkpoint.keep_last=1"]


def _rl_experiment(config: AblationConfig, variant: Variant, index: int, seed: int,
                   run_dir: Path) -> ExperimentConfig:
    overrides = _variant_overrides(config, variant, index, seed, run_dir)
    try:
        experiment = base_experiment(config, overrides)
        # a checkpoint at the last step only: the final policy, evaluated and compared
        return base_experiment(config, [*overrides,
                                        f"checkpoint.interval={experiment.train.steps}"])
    except ValueError as error:
        raise ValueError(f"variants[{index}] ({variant.name}): {error}") from None


def run_specs(config: AblationConfig) -> list[RunSpec]:
    """Every run, seed-major (all variants of the first seed first, so a partial ablation
    already compares every variant), after the warm start's row of that seed; raises, naming
    the variant and field, for a run the trainer would refuse or whose budget differs."""
    layout = Layout(Path(config.out))
    specs: list[RunSpec] = []
    for seed in config.seeds:
        evaluation = evaluation_config(config, seed)
        specs.append(RunSpec(WARM_START, seed, layout.run_dir(WARM_START, seed), None, evaluation))
        for index, variant in enumerate(config.variants):
            run_dir = layout.run_dir(variant.name, seed)
            specs.append(RunSpec(variant.name, seed, run_dir,
                                 _rl_experiment(config, variant, index, seed, run_dir), evaluation))
    rl = [s for s in specs if s.experiment is not None]
    first = rl[0]
    for spec in rl[1:]:
        for dotted in BUDGET_FIELDS:
            mine, theirs = _get(spec.experiment, dotted), _get(first.experiment, dotted)
            if mine != theirs:
                index = [v.name for v in config.variants].index(spec.variant)
                raise ValueError(f"variants[{index}] ({spec.variant}): {dotted} is {mine!r} but "
                                 f"{first.variant} has {theirs!r}; every run needs the same "
                                 f"steps and rollout budget")
    return specs
