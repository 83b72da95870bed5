"""The trainer end to end at context parallel 2 (2 gloo processes, TP 1, DP 1; SPEC 9) against the
same run on one process: Archer's per-response quantiles span both CP ranks, so the losses, the
reasoning-token share and the trained weights agree to float32 reduction-order rounding. A CP 2
run stopped after step 2 and resumed (per-CP-rank optimizer files) equals the uninterrupted one
bitwise.

Archer on the CPU quick-start config (examples/configs/archer_arithmetic_cpu.yaml), 3 steps of
2 updates, as tests/trainer/test_parallel_layouts.py."""

from __future__ import annotations

import pytest
import torch

from megatron_archer.trainer import load_config
from tests.distributed import run_distributed
from tests.trainer.common import tiny_run
from tests.trainer.test_parallel_layouts import (
    LOSS_RTOL,
    PARAM_ATOL,
    STEPS,
    _engine,
    _metrics,
    _single_worker,
    _train,
)


def _cp_worker(rank, world_size, root, base):
    cp = ["parallel.tensor=1", "parallel.context=2"]
    _train(root, base, "cp2", *cp, f"train.steps={STEPS}")
    _train(root, base, "cp2_resumed", *cp, "train.steps=2")
    _train(root, base, "cp2_resumed", *cp, f"train.steps={STEPS}", "checkpoint.resume=true")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("context_parallel")
    base = tiny_run(root)
    run_distributed(_single_worker, 1, root, base)
    run_distributed(_cp_worker, 2, root, base)
    return root


def test_cp2_equals_one_process(runs):
    resolved = load_config(runs / "cp2" / "config.yaml").parallel
    assert (resolved.tensor, resolved.context, resolved.data) == (1, 2, None)
    single, cp2 = _metrics(runs, "single"), _metrics(runs, "cp2")
    assert [m["step"] for m in cp2] == list(range(1, STEPS + 1))
    for a, b in zip(single, cp2):
        assert b["step/skipped"] == 0 and b["actor/updates"] == 2
        for key in ("reward/mean", "response/length_mean", "dynamic_sampling/groups"):
            assert a[key] == b[key], (a["step"], key)
        for key in ("actor/loss", "entropy/mean", "actor/high/token_share", "actor/grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=LOSS_RTOL, abs=1e-6), (a["step"], key)
    expected, got = _engine(runs, "single"), _engine(runs, "cp2")
    assert got.keys() == expected.keys()
    worst = max((got[n] - t).abs().max().item() for n, t in expected.items())
    assert worst <= PARAM_ATOL, worst
    print(f"CP 2 trainer: engine weights after {STEPS} steps within {worst:.2g} of one process")


def test_cp2_resume_is_bitwise(runs):
    full, resumed = _metrics(runs, "cp2"), _metrics(runs, "cp2_resumed")
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))

    def deterministic(record):
        return {k: v for k, v in record.items() if not k.startswith(("time/", "perf/"))}

    for a, b in zip(full, resumed):
        assert deterministic(a) == deterministic(b)
    expected, got = _engine(runs, "cp2"), _engine(runs, "cp2_resumed")
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    optimizer_files = sorted(p.name for p in (runs / "cp2").rglob("tp0_pp0_dp0_cp*.pt"))
    assert optimizer_files and {"tp0_pp0_dp0_cp0.pt", "tp0_pp0_dp0_cp1.pt"} <= set(optimizer_files)
