"""The sandbox's child side: set the run's limits on this interpreter, then run the program in it.

Two modes, chosen by the `mode=` argument (only the standard library is used here: it
runs before and under the limits):

- "bwrap" (`code_sandbox`'s "bwrap_per_run"): `code_sandbox` starts `python -I -S -B -c <this
  file> KEY=VALUE...` inside bubblewrap, which is the boundary (`bwrap.py`). The program comes on
  an inherited, sealed file descriptor (read, then closed); the launcher sets the resource limits
  (CPU seconds, address space, file size, open files, no core dumps, RLIMIT_NPROC = 0: no new
  processes or threads, enforced because the user is not root) and runs the program in this
  interpreter. The warm pool's server (`pool_server.py`) loads this file as a module and runs
  each program with the same `run_confined`, in the sandbox it has built.
- "in_process" (the opt-in weak guard): started as `python -I -S -B sandbox_launcher.py KEY=VALUE...`
  in a private host directory, it
  1. reads `program.py` and deletes it (so the program cannot read its own test harness back);
  2. moves into a new, empty network namespace where the kernel allows it;
  3. sets the same resource limits (the kernel ignores RLIMIT_NPROC for root);
  4. installs an audit hook (PEP 578) that raises PermissionError on process creation, signals,
     sockets, ctypes, tracing hooks, extension modules from outside the standard library, writes
     outside the directory and reads of other processes' /proc entries. The hook is a
     Python-level guard: a program can get around it (see the README), so this mode is not a
     security boundary.
"""

from __future__ import annotations

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


def run_confined(config: dict) -> None:
    """bwrap mode: the program from the sealed descriptor, under the limits, in this interpreter.

    This process is the sandbox's pid 1 (bwrap --as-pid-1, so that bwrap's wait for it covers
    the whole namespace and its CPU time), and the kernel does not deliver default-action signals
    such as RLIMIT_CPU's SIGXCPU to a namespace init: a handler exits with the status a signal
    death would give (128 + n). Should the program replace it, the hard limit's SIGKILL, which
    the kernel forces, ends it a second later.
    """
    import _signal  # not `signal`: its enum import alone costs more than the rest of the start

    with os.fdopen(config["program_fd"], "rb") as file:
        code = compile(file.read(), "program.py", "exec")
    _signal.signal(_signal.SIGXCPU, lambda signum, frame: os._exit(128 + signum))
    set_limits(config)
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})


def run_guarded(config: dict) -> None:
    """in_process mode: the program from program.py, in a network namespace, under the audit hook."""
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


def parse_config(args: list[str]) -> dict:
    """`key=value` arguments (what `code_sandbox.launcher_args` writes); digits become ints.
    (Not JSON: importing json costs about as much as starting the interpreter.)"""
    pairs = (arg.partition("=")[::2] for arg in args)
    return {key: int(value) if value.isdigit() else value for key, value in pairs}


def main() -> None:
    config = parse_config(sys.argv[1:])
    (run_confined if config["mode"] == "bwrap" else run_guarded)(config)


if __name__ == "__main__":
    main()
