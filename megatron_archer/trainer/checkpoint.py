"""Trainer checkpoints: everything a run needs to continue exactly, written atomically.

``run_dir/checkpoints/step_<step:08d>/`` holds::

    model/               the weights as a model checkpoint (``models.dist_checkpoint``: megatron
                         distributed checkpoint + HF config), loadable alone at any layout
    optimizer/           CPU: ``tp<t>_pp<p>_dp<d>.pt``, each rank's torch AdamW state_dict;
                         CUDA: megatron's distributed optimizer as a distributed checkpoint
    rng/rank_<r>.pt      each rank's python, numpy, torch CPU (and CUDA) generator states
    trainer_state.json   step, lr-schedule position, data sampler state, caller's extra state
    trainer_tensors.safetensors  the caller's extra tensors, when it has any (the in-flight
                         rollout's routing: gigabytes at mixture-of-experts scale, not JSON)
    manifest.json        written last: format, step, layout (tp, pp, dp), optimizer format

Every rank writes its part into a hidden temporary sibling which is renamed into place once all
ranks have finished and the manifest is written (``models.output_dir``), so a crash mid-save
leaves the previous checkpoints untouched and at most a hidden ``.step_*`` directory, removed by
the next save. A directory without a manifest is incomplete and never loaded. Old checkpoints are
pruned only after the new one is complete, each renamed to a hidden name before deletion, so a
crash while pruning never leaves a visible partial checkpoint.

Resuming needs the saved layout (tensor, pipeline, data parallel sizes): the optimizer and RNG
states are per rank. The model alone (``model/``) loads at any layout.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import CheckpointException

from megatron_archer.actor import Actor, unwrap_chunk
from megatron_archer.models.dist_checkpoint import (
    WEIGHTS_DIR,
    check_distcp_files,
    load_model_weights,
    save_model_checkpoint,
)
from megatron_archer.models.hf_import import CheckpointError
from megatron_archer.models.output_dir import atomic_output_dir

FORMAT = "megatron-archer-trainer-checkpoint"
VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
TRAINER_TENSORS = "trainer_tensors.safetensors"
MODEL_DIR = "model"
OPTIMIZER_DIR = "optimizer"
RNG_DIR = "rng"
TORCH_ADAMW = "torch-adamw-per-rank"
MEGATRON_DISTRIBUTED = "megatron-distributed-optimizer"
# megatron's per-bucket format: fully parallel save/load, reshardable in DP only (the layout
# must match anyway, for the RNG states)
_DIST_OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable",
                        "chained_optim_avoid_prefix": True}
_STEP_DIR = re.compile(r"step_(\d{8})")
_LOW_SPACE = 64 << 20  # bytes free below which a failed write is reported as a full disk


class CheckpointNotUsable(ValueError):
    """The checkpoint is missing, incomplete, damaged, of another format, or of another layout."""


class CheckpointNotSaved(OSError):
    """A save failed on some rank (a full disk, a write error); nothing of it was kept."""


@dataclass(frozen=True)
class ResumeState:
    """What ``load_checkpoint`` hands back to the trainer (the actor is restored in place)."""

    path: Path
    step: int
    sampler_state: dict[str, Any]
    extra_state: dict[str, Any]


def step_dir(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"step_{step:08d}"


def save_checkpoint(run_dir: str | Path, step: int, actor: Actor, *, hf_source: str | Path,
                    sampler_state: dict[str, Any], extra_state: dict[str, Any],
                    extra_tensors: dict[str, torch.Tensor] | None = None,
                    keep_last: int | None = None, group=None) -> Path:
    """Every rank of the job: write ``step``'s checkpoint, then keep the ``keep_last`` newest.

    ``hf_source``: the HF checkpoint the model came from (its config and tokenizer files are
    kept). ``sampler_state`` and ``extra_state`` must be JSON-serialisable and the same on every
    rank (rank 0's are written); ``extra_tensors`` (rank 0's) go to ``TRAINER_TENSORS``, read
    back by ``load_extra_tensors``. An existing checkpoint of the same step is replaced once the
    new one is complete. Returns the checkpoint's path.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be an int >= 1 or None, got {keep_last!r}")
    if len(actor.chunks) != 1:
        raise NotImplementedError("checkpoints of virtual-pipeline (several) model chunks")
    rng_state = _rng_state()  # before the save itself can draw from any generator
    extra_tensors = extra_tensors or {}
    try:
        trainer_state = json.dumps({"step": step, "schedule_steps": actor.steps_taken,
                                    "sampler": sampler_state, "extra": extra_state,
                                    "tensors": sorted(extra_tensors)}, indent=2)
    except TypeError as error:
        raise TypeError(f"sampler_state and extra_state must be JSON-serialisable: {error}") \
            from None
    out = step_dir(run_dir, step)
    if dist.get_rank() == 0:
        _remove_hidden_leftovers(out.parent)
    with atomic_output_dir(out, force=True, collective=True) as tmp:
        if dist.get_rank() == 0:
            (tmp / OPTIMIZER_DIR).mkdir()
            (tmp / RNG_DIR).mkdir()
        dist.barrier()

        def write_rank_files():
            save_model_checkpoint(unwrap_chunk(actor.chunks[0]), actor.spec, tmp / MODEL_DIR,
                                  hf_source=hf_source)
            _save_optimizer(actor, tmp / OPTIMIZER_DIR)
            torch.save(rng_state, tmp / RNG_DIR / _rng_file())

        def write_manifest():
            if dist.get_rank() == 0:
                if extra_tensors:
                    save_file(extra_tensors, tmp / TRAINER_TENSORS)
                (tmp / TRAINER_STATE).write_text(trainer_state + "\n")
                _write_durably(tmp / MANIFEST, json.dumps(_manifest(step, actor), indent=2) + "\n")

        # agreed: a rank that failed (a full disk) makes every rank raise, none waits forever;
        # the first agreement also says every rank's files are written: the manifest may follow
        _agree(lambda: _saving(out, tmp, write_rank_files), group, CheckpointNotSaved)
        _agree(lambda: _saving(out, tmp, write_manifest), group, CheckpointNotSaved)
    if keep_last is not None and dist.get_rank() == 0:
        _prune(out.parent, keep_last, keep=out)
    dist.barrier()
    return out


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint of the highest step under ``run_dir``, or None."""
    complete, _ = scan_checkpoints(run_dir)
    return complete[-1] if complete else None


def checkpoint_step(path: str | Path) -> int:
    """The step of a ``step_<n>`` checkpoint directory."""
    return int(_STEP_DIR.fullmatch(Path(path).name).group(1))


def load_checkpoint(path: str | Path, actor: Actor, group=None) -> ResumeState:
    """Every rank of the job: restore ``actor`` (weights, optimizer, lr-schedule position) and
    this rank's RNG states from the checkpoint at ``path``; return the trainer's state.

    The actor must be built as for the saved run (same model, config and parallel layout).
    Each rank first checks the manifest, the layout, the trainer state and its own files, and
    the ranks agree over ``group`` (None: the default group) before the collective loads, which
    check their files' sizes against their indexes first; a rank-local file that
    still fails to load is agreed on again after (a failed collective read of the weights
    fails on every rank by itself). Either way every rank raises
    CheckpointNotUsable naming the file, so the caller can fall back to an older checkpoint
    (``load_checkpoint`` again restores everything it touched).
    """
    path = Path(path)
    trainer_state = _agree(lambda: _verify(path, actor), group)
    weights = path / MODEL_DIR
    _readable(weights / WEIGHTS_DIR, lambda: load_model_weights(unwrap_chunk(actor.chunks[0]),
                                                                 weights))  # every rank raises

    def load_rank_local():
        optimizer = path / OPTIMIZER_DIR
        _readable(optimizer if actor.on_cuda else optimizer / _optimizer_file(),
                  lambda: _load_optimizer(actor, optimizer))
        rng = path / RNG_DIR / _rng_file()
        _readable(rng, lambda: _load_rng(rng))

    _agree(load_rank_local, group)
    actor.steps_taken = trainer_state["schedule_steps"]
    return ResumeState(path=path, step=trainer_state["step"],
                       sampler_state=trainer_state["sampler"], extra_state=trainer_state["extra"])


def load_extra_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``extra_tensors`` saved with the checkpoint at ``path`` (checked by
    ``load_checkpoint``); {} when it has none."""
    tensors = Path(path) / TRAINER_TENSORS
    return load_file(str(tensors)) if tensors.is_file() else {}


def _verify(path: Path, actor: Actor) -> dict[str, Any]:
    """This rank's checks before anything is loaded; the trainer state on success."""
    manifest = _read_manifest(path)
    layout = _layout()
    if manifest["layout"] != layout:
        raise CheckpointNotUsable(
            f"{path} was saved at layout {manifest['layout']}, this job runs {layout}: optimizer "
            "and RNG states are per rank, so resume at the saved layout (the weights alone, in "
            f"{path / MODEL_DIR}, load at any layout)")
    if manifest["optimizer"] != _optimizer_format(actor):
        raise CheckpointNotUsable(
            f"{path} holds optimizer state {manifest['optimizer']!r}, this actor uses "
            f"{_optimizer_format(actor)!r} (CPU vs CUDA run)")
    if len(actor.chunks) != 1:
        raise NotImplementedError("checkpoints of virtual-pipeline (several) model chunks")
    rank_files = [path / RNG_DIR / _rng_file()]
    if not actor.on_cuda:
        rank_files.append(path / OPTIMIZER_DIR / _optimizer_file())
    for file in rank_files:
        if not file.is_file():
            raise CheckpointNotUsable(f"{file}: missing (this rank's state)")
    if actor.on_cuda:  # the weights' files are checked by load_model_weights, on every rank
        try:
            check_distcp_files(path / OPTIMIZER_DIR)
        except CheckpointError as error:
            raise CheckpointNotUsable(str(error)) from None
    file = path / TRAINER_STATE
    try:
        state = json.loads(file.read_text())
        missing = {"step", "schedule_steps", "sampler", "extra"} - set(state)
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointNotUsable(f"{file}: unreadable ({error})") from None
    if missing:
        raise CheckpointNotUsable(f"{file}: no {', '.join(sorted(missing))}")
    if state.get("tensors"):
        tensors = path / TRAINER_TENSORS
        try:
            with safe_open(str(tensors), framework="pt") as f:  # the header only
                absent = set(state["tensors"]) - set(f.keys())
        except (OSError, SafetensorError) as error:
            raise CheckpointNotUsable(f"{tensors}: unreadable ({error})") from None
        if absent:
            raise CheckpointNotUsable(f"{tensors}: no {', '.join(sorted(absent))}")
    return state


def _agree(fn, group, failure: type[Exception] = CheckpointNotUsable):
    """Run ``fn`` on every rank of ``group``; if it raised ``failure`` on any, raise it on every
    rank with each failing rank's message. Any other error on a rank ends the agreement too
    (no rank is left waiting in it): that rank raises its error, the others a RuntimeError
    naming it. Otherwise ``fn``'s result."""
    if not dist.is_initialized():  # one process, no job: nothing to agree with
        return fn()
    result, problem, unexpected = None, None, None
    try:
        result = fn()
    except failure as error:
        problem = (True, str(error))
    except Exception as error:  # noqa: BLE001 - re-raised below, after every rank has heard
        unexpected = error
        problem = (False, f"rank {dist.get_rank()}: {type(error).__name__}: {error}")
    problems = [None] * dist.get_world_size(group)
    dist.all_gather_object(problems, problem, group=group)
    if unexpected is not None:
        raise unexpected
    reported = [p for p in problems if p is not None]
    others = [text for expected, text in reported if not expected]
    if others:
        raise RuntimeError("; ".join(others))
    found = list(dict.fromkeys(text for _, text in reported))
    if found:
        raise failure("; ".join(found))
    return result


def _saving(out: Path, tmp: Path, write) -> None:
    """``write()``, a failure as CheckpointNotSaved saying whether the disk is full; checked
    while the partial save still occupies ``tmp`` (torch.save reports a full disk only as
    "unexpected pos"). A failed distributed-checkpoint write (the weights) is raised by torch
    as a CheckpointException, a BaseException, on every rank: it is caught here too."""
    try:
        write()
    except (OSError, RuntimeError, CheckpointException) as error:
        free = shutil.disk_usage(tmp).free
        full = _no_space(error) or free < _LOW_SPACE
        cause = (f"No space left on device ({free} bytes free there)" if full
                 else _describe(error))
        raise CheckpointNotSaved(
            f"checkpoint {out} not saved: {cause}; nothing of it was kept and the earlier "
            "checkpoints are intact") from error


def _describe(error: BaseException) -> str:
    """One line: a distributed checkpoint's failure by rank (only its coordinator has them)."""
    if not isinstance(error, CheckpointException):
        return f"{type(error).__name__}: {error}"
    failed = [f"rank {rank}: {type(e).__name__}: {e}" for rank, (e, _) in error.failures.items()]
    return "; ".join(failed) or "the weights' write failed on another rank"


def _no_space(error: BaseException | None) -> bool:
    """ENOSPC in ``error``, its causes, or a distributed checkpoint's per-rank failures (whose
    causes are lost on their way to the coordinator: megatron keeps the text, "[Errno 28] ...")."""
    while error is not None:
        if (getattr(error, "errno", None) == errno.ENOSPC
                or f"[Errno {errno.ENOSPC}]" in str(error)):
            return True
        if isinstance(error, CheckpointException) and any(
                _no_space(failure) for failure, _ in error.failures.values()):
            return True
        error = error.__cause__
    return False


def _readable(file: Path, load):
    """``load()``, its failure (a truncated or foreign file) as CheckpointNotUsable naming ``file``;
    a distributed checkpoint's failed read is torch's CheckpointException, raised on every rank."""
    try:
        return load()
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError,
            CheckpointException) as error:
        raise CheckpointNotUsable(f"{file}: unreadable ({type(error).__name__}: "
                                  f"{str(error).splitlines()[0] if str(error) else ''})") from None


# ------------------------------------------------------------------------------ layout, manifest
def _layout() -> dict[str, int]:
    layout = {"tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
              "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
              "data_parallel": parallel_state.get_data_parallel_world_size()}
    if parallel_state.get_context_parallel_world_size() > 1:  # absent without CP (older runs)
        layout["context_parallel"] = parallel_state.get_context_parallel_world_size()
    return layout


def _optimizer_format(actor: Actor) -> str:
    return MEGATRON_DISTRIBUTED if actor.on_cuda else TORCH_ADAMW


def _manifest(step: int, actor: Actor) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "step": step, "layout": _layout(),
            "world_size": dist.get_world_size(), "optimizer": _optimizer_format(actor)}


def _write_durably(path: Path, text: str) -> None:
    """Write and fsync: the manifest is what marks a checkpoint complete."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CheckpointNotUsable(f"{path}: no such checkpoint directory")
    if not (path / MANIFEST).is_file():
        raise CheckpointNotUsable(
            f"{path} is incomplete: it has no {MANIFEST} (a save that did not finish); "
            "it is never loaded")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as error:
        raise CheckpointNotUsable(f"{path / MANIFEST} is not valid JSON: {error}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointNotUsable(
            f"{path / MANIFEST}: format {manifest.get('format')!r} version "
            f"{manifest.get('version')!r}, expected {FORMAT!r} version {VERSION}")
    return manifest


def scan_checkpoints(run_dir: str | Path) -> tuple[list[Path], list[str]]:
    """The visible ``step_*`` directories under ``run_dir`` with a valid manifest, oldest step
    first, and a line for each one without (a save that did not finish, a damaged manifest)."""
    checkpoints = Path(run_dir) / CHECKPOINTS_DIR
    if not checkpoints.is_dir():
        return [], []
    found, unusable = [], []
    for entry in sorted(checkpoints.iterdir()):
        match = _STEP_DIR.fullmatch(entry.name)
        if not match:
            continue
        try:
            _read_manifest(entry)
        except CheckpointNotUsable as error:
            unusable.append(f"{entry}: {error}")
            continue
        found.append((int(match.group(1)), entry))
    return [entry for _, entry in sorted(found)], unusable


# ------------------------------------------------------------------------------ optimizer
def _optimizer_file() -> str:
    # context-parallel ranks share a data-parallel rank: each writes its own file
    cp = (f"_cp{parallel_state.get_context_parallel_rank()}"
          if parallel_state.get_context_parallel_world_size() > 1 else "")
    return (f"tp{parallel_state.get_tensor_model_parallel_rank()}"
            f"_pp{parallel_state.get_pipeline_model_parallel_rank()}"
            f"_dp{parallel_state.get_data_parallel_rank()}{cp}.pt")


def _save_optimizer(actor: Actor, directory: Path) -> None:
    """CPU: this rank's AdamW state_dict in its own file. CUDA: megatron's distributed optimizer
    state (sharded over data-parallel ranks) as a distributed checkpoint."""
    if not actor.on_cuda:
        torch.save(actor.optimizer.state_dict(), directory / _optimizer_file())
        return
    model_state = actor.chunks[0].sharded_state_dict()
    state = actor.optimizer.sharded_state_dict(model_state, metadata=_DIST_OPTIM_METADATA)
    dist_checkpointing.save(state, str(directory))


def _load_optimizer(actor: Actor, directory: Path) -> None:
    if not actor.on_cuda:
        state = torch.load(directory / _optimizer_file(), weights_only=True)
        actor.optimizer.load_state_dict(state)
        return
    actor.optimizer.reload_model_params()  # main params from the loaded weights first
    model_state = actor.chunks[0].sharded_state_dict()
    template = actor.optimizer.sharded_state_dict(
        model_state, is_loading=True, metadata=_DIST_OPTIM_METADATA)
    actor.optimizer.load_state_dict(dist_checkpointing.load(template, str(directory)))


# ------------------------------------------------------------------------------ RNG
def _rng_file() -> str:
    return f"rank_{dist.get_rank():05d}.pt"


def _rng_state() -> dict[str, Any]:
    """This rank's generator states, as plain types (loadable with ``weights_only``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        state["cuda"] = torch.cuda.get_rng_state_all()
        state["megatron_cuda_tracker"] = get_cuda_rng_tracker().get_states()
    return state


def _load_rng(file: Path) -> None:
    state = torch.load(file, weights_only=True)
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        torch.cuda.set_rng_state_all(state["cuda"])
        get_cuda_rng_tracker().set_states(state["megatron_cuda_tracker"])


# ------------------------------------------------------------------------------ housekeeping
def _remove_hidden_leftovers(checkpoints: Path) -> None:
    """Remove what an interrupted save or prune left: hidden ``.step_*`` directories."""
    if checkpoints.is_dir():
        for entry in checkpoints.iterdir():
            if entry.name.startswith(".step_") and entry.is_dir():
                shutil.rmtree(entry)


def _prune(checkpoints: Path, keep_last: int, keep: Path) -> None:
    """Delete complete checkpoints beyond the ``keep_last`` newest (never ``keep``); each is
    first renamed to a hidden name, so it disappears from view at once and whole."""
    for old in scan_checkpoints(checkpoints.parent)[0][:-keep_last]:
        if old != keep:
            doomed = checkpoints / f".{old.name}.deleting-{uuid.uuid4().hex[:8]}"
            os.rename(old, doomed)
            shutil.rmtree(doomed)
