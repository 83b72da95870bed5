"""The trainer end to end at data-parallel 2, pipeline-parallel 2, context-parallel 2 (TP 1) and
tensor-parallel 2 with sequence parallelism (2 gloo processes each) against the same run on one
process (TP 1 x DP 1): the objectives are
split-invariant (at CP 2 Archer's per-response quantiles span both CP ranks, docs/numerics.md §9), so the
losses, the reasoning-token share and the trained weights agree to float32 reduction-order
rounding. And resume at DP 2 and at CP 2 (per-CP-rank optimizer files): a run stopped after
step 2 and resumed equals the uninterrupted one bitwise.

Archer on the CPU quick-start config (examples/configs/archer_arithmetic_cpu.yaml), 3 steps of
2 updates; the engine (on rank 0) holds the full Hugging Face weights after each sync, so runs of
different layouts are compared there."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_archer.trainer import load_config, run_training
from tests.distributed import run_distributed
from tests.trainer.common import CPU_CONFIG, tiny_run

REWARD = "reward.function=tests.trainer.rewards:digit_share"
STEPS = 3
# Two layouts sum the same float32 terms in other orders: each gradient element differs by
# |dg| <= n eps max|g| for a sum of n ~ 200 token terms (a mini-batch's tokens), and max|g| <= 1
# (clip_grad 1), so |dg| <= 200 x 1.2e-7 = 2.4e-5. Adam's step lr m / (sqrt(v) + adam_eps) moves by
# at most lr |dg| / adam_eps for a gradient change dg; adam_eps 1e-3 (this test's, instead of the
# config's 1e-8, which lets a near-zero gradient whose sign is rounding noise move its weight by a
# whole lr) bounds that by 1e-3 x 2.4e-5 / 1e-3 = 2.4e-5 per update, 1.4e-4 over 6 updates.
# A layout that drops or doubles a gradient term moves weights by ~lr = 1e-3 per update.
# (PP 2 sums in the same order as one process: bitwise equal)
ADAM_EPS = 1e-3
PARAM_ATOL = 1.5e-4
# the step metrics come from weights that differ by up to PARAM_ATOL: a loss, an entropy or a
# gradient norm moves with them by far less than 0.1%
LOSS_RTOL = 1e-3


def _train(root, base, name, *overrides):
    config = load_config(CPU_CONFIG, [*base, REWARD, f"logging.dir={root / name}",
                                      "checkpoint.interval=1", f"actor.adam_eps={ADAM_EPS}",
                                      *overrides])
    trainer = run_training(config)
    if trainer.rank0:
        engine = {n: p.detach().clone() for n, p in trainer.engine.model.named_parameters()}
        torch.save(engine, root / f"{name}.engine.pt")


def _single_worker(rank, world_size, root, base):
    _train(root, base, "single", "parallel.tensor=1", f"train.steps={STEPS}")


def _pair_worker(rank, world_size, root, base):
    _train(root, base, "dp2", "parallel.tensor=1", f"train.steps={STEPS}")
    _train(root, base, "pp2", "parallel.tensor=1", "parallel.pipeline=2", f"train.steps={STEPS}")
    _train(root, base, "dp2_resumed", "parallel.tensor=1", "train.steps=2")
    _train(root, base, "dp2_resumed", "parallel.tensor=1", f"train.steps={STEPS}",
           "checkpoint.resume=true")
    _train(root, base, "tp2_sp", "parallel.tensor=2", "parallel.sequence_parallel=true",
           f"train.steps={STEPS}")
    cp = ["parallel.tensor=1", "parallel.context=2"]
    _train(root, base, "cp2", *cp, f"train.steps={STEPS}")
    _train(root, base, "cp2_resumed", *cp, "train.steps=2")
    _train(root, base, "cp2_resumed", *cp, f"train.steps={STEPS}", "checkpoint.resume=true")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    base = tiny_run(root)
    run_distributed(_single_worker, 1, root, base)
    run_distributed(_pair_worker, 2, root, base)
    return root


def _metrics(root, name):
    return [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]


def _engine(root, name):
    return torch.load(root / f"{name}.engine.pt", weights_only=True)


# tensor, pipeline, context, sequence parallel
LAYOUTS = {"dp2": (1, 1, 1, False), "pp2": (1, 2, 1, False), "cp2": (1, 1, 2, False),
           "tp2_sp": (2, 1, 1, True)}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_equals_one_process(runs, layout):
    resolved = load_config(runs / layout / "config.yaml").parallel
    assert (resolved.tensor, resolved.pipeline, resolved.context,
            resolved.sequence_parallel) == LAYOUTS[layout]
    single, other = _metrics(runs, "single"), _metrics(runs, layout)
    assert [m["step"] for m in other] == list(range(1, STEPS + 1))
    for a, b in zip(single, other):
        assert b["step/skipped"] == 0 and b["actor/updates"] == 2
        # the same rollouts: the engine's weights agree closely enough to sample the same tokens
        for key in ("reward/mean", "response/length_mean", "dynamic_sampling/groups"):
            assert a[key] == b[key], (a["step"], key)
        for key in ("actor/loss", "entropy/mean", "actor/high/token_share", "actor/grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=LOSS_RTOL, abs=1e-6), (a["step"], key)
    expected, got = _engine(runs, "single"), _engine(runs, layout)
    assert got.keys() == expected.keys()
    worst = max((got[name] - tensor).abs().max().item() for name, tensor in expected.items())
    print(f"{layout}: largest weight difference from one process {worst:.3g}")
    assert worst <= PARAM_ATOL, worst


@pytest.mark.parametrize("layout", ["dp2", "cp2"])
def test_resume_is_bitwise(runs, layout):
    full, resumed = _metrics(runs, layout), _metrics(runs, f"{layout}_resumed")
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))

    # The engine-trainer log-prob gap is a diagnostic of two float32 programs (transformers with a
    # KV cache, megatron on packed rows) and trains nothing here; the engine's log-probs varied
    # once between runs in one process (CI: mean gap 1.2e-5 against 2.5e-7, max 1e-4, tokens and
    # everything trained bitwise equal; cause not found). Its bound is the worst-case float32
    # error of a log-prob from these weights: each logit passes ~5 dot products of length <= 96
    # (2 layers of attention and MLP, then the head), each within 96 eps relative, so the logits
    # are within ~5 x 96 x 1.2e-7 = 6e-5 relative of exact; at |z| <= 8 a log-prob (a logit minus
    # logsumexp) is within ~2 x 8 x 6e-5 = 1e-3 in each program.
    gap = ("rollout/logprob_abs_diff_mean", "rollout/logprob_abs_diff_max")

    def deterministic(record):
        return {k: v for k, v in record.items() if not k.startswith(("time/", "perf/")) and k not in gap}

    for a, b in zip(full, resumed):
        assert deterministic(a) == deterministic(b)
        assert all(a[k] < 1e-3 and b[k] < 1e-3 for k in gap if k in a), (a, b)
    expected, got = _engine(runs, layout), _engine(runs, f"{layout}_resumed")
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    if layout == "cp2":  # one optimizer file per context-parallel rank
        files = {p.name for p in (runs / "cp2").rglob("tp0_pp0_dp0_cp*.pt")}
        assert {"tp0_pp0_dp0_cp0.pt", "tp0_pp0_dp0_cp1.pt"} <= files
