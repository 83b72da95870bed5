"""Per-run cgroups: one memory and process-count limit for everything a sandboxed run starts.

Where this process may create child cgroups, each run gets a fresh one, made before the run
starts (its first process joins it before anything else runs, so every descendant is inside),
with `memory` capping all the run's processes and tmpfs files together (no swap) and `pids`
capping how many processes exist at once; it is removed after the run. Two layouts:

- cgroup v1 with the `memory` and `pids` controllers mounted (as root): a child of this
  process's own cgroup in each hierarchy;
- cgroup v2 where this process's cgroup delegates `memory` and `pids` to its children (listed in
  its `cgroup.subtree_control`, or enabled there when the kernel allows: the root cgroup, or an
  empty one).

Elsewhere `detect()` returns None and a reason; the per-process rlimits still apply (see the
README). The memory cgroup's OOM kills are counted so that such a SIGKILL is attributed to memory.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass

CONTROLLERS = ("memory", "pids")


@dataclass(frozen=True)
class Layout:
    """Where run cgroups are created: v1, one parent directory per controller; v2, one for both."""

    version: int
    parents: tuple[tuple[str, str], ...]  # (controller or "unified", directory)


def _mounts(mountinfo: str) -> list[tuple[str, str, set[str]]]:
    """(mount point, file system type, super options) of each cgroup mount."""
    found = []
    for line in mountinfo.splitlines():
        fields = line.split()
        sep = fields.index("-")
        fstype, options = fields[sep + 1], set(fields[sep + 3].split(","))
        if fstype in ("cgroup", "cgroup2"):
            found.append((fields[4], fstype, options))
    return found


def _own_paths(proc_cgroup: str) -> dict[str, str]:
    """This process's cgroup path per v1 controller, and under "" its v2 path."""
    paths = {}
    for line in proc_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def _parent(mount: str, path: str) -> str:
    """This process's cgroup directory under `mount`, or the mount's root when it does not exist
    there (a container that sees only its own subtree without a cgroup namespace)."""
    inside = os.path.join(mount, path.lstrip("/"))
    return inside if os.path.isdir(inside) else mount


def detect(mountinfo: str | None = None, proc_cgroup: str | None = None) -> tuple[Layout | None, str]:
    """The layout to create run cgroups in, or None and why not (from /proc/self by default)."""
    mountinfo = mountinfo if mountinfo is not None else _read("/proc/self/mountinfo")
    proc_cgroup = proc_cgroup if proc_cgroup is not None else _read("/proc/self/cgroup")
    mounts, own = _mounts(mountinfo), _own_paths(proc_cgroup)
    v1 = {c: mount for mount, fstype, options in mounts if fstype == "cgroup" for c in CONTROLLERS if c in options}
    if all(c in v1 and c in own for c in CONTROLLERS):
        parents = tuple((c, _parent(v1[c], own[c])) for c in CONTROLLERS)
        if all(os.access(d, os.W_OK) for _, d in parents):
            return Layout(1, parents), "cgroup v1 (memory, pids)"
        return None, "cgroup v1 memory/pids hierarchies are not writable by this user"
    v2 = [mount for mount, fstype, _ in mounts if fstype == "cgroup2"]
    if not v2 or "" not in own:
        return None, "no cgroup v1 memory+pids controllers and no cgroup v2 mount"
    parent = _parent(v2[0], own[""])
    available = set(_read(os.path.join(parent, "cgroup.controllers")).split())
    if not set(CONTROLLERS) <= available:
        return None, f"cgroup v2 at {parent} does not offer memory and pids (it offers: {sorted(available)})"
    control = os.path.join(parent, "cgroup.subtree_control")
    if not set(CONTROLLERS) <= set(_read(control).split()):
        try:
            _write(control, " ".join(f"+{c}" for c in CONTROLLERS))
        except OSError as error:
            return None, (f"cgroup v2 at {parent} does not delegate memory and pids to child cgroups "
                          f"and they cannot be enabled there ({error.strerror}); delegate them "
                          "(e.g. systemd Delegate=yes) to get per-run limits")
    if not os.access(parent, os.W_OK):
        return None, f"cgroup v2 at {parent} is not writable by this user"
    return Layout(2, (("unified", parent),)), "cgroup v2 (memory, pids)"


@functools.lru_cache(maxsize=1)
def machine_layout() -> tuple[Layout | None, str]:
    """`detect()` for this process, once, confirmed by moving a `true` process into a run cgroup."""
    try:
        layout, why = detect()
        if layout is not None:
            group = RunCgroup(layout, 64 << 20, 4)
            try:
                probe = subprocess.run(join_command(group.procs_files) + ["true"], capture_output=True,
                                       timeout=30, check=False)
            finally:
                group.remove()
            if probe.returncode != 0:
                return None, f"{why} found, but a process cannot join a child cgroup: {probe.stderr.decode()[-200:]}"
        return layout, why
    except (OSError, subprocess.SubprocessError) as error:  # no /proc, unreadable controller files
        return None, f"cgroups could not be used ({error})"


def join_command(procs_files: list[str]) -> list[str]:
    """A /bin/sh prefix that moves itself into each cgroup, then execs the rest of the command,
    so that a command's first process (and so everything it starts) runs inside."""
    script = "".join(f'echo $$ > "${i}" || exit 125; ' for i in range(1, len(procs_files) + 1))
    return ["/bin/sh", "-c", f'{script}shift {len(procs_files)}; exec "$@"', "sh", *procs_files]


class RunCgroup:
    """The cgroup(s) of one run: made with its limits, joined by the run's first process
    (`procs_files`), inspected after it (`oom_killed`), removed by `remove()`."""

    def __init__(self, layout: Layout, memory_bytes: int, max_processes: int) -> None:
        self.layout = layout
        name = f"archer-sandbox-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.dirs = {key: os.path.join(parent, name) for key, parent in layout.parents}
        try:
            for directory in self.dirs.values():
                os.mkdir(directory)
            if layout.version == 1:
                memory, pids = self.dirs["memory"], self.dirs["pids"]
                _write(os.path.join(memory, "memory.limit_in_bytes"), str(memory_bytes))
                _write_if_present(os.path.join(memory, "memory.memsw.limit_in_bytes"), str(memory_bytes))
                _write(os.path.join(pids, "pids.max"), str(max_processes))
            else:
                unified = self.dirs["unified"]
                _write(os.path.join(unified, "memory.max"), str(memory_bytes))
                _write_if_present(os.path.join(unified, "memory.swap.max"), "0")
                _write(os.path.join(unified, "pids.max"), str(max_processes))
        except BaseException:
            self.remove()
            raise

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs.values()]

    def oom_killed(self) -> bool:
        """Whether the kernel's OOM killer killed a process of this cgroup (its memory limit)."""
        if self.layout.version == 1:
            text = _read(os.path.join(self.dirs["memory"], "memory.oom_control"))
        else:
            text = _read(os.path.join(self.dirs["unified"], "memory.events"))
        counts = dict(line.split() for line in text.splitlines() if line.strip())
        return int(counts.get("oom_kill", 0)) > 0

    def remove(self, timeout_s: float = 5.0) -> None:
        """SIGKILL anything still inside, wait until empty, remove the directories (best effort
        past `timeout_s`: a cgroup whose last process is still exiting stays until it is gone)."""
        deadline = time.monotonic() + timeout_s
        for directory in self.dirs.values():
            if not os.path.isdir(directory):
                continue
            while True:
                pids = [int(p) for p in _read_or_empty(os.path.join(directory, "cgroup.procs")).split()]
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                try:
                    os.rmdir(directory)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.005)


def _read(path: str) -> str:
    with open(path) as file:
        return file.read()


def _read_or_empty(path: str) -> str:
    try:
        return _read(path)
    except OSError:
        return ""


def _write(path: str, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)


def _write_if_present(path: str, text: str) -> None:
    """Write `text` where the kernel offers the file (swap accounting may be off)."""
    if os.path.exists(path):
        _write(path, text)
