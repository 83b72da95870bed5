"""The console script: eval's numbers, config errors as exit status 2, convert delegated."""

from __future__ import annotations

import json

import pytest

from megatron_archer.cli import main
from tests.trainer.common import CPU_CONFIG, tiny_run


def test_eval_reports_avg_pass_and_length(tmp_path):
    out = tmp_path / "eval.json"
    overrides = [*tiny_run(tmp_path, prompts=4), "reward.function=tests.trainer.rewards:digit_share"]
    assert main(["eval", str(CPU_CONFIG), *overrides, "--k", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["problems"] == 4 and result["k"] == 2
    assert 0 <= result["avg@2"] <= result["pass@2"] <= 1
    assert 0 < result["mean_response_length"] <= 24


def test_config_errors_exit_2_naming_the_field(capsys):
    assert main(["train", str(CPU_CONFIG), "rollout.n=0"]) == 2
    assert "rollout.n must be an integer >= 1; got 0" in capsys.readouterr().err


def test_convert_is_the_models_converter(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "hf-to-megatron", "--help"])
    assert exit_info.value.code == 0
    assert "--hf" in capsys.readouterr().out
