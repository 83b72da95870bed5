"""The sandbox's child side: confine this interpreter, then run the untrusted program in it.

`code_sandbox` starts it as `python -I -S -B sandbox_launcher.py CONFIG_JSON` in a fresh private
directory, so only the standard library is importable. Before the program runs, it

1. reads `program.py` and deletes it (so the program cannot read its own test harness back);
2. moves into a new, empty network namespace: `unshare(CLONE_NEWNET)` as root, or together with a
   new user namespace otherwise (where the kernel allows it); nothing, not even loopback, is up;
3. sets resource limits: CPU seconds, address space, file size, open files, no core dumps, and
   RLIMIT_NPROC = 0 (no new processes or threads; the kernel does not apply it to root);
4. installs an audit hook (PEP 578) that raises PermissionError on process creation (fork, exec,
   spawn, system, subprocess), signals to other processes, sockets, ctypes, tracing and
   introspection hooks that could tamper with the hook, extension modules from outside the
   standard library, writes outside the sandbox directory (and opening directories outside it,
   which could anchor `dir_fd` writes), and reading other processes' /proc entries.

Only the standard library is used here: it runs before and under those restrictions.
"""

from __future__ import annotations

import json
import os
import resource
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

BLOCKED_EVENTS = frozenset(
    {
        "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.startfile",
        "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg",
        "sys.settrace", "sys.setprofile", "object.__getattr__",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    }
)  # fmt: skip
BLOCKED_PREFIXES = ("socket.", "ctypes.")
# Modules that reach native process, signal or socket calls without an audit event of their own.
BLOCKED_MODULES = frozenset(
    {
        "ctypes", "_ctypes", "_posixsubprocess", "subprocess", "multiprocessing", "_multiprocessing",
        "socket", "_socket", "ssl", "_ssl", "signal", "_signal", "posix", "_testcapi",
        "_testinternalcapi", "_xxsubinterpreters", "_xxinterpchannels",
    }
)  # fmt: skip
# Events that change the file system: (positions of path arguments, positions of dir_fd arguments).
PATH_EVENTS = {
    "os.chmod": ((0,), (2,)),
    "os.chown": ((0,), (3,)),
    "os.link": ((0, 1), (2, 3)),
    "os.mkdir": ((0,), (2,)),
    "os.remove": ((0,), (1,)),
    "os.rename": ((0, 1), (2, 3)),
    "os.rmdir": ((0,), (1,)),
    "os.symlink": ((1,), (2,)),
    "os.truncate": ((0,), ()),
    "os.utime": ((0,), (3,)),
    "os.setxattr": ((0,), ()),
    "os.removexattr": ((0,), ()),
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
WRITABLE_DEVICES = frozenset({"/dev/null"})


def isolate_network() -> None:
    """Enter a new network namespace (no interfaces up) if this kernel and user may; else stay."""
    unshare = getattr(os, "unshare", None)  # Python >= 3.12
    if unshare is None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)

        def unshare(flags: int) -> None:
            if libc.unshare(flags) != 0:
                raise OSError(ctypes.get_errno(), "unshare failed")

    for flags in (CLONE_NEWNET, CLONE_NEWUSER | CLONE_NEWNET):
        try:
            unshare(flags)
            break
        except OSError:
            continue
    for name in [name for name in sys.modules if name.split(".")[0] in ("ctypes", "_ctypes")]:
        del sys.modules[name]  # a later `import ctypes` must go through the audit hook again


def set_limits(config: dict) -> None:
    cpu = config["cpu_seconds"]
    for limit, soft, hard in (
        (resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL a second later
        (resource.RLIMIT_AS, config["memory_bytes"], config["memory_bytes"]),
        (resource.RLIMIT_FSIZE, config["file_bytes"], config["file_bytes"]),
        (resource.RLIMIT_NOFILE, config["open_files"], config["open_files"]),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_NPROC, 0, 0),
    ):
        current_hard = resource.getrlimit(limit)[1]
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(limit, (soft, hard))


def install_guard(workdir: str, stdlib: tuple[str, ...]) -> None:
    """Add the audit hook; it cannot be removed from Python once added."""
    own_proc = f"/proc/{os.getpid()}"
    realpath, isdir, fspath, sep = os.path.realpath, os.path.isdir, os.fspath, os.sep

    def inside(path: str, roots: tuple[str, ...]) -> bool:
        return any(path == root or path.startswith(root + sep) for root in roots)

    def check_path(event: str, path: object, write: bool) -> None:
        if isinstance(path, int):  # an open file descriptor: only reads through it are allowed
            if write:
                raise PermissionError(f"sandbox: {event} on a file descriptor is not allowed")
            return
        real = realpath(os.fsdecode(fspath(path)))
        if inside(real, (workdir,)):
            return
        if write and real not in WRITABLE_DEVICES:
            raise PermissionError(f"sandbox: writing {real} (outside the sandbox directory) is not allowed")
        if real.startswith("/proc/") and real.split(sep)[2].isdigit() and not inside(real, (own_proc,)):
            raise PermissionError(f"sandbox: reading {real} (another process) is not allowed")
        if event == "open" and isdir(real):  # a directory descriptor would anchor dir_fd writes
            raise PermissionError(f"sandbox: opening the directory {real} is not allowed")

    def hook(event: str, args: tuple) -> None:
        if event in BLOCKED_EVENTS or event.startswith(BLOCKED_PREFIXES):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import":
            if args[0].split(".")[0] in BLOCKED_MODULES:
                raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
            if args[1] is not None and not inside(realpath(args[1]), stdlib):
                raise PermissionError(f"sandbox: loading {args[1]} (outside the standard library) is not allowed")
        elif event == "open":
            path, _, flags = args
            check_path(event, path, write=bool((flags or 0) & WRITE_FLAGS))
        elif event in PATH_EVENTS:
            paths, dir_fds = PATH_EVENTS[event]
            if any(args[i] not in (None, -1) for i in dir_fds if i < len(args)):  # -1: no dir_fd
                raise PermissionError(f"sandbox: {event} relative to a directory descriptor is not allowed")
            for i in paths:
                check_path(event, args[i], write=True)

    sys.addaudithook(hook)


def main() -> None:
    config = json.loads(sys.argv[1])
    workdir = os.path.realpath(config["workdir"])
    os.chdir(workdir)
    with open("program.py", encoding="utf-8") as file:
        source = file.read()
    os.remove("program.py")
    code = compile(source, "program.py", "exec")
    del source
    isolate_network()
    set_limits(config)
    for name in ("mkfifo", "mknod"):  # they create files and raise no audit event
        for module in (os, sys.modules["posix"]):
            module.__dict__.pop(name, None)
    for name in BLOCKED_MODULES:  # already loaded ones too: importing them again must be audited
        sys.modules.pop(name, None)
    install_guard(workdir, tuple(os.path.realpath(p) for p in sys.path))
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})


if __name__ == "__main__":
    main()
