"""The fork server's zygote: forks guests, each into fresh namespaces, as its own uid.

Standard library only: it runs inside the bubblewrap sandbox of the fork-server backend
(``python -I -S -B /codemode/guest/zygote.py``) with site-packages hidden. It is started once, as
root in the initial user namespace with a few capabilities (``CAP_SYS_ADMIN`` for namespaces
and mounts, ``CAP_SETUID``/``CAP_SETGID``, ``CAP_SETPCAP``, ``CAP_KILL``), in bwrap's read-only
runtime file system with its own pid, net, ipc and uts namespaces. It has imported the guest
runtime and what it needs, and the operator's preloaded modules from the sandbox venv (whose
site-packages it put on ``sys.path``), so a guest pays neither an interpreter start nor an
import.

For each ``fork`` request (one ``SOCK_SEQPACKET`` message from the service carrying the
child's control socket and, with cgroups, its execution's ``cgroup.procs`` files opened for
writing), it forks a child that is pid 1 of a new pid namespace (``unshare(CLONE_NEWPID)``,
``fork``, ``setns`` back), and the child, before it runs anything of the program:

0. joins its cgroups (writes ``0`` to each ``cgroup.procs``) and closes them;
1. joins an empty network namespace that no other process uses (:class:`NetnsLease`: one
   lent by the zygote, made for it or given back when an earlier child was reaped);
2. keeps only its control socket (as fd 3) and ``/dev/null`` on 0, 1 and 2;
3. unshares mount, ipc and uts namespaces (the zygote made every mount private at its
   start, so the copies are private too); mounts a fresh size-bounded tmpfs on ``/tmp``,
   ``/dev/shm``, ``/input`` (root's: the service writes the input files there) and
   ``/output``, a fresh ``/proc`` and ``/dev/pts``;
4. sets rlimit backstops, empties the capability bounding and ambient sets, clears groups,
   changes to its own non-root uid/gid (which empties the other capability sets), clears the
   inheritable set, sets ``no_new_privs``, makes itself dumpable again (as an exec would),
   re-arms ``PR_SET_PDEATHSIG`` and installs the seccomp filter (BPF compiled by the service,
   passed in once at start-up); creates its home directory in its fresh ``/tmp``;
5. takes a request's first-run copy-on-write faults ahead (:func:`guest.runtime.warm_up`);
6. makes its stdout and stderr pipes and writes one byte on its control socket with their read
   ends: the service reads the child's host pid and uid from the kernel's ``SCM_CREDENTIALS``
   and keeps the read ends; a request then only writes the start frame
   on the control socket, which is the channel (or sends a channel, stdout and stderr of its
   own); the child then runs :func:`guest.runtime.serve_one`.

The zygote reaps its children and reports each exit status to the service. It is pid 1 of its
own pid namespace: if it dies, the kernel kills every process in that namespace, every guest
included. Messages, each one datagram of :data:`MESSAGE` (kind, request id, value): service to
zygote ``F`` (value: the uid) with the control socket and the cgroup.procs files, and ``K``;
zygote to service ``S`` (id 0, value: its pid; the zygote is ready), ``X`` (value: a wait
status) and ``E`` (value: an errno, then the error's text).

One file, longer than the others: the child's steps above are one sequence whose order is the
security argument, and the zygote runs it as a script before it has imported anything else.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import importlib
import json
import os
import resource
import selectors
import signal
import socket
import struct
import sys
import types
from typing import Any

# Namespaces (linux/sched.h)
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
# Mount flags (linux/mount.h)
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
# prctl (linux/prctl.h)
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

#: The child's control socket, once it has closed everything else.
CHILD_CONTROL_FD = 3
#: At most this many cgroup.procs files come with a fork request (one per controller).
MAX_JOIN_FDS = 3
#: Exit codes of a child that failed before it ran a program.
EXIT_SETUP_FAILED = 71
EXIT_NO_FDS = 70
#: One control message: kind (``F``, ``K``, ``S``, ``X`` or ``E``), request id, value; an
#: ``E`` message's text follows. Fixed binary, not JSON: between two forks every page the
#: zygote writes is copied (the children share it), and a JSON round trip in its loop writes
#: dozens of pages per fork.
MESSAGE = struct.Struct("<cqq")

#: The guest runtime (``/codemode/guest/runtime.py``), imported once by the zygote.
_guest: Any = None
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.prctl.restype = ctypes.c_int


_libc.fork.argtypes = []
_libc.fork.restype = ctypes.c_int

#: Whether :func:`_fork` may skip CPython's at-fork protocol: CPython 3.11, whose after-fork
#: work this was checked against, and a zygote with one thread (checked in :func:`main`).
_RAW_FORK = sys.implementation.name == "cpython" and sys.version_info[:2] == (3, 11)


def _fork() -> int:
    """``fork(2)`` for the zygote; like ``os.fork()`` but, where allowed, without its at-fork work.

    In the child, ``os.fork()`` re-creates the GIL, the thread states and the import lock, and
    runs the stdlib's at-fork hooks (``threading`` re-registers its threads, ``logging``
    re-creates its locks). That matters when other threads may hold those locks; the zygote
    has one thread and holds none. But run for the first time in each child, that Python code
    writes to hundreds of pages shared with the zygote, a noticeable share of an execution's
    CPU (glibc's own at-fork handlers still run). What does matter for a guest is redone in
    :func:`_after_fork`: its own random stream.
    """
    if not _RAW_FORK:
        return os.fork()
    pid = int(_libc.fork())
    if pid < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fork: {os.strerror(err)}")
    if pid == 0:
        _after_fork()
    return pid


def _after_fork() -> None:
    """In a child made by :func:`_fork`: what of CPython's after-fork work a guest needs.

    ``random`` reseeds itself in a forked child through its at-fork hook; it is not imported
    by the zygote today, but if it were, every guest would otherwise draw the same numbers.
    """
    module = sys.modules.get("random")
    if module is not None:
        module.seed()


class _SockFilterProg(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    return int(_libc.prctl(option, arg2, arg3, 0, 0))


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


class Config:
    """What every child gets, fixed at the zygote's start by the service."""

    def __init__(self, raw: dict[str, Any], seccomp_bpf: bytes, bounding_set: list[int]) -> None:
        self.tmpfs_bytes = int(raw.get("tmpfs_bytes") or (64 << 20))
        #: The directory ``$HOME`` points to, made by each child in its fresh /tmp.
        self.home: str = str(raw.get("home") or "")
        #: The operator's warm-up code, compiled once here and run again in each child.
        warmup = str(raw.get("warmup") or "")
        self.warmup: types.CodeType | None = (
            compile(warmup, "<preload_warmup>", "exec") if warmup else None
        )
        #: Private file systems each child mounts besides /tmp: (path, tmpfs options).
        self.mounts: list[tuple[str, str]] = [(str(p), str(o)) for p, o in raw.get("mounts", ())]
        #: rlimit name -> value (hard and soft), applied before the uid changes.
        self.rlimits: dict[int, int] = {
            getattr(resource, name): int(value)
            for name, value in (raw.get("rlimits") or {}).items()
            if int(value) > 0
        }
        self.seccomp_bpf = seccomp_bpf
        self._filter = ctypes.create_string_buffer(seccomp_bpf, len(seccomp_bpf))
        self.prog = _SockFilterProg(len(seccomp_bpf) // 8, ctypes.addressof(self._filter))
        # Made once here rather than in every child (building a ctypes array type after a fork
        # copies dozens of pages): capset's arguments, all sets empty.
        self.cap_header = ctypes.pointer(_CapHeader(_LINUX_CAPABILITY_VERSION_3, 0))
        self.cap_data = (_CapData * 2)()
        #: Capabilities left in the zygote's bounding set: each child drops them.
        self.bounding_set = bounding_set


# --------------------------------------------------------------------------------------------
# The child


def _keep_only_control(control_fd: int, devnull: int) -> None:
    for target in (0, 1, 2):
        os.dup2(devnull, target)
    if control_fd != CHILD_CONTROL_FD:
        os.dup2(control_fd, CHILD_CONTROL_FD)  # inheritable copy; the original closes below
    os.closerange(CHILD_CONTROL_FD + 1, 1 << 20)
    os.set_inheritable(CHILD_CONTROL_FD, False)


def _fresh_mounts(config: Config) -> None:
    # A copy of the zygote's mount tree, private like it (made so in main): nothing mounted
    # here propagates anywhere, and nothing propagates in.
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
    scratch = f"size={config.tmpfs_bytes},mode=1777"
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, scratch)  # noqa: S108
    _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, scratch)  # noqa: S108
    for path, options in config.mounts:  # /input and /output, made while still root
        _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, options)
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    _mount(
        "devpts",
        "/dev/pts",
        "devpts",
        MS_NOSUID | MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=620",
    )
    os.chdir("/tmp")  # noqa: S108


def _drop_privileges(uid: int, config: Config) -> None:
    for which, value in config.rlimits.items():
        resource.setrlimit(which, (value, value))
    for cap in config.bounding_set:  # what the zygote kept; the rest it dropped at start
        _check(_prctl(PR_CAPBSET_DROP, cap), "PR_CAPBSET_DROP")
    _check(_prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL), "PR_CAP_AMBIENT")
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)  # a non-zero uid empties the permitted and effective sets
    _check(_libc.capset(config.cap_header, config.cap_data), "capset")  # and the inheritable set
    _check(_prctl(PR_SET_NO_NEW_PRIVS, 1), "PR_SET_NO_NEW_PRIVS")
    # The uid change made the process non-dumpable, which would leave its /proc/self files
    # to root (unreadable to the program itself); an exec would have reset it, as here. Only
    # this execution has this uid, and ptrace is denied by seccomp anyway.
    _check(_prctl(PR_SET_DUMPABLE, 1), "PR_SET_DUMPABLE")
    # Cleared by the uid change; re-armed: the zygote's death kills this child.
    _check(_prctl(PR_SET_PDEATHSIG, signal.SIGKILL), "PR_SET_PDEATHSIG")
    if config.seccomp_bpf:
        _check(
            _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(config.prog)),
            "seccomp",
        )


def _ready_streams() -> tuple[int, int]:
    """Make the output pipes and report ready with their read ends; return the write ends.

    The one ``R`` byte carries the read ends (``SCM_RIGHTS``) and, from the kernel, this
    process's host pid and uid (``SCM_CREDENTIALS``): the service checks the uid, and needs
    no descriptor work of its own when a request comes. stdout and stderr stay ``/dev/null``
    until then.
    """
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    control = socket.socket(fileno=CHILD_CONTROL_FD)
    try:
        socket.send_fds(control, [b"R"], [out_r, err_r])
    finally:
        control.detach()
    os.close(out_r)
    os.close(err_r)
    return out_w, err_w


def _await_request(out_w: int, err_w: int) -> tuple[int, bytes]:
    """Wait for the first byte on the control socket: (channel fd, bytes already read).

    Either the service writes the start frame on it (it is the channel then, and ``out_w`` and
    ``err_w`` become stdout and stderr; a frame's first byte is 0, headers being smaller than
    16 MiB), or it sends ``F`` with a channel, stdout and stderr of its own (``SCM_RIGHTS``,
    :meth:`ForkServerBackend.spawn`).
    """
    control = socket.socket(fileno=CHILD_CONTROL_FD)
    try:
        data, fds, _, _ = socket.recv_fds(control, 1, 3)
    finally:
        control.detach()
    if not fds:
        if not data:
            raise EOFError("the service closed the channel")
        channel, out, err = CHILD_CONTROL_FD, out_w, err_w
    elif data == b"F" and len(fds) == 3:
        channel, out, err = fds
        os.close(out_w)
        os.close(err_w)
        os.close(CHILD_CONTROL_FD)
        data = b""
    else:
        raise EOFError("unexpected descriptors")
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.close(out)
    os.close(err)
    return channel, data


def _warm_child(code: types.CodeType) -> None:
    """Run the operator's warm-up again, in this child, before it reports ready.

    In the zygote it paid the modules' first-use costs once; here it makes this child's own
    copies of the pages a program like it writes (reference counts, caches), while the child
    waits in the pool rather than on a request's path. It ran in the zygote, so a failure
    here is not the operator's: the child goes on, only colder.
    """
    with contextlib.suppress(Exception):
        exec(code, {"__name__": "__warmup__"})  # noqa: S102


def child_main(
    control_fd: int, join: list[int], uid: int, config: Config, devnull: int, netns: int
) -> None:
    """Everything between the fork and the program; never returns.

    ``join``: ``cgroup.procs`` files to write itself into; ``netns``: the network namespace
    this child alone may use (see :class:`NetnsLease`).
    """
    code = EXIT_SETUP_FAILED
    try:
        for fd in join:
            os.write(fd, b"0")  # 0: the writer; the kernel checks the opener's credentials
            os.close(fd)
        _check(_libc.setns(netns, CLONE_NEWNET), "setns(CLONE_NEWNET)")
        signal.set_wakeup_fd(-1)
        # The C function, not signal.signal: its enum wrapping copies pages shared with the
        # zygote the first time in each child.
        _guest.C_SIGNAL.signal(_guest.C_SIGNAL.SIGCHLD, _guest.C_SIGNAL.SIG_DFL)
        _keep_only_control(control_fd, devnull)
        _fresh_mounts(config)
        _drop_privileges(uid, config)
        if config.home:
            _guest.make_home(config.home)
        _guest.warm_up()
        if config.warmup is not None:
            _warm_child(config.warmup)
        out_w, err_w = _ready_streams()
        code = EXIT_NO_FDS
        channel, prefix = _await_request(out_w, err_w)
        code = 0
        _guest.serve_one(channel, prefix)
    except BaseException:  # the exit code is the report
        os._exit(code or EXIT_SETUP_FAILED)
    # As the one-shot guest: no interpreter teardown, the service kills the tree anyway.
    os._exit(0)


# --------------------------------------------------------------------------------------------
# The zygote


class NetnsLease:
    """Empty network namespaces, each lent to one child at a time and taken back at its reaping.

    Making a network namespace costs the child a visible share of its start, and destroying
    one costs a kernel worker about as much again plus an expedited RCU grace period (an IPI
    to every CPU), for each execution. So a namespace outlives its child and is lent to a
    later one, never to two at once. Nothing of the earlier child is left in it when it is
    lent again:

    - it is taken back only when the zygote reaps the child, which is pid 1 of its own pid
      namespace; the kernel reaps every other process of that namespace before pid 1 can be
      reaped, and no process of an execution is outside it (seccomp denies new namespaces, so
      nothing can nest elsewhere), so no socket of the execution is open any more;
    - a child can change nothing that outlives its sockets: it has no capability in the
      namespace's owner (the initial user namespace), so it cannot bring ``lo`` up, add an
      interface, a route, a firewall rule or a sysctl; with ``lo`` down no TCP state (such as
      TIME_WAIT) can exist, and abstract Unix names go with their sockets.

    Made by the zygote (``unshare`` then ``setns`` back), ``CAP_SYS_ADMIN`` being one it keeps.
    """

    #: Namespaces kept for reuse beyond those lent out; more are released.
    MAX_FREE = 64

    def __init__(self) -> None:
        self.own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.free: list[int] = []
        self.lent: dict[int, int] = {}  # child pid -> namespace fd

    def take(self) -> int:
        """A namespace no child uses: one given back, else a new one."""
        if self.free:
            return self.free.pop()
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        try:
            fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            _check(_libc.setns(self.own, CLONE_NEWNET), "setns back")
        return fd

    def lend(self, pid: int, fd: int) -> None:
        self.lent[pid] = fd

    def give_back(self, fd: int) -> None:
        """Return a namespace that no process uses (never lent, or its child reaped)."""
        if len(self.free) < self.MAX_FREE:
            self.free.append(fd)
        else:
            os.close(fd)

    def reaped(self, pid: int) -> None:
        fd = self.lent.pop(pid, None)
        if fd is not None:
            self.give_back(fd)


class Zygote:
    """The fork loop: requests on the control socket, exits reported as they happen."""

    def __init__(self, control: socket.socket, config: Config) -> None:
        self.control = control
        self.config = config
        self.children: dict[int, int] = {}  # pid -> request id
        self.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self.own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.netns = NetnsLease()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def send(self, kind: bytes, request: int, value: int, text: str = "") -> None:
        self.control.send(MESSAGE.pack(kind, request, value) + text.encode())

    def fork(self, request: int, uid: int, control_fd: int, join: list[int]) -> None:
        # The next child is pid 1 of a new pid namespace; the zygote's own children after it
        # would join that namespace, so it goes back to its own right after the fork.
        netns = self.netns.take()
        try:
            _check(_libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
        except OSError:
            self.netns.give_back(netns)
            raise
        try:
            pid = _fork()
        except OSError:
            _check(_libc.setns(self.own_pidns, CLONE_NEWPID), "setns")
            self.netns.give_back(netns)
            raise
        if pid == 0:
            child_main(control_fd, join, uid, self.config, self.devnull, netns)
        self.netns.lend(pid, netns)
        _check(_libc.setns(self.own_pidns, CLONE_NEWPID), "setns")
        os.close(control_fd)
        self.children[pid] = request  # the child reports itself (its ready byte)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.netns.reaped(pid)  # its pid namespace is empty: nothing uses it any more
            request = self.children.pop(pid, None)
            if request is not None:
                self.send(b"X", request, status)

    def kill(self, request: int) -> None:
        for pid, owner in self.children.items():
            if owner == request:
                os.kill(pid, signal.SIGKILL)

    def handle(self) -> bool:
        try:
            data, fds, _, _ = socket.recv_fds(self.control, 4096, 1 + MAX_JOIN_FDS)
        except BlockingIOError:
            return True
        if not data:
            for fd in fds:
                os.close(fd)
            return False
        # Anything not of the service's one layout is ignored.
        kind, request, value = MESSAGE.unpack(data) if len(data) == MESSAGE.size else (b"", 0, 0)
        if kind == b"F" and fds:
            try:
                self.fork(request, value, fds[0], fds[1:])
            except OSError as exc:
                os.close(fds[0])
                self.send(b"E", request, exc.errno or 0, str(exc))
            finally:
                for fd in fds[1:]:
                    os.close(fd)
        elif kind == b"K":
            for fd in fds:
                os.close(fd)
            self.kill(request)
        else:
            for fd in fds:
                os.close(fd)
        return True

    def run(self) -> None:
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self.wake_w)
        selector = selectors.DefaultSelector()
        selector.register(self.control, selectors.EVENT_READ, "control")
        selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        self.send(b"S", 0, os.getpid())  # ready
        while True:
            for key, _ in selector.select():
                if key.data == "wake":
                    with contextlib.suppress(BlockingIOError):
                        while os.read(self.wake_r, 512):
                            pass
                    self.reap()
                elif not self.handle():
                    return  # the service closed the control socket: stop (children die)
            self.reap()


def _narrow_bounding_set() -> list[int]:
    """Keep in the bounding set only the capabilities bwrap left effective; return those."""
    with open("/proc/self/status") as status:
        line = next(x for x in status if x.startswith("CapEff:"))
    effective = int(line.split()[1], 16)
    cap = 0
    while cap < 64:
        if not effective & (1 << cap) and _prctl(PR_CAPBSET_DROP, cap) != 0:
            if ctypes.get_errno() == errno.EINVAL:
                break  # past the last capability of this kernel
            raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")
        cap += 1
    return [kept for kept in range(64) if effective & (1 << kept)]


def _prepare(site_dirs: list[str], preloads: list[str], warmup: str = "") -> None:
    """Import, ahead of every child, what the guest runtime and common programs need.

    ``site_dirs`` (the sandbox venv's site-packages) go on the path first; ``preloads`` are
    the operator's modules, and ``warmup`` the operator's code run once after them (the
    first use of those modules, paid here rather than in every child). One that fails ends
    the zygote with its traceback on stderr, which the service reports as the reason it
    cannot start.
    """
    global _guest
    # This folder is the package ``guest``: its parent goes on the path (``-I`` left it off).
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    importlib.import_module("asyncio")  # a program that awaits should not pay its import
    _guest = importlib.import_module("guest.runtime")
    _guest.add_site_dirs(site_dirs)
    _guest.prime()  # the request path specialised here, not again in every child
    for name in preloads:
        try:
            importlib.import_module(name)
        except BaseException:
            import traceback

            sys.stderr.write(f"preloading {name!r} failed:\n{traceback.format_exc()}")
            sys.stderr.flush()
            os._exit(1)
    if warmup:
        try:
            exec(compile(warmup, "<preload_warmup>", "exec"), {"__name__": "__warmup__"})  # noqa: S102 - the operator's own code
        except BaseException:
            import traceback

            sys.stderr.write(f"preload_warmup failed:\n{traceback.format_exc()}")
            sys.stderr.flush()
            os._exit(1)
    # Everything imported so far is shared with every child, copy-on-write: keep the cyclic
    # collector's generations (and their writes) off those pages in the children.
    gc.collect()
    gc.freeze()


def main(argv: list[str]) -> None:
    """``zygote.py CONTROL_FD SECCOMP_FD CONFIG_JSON`` (SECCOMP_FD -1: no filter)."""
    control_fd, seccomp_fd, raw = int(argv[1]), int(argv[2]), json.loads(argv[3])
    bpf = b""
    if seccomp_fd >= 0:
        chunks = []
        while chunk := os.read(seccomp_fd, 65536):
            chunks.append(chunk)
        os.close(seccomp_fd)
        bpf = b"".join(chunks)
    _check(_prctl(PR_SET_NO_NEW_PRIVS, 1), "PR_SET_NO_NEW_PRIVS")
    # Every mount private, once: each child's copy of the tree is then private too, without
    # a walk of all its mounts per child.
    _mount("none", "/", None, MS_REC | MS_PRIVATE, None)
    bounding_set = _narrow_bounding_set()
    _prepare(
        list(raw.get("sys_path") or ()), list(raw.get("preload") or ()), raw.get("warmup") or ""
    )
    global _RAW_FORK
    if len(os.listdir("/proc/self/task")) != 1:  # nothing here starts a thread, but check
        _RAW_FORK = False
    control = socket.socket(fileno=control_fd)
    os.set_inheritable(control_fd, False)
    Zygote(control, Config(raw, bpf, bounding_set)).run()


if __name__ == "__main__":
    main(sys.argv)
