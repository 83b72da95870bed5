"""tools/gpu_smoke.py is ready for a GPU: its dry run (what CI can check without one: the stages'
own code on CPU as far as it goes without CUDA) passes and says that no GPU was used; its wheels
list is strict."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_smoke.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_passes_without_a_gpu(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no GPU used: dry run only" in proc.stdout
    report = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert report["ok"] and all(check["ok"] for check in report["checks"])
    names = [check["check"] for check in report["checks"]]
    # the stages' own code ran on CPU: stage (a)'s torch path and stage (b)'s torchrun worker,
    # whose checks (imports, model, actor, train steps, checkpoint) come back from its process
    assert "dry-run a: stage (a) inputs and the fused op's torch path on CPU" in names
    assert sum(name.startswith("actor: ") for name in names) == 4, names
    assert "dry-run b: actor worker exited cleanly" in names
    # stage (d)'s worker ran up to building the TE model, which refused only for want of CUDA;
    # stage (e) made its models, launch command and serialised update buckets
    [te] = [check for check in report["checks"] if check["check"].startswith("te: ")]
    assert "needs CUDA and transformer_engine" in te["details"]["stopped_at"], te
    assert "dry-run d: te worker exited cleanly" in names
    assert "dry-run e: stage (e) models, launch command and update buckets" in names


def test_stages_without_their_package_are_skipped_with_the_reason(tmp_path, monkeypatch):
    """On the GPU machine, stage (d) without Transformer Engine and stage (e) without SGLang are
    reported skipped (not failed), each naming what did not import."""
    gpu_smoke = _module()
    assert "no_such_module_xyz is not importable: ModuleNotFoundError" in \
        gpu_smoke.import_problem("no_such_module_xyz")
    assert gpu_smoke.import_problem("json") is None
    monkeypatch.setattr(gpu_smoke, "import_problem", lambda module: f"{module}: missing")
    checks = gpu_smoke.Checks("smoke")
    gpu_smoke.stage_d(checks, tmp_path)
    gpu_smoke.stage_e(checks, tmp_path)
    assert [(c["check"], c["ok"], c["skipped"]) for c in checks.results] == [
        ("smoke: TE layer spec with fp8", True, "transformer_engine.pytorch: missing"),
        ("smoke: SGLang server with a tensor weight update", True, "sglang: missing")]


def test_wheels_list_is_pinned_and_unique(tmp_path):
    gpu_smoke = _module()
    assert gpu_smoke.read_wheels()["megatron-core"] == "0.16.1"
    for text, match in (("megatron-core>=0.16\n", "expected name==version"),
                        ("a==1\na==2\n", "listed twice")):
        path = tmp_path / "wheels.txt"
        path.write_text(text)
        with pytest.raises(ValueError, match=match):
            gpu_smoke.read_wheels(path)
