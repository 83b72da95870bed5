"""The sandbox's system-call filter, on the warm pool and with bwrap per run: from inside, every
denied call fails with EPERM (clone3 with ENOSYS, so the C library falls back to clone, whose
namespace flags are denied), personality only keeps the default persona, the /proc entries
runtimes hide are hidden, and ordinary Python programs (json, math, hashlib; numpy where the
sandbox's interpreter has it) still run."""

from __future__ import annotations

import json

import pytest

from megatron_archer.rewards.code_sandbox import run_python
from megatron_archer.rewards.seccomp_filter import DENIED
from tests.rewards.test_code_sandbox import LIMITS, both_launchers

# runs inside the sandbox only: each denied call with harmless arguments, what the kernel said
PROBE = """
import ctypes, errno, json, os
libc = ctypes.CDLL(None, use_errno=True)
NR = {"io_uring_setup": 425, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "keyctl": 250,
      "add_key": 248, "request_key": 249, "ptrace": 101, "process_vm_readv": 310,
      "process_vm_writev": 311, "kexec_load": 246, "init_module": 175, "finit_module": 313,
      "mount": 165, "umount2": 166, "pivot_root": 155, "unshare": 272, "setns": 308, "acct": 163,
      "swapon": 167, "swapoff": 168, "reboot": 169, "sethostname": 170, "clone3": 435,
      "personality": 135}
out = {}
for name, nr in NR.items():
    args = {"personality": (0x0040000,), "unshare": (0x10000000,)}.get(name, (0, 0, 0, 0, 0))
    r = libc.syscall(nr, *[ctypes.c_long(a) for a in args])
    out[name] = errno.errorcode.get(ctypes.get_errno(), "ok") if r == -1 else "ok"
CLONE_NEWUSER, SIGCHLD = 0x10000000, 17
r = libc.syscall(56, ctypes.c_long(CLONE_NEWUSER | SIGCHLD), 0, 0, 0, 0)
out["clone(CLONE_NEWUSER)"] = errno.errorcode.get(ctypes.get_errno(), "ok") if r == -1 else "ok"
out["personality(PER_LINUX)"] = "ok" if libc.syscall(135, ctypes.c_long(0)) != -1 else "denied"
try:
    out["/proc/kallsyms"] = len(open("/proc/kallsyms").read())
except OSError as e:
    out["/proc/kallsyms"] = str(e)
out["/proc/sys"] = os.listdir("/proc/sys")
for path in ("/proc/kallsyms", "/proc/sys/x"):  # the masks are read-only
    try:
        open(path, "w").close()
        out["write " + path] = "written"
    except OSError as e:
        out["write " + path] = errno.errorcode[e.errno]
print(json.dumps(out))
"""


@both_launchers
def test_denied_calls_fail_with_eperm_inside_the_sandbox():
    result = run_python(PROBE, "", LIMITS)
    assert result.status == "ok", result.describe() + result.stderr[-2000:]
    seen = json.loads(result.stdout)
    probed = [name for name in seen if name in DENIED or name in ("clone3", "personality")]
    assert len(probed) >= 20
    for name in probed:
        want = "ENOSYS" if name == "clone3" else "EPERM"
        assert seen[name] == want, (name, seen[name])
    assert seen["clone(CLONE_NEWUSER)"] == "EPERM"
    assert seen["personality(PER_LINUX)"] == "ok"  # the default persona stays allowed
    assert not isinstance(seen["/proc/kallsyms"], int) or seen["/proc/kallsyms"] == 0
    assert seen["/proc/sys"] == []
    assert seen["write /proc/kallsyms"] in ("EROFS", "EACCES") and seen["write /proc/sys/x"] in ("EROFS", "EACCES")


@both_launchers
def test_ordinary_programs_still_run_under_the_filter():
    program = """
import json, math, time, hashlib, random, collections, re, os
out = [sum(math.sqrt(i) for i in range(10000))]
print(json.dumps({"sum": round(out[0], 3), "sha": hashlib.sha256(b"x").hexdigest()[:8],
                  "cpus": os.cpu_count() is not None, "time": time.time() > 0}))
try:
    import numpy
    print("numpy", float(numpy.linalg.norm(numpy.ones(4))))
except ImportError:
    print("numpy absent")
"""
    result = run_python(program, "", LIMITS)
    assert result.status == "ok", result.describe() + result.stderr[-2000:]
    first, second = result.stdout.splitlines()
    assert json.loads(first) == {"sum": 666616.459, "sha": "2d711642", "cpus": True, "time": True}
    assert second in ("numpy 2.0", "numpy absent")


def test_the_filter_names_what_it_needs_when_libseccomp_is_missing(monkeypatch):
    import sys

    from megatron_archer.rewards import seccomp_filter

    seccomp_filter.bpf_program.cache_clear()
    monkeypatch.setitem(sys.modules, "pyseccomp", None)
    try:
        with pytest.raises(seccomp_filter.SeccompUnavailable,
                           match="needs libseccomp and its Python binding .*pip install pyseccomp"):
            seccomp_filter.bpf_program()
    finally:
        seccomp_filter.bpf_program.cache_clear()
