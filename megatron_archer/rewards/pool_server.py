"""The warm sandbox pool's server: one long-lived process per worker that builds a fresh sandbox
for each program it is asked to run, so a run costs two forks instead of three process starts
and an interpreter start.

`sandbox_pool` starts it once as the sandbox user (for a root caller inside the root bwrap that
arranges the view, then `setpriv` down to 65534, as the per-run launch does) with the sandbox's
environment: `python -I -S -B -c <this file> FD <sandbox_launcher.py>`, standard library only; it
loads the per-run launcher's source as a module, whose `run_confined` then runs each program (so
limits and the CPU-limit handler are the same code in both launches). It then serves requests
one at a time on socket FD. A message either way is a 4-byte big-endian length and a UTF-8 JSON
object (no pickles); a request's file descriptors (program, stdin, stdout, stderr, the run's
cgroup.procs files) travel with it as SCM_RIGHTS. Anything malformed ends the server with one
line on stderr (the caller then starts a new one). The server ends when its socket closes (the
caller, or the thread that owns it, has gone), killing a run in progress.

Per request:

1. the server forks the run's holder, which joins the run's cgroups, enters new user, mount,
   pid, network, IPC, UTS and cgroup namespaces (uid and gid mapped to themselves: the user stays
   unprivileged), forks the program's process, pid 1 of the new pid namespace, and waits for it;
   its exit status says how the program ended (128 + n for a signal n, bwrap's encoding), and the
   server reports it with the CPU time of both (wait4);
2. pid 1 builds the root from nothing, as bwrap does: a fresh tmpfs holding read-only binds of
   the view (`bwrap.view`), a minimal /dev (null, zero, full, random, urandom, tty, its own
   devpts), a fresh /proc with the kernel's sensitive entries masked, size-limited tmpfs mounts
   for /tmp and /dev/shm, `/` and /dev read-only; it pivots into it and detaches everything else,
   brings loopback up, sets the hostname, forbids further user namespaces, starts a new session,
   keeps only stdin, stdout, stderr and the program, drops every capability (bounding set
   included), sets no_new_privs, installs the system-call filter, and runs the program in this
   interpreter with `sandbox_launcher.run_confined`, which sets the resource limits first.

What a program can reach: a copy-on-write copy of this server's memory as it was at the fork
(an interpreter that has only ever held its start configuration, the view, the filter and each
request's limits: the server never reads a program, its input or its output, which go straight
between the caller and the run; tests/rewards/test_sandbox_pool.py searches a program's memory
for the previous one's source and input); none of the server's or any earlier run's files,
processes or descriptors. The server and the holder are outside the program's pid namespace, so it cannot
name them to signal them, and ptrace and process_vm_* are filtered anyway. Whatever a run
changes dies with its namespaces.
"""

import ctypes
import fcntl
import io
import json
import os
import re
import select
import selectors
import socket
import struct
import sys
import types

MAX_MESSAGE = 1 << 20
STREAMS = ("program", "stdin", "stdout", "stderr")
MAX_CGROUPS = 4
RUN_KEYS = {"cpu_seconds", "memory_bytes", "file_bytes", "open_files", "workdir_bytes"}
START_KEYS = {"view", "masked_files", "masked_dirs", "seccomp", "env"}
CLONE_NEW = (0x00020000 | 0x02000000 | 0x04000000 | 0x08000000  # mount, cgroup, uts, ipc
             | 0x10000000 | 0x20000000 | 0x40000000)  # user, pid, net
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
# statvfs f_flag bits -> the mount flags a read-only remount must repeat (the kernel locks them
# on mounts a new user namespace inherits): rdonly, nosuid, nodev, noexec, noatime, nodiratime, relatime
ST_TO_MS = {1: 1, 2: 2, 4: 4, 8: 8, 1024: 1024, 2048: 2048, 4096: 1 << 21}
ST_NOATIME, ST_RELATIME, MS_STRICTATIME = 1024, 4096, 1 << 24
PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 22, 24, 38, 47
PR_CAP_AMBIENT_CLEAR_ALL, SECCOMP_MODE_FILTER = 4, 2
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 1
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217, "riscv64": 41}
LINUX_CAPABILITY_VERSION_3 = 0x20080522
SIGKILL = 9
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = (("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
             ("fd", "/proc/self/fd"), ("core", "/proc/kcore"), ("ptmx", "pts/ptmx"))
PROC_NAME = re.compile(r"[a-z_-]+")
OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")  # in mountinfo (\040 is a space)

libc = ctypes.CDLL(None, use_errno=True)


class ProtocolError(Exception):
    """A message the protocol does not allow."""


def check(result: int, what: str) -> int:
    if result == -1:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")
    return result


def receive(sock: socket.socket, max_fds: int = 0) -> tuple[dict, list[int]]:
    """One message and the descriptors that came with it; EOFError when the peer has gone."""
    header, fds, _, _ = socket.recv_fds(sock, 4, max_fds)
    if not header:
        for fd in fds:
            os.close(fd)
        raise EOFError
    try:
        (length,) = struct.unpack(">I", header + exactly(sock, 4 - len(header)))
        if length > MAX_MESSAGE:
            raise ProtocolError(f"a message of {length} bytes (at most {MAX_MESSAGE})")
        message = json.loads(exactly(sock, length).decode("utf-8"))
        if not isinstance(message, dict):
            raise ProtocolError("a message must be a JSON object")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return message, fds


def exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ProtocolError("the connection closed in the middle of a message")
        data += chunk
    return data


def encode(message: dict) -> bytes:
    body = json.dumps(message).encode("utf-8")
    return struct.pack(">I", len(body)) + body


def mount(source, target, fstype, flags, data=None) -> None:
    args = [None if v is None else os.fsencode(v) for v in (source, target, fstype, data)]
    result = libc.mount(args[0], args[1], args[2], ctypes.c_ulong(flags), args[3])
    check(result, f"mount {source or fstype} on {target}")


def remount_read_only(path: str) -> None:
    """The mount at `path` read-only, without devices or set-user-ID (as bwrap remounts)."""
    bits = os.statvfs(path).f_flag
    kept = sum(ms for st, ms in ST_TO_MS.items() if bits & st)
    if not bits & (ST_NOATIME | ST_RELATIME):
        kept |= MS_STRICTATIME  # else the remount would default to relatime, which a locked mount refuses
    mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | kept)


def mount_points_under(target: str) -> list[str]:
    """`target` and every mount point below it."""
    with open("/oldroot/proc/self/mountinfo", "rb") as file:
        points = [OCTAL_ESCAPE.sub(lambda m: chr(int(m[1], 8)), os.fsdecode(line.split()[4])) for line in file]
    return [p for p in points if p == target or p.startswith(target + "/")]


def ro_bind(source: str, target: str) -> None:
    """Bind `source` (with what is mounted below it) at `target`, every mount read-only."""
    if os.path.isdir(source):
        os.makedirs(target, 0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o444))
    mount(source, target, None, MS_BIND | MS_REC)
    for point in mount_points_under(target):
        remount_read_only(point)


def tmpfs(target: str, size: int, flags: int = MS_NOSUID | MS_NODEV) -> None:
    os.makedirs(target, 0o755, exist_ok=True)
    mount("tmpfs", target, "tmpfs", flags, f"mode=0755,size={size}")


def pivot_root(new_root: bytes, put_old: bytes) -> None:
    check(libc.syscall(SYS_PIVOT_ROOT[os.uname().machine], new_root, put_old), "pivot_root")


def build_root(start: dict, workdir_bytes: int) -> None:
    """The program's file system, built as bwrap builds it from the same view, then entered.
    The server's tree stays reachable at /oldroot until the final pivot detaches it."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    os.mkdir("/tmp/oldroot")
    pivot_root(b"/tmp", b"/tmp/oldroot")
    os.chdir("/")
    new, old = "/newroot", "/oldroot"
    tmpfs(new, 1 << 20)
    for op in start["view"]:
        if op[0] == "ro-bind":
            ro_bind(old + op[1], new + op[2])
        elif op[0] == "symlink":
            os.symlink(op[1], new + op[2])
        else:  # "dir"
            os.makedirs(new + op[1], 0o755, exist_ok=True)
            os.chmod(new + op[1], 0o755)
    tmpfs(new + "/dev", 1 << 20, MS_NOSUID)
    for name in DEV_NODES:
        if os.path.exists(f"{old}/dev/{name}"):
            os.close(os.open(f"{new}/dev/{name}", os.O_CREAT | os.O_WRONLY, 0o666))
            mount(f"{old}/dev/{name}", f"{new}/dev/{name}", None, MS_BIND)
    for name, target in DEV_LINKS:
        os.symlink(target, f"{new}/dev/{name}")
    os.mkdir(f"{new}/dev/pts", 0o755)
    mount("devpts", f"{new}/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=620")
    tmpfs(new + "/dev/shm", workdir_bytes)
    os.mkdir(f"{new}/proc", 0o755)
    mount("proc", f"{new}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    with open(f"{new}/proc/sys/user/max_user_namespaces", "w") as file:
        file.write("0")  # this user namespace may have none below it (bwrap --disable-userns)
    # what masks them, made read-only once: a bind of either keeps its flags (one mount a mask);
    # /dev/null on a nodev mount cannot even be opened
    os.close(os.open("/null", os.O_CREAT | os.O_WRONLY, 0o444))
    mount(f"{old}/dev/null", "/null", None, MS_BIND)
    remount_read_only("/null")
    tmpfs("/empty", 4096)
    remount_read_only("/empty")
    for name in start["masked_files"]:
        if os.path.exists(f"{new}/proc/{name}"):
            mount("/null", f"{new}/proc/{name}", None, MS_BIND)
    for name in start["masked_dirs"]:
        if os.path.isdir(f"{new}/proc/{name}"):
            mount("/empty", f"{new}/proc/{name}", None, MS_BIND)
    tmpfs(new + "/tmp", workdir_bytes)
    remount_read_only(new + "/dev")
    os.chdir(new)
    pivot_root(b".", b".")
    check(libc.umount2(b".", MNT_DETACH), "detach the server's file system")
    os.chdir("/")
    remount_read_only("/")
    os.chdir("/tmp")


def loopback_up() -> None:
    """Loopback up, as bwrap leaves it (a connection to 127.0.0.1 is refused, not unreachable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def drop_privileges(last_cap: int, bpf: bytes) -> None:
    """Every capability gone and none gainable, no_new_privs, then the system-call filter."""
    for cap in range(last_cap + 1):
        check(libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0), "drop a capability")
    check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient capabilities")
    check(libc.capset(ctypes.byref(CapHeader(LINUX_CAPABILITY_VERSION_3, 0)), (CapData * 2)()), "capset")
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    program = ctypes.create_string_buffer(bpf, len(bpf))
    fprog = SockFprog(len(bpf) // 8, ctypes.addressof(program))
    check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "install the filter")


def fresh_stdio() -> None:
    """sys.stdin/stdout/stderr on descriptors 0-2 as the interpreter makes them at start (same
    encoding, error handlers and buffering), not the server's objects."""
    for name, fd, mode in (("stdin", 0, "rb"), ("stdout", 1, "wb"), ("stderr", 2, "wb")):
        old = getattr(sys, name)
        stream = io.TextIOWrapper(io.open(fd, mode, closefd=False), encoding=old.encoding, errors=old.errors,
                                  newline="\n", line_buffering=old.line_buffering)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def enter_sandbox(start: dict, run: dict, fds: dict, holder_alive: int) -> None:
    """pid 1 of the run: build the sandbox, with the program on descriptor 3."""
    check(libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "parent-death signal")
    if select.select([holder_alive], [], [], 0)[0]:  # EOF: the holder died before the line above
        raise ProcessLookupError("the run's holder has gone")
    os.setsid()
    build_root(start, run["workdir_bytes"])
    loopback_up()
    check(libc.sethostname(b"sandbox", 7), "sethostname")
    for target, name in enumerate(("stdin", "stdout", "stderr", "program")):
        os.dup2(fds[name], target)
    sys.modules["__main__"] = types.ModuleType("__main__")  # not the server's
    sys.argv = ["-c"]
    os.environ.clear()
    os.environ.update(start["env"])
    drop_privileges(start["last_cap"], start["bpf"])


def run_program(launcher: types.ModuleType, run: dict) -> int:
    """Run the program with the per-run launcher's own code (`sandbox_launcher.run_confined`:
    the program from descriptor 3, the SIGXCPU handler pid 1 needs, the resource limits), and
    end as the interpreter ends a script, returning the exit code it would give: a syntax error
    or an uncaught exception reported and 1, SystemExit's code (a non-integer printed, 1),
    atexit functions run, stdout and stderr flushed (120 if that fails)."""
    try:
        launcher.run_confined({**run, "program_fd": 3})
        status = 0
    except SystemExit as done:
        status = done.code if isinstance(done.code, int) else 0 if done.code is None else 1
        if not isinstance(done.code, int) and done.code is not None:
            print(done.code, file=sys.stderr)
    except BaseException as error:  # noqa: BLE001 - reported as the interpreter reports it
        sys.excepthook(type(error), error, error.__traceback__.tb_next)
        status = 1
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            status = 120
    return status


def holder(start: dict, run: dict, fds: dict, setup_error: int, server: int) -> None:
    """The run's holder (forked from the server): namespaces, then pid 1, then wait for it and
    exit as it did. A failure to build the sandbox is written to `setup_error`. Each of them
    dies with its parent (the parent-death signal, checked for a parent gone before it was set)."""
    try:
        check(libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "parent-death signal")
        if os.getppid() != server:
            os._exit(1)
        for fd in fds["cgroups"]:
            os.write(fd, b"0")  # this process, before anything of the run exists
            os.close(fd)
        uid, gid = os.getuid(), os.getgid()
        check(libc.unshare(CLONE_NEW), "unshare")
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as file:
                file.write(text)
        alive_read, alive_write = os.pipe()  # pid 1 sees EOF once the holder has gone
        child = os.fork()
        if child == 0:
            status = 125
            try:
                os.close(alive_write)
                enter_sandbox(start, run, fds, alive_read)
            except BaseException as error:  # noqa: BLE001 - the sandbox could not be built
                os.write(setup_error, f"{type(error).__name__}: {error}".encode()[:4000])
            else:
                os.closerange(4, 1 << 20)  # the setup-error pipe too: only stdio and the program are left
                fresh_stdio()
                status = run_program(start["launcher"], run)
            finally:
                os._exit(status)  # never back into the server's code
        for fd in (*(fds[name] for name in STREAMS), setup_error, alive_read):
            os.close(fd)
        _, status = os.waitpid(child, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(128 - code if code < 0 else code)
    except BaseException as error:  # noqa: BLE001 - in the holder or pid 1, before the program runs
        os.write(setup_error, f"{type(error).__name__}: {error}".encode()[:4000])
        os._exit(125)


def valid_run(request: dict, fds: list[int]) -> dict:
    run, cgroups = request.get("run"), request.get("cgroups")
    if (set(request) != {"run", "cgroups"} or not isinstance(run, dict) or set(run) != RUN_KEYS
            or not all(type(v) is int and 0 < v < 1 << 62 for v in run.values())
            or type(cgroups) is not int or not 0 <= cgroups <= MAX_CGROUPS or len(fds) != len(STREAMS) + cgroups):
        raise ProtocolError(f"a malformed request (keys {sorted(request)}, {len(fds)} descriptors)")
    return run


def valid_start(start: dict) -> dict:
    ops_ok = isinstance(start.get("view"), list) and all(
        isinstance(op, list) and op and all(type(x) is str for x in op) and (op[0], len(op)) in
        {("ro-bind", 3), ("symlink", 3), ("dir", 2)} for op in start["view"])
    names_ok = all(isinstance(start.get(key), list) and all(type(x) is str and PROC_NAME.fullmatch(x)
                                                            for x in start[key])
                   for key in ("masked_files", "masked_dirs"))
    env_ok = isinstance(start.get("env"), dict) and all(type(v) is str for v in start["env"].values())
    if set(start) != START_KEYS or not (ops_ok and names_ok and env_ok) or type(start["seccomp"]) is not str:
        raise ProtocolError(f"a malformed start message (keys {sorted(start)})")
    with open("/proc/sys/kernel/cap_last_cap") as file:
        last_cap = int(file.read())
    return {**start, "bpf": bytes.fromhex(start["seccomp"]), "last_cap": last_cap}


def run_ends_before_the_caller(sock: socket.socket, pid: int) -> bool:
    """Wait for the run's holder to exit; if the socket closes first (the caller or its thread
    has gone), kill the run (the holder's end kills pid 1 and so the whole namespace) and say so.
    A message in the middle of a run breaks the protocol."""
    exited = os.pidfd_open(pid)
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(exited, selectors.EVENT_READ)
            selector.register(sock, selectors.EVENT_READ)
            if any(key.fileobj is exited for key, _ in selector.select()):
                return True
    finally:
        os.close(exited)
    os.kill(pid, SIGKILL)
    os.waitpid(pid, 0)
    if sock.recv(1, socket.MSG_PEEK):
        raise ProtocolError("a message arrived in the middle of a run")
    return False


def serve(sock: socket.socket, launcher: types.ModuleType) -> None:
    start = {**valid_start(receive(sock)[0]), "launcher": launcher}
    sock.sendall(encode({"ready": os.getpid()}))
    while True:
        try:
            request, fds = receive(sock, len(STREAMS) + MAX_CGROUPS)
        except EOFError:
            return
        try:
            run = valid_run(request, fds)
            named = dict(zip(STREAMS, fds), cgroups=fds[len(STREAMS):])
            error_read, error_write = os.pipe()
            server = os.getpid()
            pid = os.fork()
            if pid == 0:
                try:
                    os.close(error_read)
                    sock.close()
                    holder(start, run, named, error_write, server)
                finally:
                    os._exit(125)  # never back into the server's loop
            os.close(error_write)
        finally:
            for fd in fds:
                os.close(fd)
        if not run_ends_before_the_caller(sock, pid):
            return
        _, status, usage = os.wait4(pid, 0)
        with os.fdopen(error_read, "rb") as file:
            failure = file.read(4000).decode("utf-8", "replace")
        reply = {"error": failure} if failure else {
            "exit": os.waitstatus_to_exitcode(status), "cpu": usage.ru_utime + usage.ru_stime}
        sock.sendall(encode(reply))


def main() -> None:
    if os.uname().machine not in SYS_PIVOT_ROOT:
        sys.exit(f"sandbox pool server: no pivot_root system call number for {os.uname().machine} here; "
                 "use `reward.sandbox: bwrap_per_run`")
    sock = socket.socket(fileno=int(sys.argv[1]))
    launcher = types.ModuleType("sandbox_launcher")  # the per-run launcher's code, from the caller
    exec(compile(sys.argv[2], "sandbox_launcher.py", "exec"), launcher.__dict__)
    try:
        serve(sock, launcher)
    except (BrokenPipeError, ConnectionResetError):
        return  # the caller has gone
    except Exception as error:  # noqa: BLE001 - one line, then the caller starts a new server
        what = str(error) if isinstance(error, ProtocolError) else f"{type(error).__name__}: {error}"
        print(f"sandbox pool server: {what}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
