"""ProcessEngine: the local engine in a spawned process gives the in-process engine's samples
bitwise (same thread count), before and after a weight update; a failed update (bad tensor,
or a sender that fails mid-stream) changes nothing and keeps the protocol in step; the child's
error keeps its type; a dead child is an error naming its exit code. One child for the module."""

from __future__ import annotations

import pytest
import torch

from megatron_archer.rollout.engine import SamplingParams
from megatron_archer.rollout.local_engine import LocalEngine
from megatron_archer.rollout.process_engine import ProcessEngine
from tests.models.checkpoints import write_checkpoint

PROMPTS = [[1, 2, 3], [7, 8, 9, 10, 11, 12], [42]]
PARAMS = SamplingParams(max_new_tokens=6, n=2, temperature=1.0, top_p=0.95, seed=11)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    checkpoint = write_checkpoint(tmp_path_factory.mktemp("process") / "qwen2", "qwen2")
    local = LocalEngine(checkpoint, threads=1)
    remote = ProcessEngine(checkpoint, threads=1)
    yield local, remote
    remote.shutdown()


def _plain(samples):
    return [[(s.token_ids, s.logprobs, s.finish_reason) for s in g] for g in samples]


def _perturbed(local, scale):
    g = torch.Generator().manual_seed(3)
    return [[(n, p.detach() + scale * torch.randn(p.shape, generator=g))
             for n, p in local.model.named_parameters()]]


def test_samples_equal_the_in_process_engine_before_and_after_an_update(engines):
    local, remote = engines
    assert remote.weight_version is None and remote.health()
    assert _plain(remote.generate(PROMPTS, PARAMS)) == _plain(local.generate(PROMPTS, PARAMS))
    buckets = _perturbed(local, 0.05)
    local.update_weights(buckets, 1)
    remote.update_weights(buckets, 1)
    assert remote.weight_version == 1
    after = remote.generate(PROMPTS, PARAMS)
    assert _plain(after) == _plain(local.generate(PROMPTS, PARAMS))


def test_failed_updates_change_nothing(engines):
    local, remote = engines
    version, before = remote.weight_version, _plain(remote.generate(PROMPTS, PARAMS))
    name, tensor = next(iter(local.model.named_parameters()))
    bad = [[(name, tensor.detach().clone())], [("no.such.weight", torch.zeros(2))],
           [(name, tensor.detach() + 1)]]  # the child stops reading at the second bucket
    with pytest.raises(KeyError, match="no.such.weight is not a parameter"):
        remote.update_weights(bad, 7)

    def failing():
        yield [(name, tensor.detach() + 1)]
        raise OSError("a collective failed")

    with pytest.raises(OSError, match="a collective failed"):
        remote.update_weights(failing(), 8)
    assert remote.weight_version == version
    assert _plain(remote.generate(PROMPTS, PARAMS)) == before, "the model is unchanged"


def test_a_dead_child_is_an_error_with_its_exit_code(engines):  # last: it kills the child
    _, remote = engines
    remote._process.kill()
    remote._process.join()
    with pytest.raises(RuntimeError, match=r"local engine process exited \(exit code -9\)"):
        remote.generate(PROMPTS, PARAMS)
    with pytest.raises(RuntimeError, match="exit code -9"):
        remote.update_weights([[("w", torch.zeros(1))]], 9)
    assert not remote.health()


def test_routing_crosses_the_process_boundary(tmp_path):
    """``record_routing`` reaches the child, and each sample's routing comes back equal to the
    in-process engine's (a mixture-of-experts checkpoint; one more child)."""
    checkpoint = write_checkpoint(tmp_path / "moe", "qwen3_moe")
    local = LocalEngine(checkpoint, threads=1, record_routing=True)
    remote = ProcessEngine(checkpoint, threads=1, record_routing=True)
    try:
        got = remote.generate(PROMPTS, PARAMS)
    finally:
        remote.shutdown()
    want = local.generate(PROMPTS, PARAMS)
    assert _plain(got) == _plain(want)
    for prompt, group, expected in zip(PROMPTS, got, want):
        for sample, other in zip(group, expected):
            assert sample.routing.shape == (len(prompt) + len(sample.token_ids) - 1, 2, 2)
            assert torch.equal(sample.routing, other.routing)
