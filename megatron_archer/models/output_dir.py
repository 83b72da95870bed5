"""Write a checkpoint directory all at once: into a hidden sibling, renamed into place on success.

A reader never sees a half-written checkpoint: until the rename, ``out`` is absent (or still the
old one, under ``force``), and a failure removes the temporary directory. The sibling is on the
same filesystem, so the rename is atomic. An existing non-empty ``out`` is refused unless
``force``; then it is replaced only after the new one is complete.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist


def check_output_dir(out: str | Path, force: bool) -> Path:
    """``out`` as a Path, if it may be written: absent, an empty directory, or ``force``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty (pass force=True / --force)")
    return out


@contextmanager
def atomic_output_dir(out: str | Path, *, force: bool, collective: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes ``out`` when the block succeeds.

    ``collective``: every rank of the default process group enters together and writes into
    the same directory (a filesystem shared by the ranks); rank 0 creates and renames it. If
    another rank fails, rank 0 waits at a barrier until the job is torn down (torchrun): ``out``
    is then still untouched, and a hidden ``.<name>.tmp-*`` sibling may be left behind.
    """
    out = check_output_dir(out, force)
    owner = not collective or dist.get_rank() == 0
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    if collective:
        box = [tmp]
        dist.broadcast_object_list(box, src=0)
        tmp = box[0]
    if owner:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    if collective:
        dist.barrier()
    try:
        yield tmp
        if collective:
            dist.barrier()
    except BaseException:
        if owner:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if owner:
        _replace(tmp, out)
    if collective:
        dist.barrier()


def _replace(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first, then deleted."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old)
