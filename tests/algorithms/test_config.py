"""Configs: presets carry the papers' values (docs/numerics.md §4, 5), validation names the field, dicts round-trip."""

import dataclasses

import pytest

from megatron_archer.algorithms import (
    AlgorithmConfig,
    Constraints,
    ForkingConfig,
    LossConfig,
    SelectionConfig,
    config_from_dict,
    preset,
)


def test_dapo_preset_is_the_forking_papers_dapo():
    cfg = preset("dapo")
    assert (cfg.loss.clip.eps_low, cfg.loss.clip.eps_high, cfg.loss.clip.kl_coef) == (0.2, 0.28, 0.0)
    assert cfg.loss.entropy_coef == 0.0 and cfg.loss.aggregation == "token-mean"
    assert cfg.dynamic_sampling.enabled
    assert (cfg.overlong.enabled, cfg.overlong.max_length, cfg.overlong.cache_length) == (True, 20480, 4096)
    assert cfg.selection.method == "none"


def test_forking_preset_is_dapo_with_global_top_20_percent():
    cfg = preset("forking_80_20")
    assert dataclasses.replace(cfg, selection=SelectionConfig()) == preset("dapo")
    fork = cfg.selection.forking
    assert cfg.selection.method == "forking" and cfg.selection.entropy_source == "current"
    assert (fork.rho, fork.scope, fork.normalizer, fork.keep) == (0.2, "global", "all", "top")


def test_archer_preset_matches_the_table():
    cfg = preset("archer")
    archer = cfg.selection.archer
    assert cfg.selection.method == "archer" and archer.quantile == 0.8
    assert archer.reasoning == Constraints(0.5, 0.5, 0.0)
    assert archer.knowledge == Constraints(0.2, 0.2, 0.001)
    assert cfg.loss.dual_clip == 10.0 and cfg.loss.kl_estimator == "k3"
    assert cfg.loss.kl_aggregation == "class_mean" and cfg.loss.aggregation == "token-mean"
    assert cfg.advantage.estimator == "grpo" and cfg.dynamic_sampling.enabled


def test_grpo_preset():
    cfg = preset("grpo")
    assert cfg.loss.clip == Constraints(0.2, 0.2, 0.04)
    assert cfg.loss.aggregation == "seq-mean-token-mean" and cfg.loss.kl_estimator == "k3"


@pytest.mark.parametrize("name", ["grpo", "dapo", "forking_80_20", "archer"])
def test_presets_round_trip_through_plain_dicts(name):
    cfg = preset(name)
    assert config_from_dict({"preset": name}) == cfg
    assert config_from_dict(dataclasses.asdict(cfg)) == cfg


def test_dict_overrides_merge_into_the_preset():
    cfg = config_from_dict({"preset": "forking_80_20", "selection": {"forking": {"rho": 0.5}},
                            "loss": {"clip": {"eps_high": 0.3}}})
    assert cfg.selection.forking == ForkingConfig(rho=0.5)
    assert cfg.loss.clip == Constraints(0.2, 0.3, 0.0)
    assert cfg.overlong == preset("dapo").overlong


@pytest.mark.parametrize("data, message", [
    ({"loss": {"aggregation": "mean"}}, "loss.aggregation must be one of token-mean, seq-mean-token-mean"),
    ({"selection": {"forking": {"rho": 0.0}}}, "selection.forking.rho must be in (0.0, 1.0]"),
    ({"selection": {"forking": {"rho": 1.5}}}, "selection.forking.rho must be in (0.0, 1.0]"),
    ({"selection": {"forking": {"rho": "0.2"}}}, "selection.forking.rho must be a number"),
    ({"selection": {"forking": {"scope": "batch"}}}, "selection.forking.scope must be one of global, micro_batch"),
    ({"selection": {"method": "topk"}},
     "selection.method must be one of none, forking, archer, archer_soft, clip_cov, kl_cov"),
    ({"selection": {"entropy_source": "ref"}}, "selection.entropy_source must be one of current, old"),
    ({"selection": {"archer": {"knowledge": {"kl_coef": -1}}}},
     "selection.archer.knowledge.kl_coef must be in [0.0, inf]"),
    ({"loss": {"clip": {"eps_low": 1.0}}}, "loss.clip.eps_low must be in [0.0, 1.0)"),
    ({"loss": {"dual_clip": 1.0}}, "loss.dual_clip must be in (1.0, inf]"),
    ({"loss": {"kl_estimator": "k4"}}, "loss.kl_estimator must be one of k1, k2, k3"),
    ({"loss": {"aggregation": "seq-mean-token-sum-norm"}}, "loss.norm_length must be an integer >= 1"),
    ({"loss": {"norm_length": 10}}, "loss.norm_length is only used by aggregation"),
    ({"advantage": {"estimator": "ppo"}}, "advantage.estimator must be one of grpo, dr_grpo, rloo"),
    ({"overlong": {"max_length": 100, "cache_length": 200}}, "overlong.cache_length must be <= max_length"),
    ({"dynamic_sampling": {"enabled": "yes"}}, "dynamic_sampling.enabled must be true or false"),
    ({"loss": {"clipp": {}}}, "loss.clipp is not a field; allowed: clip, dual_clip"),
    ({"loss": 3}, "loss must be a LossConfig"),
    ({"preset": "ppo"}, "preset must be one of grpo, dapo, forking_80_20, archer"),
])
def test_errors_name_the_field_and_allowed_values(data, message):
    with pytest.raises(ValueError) as error:
        config_from_dict(data)
    assert message in str(error.value)


def test_direct_construction_is_validated_too():
    with pytest.raises(ValueError, match="rho must be in"):
        ForkingConfig(rho=-0.1)
    with pytest.raises(ValueError, match="forking must be a ForkingConfig"):
        SelectionConfig(forking={"rho": 0.2})
    with pytest.raises(ValueError, match="normalizer 'selected' has no effect"):
        AlgorithmConfig(
            selection=SelectionConfig("forking", forking=ForkingConfig(normalizer="selected")),
            loss=LossConfig(aggregation="seq-mean-token-sum-norm", norm_length=128),
        )


def test_a_field_the_method_ignores_is_refused_naming_the_method():
    from megatron_archer.algorithms.config import config_from_dict

    cases = [
        ({"preset": "archer", "selection": {"forking": {"rho": 0.5}}},
         "selection.forking is set but selection.method is 'archer', which does not use it"),
        ({"preset": "forking_80_20", "selection": {"archer": {"quantile": 0.7}}},
         "selection.archer is set but selection.method is 'forking'"),
        ({"preset": "dapo", "selection": {"forking": {"scope": "micro_batch"}}},
         "selection.forking is set but selection.method is 'none'"),
        ({"preset": "archer", "selection": {"archer": {"soft_width": 0.4}}},
         "soft_width is used by selection.method 'archer_soft' only"),
    ]
    for data, message in cases:
        with pytest.raises(ValueError, match=message):
            config_from_dict(data)
    soft = config_from_dict({"preset": "archer", "selection": {"method": "archer_soft",
                                                                "archer": {"soft_width": 0.4}}})
    assert soft.selection.archer.soft_width == 0.4
    assert config_from_dict({"preset": "forking_80_20", "selection": {"forking": {"rho": 0.5}}}) \
        .selection.forking.rho == 0.5
