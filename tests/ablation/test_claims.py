"""Per-claim verdicts: Student's t against float64 closed forms, an integrated density and the
printed tables; the paired interval, minimum detectable effect and verdict on small inputs worked
by hand; the report's claims section; the claims field of an ablation config; power.yaml."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from megatron_archer.ablation.claims import (
    claim_verdicts,
    paired_interval,
    t_cdf,
    t_quantile,
    verdict,
)
from megatron_archer.ablation.config import Claim, load_ablation_config, select_variants
from megatron_archer.ablation.report import write_report
from tests.ablation.common import tiny_ablation

EXAMPLES = Path(__file__).parents[2] / "examples" / "ablations"
EPS = 2.0 ** -52


def _density_integral(t: float, df: int, intervals: int = 2000) -> float:
    """P(T <= t), t >= 0, as 1/2 + composite Simpson of the t density on [0, t] (float64)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    f = lambda x: math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))  # noqa: E731
    h = t / intervals
    total = f(0.0) + f(t) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, intervals))
    return 0.5 + h / 3 * total


@pytest.mark.parametrize("t", [-7.5, -1.3, -0.2, 0.0, 0.4, 1.0, 2.5, 40.0])
def test_t_cdf_matches_the_closed_forms_of_one_two_and_three_degrees(t):
    # each side a handful of float64 operations on values <= 1: a few ulps of 1 apart
    assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=16 * EPS)
    assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=16 * EPS)
    three = 0.5 + (t / (math.sqrt(3) * (1 + t * t / 3)) + math.atan(t / math.sqrt(3))) / math.pi
    assert t_cdf(t, 3) == pytest.approx(three, abs=16 * EPS)


@pytest.mark.parametrize("df", [4, 5, 6, 7, 12, 25])
@pytest.mark.parametrize("t", [0.3, 1.1, 2.9])
def test_t_cdf_matches_the_integrated_density(df, t):
    # Simpson's error is <= t h^4 max|f''''| / 180 with h = t / 2000 <= 1.5e-3 and
    # |f''''| <= 3 * 5 on this range (the density's fourth derivative at 0 is 3 f(0)(1 + 2/df)
    # (1 + 3/df) <= 3 * 0.4 * 1.5 * 1.75 and smaller elsewhere): <= 3 * 5e-12 * 15 / 180 < 2e-12
    assert t_cdf(t, df) == pytest.approx(_density_integral(t, df), abs=2e-12)
    assert t_cdf(-t, df) == pytest.approx(1 - t_cdf(t, df), abs=4 * EPS)


# Student's t quantiles as printed in the standard tables (6 decimals): t_{p, df}
TABLE = {0.975: {1: 12.706205, 2: 4.302653, 3: 3.182446, 4: 2.776445, 5: 2.570582, 10: 2.228139,
                 30: 2.042272},
         0.80: {1: 1.376382, 2: 1.060660, 3: 0.978472, 4: 0.940965, 5: 0.919544, 10: 0.879058},
         0.995: {1: 63.656741, 4: 4.604095, 10: 3.169273}}


@pytest.mark.parametrize("p, df, expected",
                         [(p, df, v) for p, row in TABLE.items() for df, v in row.items()])
def test_t_quantile_matches_the_tables(p, df, expected):
    q = t_quantile(p, df)
    assert q == pytest.approx(expected, abs=5e-7)  # the table's rounding
    assert t_quantile(1 - p, df) == -q
    assert t_cdf(q, df) == pytest.approx(p, abs=4 * EPS)


def test_t_quantile_closed_forms_and_refusals():
    for p in (0.6, 0.8, 0.9, 0.975, 0.999):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-13)
        a = 2 * p - 1  # df 2: P(|T| <= t) = t / sqrt(2 + t^2)
        assert t_quantile(p, 2) == pytest.approx(a * math.sqrt(2 / (1 - a * a)), rel=1e-13)
    assert t_quantile(0.5, 7) == 0.0
    with pytest.raises(ValueError, match="p must be in \\(0, 1\\)"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="df must be an integer >= 1"):
        t_cdf(1.0, 0)


def test_paired_interval_worked_by_hand():
    # d = 1, 2, 3: mean 2, SD 1; t_{.975,2} = 4.302653, t_{.80,2} = 1.060660, sqrt 3 = 1.732051
    stats = paired_interval([1.0, 2.0, 3.0])
    assert (stats["n"], stats["mean"], stats["sd"]) == (3, 2.0, 1.0)
    assert stats["low"] == pytest.approx(2 - 2.484138, abs=1e-6)
    assert stats["high"] == pytest.approx(2 + 2.484138, abs=1e-6)
    assert stats["mde"] == pytest.approx(5.363313 / 1.732051, abs=1e-6)  # 3.096510
    # d = 2, 3, 4, 5: mean 3.5, SD sqrt(5/3) = 1.290994; t_{.975,3} = 3.182446, n = 4
    stats = paired_interval([2.0, 3.0, 4.0, 5.0])
    assert stats["sd"] == pytest.approx(1.290994, abs=1e-6)
    assert stats["low"] == pytest.approx(3.5 - 3.182446 * 1.290994 / 2, abs=1e-6)  # 1.445740
    # (3.18244631 + 0.97847231) * 1.29099445 / 2 = 4.16091862 * 0.64549722 = 2.685861
    assert stats["mde"] == pytest.approx(2.685861, abs=1e-6)
    assert paired_interval([0.7]) == {"n": 1, "mean": 0.7, "sd": None, "low": None,
                                      "high": None, "mde": None}
    assert paired_interval([])["mean"] is None


@pytest.mark.parametrize("low, high, direction, expected", [
    (0.1, 2.0, "higher", "reproduced"), (-2.0, -0.1, "higher", "contradicted"),
    (-0.1, 2.0, "higher", "inconclusive"), (0.0, 2.0, "higher", "inconclusive"),
    (-2.0, -0.1, "lower", "reproduced"), (0.1, 2.0, "lower", "contradicted"),
    (-2.0, 0.0, "lower", "inconclusive"), (None, None, "higher", "too few seeds")])
def test_verdict_follows_the_claimed_side(low, high, direction, expected):
    assert verdict(low, high, direction) == expected


def test_claim_verdicts_pair_only_seeds_both_finished():
    values = {"warm_start": {"0": 0.10, "1": 0.12, "2": 0.09},
              "a": {"0": 0.13, "1": 0.15, "2": 0.12, "3": 0.2},
              "b": {"0": 0.11, "1": None, "2": 0.12}}
    rows = claim_verdicts([Claim("a", "warm_start"), Claim("b", "a", "lower", "paper"),
                           Claim("c", "a")], values)
    gain, lower, absent = rows
    assert gain["claim"] == "a > warm_start" and gain["n"] == 3
    assert gain["differences"] == pytest.approx({"0": 0.03, "1": 0.03, "2": 0.03}, abs=1e-15)
    assert gain["sd"] == pytest.approx(0.0, abs=1e-15) and gain["verdict"] == "reproduced"
    assert lower["claim"] == "b < a" and lower["source"] == "paper"
    assert lower["differences"] == pytest.approx({"0": -0.02, "2": 0.0}, abs=1e-15)
    assert lower["mean"] == pytest.approx(-0.01, abs=1e-15)
    # d = -0.02, 0: SD 0.01 sqrt 2, half-width t_{.975,1} * 0.01 = 0.127062: inconclusive
    assert lower["high"] == pytest.approx(-0.01 + 0.127062, abs=1e-6)
    assert lower["verdict"] == "inconclusive"
    assert absent["n"] == 0 and absent["verdict"] == "too few seeds"


def _summary(avg: float) -> dict:
    return {"eval": {"avg@2": avg, "pass@2": 2 * avg, "mean_response_length": 5.0},
            "entropy": {"top_overlap": 0.9},
            "curves": {"step": [1, 2], "accuracy": [0.1, 0.2], "entropy": [0.5, 0.4]},
            "time": {"total": {"wall_s": 10.0, "cpu_s": 5.0}}}


def test_report_writes_the_claims_section(tmp_path):
    avg = {"warm_start": [0.10, 0.12, 0.09], "dapo": [0.12, 0.15, 0.10],
           "bottom_80": [0.11, 0.12, 0.11]}
    summaries = {v: {s: _summary(a) if v != "warm_start" else
                     {k: x for k, x in _summary(a).items() if k not in ("entropy", "curves")}
                     for s, a in enumerate(values)} for v, values in avg.items()}
    claims = [Claim("dapo", "warm_start", "higher", "both"), Claim("bottom_80", "dapo", "lower")]
    report = write_report(tmp_path, summaries, 2, 0.2, [0, 1, 2], [], claims)
    gain, lower = report["claims"]
    # dapo - warm start = 2, 3, 1 points: mean 2, SD 1 -> 2 +- 2.484138 points, MDE 3.096510
    assert gain["mean"] == pytest.approx(0.02, abs=1e-15)
    assert (gain["low"], gain["high"]) == pytest.approx((-0.004841, 0.044841), abs=1e-6)
    # bottom_80 - dapo = -1, -3, +1 points: mean -1, SD 2
    assert lower["sd"] == pytest.approx(0.02, abs=1e-15) and lower["verdict"] == "inconclusive"
    readme = (tmp_path / "README.md").read_text()
    assert ("| dapo > warm_start | both | 3 | 0: +2.00, 1: +3.00, 2: +1.00 | +2.00 | "
            "-0.48 to +4.48 | 1.00 | 3.10 | inconclusive |") in readme
    assert "| bottom_80 < dapo | - | 3 |" in readme
    rows = list(csv.DictReader((tmp_path / "claims.csv").open()))
    assert [r["claim"] for r in rows] == ["dapo > warm_start", "bottom_80 < dapo"]
    assert float(rows[1]["mde"]) == pytest.approx(2 * 0.030965101, abs=1e-8)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["claims"][0]["verdict"] == "inconclusive"
    assert "claims.csv" in on_disk["files"]
    # no claims: no section, no files
    plain = write_report(tmp_path / "plain", summaries, 2, 0.2, [0, 1, 2], [])
    assert plain["claims"] == [] and not (tmp_path / "plain" / "claims.csv").exists()
    assert "## Claims" not in (tmp_path / "plain" / "README.md").read_text()


def _load(tmp_path, claims, overrides=()):
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(tiny_ablation(tmp_path / "out", claims=claims)))
    return load_ablation_config(path, overrides)


@pytest.mark.parametrize("claims, message", [
    ([{"variant": "dapo", "reference": "grpo"}], "claims\\[0\\].variant 'dapo' is not a variant"),
    ([{"variant": "grpo", "reference": "archer"}, {"variant": "grpo", "reference": "x"}],
     "claims\\[1\\].reference 'x' is not a variant"),
    ([{"variant": "warm_start", "reference": "grpo"}], "claims\\[0\\].variant 'warm_start'"),
    ([{"variant": "grpo", "reference": "grpo"}], "claims\\[0\\].reference must differ"),
    ([{"variant": "grpo", "reference": "archer", "direction": "up"}],
     "claims\\[0\\].direction must be one of higher, lower"),
    ([{"variant": "grpo", "reference": "archer", "paper": "x"}],
     "claims\\[0\\].paper is not a field"),
    ({"variant": "grpo"}, "claims must be a list"),
])
def test_claims_are_validated_at_load(tmp_path, claims, message):
    with pytest.raises(ValueError, match=message):
        _load(tmp_path, claims)


def test_claims_load_and_follow_the_selected_variants(tmp_path):
    config = _load(tmp_path, [{"variant": "archer", "reference": "grpo", "source": "p"},
                              {"variant": "grpo", "reference": "warm_start"}])
    assert config.claims == (Claim("archer", "grpo", "higher", "p"),
                             Claim("grpo", "warm_start"))
    assert select_variants(config, ["grpo"]).claims == (Claim("grpo", "warm_start"),)


def test_power_yaml_runs_the_papers_comparisons_at_the_sweep_settings():
    config = load_ablation_config(EXAMPLES / "power.yaml")
    papers = {v.name: v for v in load_ablation_config(EXAMPLES / "papers.yaml").variants}
    assert config.seeds == (0, 1, 2, 3, 4)
    names = [v.name for v in config.variants]
    assert names == ["dapo", "forking_rho0.2", "bottom_80", "archer", "clip_cov", "kl_cov",
                     "forking_rho0.5", "forking_rho1.0", "archer_no_knowledge_kl",
                     "archer_equal_clip", "archer_soft"]
    for variant in config.variants:  # as papers.yaml defines them
        assert variant.algorithm == papers[variant.name].algorithm
        assert variant.overrides == papers[variant.name].overrides == ()
    from megatron_archer.ablation.plan import run_specs

    for spec in run_specs(load_ablation_config(EXAMPLES / "power.yaml", ["seeds=[0]"])):
        if spec.experiment is not None:
            e = spec.experiment
            assert (e.actor.lr, e.train.steps, e.train.epochs) == (3e-5, 200, 1)
            assert (e.rollout.prompts_per_step, e.rollout.n, e.train.mini_batch_size) == (8, 8, 4)
    assert [(c.variant, c.reference, c.direction) for c in config.claims] == [
        ("dapo", "warm_start", "higher"), ("forking_rho0.2", "dapo", "higher"),
        ("bottom_80", "dapo", "lower"), ("bottom_80", "forking_rho0.2", "lower"),
        ("archer", "dapo", "higher"), ("clip_cov", "dapo", "higher"),
        ("kl_cov", "dapo", "higher"), ("forking_rho0.2", "forking_rho1.0", "higher"),
        ("forking_rho0.2", "forking_rho0.5", "higher"), ("archer", "archer_no_knowledge_kl", "higher"),
        ("archer", "archer_equal_clip", "higher")]


def test_variants_that_score_the_same_on_every_seed_are_identical():
    """Two variants that ran the same computation (a clip range that never binds) differ by
    exactly 0 on every seed: the verdict says so rather than "inconclusive" with an interval of
    width 0; one seed with a difference makes it an ordinary claim again."""
    same = {"a": {"0": 0.13, "1": 0.15}, "b": {"0": 0.13, "1": 0.15}}
    assert claim_verdicts([Claim("a", "b")], same)[0]["verdict"] == "identical"
    one_off = {"a": {"0": 0.13, "1": 0.15}, "b": {"0": 0.13, "1": 0.14}}
    assert claim_verdicts([Claim("a", "b")], one_off)[0]["verdict"] != "identical"
