"""Adversarial programs for the code sandbox, one or more per escape class (issue 12) plus the
earlier seven. Each prints "ok" only if its attack worked, so without the sandbox it would earn
reward 1: reward 0 shows the sandbox stopped it. They are bounded so that a broken sandbox still
cannot harm this machine (64 sleeping children at most, connections only to this test's own
listeners on 127.0.0.1).

`programs(**params)` fills in what the caller knows: CALLER_PID, PORT (TCP listener), UDP_PORT,
MARK (a unique name used for leftovers: files, sleep durations), SHM_KEY, OUTSIDE (a host
directory anyone may write) and SECRET_FILE (a world-readable host file holding the secret).
Each entry is (program, substring the reward's reason must contain, or a tuple of alternatives).
"""

# Loads an extension module or package by file path under another name (no import by name).
LOAD_BY_PATH = """
import glob, importlib.util, os, sys, sysconfig
def load(name, alias):
    base = sysconfig.get_path("platstdlib")
    paths = glob.glob(os.path.join(base, "lib-dynload", name + ".*.so")) + glob.glob(os.path.join(base, name, "__init__.py"))
    # an extension module keeps its own name (its init function is PyInit_<name>), a package takes the alias
    spec = importlib.util.spec_from_file_location(name if paths[0].endswith(".so") else alias, paths[0])
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    return module
"""

ATTACKS = {
    # ---- the earlier seven ----
    # on a loaded machine the 4 s wall limit may come before 1 s of CPU (test_code_sandbox checks the CPU limit alone)
    "busy_loop": ("while True:\n    pass\nprint('ok')", ("CPU time limit of 1 s exceeded", "wall-clock limit of 4 s exceeded")),
    "sleeping_loop": ("import time\nwhile True:\n    time.sleep(0.1)\nprint('ok')", "wall-clock limit of 4 s exceeded"),
    "fork_bomb": (
        "import os\nfor _ in range(64):\n    if os.fork() == 0:\n        os.execv('/bin/sleep', ['sleep', '{MARK}'])\nprint('ok')",
        "Resource temporarily unavailable",
    ),
    "ten_gigabytes": ("x = bytearray(10 * 1024**3)\nprint('ok')", "MemoryError"),
    "write_outside": (
        "import os\nopen(os.path.join({OUTSIDE!r}, '{MARK}'), 'w').write('x')\nprint('ok')",
        "No such file or directory",
    ),
    "socket": (
        "import socket\nsocket.create_connection(('127.0.0.1', {PORT}), timeout=2)\nprint('ok')",
        "Connection refused",  # the sandbox's own loopback: nothing listens there
    ),
    "environment_secrets": (
        "import os\nseen = str(dict(os.environ))\n"
        "for pid in [p for p in os.listdir('/proc') if p.isdigit()] + [str(os.getppid()), '{CALLER_PID}']:\n"
        "    try:\n        seen += open(f'/proc/{{pid}}/environ', 'rb').read().decode(errors='replace')\n"
        "    except OSError:\n        pass\n"
        "print(seen)\nprint('ok' if 'ARCHER_TEST_SECRET' in seen else 'none')",
        "wrong output",
    ),
    "print_a_gigabyte": (
        "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)\nprint('ok')",
        "output limit of 65536 bytes exceeded",
    ),
    # ---- turning the guard off from inside ----
    "guard_state_and_builtins": (
        "import builtins, os, sys\nmain = sys.modules['__main__']\n"
        "for name in ('BLOCKED_EVENTS', 'BLOCKED_MODULES', 'BLOCKED_PREFIXES', 'PATH_EVENTS'):\n"
        "    if hasattr(main, name):\n        setattr(main, name, type(getattr(main, name))())\n"
        "builtins.isinstance = lambda *a: False\nos.path.realpath = lambda p, **k: '/tmp/x'\n"
        "if os.fork() == 0:\n    os.execv('/bin/sleep', ['sleep', '{MARK}'])\nprint('ok')",
        "Resource temporarily unavailable",
    ),
    # ---- refused modules under another name, then fork / spawn / raw memory ----
    "posixsubprocess_by_path": (
        LOAD_BY_PATH + "ps = load('_posixsubprocess', 'innocent')\n"
        "import os\nr, w = os.pipe()\n"
        "pid = ps.fork_exec(['/bin/sleep', '{MARK}'], [b'/bin/sleep'], True, (), None, None, -1, -1, -1, -1, -1, -1,"
        " r, w, True, False, 0, None, None, None, -1, None, False)\nprint('ok' if pid > 0 else 'no')",
        "Resource temporarily unavailable",
    ),
    "ctypes_by_path_fork_and_memory": (
        LOAD_BY_PATH + "c = load('ctypes', 'harmless')\nlibc = c.CDLL('libc.so.6', use_errno=True)\n"
        "escaped = []\npid = libc.fork()\nif pid == 0:\n    libc._exit(0)\nescaped += ['fork'] if pid > 0 else []\n"
        "class iovec(c.Structure):\n    _fields_ = [('base', c.c_void_p), ('len', c.c_size_t)]\n"
        "buf = c.create_string_buffer(64)\nlocal, remote = iovec(c.addressof(buf), 64), iovec(0x400000, 64)\n"
        "n = libc.process_vm_readv({CALLER_PID}, c.byref(local), 1, c.byref(remote), 1, 0)\n"
        "escaped += ['process_vm_readv'] if n > 0 else []\n"
        "try:\n    open('/proc/{CALLER_PID}/mem', 'rb').read(1)\n    escaped.append('mem')\nexcept OSError:\n    pass\n"
        "print(escaped)\nprint('ok' if escaped else 'refused')",
        "wrong output",
    ),
    # ---- a sub-interpreter without the hook ----
    "subinterpreter": (
        "import os, _xxsubinterpreters as interpreters\ni = interpreters.create()\n"
        "interpreters.run_string(i, \"import os\\nos.posix_spawn('/bin/sleep', ['sleep', '{MARK}'], {{}})\\nopen('/tmp/forked', 'w').close()\")\n"
        "print('ok' if os.path.exists('/tmp/forked') else 'no')",
        "Resource temporarily unavailable",
    ),
    # ---- path checks vs the kernel; the caller's environ; files outside; /dev/shm and devices ----
    "paths_environ_files_devices": (
        "import os, stat\nfound = []\n"
        "class Shifty:\n    n = 0\n    def __fspath__(self):\n        Shifty.n += 1\n"
        "        return 'harmless.txt' if Shifty.n == 1 else {SECRET_FILE!r}\n"
        "for target in [Shifty(), {SECRET_FILE!r}, '/proc/{CALLER_PID}/environ', '/proc/1/environ']:\n"
        "    try:\n        data = open(target, 'rb').read().decode(errors='replace')\n"
        "        found += ['secret'] if 'ARCHER' in data else []\n    except OSError:\n        pass\n"
        "root = os.open('/', os.O_RDONLY)\n"
        "try:\n    os.open('{SECRET_FILE_REL}', os.O_RDONLY, dir_fd=root)\n    found.append('dir_fd')\nexcept OSError:\n    pass\n"
        "os.chdir('/')\n"
        "try:\n    open('{SECRET_FILE_REL}').read()\n    found.append('cwd')\nexcept OSError:\n    pass\n"
        "open('/dev/shm/{MARK}', 'w').write('left behind?')\n"
        "for path, mode, dev in [('/tmp/null2', stat.S_IFCHR | 0o666, os.makedev(1, 3)), ('/dev/shm/{MARK}.dev', stat.S_IFBLK | 0o666, os.makedev(8, 0))]:\n"
        "    try:\n        os.mknod(path, mode, dev)\n        found.append('mknod ' + path)\n    except OSError:\n        pass\n"
        + LOAD_BY_PATH + "c = load('ctypes', 'ct')\nlibc = c.CDLL('libc.so.6')\n"
        "shm = libc.shmget({SHM_KEY}, 4096, 0o1000 | 0o666)\n"
        "print(found, shm)\nprint('ok' if found else 'refused')",
        "wrong output",
    ),
    # ---- re-entering the caller's network namespace; loopback and DNS ----
    "network_namespace_reentry": (
        LOAD_BY_PATH + "c = load('ctypes', 'ct')\nlibc = c.CDLL('libc.so.6', use_errno=True)\n"
        "import os, socket\nescaped = []\n"
        "for path in ['/proc/{CALLER_PID}/ns/net', '/proc/1/ns/net', '/proc/self/ns/net']:\n"
        "    try:\n        fd = os.open(path, os.O_RDONLY)\n    except OSError:\n        continue\n"
        "    if libc.setns(fd, 0x40000000) == 0 and path != '/proc/self/ns/net':\n        escaped.append('setns ' + path)\n"
        "for attempt in [lambda: socket.create_connection(('127.0.0.1', {PORT}), timeout=1),\n"
        "                lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'{MARK}', ('127.0.0.1', {UDP_PORT})),\n"
        "                lambda: socket.getaddrinfo('{MARK}.example.com', 80)]:\n"
        "    try:\n        attempt()\n        escaped.append('network')\n    except OSError:\n        pass\n"
        "print(escaped)\nprint('ok' if escaped else 'refused')",
        "wrong output",
    ),
    # ---- killing the caller or its process group ----
    "kill_the_caller": (
        "import os, signal\nescaped = []\n"
        "for target in [{CALLER_PID}, -{CALLER_PID}]:\n"
        "    try:\n        os.kill(target, 0)\n        escaped.append(target)\n    except OSError:\n        pass\n"
        "for target in [{CALLER_PID}, -{CALLER_PID}, 1, -1]:\n"
        "    try:\n        os.kill(target, signal.SIGKILL)\n    except OSError:\n        pass\n"
        "try:\n    os.killpg(os.getpgrp(), signal.SIGKILL)\nexcept OSError:\n    pass\n"
        "print(escaped)\nprint('ok' if escaped else 'refused')",
        "wrong output",
    ),
    # ---- crashing or blocking the caller's cleanup ----
    "deep_tree_and_immutable_file": (
        LOAD_BY_PATH + "c = load('ctypes', 'ct')\nlibc = c.CDLL('libc.so.6', use_errno=True)\nimport os\n"
        "for _ in range(3000):\n    os.mkdir('d')\n    os.chdir('d')\nopen('f', 'w').write('x')\n"
        "fd = os.open('f', os.O_RDONLY)\nflags = c.c_int(0x10)\n"  # FS_IMMUTABLE_FL
        "done = libc.ioctl(fd, 0x40086602, c.byref(flags)) == 0\n"  # FS_IOC_SETFLAGS
        "print('ok' if done else 'immutable refused')",
        "wrong output",
    ),
    # ---- memory summed over several children, or held in tmpfs files ----
    "memory_over_children_and_files": (
        "import os, threading\nheld = 0\nkids = 0\n"
        "for _ in range(4):\n    try:\n        if os.fork() == 0:\n            x = bytearray(200 << 20)\n            os.execv('/bin/sleep', ['sleep', '{MARK}'])\n        kids += 1\n    except OSError:\n        break\n"
        "try:\n    threading.Thread(target=lambda: bytearray(200 << 20)).start()\n    kids += 1\nexcept RuntimeError:\n    pass\n"
        "for i in range(64):\n    try:\n        open(f'/dev/shm/{MARK}{{i}}', 'wb').write(b'x' * (8 << 20))\n        held += 8 << 20\n    except OSError:\n        break\n"
        "print(kids, held)\nprint('ok' if kids or held > (256 << 20) else 'capped')",
        "wrong output",
    ),
}


def programs(**params) -> dict[str, tuple[str, str]]:
    """ATTACKS with the caller's parameters filled in."""
    params.setdefault("SECRET_FILE_REL", params["SECRET_FILE"].lstrip("/"))
    return {name: (source.format(**params), reason) for name, (source, reason) in ATTACKS.items()}
