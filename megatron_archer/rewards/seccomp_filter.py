"""The system-call filter of the code sandbox, modelled on the container runtimes' default profile.

The program may make any system call except those that have been the way into the kernel for
most local privilege escalations, or that would let it rebuild what the sandbox took away:
each of them fails with EPERM (clone3 with ENOSYS, as container runtimes answer it, so the C
library falls back to clone, whose namespace flags are then checked). The filter is compiled
once per process with libseccomp (the ``pyseccomp`` binding) into a BPF program that bubblewrap
installs (``--seccomp FD``) right before it starts the program.
"""

from __future__ import annotations

import errno
import functools
import tempfile

DENIED = (
    # kernel surfaces behind many recent exploits
    "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf", "perf_event_open",
    "userfaultfd", "keyctl", "add_key", "request_key",
    # reading or steering other processes
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    # the kernel, modules and the machine
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "reboot", "swapon", "swapoff", "acct", "sethostname", "setdomainname", "syslog",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "iopl", "ioperm",
    "lookup_dcookie", "quotactl", "nfsservctl", "vhangup",
    # namespaces and mounts (the sandbox's own are set up before the filter applies)
    "mount", "umount2", "pivot_root", "unshare", "setns", "open_tree", "move_mount", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr", "name_to_handle_at", "open_by_handle_at",
)  # fmt: skip
# clone flags that make a new namespace (linux/sched.h)
NAMESPACE_FLAGS = {"CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000,
                   "CLONE_NEWUTS": 0x04000000, "CLONE_NEWIPC": 0x08000000,
                   "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
                   "CLONE_NEWNET": 0x40000000, "CLONE_NEWTIME": 0x00000080}
PER_LINUX = 0  # the default persona: the only personality() argument allowed


class SeccompUnavailable(RuntimeError):
    """libseccomp or its binding is missing; the message says how to install them."""


@functools.cache
def bpf_program() -> bytes:
    """The compiled filter for this machine's architecture (cached)."""
    try:
        import pyseccomp as seccomp
    except (ImportError, OSError) as error:  # OSError: the binding is there, libseccomp is not
        raise SeccompUnavailable(
            f"the code sandbox's system-call filter needs libseccomp and its Python binding "
            f"({error}): `apt-get install libseccomp2` and `pip install pyseccomp`") from None
    rules = seccomp.SyscallFilter(seccomp.ALLOW)
    for name in DENIED:
        try:
            rules.add_rule(seccomp.ERRNO(errno.EPERM), name)
        except (ValueError, RuntimeError):
            continue  # a call this architecture does not have
    for flag in NAMESPACE_FLAGS.values():
        rules.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")  # its flags are behind a pointer
    rules.add_rule(seccomp.ERRNO(errno.EPERM), "personality", seccomp.Arg(0, seccomp.NE, PER_LINUX))
    with tempfile.TemporaryFile() as out:
        rules.export_bpf(out)
        out.seek(0)
        return out.read()
