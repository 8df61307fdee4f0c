"""The bubblewrap backend: one fresh kernel sandbox per execution.

Launch chain, per execution (the service runs as root)::

    /bin/sh launcher       joins the execution's cgroups, sets rlimit backstops, execs
      bwrap (root)         new pid/net/ipc/uts/mount/cgroup namespaces; a root file system of
                           read-only binds (the Python runtime and its shared libraries, guest.py)
                           and private size-bounded tmpfs /tmp and /dev/shm; loads the seccomp
                           filter with no_new_privs; execs, as pid 1 of the new pid namespace,
        setpriv            drops to a non-root host uid/gid of its own (one per live execution),
                           clears groups, the bounding, inheritable and ambient capability sets
          python -I -S -B /codemode/guest.py --fds-from CONTROL_FD

Sandboxes are started ahead of need (``pool_size``, default 2): the guest imports its runtime and
waits on a control socket; ``spawn`` hands it the channel, stdout and stderr in one
``SCM_RIGHTS`` message (~0.2 ms) instead of paying ~45 ms of launch (of which ~12 ms is joining
a v1 cgroup and ~25 ms Python's start). Each sandbox still serves exactly one execution.

bwrap runs as real root without a user namespace, so it can bind a runtime that the sandbox uid
could not reach on the host (``/root`` is 0700 here), and the guest's kernel uid is unprivileged
in the initial user namespace: writes to ``/proc/sys`` fail and ``RLIMIT_NPROC`` applies. Each
live execution gets its own uid, so one execution's processes never count against another's
``RLIMIT_NPROC``.

The guest is pid 1 of its pid namespace: when it exits, or is killed, the kernel kills every
process left in the namespace, so :meth:`GuestProcess.kill` is one ``SIGKILL`` through a pidfd.
Memory and process counts are capped by a per-execution cgroup (v1 or v2) when the host offers
the controllers; the group also tells whether a limit was hit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import sysconfig
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Protocol, TypedDict, TypeVar, Unpack

from codemode.executor import cgroups, seccomp
from codemode.executor.sandbox import (
    GUEST_PATH,
    GuestExit,
    GuestFds,
    GuestProcess,
    SandboxBackend,
    SandboxLimits,
)

logger = logging.getLogger("codemode.executor")

#: Where guest.py appears inside the sandbox.
GUEST_MOUNT = "/codemode/guest.py"
#: First host uid handed to sandboxes: above the ranges systemd and container tools allocate
#: (0x00080000-0x6FFFFFFF), below the values tools treat as negative.
DEFAULT_UID_BASE = 0x70000000
DEFAULT_UID_COUNT = 4096
#: Sandboxes started ahead of need, so that starting one is off the request path.
DEFAULT_POOL_SIZE = 2
#: Exit status of the launcher when it cannot join the execution's cgroup.
LAUNCH_FAILED = 125
_INFO_TIMEOUT = 10.0
# Paths inside the sandbox: private tmpfs mounts, not the host's shared directories.
_SANDBOX_TMP = "/tmp"  # noqa: S108
_SANDBOX_SHM = "/dev/shm"  # noqa: S108


class LimitsLike(Protocol):
    """Anything with the limit attributes (``SandboxLimits``, the service's ``LimitsConfig``)."""

    @property
    def memory_bytes(self) -> int: ...
    @property
    def max_processes(self) -> int: ...
    @property
    def tmpfs_bytes(self) -> int: ...
    @property
    def cpu_seconds(self) -> float: ...
    @property
    def max_file_bytes(self) -> int: ...
    @property
    def max_open_files(self) -> int: ...


def as_sandbox_limits(limits: LimitsLike | None) -> SandboxLimits:
    """The host-enforced part of ``limits`` as a :class:`SandboxLimits`."""
    if limits is None:
        return SandboxLimits()
    if isinstance(limits, SandboxLimits):
        return limits
    return SandboxLimits(
        memory_bytes=int(limits.memory_bytes),
        max_processes=int(limits.max_processes),
        tmpfs_bytes=int(limits.tmpfs_bytes),
        cpu_seconds=int(-(-limits.cpu_seconds // 1)),  # whole seconds, rounded up
        max_file_bytes=int(limits.max_file_bytes),
        max_open_files=int(limits.max_open_files),
    )


class SandboxUnavailable(RuntimeError):
    """This host cannot give the isolation this backend promises; the message says what lacks."""


# --------------------------------------------------------------------------------------------
# The runtime's files


@dataclass(frozen=True, slots=True)
class RuntimeLayout:
    """The host files a guest needs, as bwrap should lay them out (all read-only)."""

    executable: str
    dirs: tuple[str, ...]
    binds: tuple[str, ...]
    symlinks: tuple[tuple[str, str], ...]  # (path in sandbox, link target)
    masks: tuple[str, ...]  # directories hidden behind an empty read-only tmpfs
    setpriv: str


def _resolve(path: str, links: dict[str, str], depth: int = 0) -> str:
    """The real path of ``path``, recording every symlink met (at its resolved parent)."""
    if depth > 40:
        raise OSError(f"too many levels of symbolic links resolving {path}")
    parts = [p for p in os.path.normpath(path).split("/") if p]
    current = "/"
    for index, part in enumerate(parts):
        candidate = os.path.join(current, part)
        if os.path.islink(candidate):
            target = os.readlink(candidate)
            links[candidate] = target
            base = target if target.startswith("/") else os.path.join(current, target)
            rest = os.path.join(base, *parts[index + 1 :])
            return _resolve(os.path.normpath(rest), links, depth + 1)
        current = candidate
    return current


def _ldd(paths: Sequence[str]) -> set[str]:
    """Shared objects (absolute paths) that ``paths`` load, as the dynamic loader resolves them."""
    import subprocess

    ldd = shutil.which("ldd")
    if ldd is None:
        raise SandboxUnavailable("ldd is missing (Debian package libc-bin)")
    out = subprocess.run(
        [ldd, *paths], capture_output=True, text=True, check=False, env={"LC_ALL": "C"}
    ).stdout
    found: set[str] = set()
    for line in out.splitlines():
        if not line.startswith("\t"):
            continue  # a "file:" header when several files are listed
        for token in line.split():
            if token.startswith("/"):
                found.add(token)
    return found


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def discover_runtime(executable: str | None = None) -> RuntimeLayout:
    """Lay out this interpreter, its standard library and shared libraries, and setpriv."""
    exe = os.path.realpath(executable or sys.executable)
    stdlib = sysconfig.get_path("stdlib")
    dynload = sysconfig.get_config_var("DESTSHARED") or os.path.join(stdlib, "lib-dynload")
    setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
    if not os.path.exists(setpriv):
        raise SandboxUnavailable("setpriv is missing (Debian package util-linux)")
    if not os.path.isfile(os.path.join(stdlib, "os.py")):
        raise SandboxUnavailable(f"no standard library found at {stdlib}")
    extensions = sorted(str(p) for p in Path(dynload).glob("*.so"))
    links: dict[str, str] = {}
    wanted = {exe, setpriv, stdlib, *_ldd([exe, setpriv, *extensions])}
    real = {_resolve(p, links) for p in wanted}
    exe_real, setpriv_real = _resolve(exe, links), _resolve(setpriv, links)
    dir_binds = sorted(p for p in real if os.path.isdir(p))
    binds = sorted(
        p for p in real if not any(_is_under(p, d) and p != d for d in dir_binds)
    )  # a file inside a bound directory comes with it
    masks = []
    for candidate in ("site-packages", "dist-packages"):
        path = os.path.join(_resolve(stdlib, links), candidate)
        if os.path.isdir(path):
            masks.append(path)
    placed = [*binds, *links, os.path.dirname(GUEST_MOUNT)]
    dirs: set[str] = set()
    for path in placed:
        parent = os.path.dirname(path)
        while parent != "/":
            if parent not in links and not any(_is_under(parent, d) for d in dir_binds):
                dirs.add(parent)
            parent = os.path.dirname(parent)
    dirs.add(os.path.dirname(GUEST_MOUNT))
    return RuntimeLayout(
        executable=exe_real if os.path.exists(exe_real) else exe,
        dirs=tuple(sorted(dirs, key=lambda d: (d.count("/"), d))),
        binds=tuple(binds),
        symlinks=tuple(sorted(links.items())),
        masks=tuple(masks),
        setpriv=setpriv_real,
    )


# --------------------------------------------------------------------------------------------
# What the bubblewrap-based backends (this one and the fork server) share


def _bwrap_namespaces(bwrap: str) -> list[str]:
    """bwrap's options for fresh namespaces, a session of its own and a clean environment."""
    return [
        bwrap,
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--hostname",
        "codemode",
        "--die-with-parent",
        "--new-session",
        "--as-pid-1",
        "--clearenv",
        "--setenv",
        "LANG",
        "C.UTF-8",
    ]


def _bwrap_runtime(layout: RuntimeLayout) -> list[str]:
    """bwrap's options for the read-only runtime file system, guest.py included."""
    argv: list[str] = []
    for directory in layout.dirs:
        argv += ["--perms", "0755", "--dir", directory]
    for path in layout.binds:
        argv += ["--ro-bind", path, path]
    for dest, target in layout.symlinks:
        argv += ["--symlink", target, dest]
    for mask in layout.masks:
        argv += ["--perms", "0555", "--size", "4096", "--tmpfs", mask, "--remount-ro", mask]
    argv += ["--ro-bind", str(GUEST_PATH.resolve()), GUEST_MOUNT]
    return argv


async def _start_bwrap(
    argv: Callable[[int | None, int], list[str]],
    pass_fds: Sequence[int],
    seccomp_bpf: bytes | None,
    *,
    stderr: int,
) -> tuple[asyncio.subprocess.Process, int]:
    """Start ``argv(seccomp_fd, info_fd)`` with the seccomp filter and bwrap's info fd on pipes.

    Returns the process and the (non-blocking) read end of the info pipe, which the caller
    closes; every other descriptor made here is closed, also when the start fails.
    """
    opened: list[int] = []
    try:
        seccomp_fd: int | None = None
        if seccomp_bpf is not None:
            seccomp_fd, seccomp_w = os.pipe()
            opened.append(seccomp_fd)
            try:
                os.write(seccomp_w, seccomp_bpf)  # far below a pipe's capacity
            finally:
                os.close(seccomp_w)
        info_r, info_w = os.pipe()
        opened += [info_r, info_w]
        os.set_blocking(info_r, False)
        passed = [*pass_fds, info_w] + ([seccomp_fd] if seccomp_fd is not None else [])
        proc = await asyncio.create_subprocess_exec(
            *argv(seccomp_fd, info_w),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
            pass_fds=passed,
            env={"LANG": "C.UTF-8"},
            cwd="/",
        )
    except BaseException:
        for fd in opened:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    for fd in opened:
        if fd != info_r:
            os.close(fd)
    return proc, info_r


async def _child_pidfd(
    info_r: int, proc: asyncio.subprocess.Process
) -> tuple[int | None, int | None]:
    """bwrap's child's host pid (from the info pipe, closed here) and a pidfd on it, or Nones."""
    try:
        pid = await _read_child_pid(info_r, proc)
    finally:
        os.close(info_r)
    pidfd: int | None = None
    if pid is not None:
        with contextlib.suppress(OSError):
            pidfd = os.pidfd_open(pid)
    return pid, pidfd


def _pidfd_kill(pidfd: int) -> bool:
    """``SIGKILL`` through a pidfd (it cannot hit a reused pid); False if it could not be sent."""
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except OSError:
        return False
    return True


def _guest_exit(code: int, memory: bool, pids: bool) -> GuestExit:
    """A guest's end from its exit code (negative: the signal that killed it)."""
    if code < 0:
        return GuestExit(None, signal=-code, memory_exceeded=memory, pids_exceeded=pids)
    return GuestExit(code, memory_exceeded=memory, pids_exceeded=pids)


class _HostGuest(GuestProcess):
    """A guest in a sandbox of its own, as a host uid of its own, killed through a pidfd."""

    #: The host uid (and gid) the guest runs as; no other live guest has it.
    uid: int
    _control: socket.socket | None
    _pidfd: int | None
    _kill_requested: bool
    _exited: asyncio.Future[GuestExit]

    def _close_control(self) -> None:
        raise NotImplementedError

    def _send_fds(self, control: socket.socket, fds: GuestFds) -> bool:
        """Send the waiting guest its channel, stdout and stderr; False if it is gone."""
        try:
            control.setblocking(True)
            socket.send_fds(control, [b"F"], [fds.channel, fds.stdout, fds.stderr])
        except OSError:
            return False
        finally:
            self._close_control()
        return True

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    async def wait(self) -> GuestExit:
        return await asyncio.shield(self._exited)


_G = TypeVar("_G", bound=_HostGuest)


class BackendOptions(TypedDict, total=False):
    """What a bubblewrap-based backend takes besides its limits (see _HostSandboxBackend)."""

    uid_base: int
    uid_count: int
    bwrap: str | None
    require_seccomp: bool
    require_cgroups: bool
    pool_size: int


class _HostSandboxBackend(SandboxBackend, Generic[_G]):
    """A bubblewrap-based backend: root on the host, one non-root uid per live guest, the
    seccomp filter, cgroup limits where the host has the controllers, a pool of guests."""

    isolated = True
    #: Why the backend must run as root, for the error when it does not.
    _needs_root = ""

    #: Guests started ahead of need when ``pool_size`` is not given.
    default_pool_size = DEFAULT_POOL_SIZE

    def __init__(
        self,
        limits: LimitsLike | None = None,
        *,
        uid_base: int = DEFAULT_UID_BASE,
        uid_count: int = DEFAULT_UID_COUNT,
        bwrap: str | None = None,
        require_seccomp: bool = True,
        require_cgroups: bool = False,
        pool_size: int | None = None,
    ) -> None:
        if uid_base <= 0 or uid_count <= 0 or uid_base + uid_count >= 0xFFFFFFFF:
            raise ValueError("uid_base/uid_count must name a range of non-root uids")
        self.limits = as_sandbox_limits(limits)
        self.uid_base = uid_base
        self.uid_count = uid_count
        self._bwrap = bwrap
        self.require_seccomp = require_seccomp
        self.require_cgroups = require_cgroups
        self.pool_size = max(0, self.default_pool_size if pool_size is None else pool_size)
        self.layout: RuntimeLayout | None = None
        self.cgroup_support: cgroups.CgroupSupport | None = None
        self._cgroups: cgroups.BackendCgroups | None = None
        self._missing_controllers: list[str] = []
        self._seccomp_bpf: bytes | None = None
        self.seccomp_problem: str | None = None
        self._bwrap_path = ""
        self._uids_in_use: set[int] = set()
        self._uid_cursor = 0
        self._pool: collections.deque[_G] = collections.deque()
        self._refill_task: asyncio.Task[None] | None = None
        self._start_lock = asyncio.Lock()
        self._started = False
        self._closed = False

    # -- setup ---------------------------------------------------------------------------

    async def start(self) -> None:
        async with self._start_lock:
            if self._started:
                return
            if self._closed:
                raise RuntimeError("backend is closed")
            await asyncio.to_thread(self._prepare)
            await self._warm_up()
            self._started = True
            self._schedule_refill()

    async def _warm_up(self) -> None:
        """What starts once the host is prepared, before the first guest. Default: nothing."""

    def _prepare(self) -> None:
        """Check the host and lay out what every sandbox needs (in a thread: it runs ldd)."""
        if os.geteuid() != 0:
            raise SandboxUnavailable(self._needs_root)
        bwrap = self._bwrap or shutil.which("bwrap")
        if bwrap is None:
            raise SandboxUnavailable("bwrap is missing (Debian package bubblewrap)")
        self._bwrap_path = bwrap
        self.layout = discover_runtime()
        try:
            self._seccomp_bpf = seccomp.build_filter_bpf()
        except seccomp.SeccompUnavailable as exc:
            self.seccomp_problem = str(exc)
            if self.require_seccomp:
                raise SandboxUnavailable(str(exc)) from None
        support = cgroups.discover()
        self.cgroup_support = support
        self._missing_controllers = [c for c in cgroups.CONTROLLERS if not support.has(c)]
        if self._missing_controllers and self.require_cgroups:
            raise SandboxUnavailable(
                "cgroup controllers unavailable: " + "; ".join(support.problems)
            )
        if support.sites:
            cgroups.sweep_stale(support)
            self._cgroups = cgroups.BackendCgroups(support)
            self._cgroups.create()
        self._prepared(bwrap, self.layout)

    def _prepared(self, bwrap: str, layout: RuntimeLayout) -> None:
        """Build what depends on the prepared host (still in the thread). Default: nothing."""

    # -- uids ----------------------------------------------------------------------------

    def _take_uid(self) -> int:
        """The next uid of the range not in use, round robin: a uid is reused as late as can be."""
        for _ in range(self.uid_count):
            uid = self.uid_base + self._uid_cursor
            self._uid_cursor = (self._uid_cursor + 1) % self.uid_count
            if uid not in self._uids_in_use:
                self._uids_in_use.add(uid)
                return uid
        raise SandboxUnavailable(f"all {self.uid_count} sandbox uids are in use")

    def _give_uid(self, uid: int) -> None:
        self._uids_in_use.discard(uid)

    # -- the pool ------------------------------------------------------------------------

    def _schedule_refill(self) -> None:
        if self.pool_size <= 0 or self._closed:
            return
        if self._refill_task is None or self._refill_task.done():
            self._refill_task = asyncio.ensure_future(self._refill())

    async def _refill(self) -> None:
        raise NotImplementedError

    # -- the end -------------------------------------------------------------------------

    async def close(self) -> None:
        self._closed = True
        if self._refill_task is not None:
            # Not cancelled: a launch cut short could leave a process nobody supervises. The
            # task stops after its current launch and kills what that launch started.
            with contextlib.suppress(Exception):
                await self._refill_task
        self._pool.clear()
        await self._stop_guests()
        if self._cgroups is not None:
            for _ in range(500):
                if self._cgroups.remove():
                    break
                await asyncio.sleep(0.002)
            else:
                logger.warning("could not remove the sandbox cgroups of this backend")
            self._cgroups = None

    async def _stop_guests(self) -> None:
        """Kill every guest still alive and wait until each is cleaned up."""
        raise NotImplementedError

    def describe(self) -> dict[str, str]:
        """What this backend enforces on this host, for logs and ``codemode doctor``."""
        support = self.cgroup_support
        controllers = sorted(support.sites) if support else []
        return {
            "backend": self.name,
            "uids": f"{self.uid_base}..{self.uid_base + self.uid_count - 1}",
            "seccomp": "on" if self._seccomp_bpf else f"OFF ({self.seccomp_problem})",
            "cgroups": ", ".join(controllers) or "none (rlimits only)",
            "cgroup_problems": "; ".join(support.problems) if support else "",
        }


# --------------------------------------------------------------------------------------------
# The backend


@dataclass(slots=True)
class _Running:
    guest: _BwrapGuest
    finished: asyncio.Task[GuestExit] = field(repr=False)


class BwrapBackend(_HostSandboxBackend["_BwrapGuest"]):
    """A bubblewrap sandbox per execution, as a non-root uid, with seccomp and cgroup limits."""

    name = "bwrap"
    _needs_root = (
        "the bwrap backend starts sandboxes as root and drops each to its own uid; "
        "run the service as root (or use another backend)"
    )

    def __init__(self, limits: LimitsLike | None = None, **options: Unpack[BackendOptions]) -> None:
        super().__init__(limits, **options)
        self._argv_head: list[str] = []
        self._launcher = ""
        self._running: dict[int, _Running] = {}

    # -- setup ---------------------------------------------------------------------------

    def _prepared(self, bwrap: str, layout: RuntimeLayout) -> None:
        self._argv_head = self._build_argv_head(bwrap, layout)
        self._launcher = self._build_launcher(self._missing_controllers)

    def _build_argv_head(self, bwrap: str, layout: RuntimeLayout) -> list[str]:
        tmpfs = str(self.limits.tmpfs_bytes or 64 << 20)
        argv = _bwrap_namespaces(bwrap) + _bwrap_runtime(layout)
        argv += ["--proc", "/proc", "--dev", "/dev"]
        argv += ["--perms", "01777", "--size", tmpfs, "--tmpfs", _SANDBOX_TMP]
        argv += ["--perms", "01777", "--size", tmpfs, "--tmpfs", _SANDBOX_SHM]
        argv += ["--remount-ro", "/", "--chdir", _SANDBOX_TMP]
        return argv

    def _build_launcher(self, missing_controllers: Iterable[str]) -> str:
        limits = self.limits
        ulimits: list[str] = []
        if limits.cpu_seconds > 0:
            ulimits.append(f"ulimit -t {limits.cpu_seconds + 1}")
        if limits.max_file_bytes > 0:
            ulimits.append(f"ulimit -f {(limits.max_file_bytes + 511) // 512}")
        if limits.max_open_files > 0:
            ulimits.append(f"ulimit -n {limits.max_open_files}")
        if limits.max_processes > 0:
            ulimits.append(f"ulimit -p {limits.max_processes}")  # RLIMIT_NPROC, per uid
        if limits.memory_bytes > 0 and "memory" in set(missing_controllers):
            # No memory cgroup: bound the address space instead (coarser, but a bound).
            ulimits.append(f"ulimit -v {limits.memory_bytes // 1024}")
        join = f'while [ "$1" != -- ]; do echo $$ >"$1" || exit {LAUNCH_FAILED}; shift; done; shift'
        return "; ".join([join, *ulimits, 'exec "$@"'])

    # -- spawning ------------------------------------------------------------------------

    def command(self, uid: int, seccomp_fd: int | None, info_fd: int, control_fd: int) -> list[str]:
        """The bwrap command line for one sandbox (without the launcher)."""
        assert self.layout is not None
        argv = list(self._argv_head)
        if seccomp_fd is not None:
            argv += ["--seccomp", str(seccomp_fd)]
        argv += ["--info-fd", str(info_fd), "--"]
        argv += [
            self.layout.setpriv,
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            "--no-new-privs",
            "--bounding-set=-all",
            "--inh-caps=-all",
            "--ambient-caps=-all",
            "--",
            self.layout.executable,
            "-I",
            "-S",
            "-B",
            GUEST_MOUNT,
            "--fds-from",
            str(control_fd),
        ]
        return argv

    async def spawn(self, fds: GuestFds) -> GuestProcess:
        if self._closed:
            raise RuntimeError("backend is closed")
        await self.start()
        for _ in range(3):
            guest = self._pool.popleft() if self._pool else await self._launch()
            self._schedule_refill()
            await guest._pid_known.wait()
            if guest._hand_over(fds):
                return guest
            guest.kill()  # it died while waiting; its supervisor cleans up
        raise SandboxUnavailable("sandboxes die before they can be used; run `codemode doctor`")

    async def _refill(self) -> None:
        while not self._closed and len(self._pool) < self.pool_size:
            try:
                guest = await self._launch()
            except (OSError, SandboxUnavailable) as exc:
                logger.warning("could not pre-start a sandbox: %s", exc)
                return
            if self._closed:
                guest.kill()
                return
            self._pool.append(guest)

    async def _launch(self) -> _BwrapGuest:
        """Start one sandbox whose guest waits for its descriptors on a control socket."""
        uid = self._take_uid()
        group: cgroups.ExecutionCgroup | None = None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self._cgroups is not None:
                group = self._cgroups.new_execution(
                    self.limits.memory_bytes, self.limits.max_processes
                )
            procs_files = group.procs_files if group else []
            proc, info_r = await _start_bwrap(
                lambda seccomp_fd, info_fd: [
                    "/bin/sh",
                    "-c",
                    self._launcher,
                    "codemode-launch",
                    *procs_files,
                    "--",
                    *self.command(uid, seccomp_fd, info_fd, theirs.fileno()),
                ],
                [theirs.fileno()],
                self._seccomp_bpf,
                stderr=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            if group is not None:
                group.kill_all()
                group.remove_now()
            self._give_uid(uid)
            raise
        finally:
            theirs.close()
        guest = _BwrapGuest(proc, group, ours, uid)
        finished = asyncio.ensure_future(self._supervise(guest, info_r, uid))
        self._running[id(guest)] = _Running(guest, finished)
        guest._finished = finished
        return guest

    async def _supervise(self, guest: _BwrapGuest, info_r: int, uid: int) -> GuestExit:
        """Learn the guest's host pid, wait for the end of everything, clean up."""
        try:
            _, guest._pidfd = await _child_pidfd(info_r, guest._proc)
            guest._pid_known.set()
            if guest._kill_requested:
                guest.kill()
            code = await guest._proc.wait()
            await guest._wait_pidfd()
            # Every process of the sandbox is gone: wait() may return now, the rest is cleanup.
            outcome = guest._outcome(code)
            if not guest._exited.done():
                guest._exited.set_result(outcome)
            await guest._remove_group()
            return outcome
        except BaseException as exc:
            if not guest._exited.done():
                guest._exited.set_exception(exc)
                guest._exited.exception()  # retrieved: close() reports through its task
            raise
        finally:
            guest._pid_known.set()
            guest._close_pidfd()
            guest._close_control()
            if guest._outer_pidfd is not None:
                os.close(guest._outer_pidfd)
                guest._outer_pidfd = None
            self._give_uid(uid)
            self._running.pop(id(guest), None)

    async def _stop_guests(self) -> None:
        running = list(self._running.values())
        for entry in running:
            entry.guest.kill()
        if running:
            await asyncio.gather(*(e.finished for e in running), return_exceptions=True)


async def _read_child_pid(fd: int, proc: asyncio.subprocess.Process) -> int | None:
    """Read bwrap's ``--info-fd`` JSON (``{"child-pid": N, ...}``); None if bwrap died first."""
    loop = asyncio.get_running_loop()
    buf = bytearray()
    readable = asyncio.Event()
    loop.add_reader(fd, readable.set)
    try:
        async with asyncio.timeout(_INFO_TIMEOUT):
            while True:
                try:
                    chunk = os.read(fd, 4096)
                except BlockingIOError:
                    readable.clear()
                    waiter = asyncio.ensure_future(readable.wait())
                    exited = asyncio.ensure_future(proc.wait())
                    await asyncio.wait({waiter, exited}, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    if exited.done() and not readable.is_set():
                        return None
                    exited.cancel()
                    continue
                if not chunk:
                    break
                buf += chunk
                if b"}" in buf:
                    break
    except TimeoutError:
        return None
    finally:
        loop.remove_reader(fd)
    try:
        info = json.loads(bytes(buf))
        pid = int(info["child-pid"])
    except (ValueError, KeyError, TypeError):
        return None
    return pid if pid > 1 else None


class _BwrapGuest(_HostGuest):
    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        group: cgroups.ExecutionCgroup | None,
        control: socket.socket,
        uid: int,
    ) -> None:
        self.uid = uid
        self._proc = proc
        self._group = group
        self._control = control
        # A pidfd stays valid after bwrap is reaped, so a late kill() cannot hit a reused pid.
        self._outer_pidfd: int | None = None
        with contextlib.suppress(ProcessLookupError):
            self._outer_pidfd = os.pidfd_open(proc.pid)
        self._pidfd = None
        self._pid_known = asyncio.Event()
        self._kill_requested = False
        self._finished: asyncio.Future[GuestExit] | None = None
        self._exited = asyncio.get_running_loop().create_future()

    @property
    def pid(self) -> int:
        """The host pid of the outer bwrap process."""
        return self._proc.pid

    def _hand_over(self, fds: GuestFds) -> bool:
        """Give the waiting guest its channel, stdout and stderr; False if it is gone."""
        control = self._control
        if control is None or self._proc.returncode is not None or self._kill_requested:
            return False
        return self._send_fds(control, fds)

    def _close_control(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None

    def kill(self) -> None:
        self._kill_requested = True
        # The guest is pid 1 of its namespace: its death takes every process there along, and
        # bwrap, its parent, reaps it and exits. (Killing bwrap first would leave the guest's
        # zombie to the host's init.)
        if self._pidfd is not None and _pidfd_kill(self._pidfd):
            return
        if self._outer_pidfd is not None:
            # Not Popen.kill(): its poll() could reap bwrap under asyncio's child watcher.
            # bwrap's --die-with-parent then kills the namespace too.
            _pidfd_kill(self._outer_pidfd)
        if self._group is not None:
            self._group.kill_all()

    async def _wait_pidfd(self) -> None:
        """Wait until the namespace's pid 1 is dead (its pidfd turns readable)."""
        if self._pidfd is None:
            return
        loop = asyncio.get_running_loop()
        dead = asyncio.Event()
        loop.add_reader(self._pidfd, dead.set)
        try:
            async with asyncio.timeout(5):
                await dead.wait()
        except TimeoutError:
            _pidfd_kill(self._pidfd)
        finally:
            loop.remove_reader(self._pidfd)

    def _outcome(self, code: int) -> GuestExit:
        """How the guest ended, with the cgroup's verdict on its limits."""
        memory = self._group.memory_exceeded() if self._group is not None else False
        pids = self._group.pids_exceeded() if self._group is not None else False
        if code > 128 and code - 128 in signal.valid_signals():
            code = -(code - 128)  # the launcher's shell reports a signal as 128 + its number
        return _guest_exit(code, memory, pids)

    async def _remove_group(self) -> None:
        """Remove the execution's cgroups, in a thread: a v1 memory rmdir takes ~10 ms."""
        group = self._group
        if group is None:
            return
        for _ in range(500):
            if await asyncio.to_thread(group.try_remove):
                return
            await asyncio.sleep(0.002)
        logger.warning("a sandbox cgroup could not be removed: %s", group.procs_files)
