"""The console script: eval's numbers, config errors as exit status 2, convert delegated (its
--help and usage under the script's name), overrides before or after options."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_archer.cli import main
from tests.trainer.common import CPU_CONFIG, tiny_run


def test_eval_reports_avg_pass_and_length(tmp_path):
    out = tmp_path / "eval.json"
    overrides = [*tiny_run(tmp_path, prompts=4), "reward.function=tests.trainer.rewards:digit_share"]
    # overrides on both sides of the options
    assert main(["eval", str(CPU_CONFIG), *overrides[:2], "--k", "2", "--out", str(out),
                 *overrides[2:]]) == 0
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


def _script(*args: str) -> subprocess.CompletedProcess:
    """The installed console script in a subprocess, as a user runs it."""
    script = shutil.which("megatron-archer", path=str(Path(sys.executable).parent))
    return subprocess.run([script, *args], capture_output=True, text=True, timeout=120)


def test_console_script_convert_help_usage_and_optional_overrides(tmp_path):
    proc = _script("convert", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: megatron-archer convert ")
    assert "hf-to-megatron" in proc.stdout
    proc = _script("convert", "hf-to-megatron")
    assert proc.returncode == 2
    assert "megatron-archer convert hf-to-megatron: error: the following arguments are required" \
        in proc.stderr
    proc = _script("train", str(CPU_CONFIG), "parallel.tensor=4")
    assert proc.returncode == 2 and "must equal the world size 1" in proc.stderr
    if not torch.cuda.is_available():  # megatron's expected notices on CPU are not shown
        assert "Apex" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    proc = _script("train")  # the overrides are optional, only the config is required
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("error: the following arguments are required: config")
    # an override after an option reaches the config (and its error names the field)
    proc = _script("eval", str(CPU_CONFIG), "--k", "2", "rollout.n=0")
    assert proc.returncode == 2 and "rollout.n must be an integer >= 1; got 0" in proc.stderr
    proc = _script("eval", str(CPU_CONFIG), "--k", "2", "--nosuch")
    assert proc.returncode == 2 and "unrecognized arguments: --nosuch" in proc.stderr


def test_model_paths_are_checked_before_any_work(tmp_path):
    """A missing model, a trainer checkpoint given as a model (with the command that converts
    it) and a model without tokenizer files: one line each, exit 2, no run directory left."""
    overrides = [*tiny_run(tmp_path, prompts=4), "parallel.tensor=1"]
    proc = _script("eval", str(CPU_CONFIG), *overrides, "--model", str(tmp_path / "nosuch"))
    assert proc.returncode == 2
    assert f"--model {tmp_path / 'nosuch'} does not exist or is not a directory" in proc.stderr

    step = tmp_path / "run" / "checkpoints" / "step_00000004"
    (step / "model").mkdir(parents=True)
    (step / "model" / "archer_model.json").write_text("{}")
    proc = _script("analyze-entropy", "--checkpoint", str(step), "--output-dir",
                   str(tmp_path / "report"), "--responses", str(tmp_path / "r.jsonl"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (f"--checkpoint {step} is a megatron-archer checkpoint, not a Hugging Face model: "
            f"convert it first: megatron-archer convert megatron-to-hf --megatron {step / 'model'}"
            in proc.stderr)
    assert not (tmp_path / "report").exists()

    bare = tmp_path / "bare"
    shutil.copytree(tmp_path / "model", bare, ignore=shutil.ignore_patterns("tokenizer*", "vocab*"))
    run = tmp_path / "fresh_run"
    proc = _script("train", str(CPU_CONFIG), *overrides, f"model.path={bare}",
                   f"logging.dir={run}")
    assert proc.returncode == 2
    assert f"model.path {bare} has no tokenizer files (tokenizer.json" in proc.stderr
    assert not run.exists()
