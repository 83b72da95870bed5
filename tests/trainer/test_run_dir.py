"""A run directory holding an earlier run is refused before any work, with the ways on; with
``logging.overwrite`` exactly the earlier run's files are deleted (nothing else of the user's);
a resumed run and an empty or new directory are taken as they are. The quick start replaces only
an output directory it made itself."""

from __future__ import annotations

import pytest

from megatron_archer.quickstart.pipeline import MARKER, main, prepare_out_dir
from megatron_archer.trainer import load_config, run_training
from megatron_archer.trainer.run_dir import LOCK_FILE, claim
from tests.distributed import run_distributed
from tests.trainer.common import CPU_CONFIG, tiny_run


def _earlier_run(run):
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run / "tensorboard").mkdir()
    for name in ("config.yaml", "config.resumed_step_2.yaml", "metrics.jsonl", "notes.txt"):
        (run / name).write_text("kept\n")


def _refusal_worker(rank, world_size, overrides, run):
    with pytest.raises(ValueError, match=rf"^logging.dir {run} holds an earlier run \(config.yaml, "
                                         r"metrics.jsonl, tensorboard, config.resumed_step_2.yaml, "
                                         r"checkpoints\): continue it with checkpoint.resume=true"):
        run_training(load_config(CPU_CONFIG, overrides))


def test_a_new_run_refuses_a_directory_with_an_earlier_run(tmp_path):
    overrides = [*tiny_run(tmp_path), "parallel.tensor=1"]
    run = tmp_path / "run"
    _earlier_run(run)
    before = {p: p.read_text() for p in run.rglob("*") if p.is_file()}
    run_distributed(_refusal_worker, 1, overrides, run)
    (run / LOCK_FILE).unlink()  # the refused run's (empty, released) lock file is all it left
    assert {p: p.read_text() for p in run.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["checkpoints", "tensorboard", "config.yaml", "config.resumed_step_2.yaml",
         "metrics.jsonl", "notes.txt"])


def test_claim_overwrite_resume_and_fresh(tmp_path):
    run = tmp_path / "run"
    assert claim(run, run, resume=False, overwrite=False) == []  # not there yet
    _earlier_run(run)
    assert claim(run, run, resume=True, overwrite=False) == []  # resuming it: untouched
    deleted = claim(run, run, resume=False, overwrite=True)
    assert {p.name for p in deleted} == {"config.yaml", "config.resumed_step_2.yaml",
                                         "metrics.jsonl", "tensorboard", "checkpoints"}
    assert [p.name for p in run.iterdir()] == ["notes.txt"]  # the user's file stays
    assert claim(run, run, resume=False, overwrite=False) == []
    # checkpoints under another checkpoint.dir count too
    other = tmp_path / "ckpt"
    (other / "checkpoints" / "step_00000001").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds an earlier run"):
        claim(run, other, resume=False, overwrite=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        claim(tmp_path / "file", tmp_path, resume=False, overwrite=False)


def test_quickstart_replaces_only_its_own_out_dir(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work\n")
    assert main(["--out", str(mine)]) == 2
    assert "is not empty and was not made by the quick start" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    ours = prepare_out_dir(tmp_path / "ours")
    (ours / "metrics.jsonl").write_text("{}\n")
    assert prepare_out_dir(ours) == ours and [p.name for p in ours.iterdir()] == [MARKER]
    assert prepare_out_dir(mine / "new").is_dir()  # a new path inside is fine


_HOLD = """
import sys, time
from pathlib import Path
from megatron_archer.trainer.run_dir import RunLock
lock = RunLock(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(60)
"""


def test_a_run_directory_is_locked_by_the_job_writing_it(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from megatron_archer.trainer.run_dir import RunLock

    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=rf"^logging.dir {tmp_path} is in use by another run "
                                             rf"\(host .*, pid {holder.pid}\): wait for it"):
            RunLock(tmp_path)
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # dies without releasing: the kernel drops the lock
        holder.wait()
    assert f"pid {holder.pid}" in (tmp_path / LOCK_FILE).read_text()  # a stale lock file
    lock = RunLock(tmp_path)  # ...is taken over
    assert f"pid {os.getpid()}" in (tmp_path / LOCK_FILE).read_text()
    with pytest.raises(ValueError, match="is in use by another run"):
        RunLock(tmp_path)  # another open of it, even in this process
    lock.release()
    RunLock(tmp_path).release()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        RunLock(tmp_path / "file")


def test_every_quickstart_option_has_a_description(capsys):
    from dataclasses import fields

    from megatron_archer.quickstart.pipeline import HELP, Settings

    assert set(HELP) == {f.name for f in fields(Settings)} - {"rl_overrides"}
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "samples per problem at evaluation" in capsys.readouterr().out
