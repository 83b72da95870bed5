"""The warm sandbox pool, caller side: one long-lived `pool_server` per worker thread.

Each thread that runs programs in the "bwrap" sandbox gets its own server (started on first use,
as the sandbox user, see `pool_server`), which builds a fresh sandbox per program; the thread
sends it one request at a time and reads the program's output itself. A server ends when its
socket closes: when the thread ends (its `PoolServer` is freed with the thread's locals) or the
caller exits, a run in progress included. One found dead, or one that breaks the protocol or
stops answering, is replaced with one logged line saying why.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path

from megatron_archer.rewards import bwrap, pool_server, seccomp_filter
from megatron_archer.rewards.bwrap import SandboxUnavailable

SERVER_SOURCE = Path(pool_server.__file__).read_text(encoding="utf-8")
START_TIMEOUT_S = 60.0
SERVER_ENV = {**bwrap.SANDBOX_ENV, "PWD": "/tmp"}  # the server's, and each program's (bwrap sets PWD)

logger = logging.getLogger(__name__)


class ServerGone(RuntimeError):
    """The server exited, broke the protocol or stopped answering; the message says which."""


class PoolServer:
    """One server process and the socket to it; `launcher_source`: `sandbox_launcher.py`, whose
    `run_confined` the server runs each program with."""

    def __init__(self, setup: bwrap.Bwrap, launcher_source: str) -> None:
        ours, theirs = socket.socketpair()
        argv = [setup.interpreter.executable, "-I", "-S", "-B", "-c", SERVER_SOURCE, str(theirs.fileno()),
                launcher_source]
        try:
            self.proc = subprocess.Popen(
                setup.as_sandbox_user(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, env=SERVER_ENV, cwd="/",
                pass_fds=(theirs.fileno(),), start_new_session=True,
            )  # fmt: skip
        finally:
            theirs.close()
        self.sock = ours
        self.ended: str | None = None
        try:
            self.sock.sendall(pool_server.encode(start_message(setup)))
            ready = self._receive(START_TIMEOUT_S)
        except ServerGone as error:
            self.close()
            raise SandboxUnavailable(f"the warm sandbox pool's server did not start: {error}. Set "
                                     "`reward.sandbox: bwrap_per_run` to launch bubblewrap per "
                                     "program instead. " + bwrap.FIX) from None
        if set(ready) != {"ready"} or type(ready["ready"]) is not int:
            self.close()
            raise SandboxUnavailable(f"the warm sandbox pool's server answered {ready!r} to its start")
        self.pid = ready["ready"]  # the server's own process (self.proc is the root bwrap for a root caller)

    def start_run(self, limits: dict, fds: list[int], cgroup_fds: list[int]) -> None:
        """Ask for one run: the program, stdin, stdout and stderr descriptors, the cgroups to join."""
        message = pool_server.encode({"run": limits, "cgroups": len(cgroup_fds)})
        try:
            socket.send_fds(self.sock, [message], [*fds, *cgroup_fds])
        except OSError as error:
            raise ServerGone(self._gone(f"took no request ({error.strerror})")) from None

    def finish_run(self, timeout_s: float) -> tuple[int, float]:
        """The run's exit code (128 + n: killed by signal n; negative: the holder was killed by
        that signal) and the CPU seconds of its processes. A sandbox the server could not build
        raises SandboxUnavailable."""
        reply = self._receive(timeout_s)
        if set(reply) == {"error"} and isinstance(reply["error"], str):
            raise SandboxUnavailable(f"the warm sandbox pool could not build a sandbox here: "
                                     f"{reply['error']}. Set `reward.sandbox: bwrap_per_run` to "
                                     "launch bubblewrap per program instead.")
        if set(reply) != {"exit", "cpu"} or type(reply["exit"]) is not int or type(reply["cpu"]) not in (int, float):
            raise ServerGone(self._gone(f"answered {str(reply)[:200]} to a run"))
        return reply["exit"], float(reply["cpu"])

    def alive(self) -> bool:
        return self.ended is None and self.proc.poll() is None

    def close(self) -> str:
        """End the server (and, through their parent-death signals, any run of it); how it ended:
        its exit status and the last line it wrote."""
        if self.ended is None:
            self.sock.close()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait()
            lines = self.proc.stderr.read().decode("utf-8", "replace").strip().splitlines()
            self.proc.stderr.close()
            status = f"exit code {code}" if code >= 0 else f"killed by {signal.Signals(-code).name}"
            self.ended = status + (f": {lines[-1][:300]}" if lines else "")
        return self.ended

    def _receive(self, timeout_s: float) -> dict:
        self.sock.settimeout(timeout_s)
        try:
            return pool_server.receive(self.sock)[0]
        except TimeoutError:
            raise ServerGone(self._gone(f"did not answer within {timeout_s:g} s")) from None
        except (EOFError, ConnectionError):
            raise ServerGone(self._gone("closed the connection")) from None
        except (pool_server.ProtocolError, ValueError, OSError) as error:
            raise ServerGone(self._gone(f"broke the protocol ({error})")) from None

    def _gone(self, what: str) -> str:
        return f"{what} (pid {self.proc.pid}, {self.close()})"


def start_message(setup: bwrap.Bwrap) -> dict:
    """What a server is told once: the view, the /proc entries to mask, the system-call filter
    and the programs' environment."""
    return {
        "view": [list(op) for op in bwrap.view(setup.interpreter)],
        "masked_files": list(bwrap.MASKED_PROC_FILES), "masked_dirs": list(bwrap.MASKED_PROC_DIRS),
        "seccomp": seccomp_filter.bpf_program().hex(), "env": SERVER_ENV,
    }  # fmt: skip


_local = threading.local()


def thread_server(setup: bwrap.Bwrap, launcher_source: str) -> tuple[PoolServer, bool]:
    """This thread's server and whether it was just started; one found dead is replaced, with a
    logged line saying how it ended."""
    current = getattr(_local, "server", None)
    if current is not None and current.alive():
        return current, False
    if current is not None:
        pid = current.proc.pid
        logger.warning("sandbox pool: the server of thread %s had exited (pid %d, %s); starting a new one",
                       threading.current_thread().name, pid, current.close())
    _local.server = None
    _local.server = PoolServer(setup, launcher_source)
    return _local.server, True


def drop_thread_server(why: str) -> None:
    """Give up this thread's server because of `why` (logged); the next run starts a new one."""
    current = getattr(_local, "server", None)
    if current is not None:
        current.close()
        _local.server = None
    logger.warning("sandbox pool: the server of thread %s %s; starting a new one", threading.current_thread().name, why)
