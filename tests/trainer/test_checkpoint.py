"""Trainer checkpoints on real gloo ranks: a resumed run continues bitwise like an uninterrupted
one (loss, every parameter, RNG draws, data position); a crash mid-save leaves the previous
checkpoint usable; keep_last prunes; incomplete or foreign-layout checkpoints are refused."""

from __future__ import annotations

import errno
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.utils import _wrap_exception

from megatron_archer.actor import Actor, ActorConfig
from megatron_archer.data.sampler import PromptSampler
from megatron_archer.models import load_hf_model
from megatron_archer.trainer import checkpoint
from megatron_archer.trainer.checkpoint import (
    CheckpointNotUsable,
    latest_checkpoint,
    load_checkpoint,
    load_extra_tensors,
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
        routing = torch.arange(7, dtype=torch.int16)  # extra tensors: rank 0's are written
        path = save_checkpoint(run_dir, 2, actor, hf_source=hf,
                               sampler_state=sampler.state_dict(), extra_state={"rewards": [0.5]},
                               extra_tensors={"routing": routing} if rank == 0 else None)

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
        assert torch.equal(load_extra_tensors(path)["routing"], routing)

        dist.barrier()  # every rank has read it
        if rank == 0:  # the extra tensors' file, cut short: refused on every rank, named
            tensors = path / checkpoint.TRAINER_TENSORS
            tensors.write_bytes(tensors.read_bytes()[:20])
        dist.barrier()
        with pytest.raises(CheckpointNotUsable, match=r"trainer_tensors.safetensors: unreadable"):
            load_checkpoint(path, _actor(hf))


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
            with pytest.raises(checkpoint.CheckpointNotSaved, match="injected crash"):
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

        _damage_worker(rank, hf, run_dir, fresh, save)

    with model_parallel(2):
        with pytest.raises(CheckpointNotUsable, match="layout"):
            load_checkpoint(step_dir(run_dir, 2), _actor(hf))


def _disk_full(actor, directory):
    raise OSError(errno.ENOSPC, "No space left on device", str(directory))


def _disk_full_results(writer):
    """What megatron's writer reports for a worker that hit a full disk: the error, wrapped
    (filesystem_async.FileSystemWriterAsync.retrieve_write_results)."""
    full = OSError(errno.ENOSPC, "No space left on device")
    try:
        raise RuntimeError(f"Worker failure: {full}") from full
    except RuntimeError as error:
        return _wrap_exception(error)


def _read_error(reader, plan, planner):
    raise OSError(errno.EIO, "Input/output error")


def _damage_worker(rank, hf, run_dir, actor, save):
    """DP 2, checkpoints 2 and 3 saved: a full disk on one rank and damaged files on one rank
    end in the same error on every rank (none waits forever), naming the file."""
    # a full disk on rank 1 while its optimizer state is written; then while the weights are
    # written (the distributed checkpoint's own failure, raised on every rank, ENOSPC inside)
    for owner, name, failing in ((checkpoint, "_save_optimizer", _disk_full),
                                 (FileSystemWriterAsync, "retrieve_write_results",
                                  _disk_full_results)):
        real = getattr(owner, name)
        if rank == 1:
            setattr(owner, name, failing)
        try:
            with pytest.raises(checkpoint.CheckpointNotSaved,
                               match=r"step_00000004 not saved: No space left on device.*intact"):
                save_checkpoint(run_dir, 4, actor, **save)
        finally:
            setattr(owner, name, real)
        dist.barrier()
        assert _listing(run_dir) == ["step_00000002", "step_00000003"]

    step3 = step_dir(run_dir, 3)
    if rank == 1:  # this rank's RNG file, cut short
        rng = step3 / "rng" / "rank_00001.pt"
        rng.write_bytes(rng.read_bytes()[:100])
    dist.barrier()
    with pytest.raises(CheckpointNotUsable, match=r"rng/rank_00001.pt: unreadable"):
        load_checkpoint(step3, _actor(hf))
    if rank == 0:  # a weights file cut short: found before the collective load
        distcp = sorted((step3 / "model" / "weights").glob("*.distcp"))[0]
        distcp.write_bytes(distcp.read_bytes()[:64])
    dist.barrier()
    with pytest.raises(CheckpointNotUsable, match=r"\.distcp: truncated, 64 bytes where"):
        load_checkpoint(step3, _actor(hf))
    # a weights file that passes the size check but cannot be read on one rank: torch's
    # collective load fails on every rank (a CheckpointException), which is a fallback too
    reader = FileSystemReader.read_data
    if rank == 1:
        FileSystemReader.read_data = _read_error
    try:
        with pytest.raises(CheckpointNotUsable, match=r"step_00000002/model/weights: unreadable"):
            load_checkpoint(step_dir(run_dir, 2), _actor(hf))
    finally:
        FileSystemReader.read_data = reader
    assert load_checkpoint(step_dir(run_dir, 2), _actor(hf)).step == 2


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


def _perturbed_copy(model, out):
    """A copy of the model directory whose weights differ in one element: same architecture."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model, out)
    file = sorted(out.glob("*.safetensors"))[0]
    tensors = load_file(file)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 0.5
    save_file(tensors, file, metadata={"format": "pt"})
    return out


def _resume_checks_worker(rank, world_size, tmp_path, overrides):
    from megatron_archer.trainer import load_config, run_training
    from tests.trainer.common import CPU_CONFIG

    def train(*more):
        run_training(load_config(CPU_CONFIG, [*overrides, *more]))

    train("train.steps=2")
    step2 = step_dir(tmp_path / "run", 2)
    optimizer = step2 / "optimizer" / "tp0_pp0_dp0.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:200])  # a damaged copy of the newest
    train("train.steps=3", "checkpoint.resume=true")
    assert latest_checkpoint(tmp_path / "run") == step_dir(tmp_path / "run", 3)

    model = next(o.split("=", 1)[1] for o in overrides if o.startswith("model.path="))
    other = _perturbed_copy(Path(model), tmp_path / "other_model")
    with pytest.raises(ValueError, match=r"^checkpoint.resume: .*step_00000003 was trained from "
                                         r"other sources: model.path: .*other_model differs .*"
                                         r"allow_source_change=true"):
        train("train.steps=4", "checkpoint.resume=true", f"model.path={other}")
    moved = tmp_path / "moved_model"
    Path(model).rename(moved)  # the same content elsewhere resumes
    train("train.steps=4", "checkpoint.resume=true", f"model.path={moved}")
    train("train.steps=5", "checkpoint.resume=true", f"model.path={other}",
          "checkpoint.allow_source_change=true")
    assert latest_checkpoint(tmp_path / "run") == step_dir(tmp_path / "run", 5)


def test_resume_falls_back_past_a_damaged_checkpoint_and_refuses_changed_sources(tmp_path, capfd):
    from tests.trainer.common import tiny_run

    overrides = [*tiny_run(tmp_path), "parallel.tensor=1", "checkpoint.interval=1"]
    run_distributed(_resume_checks_worker, 1, tmp_path, overrides)
    out = capfd.readouterr().out
    assert re.search(r"resume: skipped \S+step_00000002: \S+tp0_pp0_dp0.pt: unreadable", out), out
    assert re.search(r"resumed from \S+step_00000001 at step 1", out)
    assert re.search(r"resume: checkpoint.allow_source_change: model.path: \S+other_model", out)


def _agree_worker(rank: int, world: int) -> None:
    from datetime import timedelta

    # a short timeout: a rank left waiting in the agreement fails the test instead of hanging it
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=30))

    def fails_on_rank_1(error: Exception):
        def fn():
            if rank == 1:
                raise error
            return "ok"
        return fn

    assert checkpoint._agree(lambda: rank, group) == rank
    with pytest.raises(CheckpointNotUsable, match=r"^rank 1's file: damaged$"):
        checkpoint._agree(fails_on_rank_1(CheckpointNotUsable("rank 1's file: damaged")), group)
    # any other error on one rank ends the agreement on every rank too (none waits forever);
    # the failing rank raises its own error, the others name it
    expected = TypeError if rank == 1 else RuntimeError
    with pytest.raises(expected, match=r"list indices must be integers"):
        checkpoint._agree(fails_on_rank_1(TypeError("list indices must be integers")), group)
    dist.barrier(group)


def test_agreement_ends_on_every_rank_whatever_one_rank_raises():
    run_distributed(_agree_worker, 2)
