"""The trainer end to end with rollout routing replay (``actor.routing_replay: rollout``) on a
Qwen3-MoE model (4 experts, top-2): the local engine (generating one step ahead,
``rollout.async``) returns each sample's routing, which travels with the rank's share and routes
every training forward. 3 Archer steps at expert parallel 2 (2 gloo processes) against one process, and a run
stopped after step 2 (its in-flight rollout, routing included, saved with the checkpoint) and
resumed equal to the uninterrupted one bitwise."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from megatron_archer.algorithms import AlgorithmConfig
from megatron_archer.rollout.local_engine import LocalEngine
from megatron_archer.trainer import load_config, run_training
from megatron_archer.trainer.rollout_share import pack_share, unpack_share
from megatron_archer.trainer.step import build_shares
from tests.trainer.common import CPU_CONFIG, random_groups
from tests.trainer.test_moe_trainer import (
    assert_resume_is_bitwise,
    assert_steps_match,
    single_and_ep2_runs,
)
from tests.trainer.test_parallel_layouts import (
    ADAM_EPS,
    PARAM_ATOL,
    REWARD,
    _engine,
    _metrics,
)

ROLLOUT = ("actor.routing_replay=rollout", "rollout.async=true", "rollout.colocated=false")


def _train(root, base, name, *overrides):
    """A run whose engine (rank 0) is a LocalEngine in this process recording routing, as
    ``build_engine`` makes it, so that its weights (every expert) can be saved afterwards."""
    config = load_config(CPU_CONFIG, [*base, REWARD, f"logging.dir={root / name}",
                                      "checkpoint.interval=1", f"actor.adam_eps={ADAM_EPS}",
                                      "parallel.tensor=1", *ROLLOUT, *overrides])
    engine = LocalEngine(config.model.path, record_routing=True, threads=1) \
        if dist.get_rank() == 0 else None
    trainer = run_training(config, engine=engine)
    if trainer.rank0:
        weights = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
        torch.save(weights, root / f"{name}.engine.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return single_and_ep2_runs(tmp_path_factory.mktemp("moe_rollout"), _train)


def test_rollout_replay_at_expert_parallel_equals_one_process(runs):
    config = load_config(runs / "ep2" / "config.yaml")
    assert config.parallel.expert == 2 and config.actor.routing_replay == "rollout"
    single, ep2 = _metrics(runs, "single"), _metrics(runs, "ep2")
    assert_steps_match(single, ep2)
    for record in single + ep2:  # every update routed each token to the engine's experts
        assert record["moe/routing_mismatch_share"] == 0.0, record
    expected, got = _engine(runs, "single"), _engine(runs, "ep2")
    worst = max((got[name] - tensor).abs().max().item() for name, tensor in expected.items())
    assert worst <= PARAM_ATOL, worst


def test_rollout_replay_resume_is_bitwise(runs):
    state = (runs / "ep2_resumed").rglob("trainer_state.json")
    assert any('"routing"' in path.read_text() for path in state)  # saved in flight,
    assert any((path.parent / "trainer_tensors.safetensors").is_file() for path in state)  # apart
    assert_resume_is_bitwise(runs)


def test_routing_travels_with_the_share():
    """Each sequence's engine routing ([prompt + response - 1 tokens, layers, k]) comes back from
    the share's flat int32 buffer with its sequence; a share without routing has none."""
    groups = random_groups(4, 2, seed=1)
    g = torch.Generator().manual_seed(2)
    for group in groups:
        group.samples = [replace(s, routing=torch.randint(
            0, 128, (len(group.prompt.input_ids) + len(s.token_ids) - 1, 3, 2), generator=g,
            dtype=torch.int16)) for s in group.samples]
    for share in build_shares(groups, AlgorithmConfig(), 2, 2):
        back = unpack_share(*pack_share(share))
        for mb, got in zip(share, back):
            assert [t.tolist() for t in got.batch.input_ids] == \
                [t.tolist() for t in mb.batch.input_ids]
            assert [m.tolist() for m in got.batch.response_mask] == \
                [m.tolist() for m in mb.batch.response_mask]
            assert torch.equal(got.advantages, mb.advantages.float())
            for i, mask in enumerate(mb.batch.response_mask):
                responses = int(mask.sum())
                assert torch.equal(got.rollout_logp[i, :responses], mb.rollout_logp[i, :responses])
            assert len(got.batch.routing) == len(mb.batch.routing) > 0
            for want, have in zip(mb.batch.routing, got.batch.routing):
                assert have.dtype == torch.int16 and torch.equal(have, want)
    dense = build_shares(random_groups(4, 2, seed=1), AlgorithmConfig(), 2, 2)[0]
    assert all(mb.batch.routing is None for mb in unpack_share(*pack_share(dense)))


def test_a_mini_batch_with_some_samples_missing_their_routing_is_refused():
    """The engine's routing comes with every sample of a mini-batch or with none: a partial
    one is an error naming the count, not a mini-batch silently trained without replay."""
    groups = random_groups(2, 2, seed=3)
    first = groups[0].samples[0]
    groups[0].samples[0] = replace(first, routing=torch.zeros(
        len(groups[0].prompt.input_ids) + len(first.token_ids) - 1, 3, 2, dtype=torch.int16))
    with pytest.raises(ValueError, match=r"3 of 4 samples .* without their routing"):
        build_shares(groups, AlgorithmConfig(), 4, 1)
