"""The seccomp filter every sandboxed guest runs under, compiled with libseccomp.

The filter allows by default and denies (``EPERM``, or ``EAFNOSUPPORT`` for sockets) the system
calls that reach kernel surface a Python program has no business with: namespaces and mounts,
tracing, kernel modules and keyrings, BPF and perf, io_uring, and any socket family but
``AF_UNIX``. Syscalls of a foreign architecture (x32, i386) kill the process (libseccomp's
default bad-arch action).

It is built with the ``pyseccomp`` binding (PyPI; a ctypes wrapper over ``libseccomp.so.2``),
exported as a BPF program, and handed to bubblewrap (``--seccomp FD``), which installs it with
``no_new_privs`` right before it executes the guest.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from typing import Any

#: Syscalls denied outright with EPERM. Names unknown to this kernel/libseccomp are skipped.
DENIED_SYSCALLS: tuple[str, ...] = (
    # tracing and other processes' memory
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_getfd",
    "kcmp",
    # namespaces, mounts, roots
    "unshare",
    "setns",
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "chroot",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "name_to_handle_at",
    "open_by_handle_at",
    # kernel code, keys, BPF, perf, io_uring
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "bpf",
    "perf_event_open",
    "keyctl",
    "add_key",
    "request_key",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "userfaultfd",
    # host administration
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "syslog",
    "vhangup",
    "iopl",
    "ioperm",
    "uselib",
    "personality",
    "lookup_dcookie",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "sethostname",
    "setdomainname",
)

_CLONE_NS_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
    0x00000080,  # CLONE_NEWTIME
)


class SeccompUnavailable(RuntimeError):
    """The libseccomp binding (``pyseccomp``) or ``libseccomp.so.2`` is missing."""


def _load_binding() -> Any:
    try:
        import pyseccomp
    except (ImportError, OSError) as exc:  # OSError: libseccomp.so.2 not found by ctypes
        raise SeccompUnavailable(
            "the seccomp binding is missing: install the 'seccomp' extra "
            "(pip install 'codemode[seccomp]', which brings pyseccomp) and the libseccomp2 "
            f"system package ({exc})"
        ) from None
    return pyseccomp


def binding_available() -> tuple[bool, str]:
    """Whether the binding loads, and a one-line explanation."""
    try:
        mod = _load_binding()
    except SeccompUnavailable as exc:
        return False, str(exc)
    try:
        api = mod.get_api()
    except Exception as exc:  # any failure of the C library is reported
        return False, f"libseccomp does not answer: {exc}"
    return True, f"pyseccomp over libseccomp (API level {api})"


def build_filter_bpf() -> bytes:
    """Compile the guest filter for this machine's architecture; return the BPF program."""
    sc = _load_binding()
    filt = sc.SyscallFilter(defaction=sc.ALLOW)
    # A binary tree of syscall numbers rather than a list: every guest installs the filter, and
    # the kernel then evaluates it for each syscall number to build its allow cache, which a
    # tree makes about twice as fast.
    with contextlib.suppress(OSError):  # libseccomp < 2.5 has no tree: the list still works
        filt.set_attr(sc.Attr.CTL_OPTIMIZE, 2)
    deny = sc.ERRNO(errno.EPERM)
    for name in DENIED_SYSCALLS:
        try:
            filt.add_rule(deny, name)
        except (ValueError, RuntimeError, OSError):
            continue  # not a syscall of this architecture / libseccomp version
    # New namespaces through clone(2); clone3 hides its flags in memory, so make it look
    # absent: glibc then falls back to clone(2), which the rules above can inspect.
    for flag in _CLONE_NS_FLAGS:
        filt.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    filt.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    # No network family at all: only local socketpairs (asyncio's self-pipe uses one).
    no_family = sc.ERRNO(errno.EAFNOSUPPORT)
    filt.add_rule(no_family, "socket", sc.Arg(0, sc.NE, socket.AF_UNIX))
    filt.add_rule(no_family, "socketpair", sc.Arg(0, sc.NE, socket.AF_UNIX))
    fd = os.memfd_create("codemode-seccomp", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "rb", buffering=0) as handle:
            filt.export_bpf(handle)
        size = os.fstat(fd).st_size
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)
