"""Trainer checkpoints on real gloo ranks: a resumed run continues bitwise like an uninterrupted
one (loss, every parameter, RNG draws, data position); a crash mid-save leaves the previous
checkpoint usable; keep_last prunes; incomplete or foreign-layout checkpoints are refused."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron_archer.actor import Actor, ActorConfig
from megatron_archer.data.sampler import PromptSampler
from megatron_archer.models import load_hf_model
from megatron_archer.trainer import checkpoint
from megatron_archer.trainer.checkpoint import (
    CheckpointNotUsable,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    step_dir,
)
from tests.actor.common import make_batch
from tests.distributed import run_distributed
from tests.models.checkpoints import write_checkpoint
from tests.models.parallel import model_parallel

# warmup over 2 steps: a resumed actor that lost its schedule position steps at another lr
CONFIG = ActorConfig(max_tokens_per_micro_batch=40, lr=1e-2, weight_decay=0.1, adam_eps=1e-4,
                     clip_grad=0.5, lr_warmup_steps=2)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _actor(hf) -> Actor:
    loaded = load_hf_model(hf, params_dtype=torch.float32)
    return Actor(loaded.model, loaded.spec, CONFIG, loaded.backend)


def _step(actor: Actor, sampler: PromptSampler):
    """One step of a toy training loop whose loss depends on the data position (the batch) and
    on all three global generators (the advantages), the same on every rank."""
    indices = sampler.next_batch()
    batch = make_batch(4, seed=sum(i * 31**k for k, i in enumerate(indices)))
    advantages = (torch.randn(len(batch)) + random.random()
                  + torch.from_numpy(np.random.standard_normal(len(batch))).float())
    total_tokens = sum(batch.response_counts)

    def loss_fn(mb, logp, entropy):
        terms = -mb.gather(advantages)[:, None] * logp + 0.05 * logp.square()
        return torch.where(mb.response_mask, terms, 0.0).sum() / total_tokens

    result = actor.train_step(batch, loss_fn)
    assert not result.skipped
    return result


def _params(actor: Actor) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in actor.chunks[0].named_parameters()}


def _draws():
    return torch.rand(4), np.random.rand(), random.random()


def _resume_worker(rank, world_size, hf, run_dir):
    with model_parallel(2):  # TP 2
        _seed_everything(0)
        actor, sampler = _actor(hf), PromptSampler(10, 3, seed=1)
        for _ in range(3):
            expected = _step(actor, sampler)
        expected_params, expected_draws = _params(actor), _draws()
        expected_batch = sampler.next_batch()

        _seed_everything(0)
        actor, sampler = _actor(hf), PromptSampler(10, 3, seed=1)
        for _ in range(2):
            _step(actor, sampler)
        path = save_checkpoint(run_dir, 2, actor, hf_source=hf,
                               sampler_state=sampler.state_dict(), extra_state={"rewards": [0.5]})

        _seed_everything(123)  # the resumed process starts from other generator states
        actor, sampler = _actor(hf), PromptSampler(10, 3, seed=1)
        assert latest_checkpoint(run_dir) == path
        state = load_checkpoint(path, actor)
        assert (state.step, state.extra_state) == (2, {"rewards": [0.5]})
        sampler.load_state_dict(state.sampler_state)
        result = _step(actor, sampler)

        assert (result.loss, result.lr, result.step) == (expected.loss, expected.lr, expected.step)
        got = _params(actor)
        assert got.keys() == expected_params.keys()
        for name, tensor in got.items():
            assert torch.equal(tensor, expected_params[name]), name  # bitwise
        draws = _draws()
        assert torch.equal(draws[0], expected_draws[0]) and draws[1:] == expected_draws[1:]
        assert sampler.next_batch() == expected_batch


def _listing(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def _fail_after_model(actor, directory):
    raise RuntimeError("injected crash after the model part")


def _crash_and_prune_worker(rank, world_size, hf, run_dir):
    save = dict(hf_source=hf, sampler_state={"position": 0}, extra_state={}, keep_last=2)
    with model_parallel(1):  # DP 2: optimizer files tp0_pp0_dp0.pt, tp0_pp0_dp1.pt
        _seed_everything(0)
        actor, sampler = _actor(hf), PromptSampler(10, 3, seed=1)
        save_checkpoint(run_dir, 1, actor, **save)
        _step(actor, sampler)
        saved = _params(actor)
        save_checkpoint(run_dir, 2, actor, **save)
        assert sorted(p.name for p in (step_dir(run_dir, 2) / "optimizer").iterdir()) == [
            "tp0_pp0_dp0.pt", "tp0_pp0_dp1.pt"]
        _step(actor, sampler)

        writer = checkpoint._save_optimizer
        checkpoint._save_optimizer = _fail_after_model
        try:
            with pytest.raises(RuntimeError, match="injected crash"):
                save_checkpoint(run_dir, 3, actor, **save)
        finally:
            checkpoint._save_optimizer = writer
        dist.barrier()  # rank 0 removes the failed save's temporary
        assert latest_checkpoint(run_dir) == step_dir(run_dir, 2)
        assert _listing(run_dir) == ["step_00000001", "step_00000002"]

        # the previous checkpoint is intact: it loads, with the weights it was saved with
        fresh = _actor(hf)
        assert load_checkpoint(step_dir(run_dir, 2), fresh).step == 2
        assert all(torch.equal(p, saved[n]) for n, p in _params(fresh).items())

        # a killed save leaves its hidden temporary behind; the next save removes it
        if rank == 0:
            leftover = run_dir / "checkpoints" / ".step_00000003.tmp-0badc0de" / "model"
            leftover.mkdir(parents=True)
            (leftover / "partial").write_text("x")
        dist.barrier()
        assert latest_checkpoint(run_dir) == step_dir(run_dir, 2)
        save_checkpoint(run_dir, 3, fresh, **save)  # keep_last=2 prunes step 1
        assert _listing(run_dir) == ["step_00000002", "step_00000003"]
        assert latest_checkpoint(run_dir) == step_dir(run_dir, 3)

    with model_parallel(2):
        with pytest.raises(CheckpointNotUsable, match="layout"):
            load_checkpoint(step_dir(run_dir, 3), _actor(hf))


def _checkpoint_worker(rank, world_size, hf, root):
    """Both scenarios in one spawned job: a spawn, its imports and megatron's first
    checkpoint save (it starts a multiprocessing manager) cost ~25 s."""
    _resume_worker(rank, world_size, hf, root / "resume")
    _crash_and_prune_worker(rank, world_size, hf, root / "crash")


def test_resume_is_bitwise_and_a_crash_mid_save_keeps_the_previous_checkpoint(tmp_path):
    """Resume after step 2 equals uninterrupted step 3 bitwise (TP 2); a crash mid-save keeps
    the previous checkpoint usable and keep_last prunes (DP 2)."""
    hf = write_checkpoint(tmp_path / "qwen3", "qwen3")
    run_distributed(_checkpoint_worker, 2, hf, tmp_path)


def _fake_complete(path):
    """A directory with a valid manifest: what latest_checkpoint and pruning judge by."""
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(
        f'{{"format": "{checkpoint.FORMAT}", "version": {checkpoint.VERSION}}}')
    return path


def test_incomplete_checkpoint_is_ignored_and_refused(tmp_path):
    complete, incomplete = _fake_complete(step_dir(tmp_path, 3)), step_dir(tmp_path, 7)
    (incomplete / "model").mkdir(parents=True)  # a save that never wrote its manifest
    _fake_complete(tmp_path / "checkpoints" / ".step_00000009.tmp-12345678")

    assert latest_checkpoint(tmp_path) == complete
    with pytest.raises(CheckpointNotUsable, match="incomplete: it has no manifest.json"):
        load_checkpoint(incomplete, actor=None)
    with pytest.raises(CheckpointNotUsable, match="no such checkpoint"):
        load_checkpoint(step_dir(tmp_path, 8), actor=None)
    assert latest_checkpoint(tmp_path / "elsewhere") is None


def test_prune_never_deletes_the_checkpoint_just_written(tmp_path):
    for step in (1, 2, 5):
        _fake_complete(step_dir(tmp_path, step))
    step_dir(tmp_path, 9).mkdir()  # incomplete: not counted, not touched
    checkpoint._prune(tmp_path / "checkpoints", keep_last=1, keep=step_dir(tmp_path, 2))
    assert _listing(tmp_path) == ["step_00000002", "step_00000005", "step_00000009"]


def test_keep_last_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 1, actor=None, hf_source=tmp_path, sampler_state={},
                        extra_state={}, keep_last=0)


def test_scan_names_each_unusable_checkpoint(tmp_path):
    complete = _fake_complete(step_dir(tmp_path, 3))
    step_dir(tmp_path, 7).mkdir()
    (_fake_complete(step_dir(tmp_path, 8)) / "manifest.json").write_text("{trunc")
    found, unusable = checkpoint.scan_checkpoints(tmp_path)
    assert found == [complete]
    assert len(unusable) == 2 and "step_00000007" in unusable[0] and "manifest" in unusable[0]
    assert "step_00000008" in unusable[1] and "not valid JSON" in unusable[1]
    assert checkpoint.checkpoint_step(complete) == 3


def _fewer_steps_worker(rank, world_size, overrides):
    from megatron_archer.trainer import load_config, run_training
    from tests.trainer.common import CPU_CONFIG

    with pytest.raises(ValueError, match=r"^train.steps=2 is below the step of the checkpoint to "
                                         r"resume, .*step_00000004: raise train.steps"):
        run_training(load_config(CPU_CONFIG, overrides))


def test_resume_refuses_fewer_steps_than_the_checkpoint(tmp_path, capfd):
    from tests.trainer.common import tiny_run

    overrides = [*tiny_run(tmp_path), "parallel.tensor=1", "train.steps=2",
                 "checkpoint.resume=true"]
    _fake_complete(step_dir(tmp_path / "run", 4))
    step_dir(tmp_path / "run", 5).mkdir()  # a save that did not finish: skipped, and said so
    run_distributed(_fewer_steps_worker, 1, overrides)
    out = capfd.readouterr().out
    assert "resume: skipped" in out and "step_00000005" in out
