"""The prompt sampler: seeded epochs, batches across epoch boundaries, exact resume."""

import json

import pytest

from megatron_archer.data import PromptSampler


def draw(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def test_every_epoch_is_a_permutation_and_epochs_differ():
    sampler = PromptSampler(num_prompts=10, batch_size=5, seed=3)
    epochs = [sum(draw(sampler, 2), []) for _ in range(3)]
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3
    assert epochs[0] != list(range(10))


def test_deterministic_for_a_seed():
    assert draw(PromptSampler(13, 4, seed=7), 10) == draw(PromptSampler(13, 4, seed=7), 10)
    assert draw(PromptSampler(13, 4, seed=7), 10) != draw(PromptSampler(13, 4, seed=8), 10)
    assert draw(PromptSampler(5, 2, shuffle=False), 3) == [[0, 1], [2, 3], [4, 0]]


def test_batches_cross_the_epoch_boundary():
    sampler = PromptSampler(num_prompts=7, batch_size=3, seed=0)
    first, second, third = draw(sampler, 3)
    assert sorted(first + second + third[:1]) == list(range(7))  # epoch 0, then two of epoch 1
    assert (sampler.epoch, sampler.position) == (1, 2)
    assert len(sampler.next_batch(size=12)) == 12  # a DAPO top-up may span several epochs
    assert (sampler.epoch, sampler.position) == (2, 7)  # epoch 2 used up; epoch 3 starts on the next draw


# before, at, just after and well past a boundary; 7 batches of 3 end exactly at the end of epoch 2
@pytest.mark.parametrize("stop_after", [1, 2, 3, 5, 7])
def test_exact_resume_from_state_dict(stop_after):
    reference = draw(PromptSampler(7, 3, seed=11), 8)
    interrupted = PromptSampler(7, 3, seed=11)
    drawn = draw(interrupted, stop_after)
    state = json.loads(json.dumps(interrupted.state_dict()))  # a checkpoint round trip
    resumed = PromptSampler(7, 3, seed=11)
    resumed.load_state_dict(state)
    assert drawn + draw(resumed, 8 - stop_after) == reference


def test_state_from_another_sampler_is_refused():
    state = PromptSampler(7, 3, seed=11).state_dict()
    with pytest.raises(ValueError, match="sampler state has seed=11, this sampler 12"):
        PromptSampler(7, 3, seed=12).load_state_dict(state)
    with pytest.raises(ValueError, match="num_prompts=7, this sampler 8"):
        PromptSampler(8, 3, seed=11).load_state_dict(state)
    with pytest.raises(ValueError, match="position must be <= num_prompts"):
        PromptSampler(7, 3, seed=11).load_state_dict({**state, "position": 9})


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="num_prompts must be an integer >= 1; got 0"):
        PromptSampler(0, 1)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        PromptSampler(3, 0)
    with pytest.raises(ValueError, match="size must be an integer >= 1"):
        PromptSampler(3, 1).next_batch(size=0)
