"""tools/reevaluate_ablation.py on a tiny prepared ablation: the larger held-out file extends the
prepared one, each seed's evaluation is the same for the warm start and a run (a "run" that is a
copy of the warm start scores identically, seed by seed), runs without a final checkpoint are
skipped, finished results are kept on a rerun (but not once their checkpoint changed, and never
reused for another size), and the claims table is written."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import yaml

from megatron_archer.ablation.config import load_ablation_config
from megatron_archer.ablation.plan import Layout
from megatron_archer.ablation.prepare import prepare
from tests.ablation.common import tiny_ablation

SCRIPT = Path(__file__).parents[2] / "tools" / "reevaluate_ablation.py"


def _tool():
    spec = importlib.util.spec_from_file_location("reevaluate_ablation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reevaluation_pairs_seeds_and_keeps_results(tmp_path, capsys):
    claims = [{"variant": "grpo", "reference": "warm_start", "direction": "higher"}]
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(tiny_ablation(tmp_path / "out", seeds=[0, 1], claims=claims)))
    config = load_ablation_config(path)
    prepare(config)
    layout = Layout(Path(config.out))
    for seed in (0, 1):  # grpo's "final" checkpoints: the warm start itself; archer has none
        shutil.copytree(layout.warm_start, layout.run_dir("grpo", seed) / "final")
    out = tmp_path / "eval6"
    tool = _tool()
    assert tool.main([str(path), "--problems", "6", "--out", str(out)]) == 0

    prepared = layout.data("eval").read_text().splitlines()
    assert (out / "eval.jsonl").read_text().splitlines()[:len(prepared)] == prepared
    assert len((out / "eval.jsonl").read_text().splitlines()) == 6
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("*/seed_*.json")) == [
        "grpo/seed_0.json", "grpo/seed_1.json", "warm_start/seed_0.json",
        "warm_start/seed_1.json"]
    for seed in (0, 1):
        assert (out / "grpo" / f"seed_{seed}.json").read_text() == \
            (out / "warm_start" / f"seed_{seed}.json").read_text()
    assert "| identical |" in (out / "README.md").read_text()
    assert "identical" in (out / "claims.csv").read_text()

    written = {p: p.stat().st_mtime_ns for p in out.glob("*/seed_*.json")}
    capsys.readouterr()
    assert tool.main([str(path), "--problems", "6", "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed_*.json")} == written
    assert "seed 0:" not in capsys.readouterr().out  # nothing evaluated again
    retrained = layout.run_dir("grpo", 1) / "final" / "config.json"  # a run trained again
    retrained.write_text(retrained.read_text() + "\n")
    assert tool.main([str(path), "--problems", "6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "changed since" in printed and "grpo seed 1:" in printed
    assert "seed 0:" not in printed and "warm_start seed 1:" not in printed
    with pytest.raises(SystemExit):  # results made on 6 problems are not reused for 8
        tool.main([str(path), "--problems", "8", "--out", str(out)])
    assert "holds 6 problems, not 8" in capsys.readouterr().err
