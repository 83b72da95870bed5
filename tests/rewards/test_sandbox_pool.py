"""The warm sandbox pool: nothing one program leaves (files, processes, IPC objects, the contents
of its memory) is there for the next one on the same server; programs running side by side
cannot see or signal each other; a timeout ends the program only; a server killed while idle or
in the middle of a run is replaced with one logged line (the run is made again); the protocol
refuses anything malformed; a server that cannot build the sandbox is an error at its start.
The programs here run only inside the sandbox."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import secrets
import signal
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from megatron_archer.rewards import bwrap, code_sandbox, pool_server, sandbox_pool
from megatron_archer.rewards.code_sandbox import (
    BWRAP,
    TIMEOUT,
    SandboxUnavailable,
    configure_sandbox,
    run_python,
)
from tests.rewards.test_code_sandbox import LIMITS, needs_bwrap

pytestmark = needs_bwrap

LEAVE_BEHIND = """
import ctypes, os, threading, time
open('/tmp/{mark}', 'w').write('left')
open('/dev/shm/{mark}', 'w').write('left')
segment = ctypes.CDLL(None, use_errno=True).shmget({key}, 4096, 0o1000 | 0o666)  # IPC_CREAT
started = []
try:
    if os.fork() == 0:
        time.sleep(60)
        os._exit(0)
    started.append('process')
except OSError:
    pass
try:
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    started.append('thread')
except RuntimeError:
    pass
print(segment >= 0, started)
"""
LOOK_AROUND = """
import ctypes, os
print(sorted(os.listdir('/tmp')), sorted(os.listdir('/dev/shm')),
      sorted(p for p in os.listdir('/proc') if p.isdigit()),
      ctypes.CDLL(None, use_errno=True).shmget({key}, 0, 0) != -1)
"""
# Looks through its own memory for MARKER + 32 hex digits and prints the short hash of each
# match that is one of {wanted}; the marker's parts are joined at run time, so the program's
# own text holds no match.
SCAN_MEMORY = """
import hashlib, re
marker = ('ARCHER' + 'LEFTOVER').encode()
pattern = re.compile(re.escape(marker) + rb'([0-9a-f]{{32}})')
found = set()
with open('/proc/self/maps') as maps, open('/proc/self/mem', 'rb', 0) as mem:
    for line in maps:
        span, perms = line.split()[:2]
        low, high = (int(x, 16) for x in span.split('-'))
        if not perms.startswith('r'):
            continue
        for offset in range(low, high, 1 << 20):
            try:
                mem.seek(offset)
                data = mem.read(min(high - offset, (1 << 20) + 64))
            except (OSError, OverflowError, ValueError):
                break
            for match in pattern.finditer(data):
                digest = hashlib.sha256(match[1]).hexdigest()[:16]
                if digest in {wanted}:
                    found.add(digest)
print(sorted(found))
"""


def _server() -> sandbox_pool.PoolServer:
    """This thread's pool server (after a run has started it)."""
    return sandbox_pool._local.server


def test_a_program_sees_nothing_the_previous_one_left():
    """Files in /tmp and /dev/shm, a SysV segment, background processes (which it cannot even
    start) and the contents of its memory: the next program on the same server finds none."""
    configure_sandbox(BWRAP)
    mark, key = f"leftover-{secrets.token_hex(4)}", 0x5B000000 + os.getpid() % 4096
    first = run_python(LEAVE_BEHIND.format(mark=mark, key=key), "", LIMITS)
    assert first.status == "ok" and first.stdout == "True []\n", first
    server = _server()
    assert code_sandbox._descendants(server.pid) == []  # nothing of the run is left, seen from here
    second = run_python(LOOK_AROUND.format(key=key), "", LIMITS)
    assert second.stdout == "[] [] ['1'] False\n", second
    assert _server() is server  # the same server ran both

    in_source, in_stdin = secrets.token_hex(16), secrets.token_hex(16)
    wanted = {hashlib.sha256(token.encode()).hexdigest()[:16] for token in (in_source, in_stdin)}
    scan = SCAN_MEMORY.format(wanted=sorted(wanted))
    limits = dataclasses.replace(LIMITS, memory_bytes=1 << 30, cpu_seconds=20, wall_seconds=60.0)
    holder = f"kept = 'ARCHERLEFTOVER{in_source}'\nread = input()\n"
    control = run_python(holder + scan, f"ARCHERLEFTOVER{in_stdin}\n", limits)
    assert control.status == "ok" and control.stdout == f"{sorted(wanted)}\n", control  # the scan finds them
    after = run_python(scan, "", limits)
    assert after.status == "ok" and after.stdout == "[]\n", after
    assert _server() is server


def test_programs_side_by_side_cannot_see_or_signal_each_other():
    configure_sandbox(BWRAP)
    sleeper = "import time\ntime.sleep(3)\nprint('still here')"
    attacker = """
import os, signal
seen = sorted(p for p in os.listdir('/proc') if p.isdigit())
hit = []
for pid in [-1] + list(range(2, 4096)):
    try:
        os.kill(pid, signal.SIGKILL)
        hit.append(pid)
    except OSError:
        pass
print(seen, hit)
"""
    with ThreadPoolExecutor(2) as pool:
        sleeping = pool.submit(run_python, sleeper, "", LIMITS)
        deadline = time.monotonic() + 30
        while not _namespace_inits() and time.monotonic() < deadline:
            time.sleep(0.05)
        result = pool.submit(run_python, attacker, "", LIMITS).result()
        assert result.status == "ok" and result.stdout == "['1'] []\n", result
        assert sleeping.result().stdout == "still here\n"


def test_a_timeout_ends_the_program_not_the_server(caplog):
    configure_sandbox(BWRAP)
    assert run_python("print(1)", "", LIMITS).status == "ok"
    server = _server()
    with caplog.at_level(logging.WARNING, logger=sandbox_pool.__name__):
        result = run_python("import time\ntime.sleep(60)", "", dataclasses.replace(LIMITS, wall_seconds=1.0))
        assert result.status == TIMEOUT and result.wall_seconds < 1.0 + 6.0, result
        assert _server() is server and server.alive() and code_sandbox._descendants(server.pid) == []
        assert run_python("print(2)", "", LIMITS).stdout == "2\n"
    assert _server() is server and not caplog.records


def test_a_killed_server_is_replaced_with_one_line(caplog):
    configure_sandbox(BWRAP)
    assert run_python("print(1)", "", LIMITS).status == "ok"
    old = _server()
    os.kill(old.pid, signal.SIGKILL)
    old.proc.wait(timeout=30)
    with caplog.at_level(logging.WARNING, logger=sandbox_pool.__name__):
        assert run_python("print(2)", "", LIMITS).stdout == "2\n"
    assert _server() is not old and _server().alive()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "had exited" in lines[0] and "starting a new one" in lines[0], lines


def test_a_run_whose_server_is_killed_is_made_again(caplog):
    configure_sandbox(BWRAP)
    program = "import time\ntime.sleep(1.5)\nprint('done')"
    with caplog.at_level(logging.WARNING, logger=sandbox_pool.__name__), ThreadPoolExecutor(1) as pool:
        pool.submit(run_python, "pass", "", LIMITS).result()  # the thread's server, started and probed
        run = pool.submit(run_python, program, "", LIMITS)
        deadline = time.monotonic() + 30
        while not (inits := _namespace_inits()) and time.monotonic() < deadline:
            time.sleep(0.02)
        holder = _parent(inits[0])
        os.kill(_parent(holder), signal.SIGKILL)  # the server
        result = run.result(timeout=60)
    assert result.status == "ok" and result.stdout == "done\n", result
    lines = [r.getMessage() for r in caplog.records]
    killed = ("killed by SIGKILL", "exit code 137")  # 137: a root caller's bwrap reports 128 + 9
    assert len(lines) == 1 and "closed the connection" in lines[0] and any(k in lines[0] for k in killed), lines


@pytest.mark.parametrize("message, complaint", [
    (struct.pack(">I", 7) + b"[1,2,3]", "a message must be a JSON object"),
    (struct.pack(">I", 1 << 30), "a message of 1073741824 bytes"),
    (pool_server.encode({"run": {"cpu_seconds": 1}, "cgroups": 0}), "a malformed request"),
    (pool_server.encode({"run": dict.fromkeys(pool_server.RUN_KEYS, 1), "cgroups": 0, "argv": ["sh"]}),
     "a malformed request"),
    (b"\x80\x03cos\nsystem\n", "a message of"),  # a pickle is refused for its length, never unpickled
])
def test_the_server_refuses_a_malformed_message_with_one_line(message, complaint):
    server = sandbox_pool.PoolServer(bwrap.require(), code_sandbox.LAUNCHER_SOURCE)
    server.sock.sendall(message)
    server.proc.wait(timeout=30)
    ended = server.close()
    assert ended.startswith("exit code 2: sandbox pool server: ") and complaint in ended, ended


def test_a_server_that_cannot_build_the_sandbox_is_an_error_at_start(monkeypatch):
    start_message = sandbox_pool.start_message

    def broken(setup):
        start = start_message(setup)
        return {**start, "view": [*start["view"], ["ro-bind", "/nonexistent-archer-path", "/opt/x"]]}

    monkeypatch.setattr(sandbox_pool, "start_message", broken)
    with pytest.raises(SandboxUnavailable, match="could not build a sandbox here: .*nonexistent-archer-path"):
        configure_sandbox(BWRAP, check=True)


def test_each_thread_has_its_own_server_which_ends_with_it():
    configure_sandbox(BWRAP)
    pids = []

    def one():
        run_python("pass", "", LIMITS)
        pids.append(_server().pid)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(pids)) == 2
    for pid in pids:  # the thread's locals are freed, so the server's socket closes
        _wait_until_gone(pid)


CALLER = """
import sys
from megatron_archer.rewards.code_sandbox import run_python
run_python("import time\\ntime.sleep({mark})", "")
"""


def test_a_caller_killed_in_the_middle_of_a_run_leaves_nothing():
    mark = f"{41 + secrets.randbelow(1000) / 1000:.3f}"  # a unique sleep, to find its process by
    caller = subprocess.Popen([sys.executable, "-c", CALLER.format(mark=mark)], cwd=Path(__file__).parents[2])
    try:
        deadline = time.monotonic() + 60
        while not (inits := _namespace_inits(caller.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert inits, "the program never started"
        server = _parent(_parent(inits[0]))
    finally:
        caller.kill()
        caller.wait()
    for pid in (server, *inits):
        _wait_until_gone(pid)


def _wait_until_gone(pid: int) -> None:
    deadline = time.monotonic() + 30
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(pid), f"process {pid} is still there"


def _namespace_inits(root: int | None = None) -> list[int]:
    """The sandboxes' pid 1 below `root` (this process)."""
    return code_sandbox._namespace_inits(root or os.getpid())


def _running(pid: int) -> bool:
    """Whether `pid` exists and has not exited (a zombie waits for init, which may be slow to reap)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def _parent(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))


ENDINGS = [
    "x = (",  # a syntax error
    "def f():\n    raise ValueError('bad')\nf()",
    "import sys\nsys.exit('a message')",
    "import sys\nsys.exit(3)",
    "raise SystemExit",
    "import atexit\natexit.register(print, 'at exit')\nprint('partial', end='')",
    "import sys\nprint(__name__, sys.stdin.read(), sys.stdout.encoding, sys.stderr.errors, sys.flags.isolated)",
    "import os, sys\nprint('é', sorted(os.environ), file=sys.stderr)\nos._exit(4)",
]


@pytest.mark.parametrize("program", ENDINGS)
def test_a_program_ends_on_the_pool_as_with_bwrap_per_run(program):
    """Exit codes, output and the last line of stderr (the reason a reward gives) are the same."""
    pool, per_run = (run_python(program, "input", LIMITS, sandbox=s) for s in (BWRAP, code_sandbox.BWRAP_PER_RUN))
    last = [r.stderr.strip().splitlines()[-1:] for r in (pool, per_run)]
    assert (pool.status, pool.returncode, pool.stdout, last[0]) == (per_run.status, per_run.returncode,
                                                                    per_run.stdout, last[1])


MOUNTS = """
for line in open('/proc/self/mountinfo'):
    fields = line.split()
    print(fields[4], ','.join(sorted(fields[5].split(','))), fields[fields.index('-') + 1])
"""


def test_the_pool_builds_the_mount_table_bwrap_builds():
    """Every mount point, its per-mount flags (ro, nodev, nosuid, noexec, atime) and file system
    type, seen from inside, are those of bwrap's sandbox."""
    pool, per_run = (run_python(MOUNTS, "", LIMITS, sandbox=s) for s in (BWRAP, code_sandbox.BWRAP_PER_RUN))
    assert pool.status == per_run.status == "ok", (pool, per_run)
    assert sorted(pool.stdout.splitlines()) == sorted(per_run.stdout.splitlines())
    assert "/ nodev,nosuid,relatime,ro tmpfs" in pool.stdout.splitlines()


PROCESS = """
import os, socket
status = dict(line.split(':\\t', 1) for line in open('/proc/self/status').read().splitlines() if ':\\t' in line)
for key in ('Uid', 'Gid', 'Groups', 'CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb', 'NoNewPrivs', 'Seccomp',
            'Seccomp_filters', 'NSpid', 'NStgid'):
    print(key, status[key].strip())
print(open('/proc/self/limits').read())
print(socket.gethostname(), os.getsid(0), os.getpgrp(), os.getppid(), oct(os.umask(0)), os.getcwd())
print(sorted(os.listdir('/proc/self/fd')), sorted(os.listdir('/dev')), sorted(os.listdir('/proc/self/ns')))
print(open('/proc/self/setgroups').read(), open('/proc/self/oom_score_adj').read(), open('/proc/self/cgroup').read())
"""


def test_the_pool_gives_the_program_the_process_bwrap_gives():
    """Ids, capabilities, no_new_privs, the filter, pid-namespace depth, every resource limit,
    hostname, session, descriptors, /dev and the namespace set are those of bwrap's sandbox.
    (One difference, not compared: bwrap nests the program's user namespace in an intermediate
    one, so /proc/self/uid_map reads "65534 0 1" there and "65534 65534 1" on the pool.)"""
    pool, per_run = (run_python(PROCESS, "", LIMITS, sandbox=s) for s in (BWRAP, code_sandbox.BWRAP_PER_RUN))
    assert pool.status == per_run.status == "ok", (pool, per_run)
    assert pool.stdout == per_run.stdout
    assert "Seccomp 2" in pool.stdout and "NoNewPrivs 1" in pool.stdout
