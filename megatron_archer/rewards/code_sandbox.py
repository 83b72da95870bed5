"""Run an untrusted Python program in a confined subprocess and capture what it printed.

Each run gets a fresh private temporary directory (removed afterwards), an empty environment, its
stdin from an unlinked temporary file, and its own session and process group. Inside, the child
(`sandbox_launcher`) confines itself before running the program; out here the parent enforces a
wall-clock limit and an output cap by killing the whole process group. How each attack is stopped:

- infinite loop: RLIMIT_CPU (SIGXCPU, then SIGKILL) for busy loops, the parent's wall-clock
  limit (SIGKILL to the process group) for sleeping or blocked ones;
- fork bomb, subprocesses: the audit hook refuses os.fork/exec/spawn/system/posix_spawn and
  subprocess, and the modules that reach fork without an audit event (_posixsubprocess, ctypes);
  RLIMIT_NPROC = 0 makes the kernel refuse too, except for root; anything left is killed with the
  process group at the end of the run;
- large allocation: RLIMIT_AS (MemoryError in the program; the host never commits the memory);
- writing outside its directory: the audit hook refuses write-mode opens, renames, removals,
  links, chmod/chown, mkdir... on paths that resolve outside the sandbox directory, `dir_fd`
  relative calls, and opening outside directories; RLIMIT_FSIZE caps each file it writes inside;
- network: a new, empty network namespace (no interface up, so not even 127.0.0.1 is reachable)
  where the kernel allows one, and the audit hook refuses every socket;
- the parent's secrets: the child's environment is empty (no inherited variables) and the audit
  hook refuses reading /proc/<pid>/ of any other process (e.g. the parent's `environ`);
- printing a gigabyte: the parent reads stdout and stderr with a combined byte cap and kills the
  process group when it is exceeded; only the first `output_bytes` are kept.

Not prevented: reading world-readable files (or, when run as root, any file) and printing them;
a program that subverts CPython itself (the audit hook is a Python-level guard; when the caller is
root only the resource limits, the network namespace and the parent's kills are kernel-enforced);
filling the sandbox directory with many files below RLIMIT_FSIZE each until the time limit.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

LAUNCHER = str(Path(__file__).with_name("sandbox_launcher.py"))

# SandboxResult.status values.
OK, ERROR, TIMEOUT, CPU_LIMIT, OUTPUT_LIMIT, SIGNALED = (
    "ok", "error", "timeout", "cpu_limit", "output_limit", "signaled"
)


@dataclass(frozen=True)
class SandboxLimits:
    """What one run may use. `output_bytes` counts stdout and stderr together."""

    wall_seconds: float = 10.0
    cpu_seconds: int = 5
    memory_bytes: int = 1 << 30
    output_bytes: int = 1 << 20
    file_bytes: int = 16 << 20
    open_files: int = 64

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be positive, got {value}")
        if not isinstance(self.cpu_seconds, int):
            raise TypeError(f"SandboxLimits.cpu_seconds must be whole seconds (RLIMIT_CPU), got {self.cpu_seconds!r}")


@dataclass(frozen=True)
class SandboxResult:
    """How a run ended (`status`: ok, error, timeout, cpu_limit, output_limit, signaled) and its output."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_seconds: float
    limits: SandboxLimits

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
        if self.status == OUTPUT_LIMIT:
            return f"output limit of {self.limits.output_bytes} bytes exceeded"
        return f"killed by {signal.Signals(-self.returncode).name}"


def run_python(source: str, stdin: str = "", limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `source` as a Python program on `stdin` under `limits`. Safe to call from several threads."""
    workdir = tempfile.mkdtemp(prefix="archer-sandbox-")
    try:
        Path(workdir, "program.py").write_text(source, encoding="utf-8")
        config = {
            "workdir": workdir,
            "cpu_seconds": limits.cpu_seconds,
            "memory_bytes": limits.memory_bytes,
            "file_bytes": limits.file_bytes,
            "open_files": limits.open_files,
        }
        with tempfile.TemporaryFile() as stdin_file:
            stdin_file.write(stdin.encode("utf-8"))
            stdin_file.seek(0)
            start = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", LAUNCHER, json.dumps(config)],
                stdin=stdin_file,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=workdir,
                env={"HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"},
                start_new_session=True,
            )
        status, stdout, stderr = _collect(proc, start + limits.wall_seconds, limits.output_bytes)
        return SandboxResult(
            status=status,
            returncode=proc.returncode,
            stdout=stdout.decode("utf-8", errors="replace"),
            stderr=stderr.decode("utf-8", errors="replace"),
            wall_seconds=time.monotonic() - start,
            limits=limits,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[str, bytes, bytes]:
    """Read the child's output until it exits, the deadline passes or the output passes `cap`."""
    chunks = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    status = None
    with selectors.DefaultSelector() as selector:
        for stream in chunks:
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map() and status is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                status = TIMEOUT
                break
            for key, _ in selector.select(remaining):
                data = os.read(key.fd, 1 << 16)
                if not data:
                    selector.unregister(key.fileobj)
                    continue
                chunks[key.fileobj] += data
                if sum(map(len, chunks.values())) > cap:
                    status = OUTPUT_LIMIT
                    break
    if status is None:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            status = TIMEOUT
    _kill_group(proc)
    proc.stdout.close()
    proc.stderr.close()
    if status is None:
        status = _exit_status(proc.returncode)
    stdout, stderr = bytes(chunks[proc.stdout]), bytes(chunks[proc.stderr])
    return status, stdout[:cap], stderr[: max(0, cap - len(stdout))]


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (it leads its own session), then reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # also after a normal exit: nothing it started survives
    except ProcessLookupError:
        pass
    proc.wait()


def _exit_status(returncode: int) -> str:
    if returncode == 0:
        return OK
    if returncode > 0:
        return ERROR
    if -returncode in (signal.SIGXCPU, signal.SIGKILL):  # RLIMIT_CPU: soft limit, then hard limit
        return CPU_LIMIT
    return SIGNALED
