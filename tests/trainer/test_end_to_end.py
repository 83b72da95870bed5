"""The CPU quick start end to end (examples/configs/archer_arithmetic_cpu.yaml: 2 gloo processes,
tensor parallel 2, Archer on the arithmetic prompts with the local engine), and on the same setup
the trainer's resume (stop after step 2, resume: step 3 equals an uninterrupted run's bitwise)
and skipped steps (no group with reward signal). One spawned job runs every scenario (a spawn and
its imports cost ~20 s); the tests check what it left behind."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist
import transformers
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from megatron_archer.trainer import load_config, run_training
from megatron_archer.trainer.checkpoint import latest_checkpoint, step_dir
from tests.distributed import run_distributed
from tests.trainer.common import CPU_CONFIG, tiny_run

# a reward with signal for an untrained model, so dynamic sampling keeps groups and updates run
REWARD = "reward.function=tests.trainer.rewards:digit_share"
NO_SIGNAL = "reward.function=tests.trainer.rewards:constant"
RANKS = (0, 1)


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _state(trainer) -> dict:
    """This rank's actor and reference parameters; rank 0 adds the engine's weights."""
    state = {"actor": _params(trainer.actor.chunks[0]),
             "reference": _params(trainer.reference.chunks[0]),
             "skipped_steps": trainer.skipped_steps}
    if trainer.rank0:
        state["engine"] = _params(trainer.engine.model)
        state["engine_version"] = trainer.engine.weight_version
    return state


def _scenarios_worker(rank, world_size, base, root):
    def train(label, name, *overrides):
        config = load_config(CPU_CONFIG, [*base, f"logging.dir={root / name}",
                                          "checkpoint.interval=1", *overrides])
        torch.save(_state(run_training(config)), root / f"{label}.rank{rank}.pt")

    train("full", "full", REWARD, "train.steps=3")
    train("stopped", "resumed", REWARD, "train.steps=2")
    if rank == 0:  # then a crash while saving step 3: logged, checkpoint without manifest
        (step_dir(root / "resumed", 3) / "model").mkdir(parents=True)
        with open(root / "resumed" / "metrics.jsonl", "a") as f:
            f.write('{"step": 3, "actor/loss": 1e9}\n{"step": 4, "act')  # and a line cut short
        with SummaryWriter(str(root / "resumed" / "tensorboard")) as writer:
            writer.add_scalar("actor/loss", 1e9, 3)
    dist.barrier()
    train("resumed", "resumed", REWARD, "train.steps=3", "checkpoint.resume=true")
    # resume on, nothing to resume: starts at step 1; no group ever has signal
    train("skipped", "skipped", NO_SIGNAL, "train.steps=2", "checkpoint.resume=true")
    train("continued", "skipped", REWARD, "train.steps=3", "checkpoint.resume=true")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer_runs")
    base = tiny_run(root)
    run_distributed(_scenarios_worker, 2, base, root)
    return root


def _state_of(root, label, rank):
    return torch.load(root / f"{label}.rank{rank}.pt", weights_only=True)


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _deterministic(record):
    """A metrics record without wall-clock times and throughput."""
    return {k: v for k, v in record.items() if not k.startswith(("time/", "perf/"))}


def _tensorboard_losses(run):
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("actor/loss")]


def _assert_equal_params(got, expected):
    assert got.keys() == expected.keys()
    for name, tensor in got.items():
        assert torch.equal(tensor, expected[name]), name  # bitwise


def test_three_steps_tp2_archer(runs):
    run = runs / "full"
    lines = _metrics(run)
    assert [line["step"] for line in lines] == [1, 2, 3]
    for line in lines:
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in line.values()), line
        assert line["step/skipped"] == 0 and line["actor/updates"] == 2
        # docs/numerics.md §7: per-class shares / clips / ratio / KL, entropy, gap, keep rate, phases
        for key in ("reward/mean", "reward/accuracy", "response/length_mean",
                    "response/length_max", "response/clipped_share", "response/repetition_ratio",
                    "entropy/mean", "entropy/p80", "actor/high/token_share",
                    "actor/low/clip_frac_low", "actor/high/clip_frac_high",
                    "actor/low/ratio_mean", "actor/low/kl_mean", "actor/grad_norm", "actor/lr",
                    "dynamic_sampling/keep_rate", "perf/tokens_per_s", "time/rollout",
                    "time/reward", "time/logprob", "time/train", "time/weight_sync"):
            assert key in line, key
        # Archer's split at the per-response 0.8 quantile: about 20% high-entropy tokens
        assert 0.1 < line["actor/high/token_share"] < 0.35
        # the engine's log-probs are the actor's: same weights (steps 2, 3: after a sync)
        assert line["rollout/logprob_abs_diff_mean"] < 1e-3
    resolved = load_config(run / "config.yaml")
    assert resolved.algorithm.selection.method == "archer"
    assert resolved.parallel.tensor == 2
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert latest_checkpoint(run) == step_dir(run, 3)

    state = _state_of(runs, "full", 0)
    assert state["engine_version"] == 3
    initial = transformers.AutoModelForCausalLM.from_pretrained(runs / "model").state_dict()
    moved = max((state["engine"][n] - t).abs().max().item() for n, t in initial.items())
    assert moved > 1e-4, moved  # the engine holds updated weights


def test_resume_after_step_2_equals_uninterrupted_step_3_bitwise(runs):
    full, resumed = _metrics(runs / "full"), _metrics(runs / "resumed")
    # steps 1-2 kept from the first run, its stale step 3 and cut line dropped, step 3 appended
    assert [line["step"] for line in resumed] == [1, 2, 3]
    for got, expected in zip(resumed, full):
        assert _deterministic(got) == _deterministic(expected)  # loss, rewards, entropy, ...
    # TensorBoard purges the stale step 3 too
    assert _tensorboard_losses(runs / "resumed") == _tensorboard_losses(runs / "full")
    assert [step for step, _ in _tensorboard_losses(runs / "full")] == [1, 2, 3]
    for rank in RANKS:
        got, expected = _state_of(runs, "resumed", rank), _state_of(runs, "full", rank)
        _assert_equal_params(got["actor"], expected["actor"])
        # the KL anchor is the initial policy, not the restored one
        _assert_equal_params(got["reference"], expected["reference"])
        assert any(not torch.equal(p, got["reference"][n]) for n, p in got["actor"].items())
    got, expected = _state_of(runs, "resumed", 0), _state_of(runs, "full", 0)
    assert got["engine_version"] == 3
    _assert_equal_params(got["engine"], expected["engine"])

    run = runs / "resumed"
    first, again = load_config(run / "config.yaml"), load_config(run / "config.resumed_step_2.yaml")
    assert (first.train.steps, first.checkpoint.resume) == (2, False)
    assert (again.train.steps, again.checkpoint.resume) == (3, True)
    assert latest_checkpoint(run) == step_dir(run, 3)  # the incomplete step 3 was replaced


def test_skipped_steps_change_no_weights_and_the_run_continues(runs):
    lines = _metrics(runs / "skipped")
    assert [line["step"] for line in lines] == [1, 2, 3]
    for line, total in zip(lines[:2], (1, 2)):
        assert line["step/skipped"] == 1 and line["step/skipped_total"] == total
        assert line["dynamic_sampling/rounds"] == 3  # max_gen_rounds tried
        assert line["dynamic_sampling/groups"] == 0 and line["dynamic_sampling/keep_rate"] == 0
        assert not any(key.startswith("actor/") for key in line)
    # resumed after the skipped steps: step 3 trains, the skipped count carried over
    assert lines[2]["step/skipped"] == 0 and lines[2]["step/skipped_total"] == 2
    assert lines[2]["actor/updates"] == 2
    assert sorted(p.name for p in (runs / "skipped").glob("config*.yaml")) == [
        "config.resumed_step_2.yaml", "config.yaml"]

    initial = transformers.AutoModelForCausalLM.from_pretrained(runs / "model").state_dict()
    for rank in RANKS:
        skipped, continued = _state_of(runs, "skipped", rank), _state_of(runs, "continued", rank)
        assert skipped["skipped_steps"] == 2 and continued["skipped_steps"] == 2
        _assert_equal_params(skipped["actor"], skipped["reference"])  # the initial policy
        assert any(not torch.equal(p, skipped["actor"][n])
                   for n, p in continued["actor"].items())
    skipped = _state_of(runs, "skipped", 0)
    assert skipped["engine_version"] == 2
    assert all(torch.equal(skipped["engine"][n], t) for n, t in initial.items())
