"""What the bubblewrap-based backends share: launching bwrap, pidfds, uids, the guest pool.

Both :mod:`.bwrap` (a sandbox per execution) and :mod:`.forkserver` (one sandboxed zygote
that forks guests) run as root on the host, give each live guest a non-root uid of its own,
load the seccomp filter of :mod:`.seccomp`, cap memory and processes with a cgroup of
:mod:`.cgroups` where the host has the controllers, and keep guests started ahead in a pool.
The argv builders here are also what ``codemode doctor``'s probe (:mod:`.hostcheck`) starts,
so the check and the backends cannot drift apart.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import json
import logging
import math
import os
import secrets
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Generic, TypeVar

from codemode.config import LimitsConfig
from codemode.executor.guest import GUEST_DIR
from codemode.executor.sandbox import cgroups, seccomp
from codemode.executor.sandbox.environment import (
    GUEST_HOME,
    HOME_TARGET,
    GuestContents,
    IdentityFiles,
    guest_env,
    zoneinfo_binds,
)
from codemode.executor.sandbox.interface import (
    INPUT_DIR,
    OUTPUT_DIR,
    GuestExit,
    GuestFds,
    GuestProcess,
    SandboxBackend,
)
from codemode.executor.sandbox.runtime import (
    GUEST_MOUNT,
    SANDBOX_SITE_PACKAGES,
    RuntimeLayout,
    SandboxUnavailable,
    discover_runtime,
)
from codemode.executor.sandbox.venv import SandboxVenv, inspect_venv

logger = logging.getLogger("codemode.executor")

#: First host uid handed to sandboxes: above the ranges systemd and container tools allocate
#: (0x00080000-0x6FFFFFFF), below the values tools treat as negative.
DEFAULT_UID_BASE = 0x70000000
DEFAULT_UID_COUNT = 4096
#: Sandboxes started ahead of need, so that starting one is off the request path.
DEFAULT_POOL_SIZE = 2
_INFO_TIMEOUT = 10.0
# Paths inside the sandbox: private tmpfs mounts, not the host's shared directories.
SANDBOX_TMP = "/tmp"  # noqa: S108
SANDBOX_SHM = "/dev/shm"  # noqa: S108


#: Inodes of each guest's /output (the service takes at most 4096 entries from it).
_OUTPUT_INODES = 4100


def file_mounts(limits: LimitsConfig) -> list[tuple[str, str]]:
    """The private ``/input`` and ``/output`` of each guest: (path, tmpfs options)."""
    return [
        (INPUT_DIR, f"size={max(limits.max_input_bytes, 4096)},mode=0755"),
        (
            OUTPUT_DIR,
            f"size={max(limits.max_output_files_bytes, 4096)},mode=1777,nr_inodes={_OUTPUT_INODES}",
        ),
    ]


def whole_seconds(seconds: float) -> int:
    """``seconds`` rounded up to a whole second, as rlimits and ``ulimit -t`` take them."""
    return math.ceil(seconds)


def bwrap_namespaces(bwrap: str) -> list[str]:
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


def bwrap_runtime(layout: RuntimeLayout) -> list[str]:
    """bwrap's options for the read-only runtime file system, the guest folder included, and
    the guest's environment."""
    argv: list[str] = []
    for name, value in layout.env:
        argv += ["--setenv", name, value]
    for directory in layout.dirs:
        argv += ["--perms", "0755", "--dir", directory]
    for path in layout.binds:
        argv += ["--ro-bind", path, path]
    for source, dest in layout.files:
        argv += ["--ro-bind", source, dest]
    for dest, target in layout.symlinks:
        argv += ["--symlink", target, dest]
    for mask in layout.masks:
        argv += ["--perms", "0555", "--size", "4096", "--tmpfs", mask, "--remount-ro", mask]
    argv += ["--ro-bind", GUEST_DIR, GUEST_MOUNT]
    return argv


async def start_bwrap(
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


async def child_pidfd(
    info_r: int, proc: asyncio.subprocess.Process
) -> tuple[int | None, int | None]:
    """bwrap's child's host pid (from the info pipe, closed here) and a pidfd on it, or Nones."""
    try:
        pid = await read_child_pid(info_r, proc)
    finally:
        os.close(info_r)
    pidfd: int | None = None
    if pid is not None:
        with contextlib.suppress(OSError):
            pidfd = os.pidfd_open(pid)
    return pid, pidfd


def pidfd_kill(pidfd: int) -> bool:
    """``SIGKILL`` through a pidfd (it cannot hit a reused pid); False if it could not be sent."""
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except OSError:
        return False
    return True


def guest_exit(code: int, memory: bool, pids: bool) -> GuestExit:
    """A guest's end from its exit code (negative: the signal that killed it)."""
    if code < 0:
        return GuestExit(None, signal=-code, memory_exceeded=memory, pids_exceeded=pids)
    return GuestExit(code, memory_exceeded=memory, pids_exceeded=pids)


class HostGuest(GuestProcess):
    """A guest in a sandbox of its own, as a host uid of its own, killed through a pidfd."""

    #: The host uid (and gid) the guest runs as; no other live guest has it.
    uid: int
    #: The guest's host pid (pid 1 of its namespace), once known.
    pid: int | None
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

    def open_dir(self, path: str) -> int:
        """``path`` inside the sandbox, through ``/proc/PID/root``, checked to be this guest's.

        The last component is not followed if it is a link. The guest is checked to be alive
        (through its pidfd) after the open, so the pid cannot have been another process's.
        """
        if self.pid is None or self._pidfd is None:
            raise OSError(errno.ESRCH, "the guest has not started")
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(f"/proc/{self.pid}/root{path}", flags)
        try:
            signal.pidfd_send_signal(self._pidfd, 0)
        except OSError:
            os.close(fd)
            raise
        return fd

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    async def wait(self) -> GuestExit:
        return await asyncio.shield(self._exited)


_G = TypeVar("_G", bound=HostGuest)


class BackendOptions(GuestContents, total=False):
    """What a bubblewrap-based backend takes besides its limits (see HostSandboxBackend)."""

    uid_base: int
    uid_count: int
    bwrap: str | None
    require_seccomp: bool
    require_cgroups: bool
    pool_size: int


class HostSandboxBackend(SandboxBackend, Generic[_G]):
    """A bubblewrap-based backend: root on the host, one non-root uid per live guest, the
    seccomp filter, cgroup limits where the host has the controllers, a pool of guests."""

    isolated = True
    #: Why the backend must run as root, for the error when it does not.
    _needs_root = ""

    #: Guests started ahead of need when ``pool_size`` is not given.
    default_pool_size = DEFAULT_POOL_SIZE

    def __init__(
        self,
        limits: LimitsConfig | None = None,
        *,
        uid_base: int = DEFAULT_UID_BASE,
        uid_count: int = DEFAULT_UID_COUNT,
        bwrap: str | None = None,
        require_seccomp: bool = True,
        require_cgroups: bool = False,
        pool_size: int | None = None,
        sandbox_venv: str | None = None,
        preload: Sequence[str] = (),
        preload_warmup: str | None = None,
        sandbox_env: Mapping[str, str] | None = None,
    ) -> None:
        if uid_base <= 0 or uid_count <= 0 or uid_base + uid_count >= 0xFFFFFFFF:
            raise ValueError("uid_base/uid_count must name a range of non-root uids")
        self.limits = limits if limits is not None else LimitsConfig()
        self.uid_base = uid_base
        self.uid_count = uid_count
        self._bwrap = bwrap
        self.require_seccomp = require_seccomp
        self.require_cgroups = require_cgroups
        self.pool_size = max(0, self.default_pool_size if pool_size is None else pool_size)
        self.sandbox_venv = sandbox_venv
        self.preload_modules = tuple(preload)
        self.preload_warmup = preload_warmup
        self.guest_env = guest_env(sandbox_env)  # checked here, before anything starts
        #: The sandbox venv, once checked at start (None: the standard library only).
        self.venv: SandboxVenv | None = None
        self._identity: IdentityFiles | None = None
        self.layout: RuntimeLayout | None = None
        self.cgroup_support: cgroups.CgroupSupport | None = None
        self._cgroups: cgroups.BackendCgroups | None = None
        self._missing_controllers: list[str] = []
        self._seccomp_bpf: bytes | None = None
        self.seccomp_problem: str | None = None
        self._bwrap_path = ""
        self._uids_in_use: set[int] = set()
        # A random start: two services on one host (tests, a restart beside an old one) then
        # rarely hand out the same uid, whose RLIMIT_NPROC budget their guests would share.
        self._uid_cursor = secrets.randbelow(uid_count)
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
        self.layout = self._lay_out()
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

    def _lay_out(self) -> RuntimeLayout:
        """The runtime, the sandbox venv, time zones, a passwd naming the uids, the home link."""
        extra = zoneinfo_binds()
        if self.sandbox_venv is not None:
            self.venv = inspect_venv(self.sandbox_venv)
            self.packages = tuple((p.name, p.version) for p in self.venv.packages)
            extra += self.venv.libraries
        if self._identity is None:
            try:
                self._identity = IdentityFiles(self.uid_base, self.uid_count)
            except OSError as exc:
                raise SandboxUnavailable(
                    "cannot write the sandboxes' /etc/passwd and /etc/group under "
                    f"{tempfile.gettempdir()}: {exc.strerror or exc}; make room there or "
                    "point TMPDIR at a directory that has some"
                ) from None
        binds = self._identity.binds()
        if self.venv is not None:
            binds.append((self.venv.site_packages, SANDBOX_SITE_PACKAGES))
        return discover_runtime(
            extra=extra,
            files=binds,
            symlinks=[(GUEST_HOME, HOME_TARGET)],
            env=sorted(self.guest_env.items()),
        )

    @property
    def site_dirs(self) -> list[str]:
        """What a guest puts on ``sys.path`` besides the standard library (sandbox paths)."""
        return [SANDBOX_SITE_PACKAGES] if self.venv is not None else []

    @property
    def memory_cgroup_bytes(self) -> int:
        if self._cgroups is None or "memory" in self._missing_controllers:
            return 0
        return self.limits.memory_bytes

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
        if self._identity is not None:
            self._identity.remove()
            self._identity = None

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
            "sandbox_venv": self.venv.root if self.venv is not None else "none",
            "preload": ",".join(self.preload_modules) or "none",
        }


async def read_child_pid(fd: int, proc: asyncio.subprocess.Process) -> int | None:
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
