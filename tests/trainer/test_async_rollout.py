"""One-step-asynchronous training (``rollout.async``, trainer.async_rollout).

Pure parts: the version each sample carries (the engine's tag, else the engine's version when
its round started), the stale-group drop and its metrics on constructed versions, the in-flight
batch's exact JSON round trip, the worker's order (one rollout ahead, errors raised where taken), the
config fields. End to end at data-parallel 2 (2 gloo processes, the local engine in its own
process on rank 0): step 1 trains on version-0 samples, every later step on samples one version
behind (staleness 1, nothing dropped); the rollout of step k + 1 is served by version k - 1
(the engine's weights when it started); and a run stopped after step 2 and resumed equals the
uninterrupted async run bitwise (metrics and trained weights)."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from megatron_archer.algorithms import DynamicSamplingConfig, preset
from megatron_archer.rollout import Sample, SamplingParams
from megatron_archer.trainer import load_config, run_training
from megatron_archer.trainer.async_rollout import (
    RolloutsAhead,
    batch_from_dict,
    batch_to_dict,
    drop_stale,
)
from megatron_archer.trainer.config import resolved_yaml
from megatron_archer.trainer.rollout_phase import Group, RolloutBatch, collect_rollouts
from tests.distributed import run_distributed
from tests.trainer.common import CPU_CONFIG, tiny_run

REWARD = "reward.function=tests.trainer.rewards:digit_share"
ASYNC = ["rollout.async=true", "rollout.colocated=false"]
STEPS = 3


def _group(versions, index=0):
    samples = [Sample(token_ids=[1, 2], logprobs=[-0.25, -1 / 3], finish_reason="stop",
                      weight_version=v) for v in versions]
    return Group(prompt=None, samples=samples, rewards=[0.1, 1 / 7][:len(versions)],
                 scores=[0.1, 1 / 7][:len(versions)], index=index)


def _batch(groups):
    return RolloutBatch(groups=groups, generated_groups=len(groups), passed_groups=len(groups),
                        rounds=1, all_groups=list(groups), times={"rollout": 0.5},
                        engine_metrics={})


def test_a_group_older_than_max_staleness_is_dropped_and_counted():
    fresh, mixed, old = _group([4, 4]), _group([4, 2]), _group([1, 1])
    kept, metrics = drop_stale(_batch([fresh, mixed, old]), trainer_version=5, max_staleness=3)
    assert kept.groups == [fresh, mixed], "the oldest sample decides: 5 - 2 = 3 <= 3 passes, 5 - 1 does not"
    assert metrics == {"async/dropped_groups": 1.0, "async/dropped_samples": 2.0,
                       "async/staleness_mean": (1 + 1 + 1 + 3) / 4, "async/staleness_max": 3.0}
    assert kept.all_groups == [fresh, mixed, old], "rollout metrics still see every group"
    none, metrics = drop_stale(_batch([old]), trainer_version=5, max_staleness=1)
    assert none.groups == [] and metrics["async/staleness_max"] == 0.0


def test_the_in_flight_batch_round_trips_exactly_through_json():
    groups = [_group([3, 3], index=5), _group([3, 2], index=1)]
    routing = torch.randint(0, 128, (3, 4, 2), dtype=torch.int16)  # [tokens, layers, top_k]
    groups[0].samples[1] = replace(groups[0].samples[1], routing=routing)
    later = torch.randint(0, 128, (5, 4, 2), dtype=torch.int16)  # after it in the flat tensor
    groups[1].samples[0] = replace(groups[1].samples[0], routing=later)
    batch = RolloutBatch(groups=[groups[1]], generated_groups=2, passed_groups=1, rounds=2,
                         all_groups=groups, times={"rollout": 0.1, "reward": 1e-9},
                         engine_metrics={"rollout/requests_retried": 1.0})
    prompts = [f"prompt {i}" for i in range(6)]
    data, flat = batch_to_dict(batch)  # the routing travels as one flat int16 tensor
    assert flat.dtype == torch.int16 and flat.numel() == routing.numel() + later.numel()
    back = batch_from_dict(json.loads(json.dumps(data)), prompts, flat)
    assert back.all_groups[0].prompt == "prompt 5" and back.groups[0].prompt == "prompt 1"
    assert back.groups[0] is back.all_groups[1]
    for a, b in zip(batch.all_groups, back.all_groups):
        assert (a.samples, a.rewards, a.scores, a.index) == (b.samples, b.rewards, b.scores,
                                                             b.index)
    assert (back.rounds, back.times, back.engine_metrics) == (2, batch.times,
                                                              batch.engine_metrics)
    assert torch.equal(back.all_groups[0].samples[1].routing, routing)
    assert torch.equal(back.all_groups[1].samples[0].routing, later)
    assert back.all_groups[0].samples[0].routing is None


def test_samples_carry_the_engine_version_of_their_round_unless_the_engine_tags_them():
    class Engine:
        weight_version, calls = 4, 0

        def generate(self, prompts, params):
            self.calls += 1
            own = 2 if self.calls == 1 else None  # round 1: the engine's own tag (SGLang spans)
            return [[Sample(token_ids=[2], logprobs=[-0.5], finish_reason="stop",
                            weight_version=own), Sample(token_ids=[1], logprobs=[-0.5],
                                                        finish_reason="stop")] for _ in prompts]

        def take_metrics(self):
            return {}

    class Sampler:
        batch_size = 2

        def next_batch(self):
            return [3, 1]

    class Scorer:
        def score(self, prompts, responses):
            return [SimpleNamespace(value=float(ids[0] == 2)) for ids in responses]

    prompts = [SimpleNamespace(input_ids=(5, 6)) for _ in range(4)]
    algorithm = replace(preset("archer"), dynamic_sampling=DynamicSamplingConfig(True, 2))
    engine = Engine()
    batch = collect_rollouts(engine, prompts, Sampler(), SamplingParams(max_new_tokens=1, n=2),
                             Scorer(), algorithm, step=1, show_progress=False)
    assert [[s.weight_version for s in g.samples] for g in batch.groups] == [[2, 4], [2, 4]]
    assert [g.index for g in batch.groups] == [3, 1]
    engine.weight_version, engine.calls = None, 1  # the launch weights are version 0
    batch = collect_rollouts(engine, prompts, Sampler(), SamplingParams(max_new_tokens=1, n=2),
                             Scorer(), algorithm, step=1, show_progress=False)
    assert {s.weight_version for g in batch.groups for s in g.samples} == {0}


def test_the_worker_runs_one_rollout_ahead_and_raises_where_taken():
    release, calls = threading.Event(), []

    def collect(step):
        calls.append(step)
        if step == 2:
            release.wait(10)
        if step == 3:
            raise ValueError("the reward failed")
        return _batch([_group([step])])

    ahead = RolloutsAhead(collect, wait_before_update=True)
    assert ahead.take(1).groups[0].samples[0].weight_version == 1, "none in flight: run now"
    ahead.submit(2)
    with pytest.raises(RuntimeError, match="rollout 2 is in flight, step 3 asked for"):
        ahead.take(3)
    release.set()
    ahead.before_update()  # waits for rollout 2
    assert ahead.state_dict()[0]["step"] == 2
    assert ahead.take(2).groups[0].samples[0].weight_version == 2
    ahead.submit(3)
    with pytest.raises(ValueError, match="the reward failed"):
        ahead.take(3)
    assert ahead.state_dict() == (None, {}) and calls == [1, 2, 3]
    ahead.close()


def test_config_fields(tmp_path):
    base = tiny_run(tmp_path)
    with pytest.raises(ValueError, match="rollout.async needs colocated: false"):
        load_config(CPU_CONFIG, [*base, "rollout.async=true"])
    with pytest.raises(ValueError, match="rollout.async must be true or false; got 'yes please'"):
        load_config(CPU_CONFIG, [*base, "rollout.async=yes please"])
    with pytest.raises(ValueError, match="rollout.max_staleness must be an integer >= 1; got 0"):
        load_config(CPU_CONFIG, [*base, *ASYNC, "rollout.max_staleness=0"])
    config = load_config(CPU_CONFIG, [*base, *ASYNC, "rollout.max_staleness=2"])
    assert config.rollout.async_ and config.rollout.max_staleness == 2
    assert "async: true" in resolved_yaml(config)
    (tmp_path / "resolved.yaml").write_text(resolved_yaml(config))
    assert load_config(tmp_path / "resolved.yaml") == config
    assert not load_config(CPU_CONFIG, base).rollout.async_, "off by default"
    with pytest.raises(ValueError, match="rollout.threads must be an integer >= 1; got 0"):
        load_config(CPU_CONFIG, [*base, "rollout.threads=0"])


# ------------------------------------------------------------------------------ end to end
def _train(root, base, name, *overrides):
    config = load_config(CPU_CONFIG, [*base, *ASYNC, REWARD, "parallel.tensor=1",
                                      f"logging.dir={root / name}", "checkpoint.interval=1",
                                      *overrides])
    trainer = run_training(config)
    if trainer.rank0:  # TP 1: rank 0 holds every weight
        weights = {n: p.detach().clone() for n, p in trainer.actor.chunks[0].named_parameters()}
        torch.save(weights, root / f"{name}.weights.pt")
        torch.save(type(trainer.engine).__name__, root / f"{name}.engine.pt")


def _pair_worker(rank, world_size, root, base):
    _train(root, base, "full", f"train.steps={STEPS}")
    _train(root, base, "resumed", "train.steps=2")
    _train(root, base, "resumed", f"train.steps={STEPS}", "checkpoint.resume=true")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("async")
    base = tiny_run(root)
    run_distributed(_pair_worker, 2, root, base)
    return root


def _metrics(root, name):
    return [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]


def test_async_at_dp2_trains_one_version_behind(runs):
    assert torch.load(runs / "full.engine.pt") == "ProcessEngine"
    metrics = _metrics(runs, "full")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert [m["async/staleness_max"] for m in metrics] == [0.0, 1.0, 1.0]
    assert [m["async/staleness_mean"] for m in metrics] == [0.0, 1.0, 1.0]
    assert all(m["async/dropped_groups"] == 0 and m["step/skipped"] == 0 for m in metrics)
    assert all(m["actor/updates"] == 2 for m in metrics)
    # the engine's log-probs against the trainer's old ones: step 1 shares version 0 (float
    # rounding apart, measured 2.5e-7); later steps' samples are one update older (0.24, 0.18)
    gaps = [m["rollout/logprob_abs_diff_mean"] for m in metrics]
    assert gaps[0] < 1e-5 and min(gaps[1:]) > 100 * max(gaps[0], 1e-7), gaps
    # the checkpoint of step 2 holds rollout 3, generated by version 1 (step 1's weights)
    state = json.loads((runs / "full" / "checkpoints" / "step_00000002" / "trainer_state.json")
                       .read_text())["extra"]["rollout_ahead"]
    assert state["step"] == 3
    versions = {s["weight_version"] for g in state["batch"]["all_groups"] for s in g["samples"]}
    assert versions == {1}


def test_async_resume_is_bitwise(runs):
    full, resumed = _metrics(runs, "full"), _metrics(runs, "resumed")
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))

    def deterministic(record):
        return {k: v for k, v in record.items() if not k.startswith(("time/", "perf/"))}

    for a, b in zip(full, resumed):
        assert deterministic(a) == deterministic(b), a["step"]
    expected = torch.load(runs / "full.weights.pt", weights_only=True)
    got = torch.load(runs / "resumed.weights.pt", weights_only=True)
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
