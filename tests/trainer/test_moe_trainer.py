"""The trainer end to end with a Qwen3-MoE model (4 experts, top-2) and routing replay
(``actor.routing_replay: old``): 3 Archer steps at expert parallel 2 (2 gloo processes, data
parallel 2) against the same run on one process, and a run stopped after step 2 and resumed at
EP 2 equal to the uninterrupted one bitwise. The engine (transformers, experts stacked in
memory) receives the actor's per-expert weight buckets; the checkpoint's load-balancing loss
(coefficient 0.001) is on."""

from __future__ import annotations

import pytest
import torch
import transformers

from megatron_archer.trainer import load_config, run_training
from tests.distributed import run_distributed
from tests.trainer.common import CPU_CONFIG, tiny_run
from tests.trainer.test_parallel_layouts import (
    ADAM_EPS,
    LOSS_RTOL,
    PARAM_ATOL,
    REWARD,
    STEPS,
    _engine,
    _metrics,
)

# A token whose two best router scores lie within rounding of each other can choose another
# expert in the two layouts (docs/numerics.md §11), which changes its log-prob by ~0.05 and the
# step loss (a mean over ~500 tokens of terms of magnitude ~0.2, summing to near 0) by ~1e-4: the
# loss is held to 1e-3 absolute (a dropped or doubled gradient term moves it by ~0.1); seen: one
# such token at step 3 of this run, loss 8e-5 apart, weights 3.2e-6 apart. The weights, the
# entropy and the gradient norm keep the dense layouts' bounds.
LOSS_ATOL = 1e-3


def assert_steps_match(single: list[dict], ep2: list[dict]) -> None:
    """Every step of the EP 2 run (metrics records) is the one-process run's: the same rollouts,
    two updates, entropy and gradient norm within the dense layouts' bounds, the loss within
    ``LOSS_ATOL``."""
    assert [m["step"] for m in ep2] == list(range(1, STEPS + 1))
    for a, b in zip(single, ep2):
        assert b["step/skipped"] == 0 and b["actor/updates"] == 2
        for key in ("reward/mean", "response/length_mean", "dynamic_sampling/groups"):
            assert a[key] == b[key], (a["step"], key)
        for key in ("entropy/mean", "actor/grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=LOSS_RTOL, abs=1e-6), (a["step"], key)
        assert b["actor/loss"] == pytest.approx(a["actor/loss"], abs=LOSS_ATOL), a["step"]


def _train(root, base, name, *overrides):
    config = load_config(CPU_CONFIG, [*base, REWARD, f"logging.dir={root / name}",
                                      "checkpoint.interval=1", f"actor.adam_eps={ADAM_EPS}",
                                      "parallel.tensor=1", "actor.routing_replay=old",
                                      *overrides])
    trainer = run_training(config)
    if trainer.rank0:
        engine = {n: p.detach().clone() for n, p in trainer.engine.model.named_parameters()}
        torch.save(engine, root / f"{name}.engine.pt")


def _single_worker(rank, world_size, root, base, train):
    train(root, base, "single", f"train.steps={STEPS}")


def _ep2_worker(rank, world_size, root, base, train):
    train(root, base, "ep2", "parallel.expert=2", f"train.steps={STEPS}")
    train(root, base, "ep2_resumed", "parallel.expert=2", "train.steps=2")
    train(root, base, "ep2_resumed", "parallel.expert=2", f"train.steps={STEPS}",
          "checkpoint.resume=true")


def single_and_ep2_runs(root, train):
    """Under ``root``: the one-process run ``single``, the EP 2 run ``ep2`` and ``ep2_resumed``
    (stopped after step 2, resumed), each made by ``train(root, base, name, *overrides)``."""
    base = tiny_run(root, case="qwen3_moe")
    run_distributed(_single_worker, 1, root, base, train)
    run_distributed(_ep2_worker, 2, root, base, train)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return single_and_ep2_runs(tmp_path_factory.mktemp("moe"), _train)


def test_expert_parallel_run_equals_one_process(runs):
    assert load_config(runs / "ep2" / "config.yaml").parallel.expert == 2
    single, ep2 = _metrics(runs, "single"), _metrics(runs, "ep2")
    assert_steps_match(single, ep2)
    for record in single + ep2:  # every replayed update dispatched to the old forward's experts
        assert record.get("moe/routing_mismatch_share", 0.0) == 0.0, record
        assert record["moe/aux_loss"] > 0 and record["moe/expert_load_max_over_mean/layer_2"] >= 1
    assert any("moe/routing_mismatch_share" in record for record in ep2)
    expected, got = _engine(runs, "single"), _engine(runs, "ep2")
    assert got.keys() == expected.keys() and any("experts.gate_up_proj" in n for n in got)
    start = _engine_start(runs)
    moved = max((expected[n] - start[n]).abs().max().item() for n in expected if "experts" in n)
    assert moved > 1e-4  # the experts trained (lr 1e-3 x several updates)
    worst = max((got[name] - tensor).abs().max().item() for name, tensor in expected.items())
    print(f"ep2: largest weight difference from one process {worst:.3g}")
    assert worst <= PARAM_ATOL, worst


def _engine_start(root):
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "model")
    return dict(model.named_parameters())


def test_expert_parallel_resume_is_bitwise(runs):
    assert_resume_is_bitwise(runs)


def assert_resume_is_bitwise(runs) -> None:
    """``ep2_resumed`` equals ``ep2`` bitwise: the engine's weights, losses, gradient norms."""
    full, resumed = _metrics(runs, "ep2"), _metrics(runs, "ep2_resumed")
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    expected, got = _engine(runs, "ep2"), _engine(runs, "ep2_resumed")
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    for a, b in zip(full, resumed):
        for key in ("actor/loss", "actor/grad_norm", "reward/mean"):
            assert a[key] == b[key], (a["step"], key)


def _dense_worker(rank, world_size, root, base, override):
    config = load_config(CPU_CONFIG, [*base, REWARD, f"logging.dir={root / 'dense'}",
                                      "parallel.tensor=1", override])
    with pytest.raises(ValueError, match=r"is a dense model: it has no router") as error:
        run_training(config)
    assert str(error.value).startswith(override.split("=")[0])


@pytest.mark.parametrize("override", ["actor.routing_replay=old",
                                      "model.router_aux_loss_coef=0.01"])
def test_moe_options_on_a_dense_model_name_the_field(tmp_path, override):
    run_distributed(_dense_worker, 1, tmp_path, tiny_run(tmp_path, prompts=4), override)
