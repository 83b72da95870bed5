"""Per-run cgroups: layout detection for v1 and v2 (on fake cgroup trees), the files a run cgroup
writes, OOM-kill counting, and on this machine (where it allows) a real run cgroup that a
process joins and that is removed afterwards."""

import os
import subprocess
from pathlib import Path

import pytest

from megatron_archer.rewards import cgroups


def _mountinfo(*mounts):
    return "\n".join(f"{30 + i} 20 0:{40 + i} / {point} rw,nosuid - {fstype} cgroup rw,{options}"
                     for i, (point, fstype, options) in enumerate(mounts)) + "\n"


def test_v1_uses_this_processs_cgroup_in_each_hierarchy(tmp_path):
    (tmp_path / "memory" / "job" / "7").mkdir(parents=True)
    (tmp_path / "pids").mkdir()
    mountinfo = _mountinfo((tmp_path / "memory", "cgroup", "memory"), (tmp_path / "pids", "cgroup", "pids"),
                           (tmp_path / "cpu", "cgroup", "cpu,cpuacct"))
    layout, why = cgroups.detect(mountinfo, "5:memory:/job/7\n4:pids:/elsewhere\n2:cpu,cpuacct:/\n0::/\n")
    assert why == "cgroup v1 (memory, pids)"
    # the pids path does not exist under the mount (no cgroup namespace): the mount's root is used
    assert layout == cgroups.Layout(1, (("memory", str(tmp_path / "memory" / "job" / "7")),
                                        ("pids", str(tmp_path / "pids"))))


def test_v2_enables_memory_and_pids_for_children_or_says_why_not(tmp_path):
    unified = tmp_path / "unified"
    (unified / "app").mkdir(parents=True)
    (unified / "app" / "cgroup.controllers").write_text("cpu io memory pids\n")
    (unified / "app" / "cgroup.subtree_control").write_text("")
    mountinfo = _mountinfo((unified, "cgroup2", "nsdelegate"))
    layout, why = cgroups.detect(mountinfo, "0::/app\n")
    assert layout == cgroups.Layout(2, (("unified", str(unified / "app")),)) and why == "cgroup v2 (memory, pids)"
    assert (unified / "app" / "cgroup.subtree_control").read_text() == "+memory +pids"
    (unified / "app" / "cgroup.controllers").write_text("cpu io\n")
    layout, why = cgroups.detect(mountinfo, "0::/app\n")
    assert layout is None and "does not offer memory and pids" in why
    assert cgroups.detect("", "0::/\n") == (None, "no cgroup v1 memory+pids controllers and no cgroup v2 mount")


def test_a_v2_run_cgroup_writes_its_limits_and_counts_oom_kills(tmp_path):
    layout = cgroups.Layout(2, (("unified", str(tmp_path)),))
    group = cgroups.RunCgroup(layout, memory_bytes=123 << 20, max_processes=8)
    (directory,) = group.dirs.values()
    assert os.path.dirname(directory) == str(tmp_path) and "archer-sandbox-" in directory
    assert (Path(directory, "memory.max").read_text(), Path(directory, "pids.max").read_text()) == (str(123 << 20), "8")
    assert not os.path.exists(os.path.join(directory, "memory.swap.max"))  # only written where the kernel offers it
    assert group.procs_files == [os.path.join(directory, "cgroup.procs")]
    with open(os.path.join(directory, "memory.events"), "w") as events:
        events.write("low 0\nhigh 0\nmax 3\noom 1\noom_kill 0\n")
    assert not group.oom_killed()
    with open(os.path.join(directory, "memory.events"), "w") as events:
        events.write("low 0\nhigh 0\nmax 9\noom 2\noom_kill 1\n")
    assert group.oom_killed()


def test_a_real_run_cgroup_is_joined_and_removed():
    layout, why = cgroups.machine_layout()
    if layout is None:
        pytest.skip(f"no per-run cgroup on this machine: {why}")
    group = cgroups.RunCgroup(layout, memory_bytes=64 << 20, max_processes=4)
    try:
        inside = subprocess.run(cgroups.join_command(group.procs_files) + ["cat", "/proc/self/cgroup"],
                                capture_output=True, text=True, check=True).stdout
        name = os.path.basename(next(iter(group.dirs.values())))
        assert all(name in line for line in inside.splitlines() if any(c in line for c in ("memory", "pids")))
        if layout.version == 1:
            assert Path(group.dirs["memory"], "memory.limit_in_bytes").read_text().strip() == str(64 << 20)
            assert Path(group.dirs["pids"], "pids.max").read_text().strip() == "4"
    finally:
        group.remove()
    assert not any(os.path.exists(d) for d in group.dirs.values())
