"""The bubblewrap command line that confines one run, and the check that it works on this machine.

The program runs as an unprivileged user in a sandbox built by `bwrap` (Debian package
`bubblewrap`): new user, pid, network, ipc, uts, mount and cgroup namespaces; no capabilities;
no further user namespaces; its own session; killed when its parent dies; a read-only view of
only the interpreter (its prefix, /usr and the loader's libraries); fresh size-limited tmpfs
mounts for its work directory (/tmp) and /dev/shm; `/`, /dev and everything else read-only; an
environment of four fixed variables. `bwrap` itself starts with an empty environment, so the
sandbox's /proc/1/environ (bwrap's own) is empty too.

The user the program runs as must not be root, or the kernel ignores RLIMIT_NPROC. A caller
that is not root runs `bwrap` directly (an unprivileged user namespace: the program keeps the
caller's uid). A root caller first enters a mount namespace of its own (an outer, root `bwrap`
that only arranges the view, so that an interpreter under a private directory such as /root
stays reachable), drops to `uid`/`gid` (65534, "nobody") with `setpriv`, and runs the same
unprivileged `bwrap` from there.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from megatron_archer.rewards import seccomp_filter

NOBODY = 65534
SANDBOX_ENV = {"HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "PATH": "/usr/bin:/bin"}
LOADER_FILES = ("/etc/ld.so.cache",)
TOP_LEVEL = ("/bin", "/lib", "/lib32", "/lib64", "/libx32", "/sbin")


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot build the sandbox here; the message says how to fix it."""


FIX = (
    "Or set `reward.sandbox: in_process` to run untrusted programs under the weaker in-process "
    "guard instead (a Python audit hook; not a security boundary, see the README)."
)


@dataclass(frozen=True)
class Interpreter:
    """The Python that runs the programs: its executable and the directories it needs."""

    executable: str
    prefix: str

    @classmethod
    def current(cls) -> Interpreter:
        """This process's base interpreter (a virtual environment's python resolves to it)."""
        executable = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
        return cls(executable, os.path.realpath(sys.base_prefix))


def view(interpreter: Interpreter) -> list[tuple[str, ...]]:
    """The read-only view of /usr, the top-level links or directories into it, the loader cache
    and the interpreter (with traversable parent directories), as operations: ("ro-bind", source,
    target), ("symlink", link target, path), ("dir", path) (mode 0755). The per-run launch gives
    them to bwrap (`view_args`), the warm pool's server builds them itself (`pool_server`)."""
    ops: list[tuple[str, ...]] = [("ro-bind", "/usr", "/usr")]
    for top in TOP_LEVEL:
        if os.path.islink(top):
            ops.append(("symlink", os.readlink(top), top))
        elif os.path.isdir(top):
            ops.append(("ro-bind", top, top))
    bound = ["/usr", *TOP_LEVEL]
    paths = [p for p in LOADER_FILES if os.path.exists(p)]
    paths += [interpreter.prefix, os.path.dirname(interpreter.executable)]
    for path in dict.fromkeys(paths):
        if any(path == root or path.startswith(root + "/") for root in bound):
            continue
        for parent in reversed(Path(path).parents[:-1]):  # /root, /root/.pyenv, ... (bwrap would copy 0700)
            ops.append(("dir", str(parent)))
        ops.append(("ro-bind", path, path))
        bound.append(path)
    return ops


def view_args(interpreter: Interpreter) -> list[str]:
    """`view` as bwrap arguments."""
    args = []
    for op in view(interpreter):
        if op[0] == "dir":
            args += ["--perms", "0755", "--dir", op[1]]
        else:
            args += [f"--{op[0]}", *op[1:]]
    return args


# what container runtimes hide in /proc: kernel symbols and memory, keys, timers, scheduler
# state (files: /dev/null over them), and the kernel's tunables and hardware (folders: empty)
MASKED_PROC_FILES = ("kallsyms", "kcore", "keys", "key-users", "timer_list", "sched_debug",
                     "latency_stats", "sysrq-trigger", "kpagecount", "kpageflags", "kpagecgroup")
MASKED_PROC_DIRS = ("sys", "irq", "bus", "fs", "acpi", "scsi", "asound", "driver")


@functools.cache
def proc_mask_args() -> tuple[str, ...]:
    """bwrap arguments that mask those of them this kernel has (looked up once per process, not
    once a run)."""
    args = []
    for name in MASKED_PROC_FILES:
        if os.path.exists(f"/proc/{name}"):
            args += ["--ro-bind", "/dev/null", f"/proc/{name}"]
    for name in MASKED_PROC_DIRS:
        if os.path.isdir(f"/proc/{name}"):
            args += ["--size", "4096", "--tmpfs", f"/proc/{name}", "--remount-ro", f"/proc/{name}"]
    return tuple(args)


def inner_args(bwrap: str, interpreter: Interpreter, workdir_bytes: int,
               seccomp_fd: int | None = None) -> list[str]:
    """The unprivileged bwrap that holds the program, up to (not including) the command;
    ``seccomp_fd``: a file descriptor holding the compiled system-call filter
    (``seccomp_filter``), installed right before the program starts."""
    env = [arg for name, value in SANDBOX_ENV.items() for arg in ("--setenv", name, value)]
    seccomp = [] if seccomp_fd is None else ["--seccomp", str(seccomp_fd)]
    return [
        bwrap, "--unshare-all", "--unshare-user", "--unshare-cgroup", "--disable-userns",
        "--die-with-parent", "--new-session", "--as-pid-1", "--cap-drop", "ALL", "--hostname", "sandbox",
        "--clearenv", *env,
        *view_args(interpreter),
        "--dev", "/dev", "--size", str(workdir_bytes), "--tmpfs", "/dev/shm",
        "--proc", "/proc", *proc_mask_args(),
        "--size", str(workdir_bytes), "--tmpfs", "/tmp",
        "--remount-ro", "/dev", "--remount-ro", "/",
        "--chdir", "/tmp", *seccomp,
    ]  # fmt: skip


def outer_args(bwrap: str, setpriv: str, interpreter: Interpreter, uid: int, gid: int) -> list[str]:
    """For a root caller: a root bwrap that only builds a mount namespace with the view (plus the
    host's /proc, which the inner bwrap needs to mount its own), then `setpriv` down to uid/gid
    with no capabilities and no supplementary groups."""
    return [
        bwrap, "--die-with-parent", "--cap-drop", "ALL",
        "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP",
        *view_args(interpreter), "--dev", "/dev", "--bind", "/proc", "/proc",
        "--perms", "1777", "--tmpfs", "/tmp",
        setpriv, "--reuid", str(uid), "--regid", str(gid), "--clear-groups",
        "--inh-caps=-all", "--bounding-set=-all", "--",
    ]  # fmt: skip


@dataclass(frozen=True)
class Bwrap:
    """A working bubblewrap setup: `command(...)` is the argv that runs `argv` in the sandbox."""

    bwrap: str
    setpriv: str | None
    interpreter: Interpreter

    def command(self, argv: list[str], workdir_bytes: int, seccomp_fd: int | None) -> list[str]:
        inner = inner_args(self.bwrap, self.interpreter, workdir_bytes, seccomp_fd) + ["--", *argv]
        return self.as_sandbox_user(inner)

    def as_sandbox_user(self, argv: list[str]) -> list[str]:
        """`argv` run as the sandbox user: as is for a caller that is not root, else inside the
        root bwrap that arranges the view, after `setpriv` down to 65534."""
        if self.setpriv is None:
            return argv
        return outer_args(self.bwrap, self.setpriv, self.interpreter, NOBODY, NOBODY) + argv


@functools.cache
def require(path: str | None = None) -> Bwrap:
    """The bubblewrap setup for this machine, checked once per process (and per PATH) by running
    the interpreter in the sandbox; raises SandboxUnavailable with how to fix it otherwise."""
    bwrap = shutil.which("bwrap", path=path)
    if bwrap is None:
        raise SandboxUnavailable(
            "the code sandbox needs bubblewrap (`bwrap`), which is not installed on this machine: "
            "install it (Debian/Ubuntu: `apt-get install bubblewrap`; Fedora/RHEL: `dnf install "
            "bubblewrap`; `make install` does it where it can). " + FIX
        )
    setpriv = None
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv", path=path)
        if setpriv is None:
            raise SandboxUnavailable(
                "running as root, the code sandbox needs `setpriv` (util-linux) to drop to an "
                "unprivileged user, and it is not installed: `apt-get install util-linux`. " + FIX
            )
    try:
        bpf = seccomp_filter.bpf_program()
    except seccomp_filter.SeccompUnavailable as error:
        raise SandboxUnavailable(f"{error}. " + FIX) from None
    setup = Bwrap(bwrap, setpriv, Interpreter.current())
    argv = [setup.interpreter.executable, "-I", "-S", "-c", "print('sandbox ok')"]
    try:
        with tempfile.TemporaryFile() as filter_file:
            filter_file.write(bpf)
            filter_file.seek(0)
            probe = subprocess.run(setup.command(argv, 1 << 20, filter_file.fileno()), env={},
                                   capture_output=True, text=True, timeout=60, check=False,
                                   pass_fds=(filter_file.fileno(),))
    except subprocess.TimeoutExpired:
        raise SandboxUnavailable("bubblewrap did not start the interpreter within 60 s. " + FIX) from None
    if probe.returncode != 0 or probe.stdout != "sandbox ok\n":
        raise SandboxUnavailable(
            f"bubblewrap ({bwrap}) cannot build the code sandbox on this machine (exit code "
            f"{probe.returncode}: {probe.stderr.strip()[-300:] or 'no message'}). It needs "
            "unprivileged user namespaces: `sysctl -w kernel.unprivileged_userns_clone=1` (Debian "
            "kernels), `sysctl -w user.max_user_namespaces=15000` (where it is 0), "
            "`sysctl -w kernel.apparmor_restrict_unprivileged_userns=0` or an AppArmor profile for "
            "bwrap (Ubuntu 23.10+); in a container, a seccomp/AppArmor profile that allows "
            "unshare/clone of namespaces and mounts, and an unmasked /proc (e.g. `docker run "
            "--security-opt seccomp=unconfined --security-opt apparmor=unconfined --security-opt "
            "systempaths=unconfined`). The interpreter "
            f"{setup.interpreter.executable} must be readable by uid {NOBODY} when the caller is "
            "root. " + FIX
        )
    return setup
