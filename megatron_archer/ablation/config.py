"""AblationConfig: one YAML file naming the task, the warm start, the variants and the seeds.

Every section is a frozen dataclass validated at construction (``config_fields``); errors name the
dotted field (``variants[3].name``, ``warm_start.steps``). ``experiment`` is the experiment YAML
every run starts from (``trainer.config``), resolved relative to the ablation file; it has no
``algorithm`` section: each variant brings its own. ``load_ablation_config`` also builds every
run's experiment config (``plan.run_specs``), so a variant that the trainer would refuse fails at
load, before an hour of runs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from megatron_archer.ablation.claims import HIGHER, LOWER
from megatron_archer.config_fields import (
    choice,
    from_dict,
    instance,
    integer,
    merge,
    number,
)
from megatron_archer.trainer.config import (
    parse_overrides,
    read_yaml_file,  # the trainer's YAML: 1e-6 is a float
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
WARM_START = "warm_start"  # the table's row of the starting checkpoint; no variant may take it


def _strings(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(
            isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a list of strings; got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class TaskConfig:
    """The step-by-step arithmetic task (``data.stepwise_arithmetic``): min..max operations on
    integers in [1, max_operand]; ``eval_fraction`` of the expression space is held out for
    evaluation. ``sft_problems`` warm-start problems and ``rl_problems`` RL prompts (the first of
    the same train stream), ``eval_problems`` evaluation problems, all drawn with ``seed``."""

    min_operations: int = 2
    max_operations: int = 3
    max_operand: int = 9
    eval_fraction: float = 0.2
    sft_problems: int = 4000
    rl_problems: int = 1000
    eval_problems: int = 200
    seed: int = 0

    def __post_init__(self):
        integer("min_operations", self.min_operations, low=1)
        integer("max_operations", self.max_operations, low=self.min_operations)
        integer("max_operand", self.max_operand, low=1)
        number("eval_fraction", self.eval_fraction, low=0.0, high=1.0, low_open=True,
               high_open=True)
        for name in ("sft_problems", "rl_problems", "eval_problems"):
            integer(name, getattr(self, name), low=1)
        integer("seed", self.seed, low=0)


@dataclass(frozen=True)
class ModelSizes:
    """The tiny Qwen3 model built from scratch (``quickstart.build_base_model``), seeded."""

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    intermediate: int = 384
    seed: int = 0

    def __post_init__(self):
        for name in ("hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate"):
            integer(name, getattr(self, name), low=1)
        integer("seed", self.seed, low=0)
        if self.heads % self.kv_heads:
            raise ValueError(f"kv_heads ({self.kv_heads}) must divide heads ({self.heads})")


@dataclass(frozen=True)
class WarmStartConfig:
    """The supervised warm start on the solutions (``quickstart.warm_start``)."""

    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    label_smoothing: float = 0.0
    seed: int = 0

    def __post_init__(self):
        integer("steps", self.steps, low=1)
        integer("batch_size", self.batch_size, low=1)
        number("lr", self.lr, low=0.0, low_open=True)
        number("label_smoothing", self.label_smoothing, low=0.0, high=1.0, high_open=True)
        integer("seed", self.seed, low=0)


@dataclass(frozen=True)
class EvalConfig:
    """avg@k / pass@k at T = 1 on the held-out problems (``trainer.evaluate``), in engine
    batches of ``batch_prompts`` problems."""

    k: int = 8
    batch_prompts: int = 50

    def __post_init__(self):
        integer("k", self.k, low=1)
        integer("batch_prompts", self.batch_prompts, low=1)


@dataclass(frozen=True)
class EntropyConfig:
    """The entropy measurements (``analysis.analyze_entropy``): the warm start answers the first
    ``prompts`` evaluation problems ``samples_per_prompt`` times; every final checkpoint is scored
    on those same tokens for the top-``rho`` position overlap; ``min_count`` for the token table."""

    prompts: int = 64
    samples_per_prompt: int = 2
    rho: float = 0.2
    min_count: int = 100

    def __post_init__(self):
        integer("prompts", self.prompts, low=1)
        integer("samples_per_prompt", self.samples_per_prompt, low=1)
        number("rho", self.rho, low=0.0, high=1.0, low_open=True)
        integer("min_count", self.min_count, low=1)


@dataclass(frozen=True)
class Variant:
    """One algorithm: ``algorithm`` is an experiment's ``algorithm`` section (an optional
    ``preset`` plus overrides); ``overrides`` are extra ``section.field=value`` for its runs."""

    name: str
    algorithm: Mapping[str, Any]
    overrides: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(f"name must be letters, digits, '_', '.', '-' (a directory name); "
                             f"got {self.name!r}")
        if self.name == WARM_START:
            raise ValueError(f"name {WARM_START!r} is the starting checkpoint's row; pick another")
        instance("algorithm", self.algorithm, Mapping)
        object.__setattr__(self, "overrides", _strings("overrides", self.overrides))
        parse_overrides(self.overrides)


@dataclass(frozen=True)
class Claim:
    """A paper's claim for the report's verdicts (``claims``): ``variant`` reaches a ``higher``
    (or ``lower``) held-out avg@k than ``reference`` (another variant, or ``warm_start``);
    ``source`` says who claims it."""

    variant: str
    reference: str
    direction: str = HIGHER
    source: str = ""

    def __post_init__(self):
        for name in ("variant", "reference"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a variant name; got {getattr(self, name)!r}")
        if self.reference == self.variant:
            raise ValueError(f"reference must differ from variant; both are {self.variant!r}")
        choice("direction", self.direction, (HIGHER, LOWER))
        instance("source", self.source, str)


@dataclass(frozen=True)
class AblationConfig:
    """The whole ablation; see the module docstring. ``out``: the output directory (every run,
    the report); ``nproc``: processes per RL run (torchrun); ``overrides``: applied to every
    run's experiment; ``threads``: torch threads of the orchestrating process (0: every core);
    ``claims``: the comparisons the report gives a verdict on (``claims.claim_verdicts``)."""

    experiment: str
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    out: str = "runs/ablation"
    nproc: int = 2
    overrides: tuple[str, ...] = ()
    threads: int = 0
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelSizes = field(default_factory=ModelSizes)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    entropy: EntropyConfig = field(default_factory=EntropyConfig)
    claims: tuple[Claim, ...] = ()

    def __post_init__(self):
        if not isinstance(self.experiment, str) or not self.experiment:
            raise ValueError(f"experiment must be an experiment YAML path; got {self.experiment!r}")
        if not isinstance(self.variants, (list, tuple)) or not self.variants:
            raise ValueError(f"variants must be a non-empty list; got {self.variants!r}")
        variants = tuple(v if isinstance(v, Variant) else from_dict(Variant, v, f"variants[{i}].")
                         for i, v in enumerate(self.variants))
        names = [v.name for v in variants]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"variants[{i}].name {name!r} is used twice")
        object.__setattr__(self, "variants", variants)
        if not isinstance(self.seeds, (list, tuple)) or not self.seeds:
            raise ValueError(f"seeds must be a non-empty list of integers; got {self.seeds!r}")
        for i, seed in enumerate(self.seeds):
            integer(f"seeds[{i}]", seed, low=0)
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct; got {list(self.seeds)}")
        object.__setattr__(self, "seeds", tuple(self.seeds))
        if not isinstance(self.out, str) or not self.out:
            raise ValueError(f"out must be a directory path; got {self.out!r}")
        integer("nproc", self.nproc, low=1)
        integer("threads", self.threads, low=0)
        object.__setattr__(self, "overrides", _strings("overrides", self.overrides))
        parse_overrides(self.overrides)
        for name, cls in (("task", TaskConfig), ("model", ModelSizes),
                          ("warm_start", WarmStartConfig), ("eval", EvalConfig),
                          ("entropy", EntropyConfig)):
            instance(name, getattr(self, name), cls)
        if not isinstance(self.claims, (list, tuple)):
            raise ValueError(f"claims must be a list; got {self.claims!r}")
        claims = tuple(c if isinstance(c, Claim) else from_dict(Claim, c, f"claims[{i}].")
                       for i, c in enumerate(self.claims))
        for i, claim in enumerate(claims):
            for side in ("variant", "reference"):
                name = getattr(claim, side)
                if name not in names and not (side == "reference" and name == WARM_START):
                    raise ValueError(f"claims[{i}].{side} {name!r} is not a variant "
                                     f"({', '.join(names)})")
        object.__setattr__(self, "claims", claims)


def select_variants(config: AblationConfig, names: list[str]) -> AblationConfig:
    """``config`` with only the variants ``names``, in the config's order: lanes of one ablation
    run side by side on the same ``out`` with disjoint variants (a run directory is only ever
    written by the lane that owns its variant); an unknown name is an error."""
    known = [v.name for v in config.variants]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ValueError(f"--variants: {', '.join(unknown) or 'none given'} not in the config's "
                         f"variants ({', '.join(known)})")
    kept = {*names, WARM_START}
    return replace(config, variants=tuple(v for v in config.variants if v.name in names),
                   claims=tuple(c for c in config.claims
                                if c.variant in kept and c.reference in kept))


def load_ablation_config(path: str | os.PathLike, overrides=()) -> AblationConfig:
    """The ablation of the YAML file ``path`` with ``overrides`` (``a.b=value``) applied;
    ``experiment`` (and a relative ``out``, against the working directory as usual) resolved.
    Every run's experiment config is built once here (``plan.run_specs``) to refuse bad variants."""
    from megatron_archer.ablation.plan import run_specs

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ablation config {path} does not exist")
    data = read_yaml_file(path) or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: the top level must be a mapping")
    data = merge(data, parse_overrides(overrides))
    if isinstance(data.get("experiment"), str):
        data["experiment"] = str((path.parent / data["experiment"]).resolve())
    config = from_dict(AblationConfig, data)
    run_specs(config)
    return config
