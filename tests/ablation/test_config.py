"""Ablation configs: errors name the field; the equal-budget rule; the shipped ablation holds the
papers' variants as documented. No run starts here (configs only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megatron_archer.ablation.config import load_ablation_config
from megatron_archer.ablation.plan import run_specs
from tests.ablation.common import tiny_ablation

SHIPPED = Path(__file__).parents[2] / "examples" / "ablations" / "papers.yaml"


def _load(tmp_path, overrides=(), **sections):
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(tiny_ablation(tmp_path / "out", **sections)))
    return load_ablation_config(path, overrides)


@pytest.mark.parametrize("sections, overrides, message", [
    ({}, ["task.foo=1"], "task.foo is not a field"),
    ({}, ["warm_start.steps=0"], "warm_start.steps must be an integer >= 1"),
    ({}, ["task.max_operations=1", "task.min_operations=2"], "task.max_operations must be an integer >= 2"),
    ({}, ["seeds=[0, 0]"], "seeds must be distinct"),
    ({}, ["seeds=[]"], "seeds must be a non-empty list"),
    ({}, ["seeds=[-1]"], "seeds\\[0\\] must be an integer >= 0"),
    ({}, ["nproc=0"], "nproc must be an integer >= 1"),
    ({}, ["overrides=[train.steps]"], "must look like section.field=value"),
    ({}, ["entropy.rho=0"], "entropy.rho must be in"),
    ({"variants": [{"name": "a", "algorithm": {"preset": "grpo"}},
                   {"name": "a", "algorithm": {"preset": "dapo"}}]}, [],
     "variants\\[1\\].name 'a' is used twice"),
    ({"variants": [{"name": "warm_start", "algorithm": {}}]}, [], "variants\\[0\\].name 'warm_start'"),
    ({"variants": [{"name": "a/b", "algorithm": {}}]}, [], "variants\\[0\\].name must be letters"),
    ({"variants": [{"name": "a", "algorithm": {}, "colour": 1}]}, [],
     "variants\\[0\\].colour is not a field"),
    ({"variants": [{"name": "f", "algorithm": {"preset": "forking_80_20",
                                               "selection": {"forking": {"rho": 1.5}}}}]}, [],
     "variants\\[0\\] \\(f\\): algorithm.selection.forking.rho must be in"),
    ({"variants": [{"name": "d", "algorithm": {"preset": "dapo"}}]}, [],
     "variants\\[0\\] \\(d\\): algorithm.overlong.max_length \\(20480\\) must be <= rollout.max_new_tokens"),
    ({"variants": [{"name": "d", "algorithm": {"preset": "archer",
                                               "dynamic_sampling": {"max_gen_rounds": 3}}}]}, [],
     "variants\\[0\\].algorithm.dynamic_sampling.max_gen_rounds must be 1"),
    ({"variants": [{"name": "a", "algorithm": {"preset": "grpo"}},
                   {"name": "b", "algorithm": {"preset": "grpo"}, "overrides": ["rollout.n=4"]}]},
     [], "variants\\[1\\] \\(b\\): rollout.n is 4 but a has 2"),
])
def test_errors_name_the_field(tmp_path, sections, overrides, message):
    with pytest.raises(ValueError, match=message):
        _load(tmp_path, overrides, **sections)


def test_experiment_with_an_algorithm_is_refused(tmp_path):
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text("model: {path: m}\ndata: {path: d.jsonl}\nalgorithm: {preset: grpo}\n")
    with pytest.raises(ValueError, match="has an algorithm section"):
        _load(tmp_path, experiment=str(experiment))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _load(tmp_path, experiment=str(tmp_path / "missing.yaml"))


def test_every_run_gets_the_shared_budget_and_its_seed(tmp_path):
    config = _load(tmp_path, ["seeds=[3, 4]"])
    specs = run_specs(config)
    assert [(s.variant, s.seed) for s in specs] == [
        ("warm_start", 3), ("grpo", 3), ("archer", 3), ("warm_start", 4), ("grpo", 4),
        ("archer", 4)]
    for spec in specs:
        assert spec.evaluation.data.path.endswith("prepare/data/eval.jsonl")
        assert spec.evaluation.train.seed == spec.seed
        if spec.experiment is None:
            continue
        e = spec.experiment
        assert (e.train.seed, e.rollout.seed, e.data.seed) == (spec.seed,) * 3
        assert str(e.data.path).endswith("prepare/data/rl.jsonl")
        assert e.model.path.endswith("prepare/warm_start")
        assert e.checkpoint.interval == e.train.steps == 1
        assert e.algorithm.dynamic_sampling.max_gen_rounds == 1
        assert e.logging.dir == str(spec.run_dir)
    archer = [s for s in specs if s.variant == "archer"][0].experiment.algorithm
    assert archer.selection.method == "archer" and archer.dynamic_sampling.enabled


def test_the_shipped_ablation_holds_the_papers_variants():
    config = load_ablation_config(SHIPPED)
    assert config.seeds == (0, 1, 2)
    specs = {s.variant: s.experiment.algorithm for s in run_specs(config) if s.seed == 0
             and s.experiment is not None}
    assert list(specs) == [
        "grpo", "dapo", "forking_rho0.2", "forking_rho0.2_micro_batch", "forking_rho0.1",
        "forking_rho0.5", "forking_rho1.0", "bottom_80", "archer", "archer_no_knowledge_kl",
        "archer_equal_clip", "archer_soft", "clip_cov", "kl_cov"]
    grpo, dapo = specs["grpo"], specs["dapo"]
    assert grpo.loss.clip.kl_coef == 0.04 and not grpo.dynamic_sampling.enabled
    assert dapo.selection.method == "none" and dapo.loss.clip.eps_high == 0.28
    assert dapo.overlong.enabled and dapo.dynamic_sampling.enabled
    for name, rho in [("forking_rho0.1", 0.1), ("forking_rho0.2", 0.2), ("forking_rho0.5", 0.5),
                      ("forking_rho1.0", 1.0)]:
        forking = specs[name].selection.forking
        assert specs[name].selection.method == "forking"
        assert (forking.rho, forking.scope, forking.normalizer, forking.keep) == (
            rho, "global", "all", "top")
        assert specs[name].loss == dapo.loss and specs[name].overlong == dapo.overlong
    micro = specs["forking_rho0.2_micro_batch"].selection.forking
    assert (micro.rho, micro.scope, micro.normalizer) == (0.2, "micro_batch", "selected")
    bottom = specs["bottom_80"].selection.forking
    assert (bottom.rho, bottom.keep, bottom.scope) == (0.2, "bottom", "global")
    archer = specs["archer"].selection.archer
    assert specs["archer"].selection.method == "archer"
    assert (archer.reasoning.eps_high, archer.knowledge.eps_high, archer.knowledge.kl_coef) == (
        0.5, 0.2, 0.001)
    no_kl = specs["archer_no_knowledge_kl"].selection.archer
    assert no_kl.knowledge.kl_coef == 0.0 and no_kl.reasoning == archer.reasoning
    equal = specs["archer_equal_clip"].selection.archer
    assert equal.reasoning.eps_low == equal.knowledge.eps_low == 0.2
    assert equal.reasoning.eps_high == equal.knowledge.eps_high == 0.2
    assert equal.knowledge.kl_coef == 0.001 and equal.reasoning.kl_coef == 0.0
    soft = specs["archer_soft"]
    assert soft.selection.method == "archer_soft" and soft.selection.archer == archer
    for name in ("clip_cov", "kl_cov"):  # DAPO with one field changed, the paper's settings
        assert specs[name].selection.method == name
        assert specs[name].loss == dapo.loss and specs[name].overlong == dapo.overlong
        assert specs[name].dynamic_sampling == dapo.dynamic_sampling
    clip, kl = specs["clip_cov"].selection.clip_cov, specs["kl_cov"].selection.kl_cov
    assert (clip.ratio, clip.lb, clip.ub, kl.ratio, kl.coef) == (2e-4, 1.0, 5.0, 2e-3, 1.0)


def test_select_variants_keeps_the_named_in_order_and_names_unknown(tmp_path):
    from megatron_archer.ablation.config import select_variants

    config = _load(tmp_path)
    assert [v.name for v in select_variants(config, ["archer"]).variants] == ["archer"]
    assert [v.name for v in select_variants(config, ["archer", "grpo"]).variants] == \
        ["grpo", "archer"]
    with pytest.raises(ValueError, match="--variants: dapo not in the config's variants "
                                         "\\(grpo, archer\\)"):
        select_variants(config, ["grpo", "dapo"])
    with pytest.raises(ValueError, match="--variants: none given"):
        select_variants(config, [])
