"""Run an untrusted Python program in a kernel-enforced sandbox and capture what it printed.

Sandboxes (`configure_sandbox`, or `reward.sandbox` in a run's config):

- "bwrap" (default): new namespaces of every kind, an unprivileged user, rlimits, the system-call
  filter and, where the machine allows, a per-run cgroup, built per program by a warm server of
  this thread (`sandbox_pool.py`, `pool_server.py`) that is started once, as bubblewrap would
  start the program; the per-program cost is two forks. The boundary is the kernel.
- "bwrap_per_run": the same sandbox with bubblewrap launched for every program (`bwrap.py`,
  `cgroups.py`, `sandbox_launcher.py`): three process starts and an interpreter start a program.
  When bubblewrap is missing or cannot build the sandbox here, every run of either raises
  `SandboxUnavailable` saying how to fix it: untrusted code is never run unconfined by accident.
- "in_process" (opt-in, with a warning): the earlier guard, a Python audit hook plus rlimits and
  an empty network namespace in a host temporary directory. A program can switch the hook off,
  so this is not a boundary; use it only where bubblewrap cannot run and the programs are trusted.

What one run in either bwrap sandbox gets: the program and its stdin on sealed, read-only memory
files (nothing is written to the host's /tmp or /dev/shm); fresh tmpfs mounts for /tmp and
/dev/shm inside, which vanish with the mount namespace, so no cleanup can be crashed or blocked by
what the program left there; stdout and stderr read here under a combined byte cap; a wall-clock
deadline. A run is stopped by SIGKILL to the sandbox's pid-namespace init, which the kernel
answers by killing every process in the namespace before the init is reaped; so when the
launcher (or the pool's run holder) has been waited for, nothing the program started is left.
How a run ended is attributed from the exit status (a signal n is reported as 128 + n), the CPU
time of the whole tree (wait4), and the OOM-kill counters of the run's memory cgroup and of the
kernel: a SIGKILL is `cpu_limit` only if the CPU limit was reached, `memory_limit` if the OOM
killer fired.

`run_many` runs several programs on a shared pool of `workers` threads, each holding one sandbox
at a time (and, with "bwrap", one warm server).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from megatron_archer.rewards import bwrap, cgroups, sandbox_pool, seccomp_filter
from megatron_archer.rewards.bwrap import SandboxUnavailable

LAUNCHER = str(Path(__file__).with_name("sandbox_launcher.py"))
LAUNCHER_SOURCE = Path(LAUNCHER).read_text(encoding="utf-8")
BWRAP, BWRAP_PER_RUN, IN_PROCESS = "bwrap", "bwrap_per_run", "in_process"
SANDBOXES = (BWRAP, BWRAP_PER_RUN, IN_PROCESS)
MAX_PROCESSES = 8  # the pids cgroup's cap: bwrap's own processes plus the program (RLIMIT_NPROC = 0 inside)
STOP_TIMEOUT_S = 10.0
# The kernel enforces RLIMIT_CPU on tick-sampled CPU time, wait4 reports the precise run time;
# on a contended machine the first runs ahead (0.81-0.88 s precise at a 1 s limit, 1.6 s at the
# 2 s hard limit, load 11-17 on 2 cores). A SIGXCPU or SIGKILL death is the CPU limit once the
# precise time reaches this share of it (a program killing itself at once stays `signaled`).
CPU_LIMIT_SHARE = 0.5

# SandboxResult.status values.
OK, ERROR, TIMEOUT, CPU_LIMIT, MEMORY_LIMIT, OUTPUT_LIMIT, SIGNALED = (
    "ok", "error", "timeout", "cpu_limit", "memory_limit", "output_limit", "signaled"
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SandboxLimits:
    """What one run may use. `output_bytes` counts stdout and stderr together; `memory_bytes` is
    each process's address space and, where a cgroup can be made, all the run holds in memory
    (processes and tmpfs files); `workdir_bytes` is the size of each tmpfs (/tmp and /dev/shm)."""

    wall_seconds: float = 10.0
    cpu_seconds: int = 5
    memory_bytes: int = 1 << 30
    output_bytes: int = 1 << 20
    file_bytes: int = 16 << 20
    open_files: int = 64
    workdir_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be positive, got {value}")
        if not isinstance(self.cpu_seconds, int):
            raise TypeError(f"SandboxLimits.cpu_seconds must be whole seconds (RLIMIT_CPU), got {self.cpu_seconds!r}")


@dataclass(frozen=True)
class SandboxResult:
    """How a run ended (`status`: ok, error, timeout, cpu_limit, memory_limit, output_limit,
    signaled), its output, and the CPU time of all its processes."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_seconds: float
    limits: SandboxLimits
    cpu_seconds: float = 0.0
    signal: int | None = None

    def describe(self) -> str:
        """A short reason: why the run ended, for reward reasons and logs."""
        if self.status == OK:
            return "exited normally"
        if self.status == ERROR:
            lines = self.stderr.strip().splitlines()
            return f"exited with code {self.returncode}" + (f": {lines[-1][:200]}" if lines else "")
        if self.status == TIMEOUT:
            return f"wall-clock limit of {self.limits.wall_seconds:g} s exceeded"
        if self.status == CPU_LIMIT:
            return f"CPU time limit of {self.limits.cpu_seconds} s exceeded"
        if self.status == MEMORY_LIMIT:
            return f"memory limit of {self.limits.memory_bytes} bytes exceeded (killed by the OOM killer)"
        if self.status == OUTPUT_LIMIT:
            return f"output limit of {self.limits.output_bytes} bytes exceeded"
        return f"killed by {_signal_name(self.signal)}"


@dataclass
class _Settings:
    sandbox: str = BWRAP
    workers: int = min(8, os.cpu_count() or 1)
    pool: ThreadPoolExecutor | None = None
    warned: bool = False


_settings = _Settings()
_settings_lock = threading.Lock()


def configure_sandbox(sandbox: str = BWRAP, workers: int | None = None, check: bool = False) -> None:
    """Choose the sandbox for runs that do not name one, and the size of `run_many`'s pool.
    "in_process" warns (once per process) that it is not a security boundary; `check` makes
    "bwrap" probe the machine now (raising SandboxUnavailable) rather than at the first run."""
    if sandbox not in SANDBOXES:
        raise ValueError(f"sandbox must be one of {', '.join(SANDBOXES)}; got {sandbox!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be an integer >= 1; got {workers!r}")
    with _settings_lock:
        _settings.sandbox = sandbox
        if workers is not None and workers != _settings.workers:
            if _settings.pool is not None:
                _settings.pool.shutdown(wait=False)
                _settings.pool = None
            _settings.workers = workers
    if sandbox == IN_PROCESS:
        _warn_in_process()
    elif check:
        setup = bwrap.require()
        if sandbox == BWRAP:  # the pool's server starts, and builds a sandbox, on this machine
            _checked_server(sandbox_pool.PoolServer(setup, LAUNCHER_SOURCE)).close()


def run_python(
    source: str, stdin: str = "", limits: SandboxLimits = SandboxLimits(), sandbox: str | None = None
) -> SandboxResult:
    """Run `source` as a Python program on `stdin` under `limits`, in `sandbox` (default: the
    configured one). Safe to call from several threads."""
    sandbox = sandbox or _settings.sandbox
    if sandbox == BWRAP:
        return _run_pool(source, stdin, limits)
    if sandbox == BWRAP_PER_RUN:
        return _run_bwrap(source, stdin, limits)
    if sandbox == IN_PROCESS:
        _warn_in_process()
        return _run_in_process(source, stdin, limits)
    raise ValueError(f"sandbox must be one of {', '.join(SANDBOXES)}; got {sandbox!r}")


def run_many(
    jobs: Sequence[tuple[str, str]], limits: SandboxLimits = SandboxLimits(), sandbox: str | None = None
) -> list[SandboxResult]:
    """`run_python` on each (source, stdin) pair, in parallel on the shared pool; results in order.
    Not to be called from inside a pool job."""
    with _settings_lock:
        if _settings.pool is None:
            _settings.pool = ThreadPoolExecutor(_settings.workers, thread_name_prefix="archer-sandbox")
        pool = _settings.pool
    futures = [pool.submit(run_python, source, stdin, limits, sandbox) for source, stdin in jobs]
    return [future.result() for future in futures]


def _warn_in_process() -> None:
    with _settings_lock:
        if _settings.warned:
            return
        _settings.warned = True
    message = (
        "reward sandbox 'in_process': untrusted programs run under a Python audit hook, which a "
        "program can switch off; this is not a security boundary (use 'bwrap' wherever it can run)"
    )
    logger.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _run_bwrap(source: str, stdin: str, limits: SandboxLimits) -> SandboxResult:
    setup = bwrap.require()
    layout, _ = cgroups.machine_layout()
    with contextlib.ExitStack() as stack:
        program_fd = _sealed_memfd("program", source.encode("utf-8"), read_only=False)
        stack.callback(os.close, program_fd)
        stdin_fd = _sealed_memfd("stdin", stdin.encode("utf-8"), read_only=True)
        stack.callback(os.close, stdin_fd)
        filter_fd = _sealed_memfd("seccomp", seccomp_filter.bpf_program(), read_only=True)
        stack.callback(os.close, filter_fd)
        config = launcher_args({"mode": BWRAP, "program_fd": program_fd, **_rlimits(limits)})
        argv = [setup.interpreter.executable, "-I", "-S", "-B", "-c", LAUNCHER_SOURCE, *config]
        command = setup.command(argv, limits.workdir_bytes, filter_fd)
        group = cgroups.RunCgroup(layout, limits.memory_bytes, MAX_PROCESSES) if layout else None
        if group is not None:
            stack.callback(group.remove)
            command = cgroups.join_command(group.procs_files) + command
        oom_before = _kernel_oom_kills()
        start = time.monotonic()
        proc = subprocess.Popen(
            command, stdin=stdin_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={}, pass_fds=(program_fd, filter_fd), start_new_session=True,
        )  # fmt: skip
        stack.callback(_close_streams, proc)
        exited = os.pidfd_open(proc.pid)
        stack.callback(os.close, exited)
        try:
            status, stdout, stderr = _collect(proc.stdout.fileno(), proc.stderr.fileno(), exited,
                                              start + limits.wall_seconds, limits.output_bytes)
        except BaseException:  # the caller is interrupted: the run must not outlive it
            _stop_sandbox(proc)
            _reap(proc)
            raise
        if status is not None:
            _stop_sandbox(proc)
        returncode, cpu = _reap(proc)
        signum, oom = _sandboxed_death(returncode, group, oom_before)
        return _result(status, returncode, signum, cpu, oom, stdout, stderr, time.monotonic() - start, limits)


def _run_pool(source: str, stdin: str, limits: SandboxLimits) -> SandboxResult:
    """A run on this thread's warm pool server; a server that has gone is replaced (one logged
    line) and the run made again on the new one, once."""
    try:
        return _run_on_server(_thread_server(), source, stdin, limits)
    except sandbox_pool.ServerGone as error:
        sandbox_pool.drop_thread_server(str(error))
    return _run_on_server(_thread_server(), source, stdin, limits)


def _thread_server() -> sandbox_pool.PoolServer:
    server, started = sandbox_pool.thread_server(bwrap.require(), LAUNCHER_SOURCE)
    return _checked_server(server) if started else server


POOL_PROBE = ("print('sandbox ok')", "sandbox ok\n")


def _checked_server(server: sandbox_pool.PoolServer) -> sandbox_pool.PoolServer:
    """`server` once it has run a probe program (so a server that cannot build the sandbox is
    an error at its start, never a reward of 0); raises SandboxUnavailable otherwise."""
    try:
        result = _run_on_server(server, POOL_PROBE[0], "", SandboxLimits())
    except sandbox_pool.ServerGone as error:
        raise SandboxUnavailable(f"the warm sandbox pool's server failed its first run: {error}") from None
    if result.status != OK or result.stdout != POOL_PROBE[1]:
        server.close()
        raise SandboxUnavailable(f"the warm sandbox pool's server failed its first run ({result.describe()}; "
                                 f"{result.stderr.strip()[-300:]}). Set `reward.sandbox: bwrap_per_run` "
                                 "to launch bubblewrap per program instead.")
    return server


def _run_on_server(server: sandbox_pool.PoolServer, source: str, stdin: str, limits: SandboxLimits) -> SandboxResult:
    """One run on a pool server: the same inputs, cgroup, deadline, output cap and attribution
    as `_run_bwrap`, with the sandbox built by the server (`pool_server`) instead of bwrap."""
    layout, _ = cgroups.machine_layout()
    with contextlib.ExitStack() as stack:
        inputs = [_sealed_memfd("program", source.encode("utf-8"), read_only=False),
                  _sealed_memfd("stdin", stdin.encode("utf-8"), read_only=True)]
        out_read, out_write = os.pipe2(os.O_CLOEXEC)
        err_read, err_write = os.pipe2(os.O_CLOEXEC)
        for fd in (*inputs, out_read, err_read):
            stack.callback(os.close, fd)
        group = cgroups.RunCgroup(layout, limits.memory_bytes, MAX_PROCESSES) if layout else None
        cgroup_fds = []
        if group is not None:
            stack.callback(group.remove)
            cgroup_fds = [os.open(path, os.O_WRONLY | os.O_CLOEXEC) for path in group.procs_files]
            for fd in cgroup_fds:
                stack.callback(os.close, fd)
        oom_before = _kernel_oom_kills()
        start = time.monotonic()
        try:
            server.start_run({**_rlimits(limits), "workdir_bytes": limits.workdir_bytes},
                             [*inputs, out_write, err_write], cgroup_fds)
        finally:  # the run holds the only write ends left: the pipes reach EOF when it ends
            os.close(out_write)
            os.close(err_write)
        try:
            status, stdout, stderr = _collect(out_read, err_read, server.sock.fileno(),
                                              start + limits.wall_seconds, limits.output_bytes)
            if status is not None:  # the run's pid 1: its namespace dies, the server answers
                _kill_namespace_inits(server.proc.pid)
            returncode, cpu = server.finish_run(STOP_TIMEOUT_S)
        except BaseException as error:  # interrupted: no run may outlive this call
            if not isinstance(error, (sandbox_pool.ServerGone, SandboxUnavailable)):
                sandbox_pool.drop_thread_server(f"was stopped with its run ({type(error).__name__})")
            raise
        signum, oom = _sandboxed_death(returncode, group, oom_before)
        return _result(status, returncode, signum, cpu, oom, stdout, stderr, time.monotonic() - start, limits)


def _sandboxed_death(returncode: int, group: cgroups.RunCgroup | None,
                     oom_before: int) -> tuple[int | None, bool]:
    """(signal, OOM-killed) of a run in either bwrap sandbox: the namespace's init reports a
    signal n as 128 + n; a negative status means the process holding the run (bwrap, or the
    pool's run holder) was itself killed (no namespace init was found to stop; the memory
    cgroup's OOM killer, say). OOM: the run's memory cgroup saw one, or a SIGKILL came while the
    kernel's OOM-kill counter rose from ``oom_before``."""
    signum = returncode - 128 if 128 < returncode < 128 + signal.NSIG else None
    if returncode < 0:
        signum = -returncode
    oom = (group is not None and group.oom_killed()) or (
        signum == signal.SIGKILL and _kernel_oom_kills() > oom_before
    )
    return signum, oom


def _run_in_process(source: str, stdin: str, limits: SandboxLimits) -> SandboxResult:
    workdir = tempfile.mkdtemp(prefix="archer-sandbox-")
    try:
        Path(workdir, "program.py").write_text(source, encoding="utf-8")
        config = launcher_args({"mode": IN_PROCESS, "workdir": workdir, **_rlimits(limits)})
        with tempfile.TemporaryFile() as stdin_file:
            stdin_file.write(stdin.encode("utf-8"))
            stdin_file.seek(0)
            start = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", LAUNCHER, *config],
                stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir,
                env={"HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}, start_new_session=True,
            )  # fmt: skip
        exited = os.pidfd_open(proc.pid)
        try:
            status, stdout, stderr = _collect(proc.stdout.fileno(), proc.stderr.fileno(), exited,
                                              start + limits.wall_seconds, limits.output_bytes)
        finally:
            os.close(exited)
            _kill_group(proc)  # also after a normal exit: nothing it started survives
            returncode, cpu = _reap(proc)
            _close_streams(proc)
        signum = -returncode if returncode < 0 else None
        oom = False  # no cgroup here: a SIGKILL below the CPU limit is reported as a signal
        return _result(status, returncode, signum, cpu, oom, stdout, stderr, time.monotonic() - start, limits)
    finally:
        _remove_tree(workdir)


def _remove_tree(path: str) -> None:
    """Delete the in_process work directory with GNU `rm -rf` (no recursion or path-length limit
    here: a program's 3000-deep tree cannot crash the caller); what it cannot delete (an immutable
    file a root program made) is logged."""
    subprocess.run(["rm", "-rf", "--one-file-system", "--", path], capture_output=True, timeout=60, check=False)
    if os.path.lexists(path):
        logger.warning("the in_process sandbox left %s behind (files it could not delete)", path)


def _rlimits(limits: SandboxLimits) -> dict:
    return {
        "cpu_seconds": limits.cpu_seconds, "memory_bytes": limits.memory_bytes,
        "file_bytes": limits.file_bytes, "open_files": limits.open_files,
    }  # fmt: skip


def launcher_args(config: dict) -> list[str]:
    """`sandbox_launcher`'s arguments: one `key=value` each (values without "=" or spaces)."""
    return [f"{key}={value}" for key, value in config.items()]


def _sealed_memfd(name: str, data: bytes, read_only: bool) -> int:
    """A memory file holding `data`, sealed against any change; `read_only` reopens it O_RDONLY
    (for stdin: the program can neither write nor grow it)."""
    fd = os.memfd_create(f"archer-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
        seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        if not read_only:
            return fd
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        if read_only:
            os.close(fd)


def _collect(stdout: int, stderr: int, done: int, deadline: float, cap: int) -> tuple[str | None, bytes, bytes]:
    """Read the run's output pipes until `done` is readable (the launcher exited, or the pool
    server answered) and both pipes are closed (status None), the deadline passes (TIMEOUT) or
    the output passes `cap` (OUTPUT_LIMIT). Nothing is reaped or read from `done`."""
    chunks = {stdout: bytearray(), stderr: bytearray()}
    status = None
    with selectors.DefaultSelector() as selector:
        for fd in (stdout, stderr, done):
            selector.register(fd, selectors.EVENT_READ)
        while len(selector.get_map()) and status is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                status = TIMEOUT
                break
            for key, _ in selector.select(remaining):
                if key.fd == done:
                    selector.unregister(done)
                    continue
                data = os.read(key.fd, 1 << 16)
                if not data:
                    selector.unregister(key.fd)
                    continue
                chunks[key.fd] += data
                if sum(map(len, chunks.values())) > cap:
                    status = OUTPUT_LIMIT
                    break
    out, err = bytes(chunks[stdout]), bytes(chunks[stderr])
    return status, out[:cap], err[: max(0, cap - len(out))]


def _stop_sandbox(proc: subprocess.Popen) -> None:
    """SIGKILL the sandbox's pid-namespace init (the kernel then kills the whole namespace before
    the init, bwrap and so `proc` exit); the process group if no init exists (yet or any more)."""
    if not _kill_namespace_inits(proc.pid):
        _kill_group(proc)


def _kill_namespace_inits(root: int) -> bool:
    """SIGKILL every pid-namespace init below process `root`; whether there was one."""
    inits = _namespace_inits(root)
    for pid in inits:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return bool(inits)


def _descendants(pid: int) -> list[int]:
    """Every live descendant of `pid`, from /proc/<pid>/task/<tid>/children."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            with contextlib.suppress(OSError), open(f"/proc/{parent}/task/{task}/children") as file:
                children = [int(child) for child in file.read().split()]
                found += children
                todo += children
    return found


def _namespace_inits(root: int) -> list[int]:
    """The pid-namespace inits (a sandbox's pid 1) below process `root`."""
    return [pid for pid in _descendants(root) if _is_namespace_init(pid)]


def _is_namespace_init(pid: int) -> bool:
    """Whether `pid` is pid 1 of a pid namespace below ours ("NSpid: <ours> ... 1")."""
    try:
        with open(f"/proc/{pid}/status") as file:
            line = next(line for line in file if line.startswith("NSpid:"))
    except (OSError, StopIteration):
        return False
    ids = line.split()[1:]
    return len(ids) > 1 and ids[-1] == "1"


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (it leads its own session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _reap(proc: subprocess.Popen) -> tuple[int, float]:
    """Wait for the child; its exit code and the CPU seconds of it and every descendant it waited for."""
    try:
        _, status, usage = _wait4(proc.pid, STOP_TIMEOUT_S)
    except TimeoutError:
        _kill_group(proc)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def _wait4(pid: int, timeout_s: float):
    """os.wait4 with a time limit (raises TimeoutError)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = os.wait4(pid, os.WNOHANG)
        if result[0] == pid:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} did not exit within {timeout_s:g} s")
        time.sleep(0.001)


def _close_streams(proc: subprocess.Popen) -> None:
    proc.stdout.close()
    proc.stderr.close()


def _kernel_oom_kills() -> int:
    """The kernel's count of OOM kills since boot (/proc/vmstat), 0 where unavailable."""
    with contextlib.suppress(OSError), open("/proc/vmstat") as file:
        for line in file:
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    return 0


def _result(status, returncode, signum, cpu, oom, stdout, stderr, wall, limits) -> SandboxResult:
    """Attribute how the run ended: a limit it hit, a signal, an error exit or success."""
    if status is None:
        if oom:
            status = MEMORY_LIMIT
        elif signum in (signal.SIGXCPU, signal.SIGKILL) and cpu >= limits.cpu_seconds * CPU_LIMIT_SHARE:
            status = CPU_LIMIT  # RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL at the hard one
        elif signum is not None:
            status = SIGNALED
        else:
            status = OK if returncode == 0 else ERROR
    return SandboxResult(
        status=status, returncode=returncode,
        stdout=stdout.decode("utf-8", errors="replace"), stderr=stderr.decode("utf-8", errors="replace"),
        wall_seconds=wall, limits=limits, cpu_seconds=cpu, signal=signum,
    )  # fmt: skip


def _signal_name(signum: int | None) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


__all__ = [
    "BWRAP", "CPU_LIMIT", "ERROR", "IN_PROCESS", "MEMORY_LIMIT", "OK", "OUTPUT_LIMIT", "SANDBOXES",
    "SIGNALED", "TIMEOUT", "SandboxLimits", "SandboxResult", "SandboxUnavailable",
    "configure_sandbox", "run_many", "run_python",
]  # fmt: skip
