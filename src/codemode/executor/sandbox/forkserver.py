"""The fork-server backend: a long-lived zygote forks every guest into fresh namespaces.

With preloads (``--preload pandas``) there are two zygotes, each with its own pool: one that
imported the preloads, for programs that import packages (and for sessions), and a plain one
for programs that import only the standard library. A guest forked from a zygote holding
pandas costs several times more to fork and to exit (its page tables), which a ``2 + 2``
should not pay; which one serves a program is read from its import statements.

Launch chain, once per backend (the service runs as root)::

    bwrap (root)          new pid/net/ipc/uts/mount/cgroup namespaces; the read-only runtime
                          file system of the bwrap backend (whose guest folder holds the
                          zygote); keeps only CAP_SYS_ADMIN, CAP_SETUID, CAP_SETGID,
                          CAP_SETPCAP and CAP_KILL
      python -I -S -B /codemode/guest/zygote.py CONTROL SECCOMP CONFIG
                          pid 1 of its pid namespace; imports the guest runtime (and asyncio)
                          once, then forks on request

Per guest, forked ahead of need (:mod:`codemode.executor.guest.zygote` has the details): pid 1 of a
new pid namespace, own net/mount/ipc/uts namespaces, fresh size-bounded tmpfs ``/tmp`` and
``/dev/shm``, fresh ``/proc`` and ``/dev/pts``, rlimit backstops, its own non-root host uid (one
per live guest) with every capability set empty, ``no_new_privs`` and the seccomp filter of the
bwrap backend; only its control socket open. It then makes its stdout and stderr pipes and
sends one byte with their read ends (``SCM_RIGHTS``): the kernel attaches its host pid and uid
(``SCM_CREDENTIALS``), the service checks the uid and opens a pidfd, and the guest waits in the
pool. It joined its execution's cgroups first thing after the fork, by writing to their
``cgroup.procs`` files through descriptors the service opened and sent with the fork request,
so everything it does is accounted there. ``acquire`` hands the control socket (now
the channel) and the read ends to the execution, which only writes the start frame; ``spawn``
instead sends the guest a channel, stdout and stderr of the caller's. Nothing on the request
path starts a process or makes a descriptor. When the pool is empty, a request takes the next
guest already being forked for it rather than forking one more (which would be ready later and
add to the load that emptied the pool); it forks its own only when none is on its way.

The guest is pid 1 of its namespace, so :meth:`GuestProcess.kill` is one ``SIGKILL`` through
its pidfd and takes every process of the execution along. The zygote reaps it and reports the
wait status; by then the namespace is empty. The zygote is pid 1 of its own namespace: when it
dies, the kernel kills every guest, and the backend starts a new zygote on the next request.

One module, past the usual size: the backend, its zygote handle and its guest type hand the
pool's guests between them through each other's state; split, each would import the others'
private names.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import socket
import struct
import time
from collections.abc import Callable
from typing import Unpack

from codemode.config import LimitsConfig
from codemode.executor.guest import zygote as zygote_protocol
from codemode.executor.sandbox import cgroups
from codemode.executor.sandbox.environment import HOME_TARGET
from codemode.executor.sandbox.host import (
    SANDBOX_SHM,
    SANDBOX_TMP,
    BackendOptions,
    HostGuest,
    HostSandboxBackend,
    bwrap_namespaces,
    bwrap_runtime,
    child_pidfd,
    file_mounts,
    guest_exit,
    pidfd_kill,
    start_bwrap,
    whole_seconds,
)
from codemode.executor.sandbox.interface import (
    INPUT_DIR,
    OUTPUT_DIR,
    GuestExit,
    GuestFds,
    GuestProcess,
    PoolStats,
    ReadyGuest,
)
from codemode.executor.sandbox.runtime import GUEST_MOUNT, SandboxUnavailable

logger = logging.getLogger("codemode.executor")

#: The zygote inside its sandbox: part of the guest folder every sandbox binds.
ZYGOTE_MOUNT = f"{GUEST_MOUNT}/zygote.py"
#: Guests forked ahead of need.
DEFAULT_POOL_SIZE = 4
#: Capabilities the zygote keeps (it needs no others to make and enter a guest's sandbox).
ZYGOTE_CAPS = ("CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_KILL")
#: A zygote that dies sooner than this after starting, this many times in a row, is broken.
_CRASH_WINDOW_S = 5.0
_MAX_QUICK_CRASHES = 3
_READY_TIMEOUT_S = 10.0
#: … and this much more when it imports the operator's preloads first.
_PRELOAD_TIMEOUT_S = 120.0
_CRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
#: Ancillary room for the ready byte: the sender's credentials and its two pipe read ends.
_READY_ANCILLARY = socket.CMSG_SPACE(_CRED.size) + socket.CMSG_SPACE(2 * 4)


class _Zygote:
    """One running zygote: its bwrap process, control socket and the guests it forked."""

    def __init__(
        self, proc: asyncio.subprocess.Process, control: socket.socket, line: _Line
    ) -> None:
        self.proc = proc
        self.control = control
        self.line = line
        self.pid: int | None = None  # host pid of the zygote (bwrap's info fd)
        self.pidfd: int | None = None
        self.started = time.monotonic()
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.children: dict[int, _ForkGuest] = {}
        self.dead = False
        self.stderr_tail = b""
        self.gone: asyncio.Task[None] | None = None

    def send(self, kind: bytes, request: int, value: int = 0, fds: list[int] | None = None) -> bool:
        if self.dead:
            return False
        message = zygote_protocol.MESSAGE.pack(kind, request, value)
        try:
            if fds:
                socket.send_fds(self.control, [message], fds)
            else:
                self.control.send(message)
        except BlockingIOError:
            return False
        except OSError:
            self.dead = True  # its end is closed: it exited, whether or not it is reaped yet
            return False
        return True

    def kill(self) -> None:
        if self.pidfd is not None:
            pidfd_kill(self.pidfd)
        elif self.proc.returncode is None:
            with contextlib.suppress(OSError):
                self.proc.kill()  # bwrap; --die-with-parent takes the zygote along


class _Line:
    """A zygote of one kind, with the operator's preloads or without, and its pool of guests.

    With preloads there are two lines: a program that imports nothing beyond the standard
    library runs on the plain one, whose guests fork and exit as cheaply as without preloads.
    """

    def __init__(self, preload: tuple[str, ...]) -> None:
        self.preload = preload
        self.zygote: _Zygote | None = None
        self.lock = asyncio.Lock()
        self.quick_crashes = 0
        self.pool: collections.deque[_ForkGuest] = collections.deque()
        self.forking = 0
        #: Requests waiting for the next guest forked for the pool (``None``: fork your own).
        self.waiting: collections.deque[asyncio.Future[_ForkGuest | None]] = collections.deque()
        #: Guests forked for the pool, and guests that did not start, for the metrics.
        self.refills = 0
        self.start_failures = 0

    def stats(self) -> PoolStats:
        kind = "preloaded" if self.preload else "plain"
        return PoolStats(kind, len(self.pool), self.refills, self.start_failures)


class ForkServerBackend(HostSandboxBackend["_ForkGuest"]):
    """Guests forked ahead from one sandboxed zygote, each in fresh namespaces as its own uid."""

    name = "forkserver"
    _needs_root = (
        "the fork-server backend starts its zygote as root and drops each guest to a "
        "uid of its own; run the service as root (or use another backend)"
    )

    default_pool_size = DEFAULT_POOL_SIZE

    def __init__(
        self, limits: LimitsConfig | None = None, **options: Unpack[BackendOptions]
    ) -> None:
        super().__init__(limits, **options)
        self._next_id = 0
        self._plain = _Line(())
        self._preloaded = _Line(self.preload_modules) if self.preload_modules else None
        self.last_zygote_error = ""
        self._live: set[_ForkGuest] = set()

    @property
    def _lines(self) -> list[_Line]:
        return [self._plain] if self._preloaded is None else [self._preloaded, self._plain]

    def pool_stats(self) -> tuple[PoolStats, ...]:
        return tuple(line.stats() for line in self._lines)

    def _line(self, packages: bool) -> _Line:
        """The preloaded line for a program that imports packages (if there is one), else plain."""
        return self._preloaded if packages and self._preloaded is not None else self._plain

    # -- setup ---------------------------------------------------------------------------

    async def _warm_up(self) -> None:
        for line in self._lines:
            await self._ensure_zygote(line)

    def zygote_argv(
        self,
        control_fd: int,
        seccomp_fd: int,
        info_fd: int,
        preload: tuple[str, ...] | None = None,
    ) -> list[str]:
        """The bwrap command line that starts a zygote (with ``preload``, default the
        backend's)."""
        layout = self.layout
        assert layout is not None
        argv = [*bwrap_namespaces(self._bwrap_path), "--cap-drop", "ALL"]
        for cap in ZYGOTE_CAPS:
            argv += ["--cap-add", cap]
        argv += bwrap_runtime(layout)
        argv += ["--proc", "/proc", "--dev", "/dev"]
        # Mount points only: every guest mounts its own tmpfs over them.
        for mount_point in (SANDBOX_TMP, SANDBOX_SHM, INPUT_DIR, OUTPUT_DIR):
            argv += ["--perms", "0755", "--dir", mount_point]
        argv += ["--remount-ro", "/", "--chdir", SANDBOX_TMP, "--info-fd", str(info_fd), "--"]
        config = {
            "tmpfs_bytes": self.limits.tmpfs_bytes,
            "mounts": file_mounts(self.limits),
            "rlimits": self._rlimits(),
            "sys_path": self.site_dirs,
            "preload": list(self.preload_modules if preload is None else preload),
            # Only where the preloads are: the plain zygote's programs import no packages.
            "warmup": (self.preload_warmup or "") if (preload is None or preload) else "",
            "home": HOME_TARGET,
        }
        argv += [
            layout.executable,
            "-I",
            "-S",
            "-B",
            ZYGOTE_MOUNT,
            str(control_fd),
            str(seccomp_fd),
            json.dumps(config, separators=(",", ":")),
        ]
        return argv

    def _rlimits(self) -> dict[str, int]:
        """Backstops under each guest (it lowers them further from its start frame)."""
        limits = self.limits
        out: dict[str, int] = {}
        if limits.cpu_seconds > 0:
            out["RLIMIT_CPU"] = whole_seconds(limits.cpu_seconds) + 1
        if limits.max_file_bytes > 0:
            out["RLIMIT_FSIZE"] = limits.max_file_bytes
        if limits.max_open_files > 0:
            out["RLIMIT_NOFILE"] = limits.max_open_files
        if limits.max_processes > 0:
            out["RLIMIT_NPROC"] = limits.max_processes  # per uid: one uid per live guest
        if limits.memory_bytes > 0 and "memory" in self._missing_controllers:
            out["RLIMIT_AS"] = limits.memory_bytes  # no memory cgroup: a coarser bound
        out["RLIMIT_CORE"] = 0
        return {k: v for k, v in out.items() if v > 0}

    # -- the zygote ----------------------------------------------------------------------

    @staticmethod
    def _crash_looping(line: _Line) -> bool:
        return line.quick_crashes >= _MAX_QUICK_CRASHES

    async def _ensure_zygote(self, line: _Line) -> _Zygote:
        async with line.lock:
            zygote = line.zygote
            if zygote is not None and not zygote.dead:
                return zygote
            if self._closed:
                raise RuntimeError("backend is closed")
            if self._crash_looping(line):
                raise SandboxUnavailable(
                    f"the fork-server zygote died {line.quick_crashes} times right after "
                    f"starting: {self.last_zygote_error or 'no message'}; run `codemode doctor`"
                )
            zygote = await self._launch_zygote(line)
            line.zygote = zygote
            return zygote

    async def _launch_zygote(self, line: _Line) -> _Zygote:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc, info_r = await start_bwrap(
                lambda seccomp_fd, info_fd: self.zygote_argv(
                    theirs.fileno(),
                    -1 if seccomp_fd is None else seccomp_fd,
                    info_fd,
                    line.preload,
                ),
                [theirs.fileno()],
                self._seccomp_bpf,
                stderr=asyncio.subprocess.PIPE,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        zygote = _Zygote(proc, ours, line)
        zygote.pid, zygote.pidfd = await child_pidfd(info_r, proc)
        loop = asyncio.get_running_loop()
        loop.add_reader(ours.fileno(), self._on_zygote_message, zygote)
        zygote.gone = asyncio.ensure_future(self._supervise_zygote(zygote))
        try:
            preloading = _PRELOAD_TIMEOUT_S if line.preload else 0.0
            async with asyncio.timeout(_READY_TIMEOUT_S + preloading):
                await asyncio.shield(zygote.ready)
        except (TimeoutError, SandboxUnavailable) as exc:
            zygote.kill()
            with contextlib.suppress(Exception):
                await zygote.gone
            # Its whole stderr (a preload's traceback, say), not just the last line of it.
            detail = str(exc) if isinstance(exc, SandboxUnavailable) else ""
            raise SandboxUnavailable(
                f"the fork-server zygote did not start: "
                f"{detail or self.last_zygote_error or repr(exc)}"
            ) from None
        return zygote

    def _on_zygote_message(self, zygote: _Zygote) -> None:
        while True:
            try:
                data = zygote.control.recv(4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                asyncio.get_running_loop().remove_reader(zygote.control.fileno())
                zygote.dead = True
                return
            try:
                kind, ident, value = zygote_protocol.MESSAGE.unpack_from(data)
            except struct.error:
                logger.warning("unexpected message from the zygote: %r", data[:200])
                continue
            if ident == 0:
                if not zygote.ready.done():
                    zygote.ready.set_result(None)
                continue
            guest = zygote.children.get(ident)
            if guest is None:
                continue
            if kind == b"X":
                zygote.children.pop(ident, None)
                guest._zygote_reported(value)
            elif kind == b"E":
                zygote.children.pop(ident, None)
                text = data[zygote_protocol.MESSAGE.size :].decode(errors="replace")
                guest._fork_failed(text or os.strerror(value))

    async def _supervise_zygote(self, zygote: _Zygote) -> None:
        """Wait for the zygote's end; then every guest it forked is gone too."""
        assert zygote.proc.stderr is not None
        with contextlib.suppress(Exception):
            while chunk := await zygote.proc.stderr.read(4096):
                zygote.stderr_tail = (zygote.stderr_tail + chunk)[-2000:]
        await zygote.proc.wait()
        zygote.dead = True
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(zygote.control.fileno())
        zygote.control.close()
        if zygote.pidfd is not None:
            os.close(zygote.pidfd)
            zygote.pidfd = None
        # bwrap exits after the zygote is reaped, and a pid namespace's init is reaped only
        # once every process of the namespace (nested ones included) is gone.
        for guest in list(zygote.children.values()):
            guest._zygote_reported(None)
        zygote.children.clear()
        message = zygote.stderr_tail.decode(errors="replace").strip()
        if message:
            self.last_zygote_error = message.splitlines()[-1]
        if not zygote.ready.done():
            zygote.ready.set_exception(SandboxUnavailable(message or "zygote exited"))
            zygote.ready.exception()
        line = zygote.line
        if line.zygote is zygote:
            if time.monotonic() - zygote.started < _CRASH_WINDOW_S:
                line.quick_crashes += 1
            else:
                line.quick_crashes = 0
            if not self._closed:
                logger.warning(
                    "the fork-server zygote exited (%s); a new one starts on the next request",
                    self.last_zygote_error or f"status {zygote.proc.returncode}",
                )
        line.pool = collections.deque(g for g in line.pool if g._zygote is not zygote)

    # -- guests --------------------------------------------------------------------------

    async def _take(self, line: _Line) -> _ForkGuest:
        """A ready guest: from the pool, else forked now; it waits for its first request."""
        if self._closed:
            raise RuntimeError("backend is closed")
        if not self._started:
            await self.start()
        for _ in range(3):
            guest = line.pool.popleft() if line.pool else None
            self._schedule_refill()
            if guest is None and line.forking > len(line.waiting):
                # Guests are being forked for the pool already, and one is not yet claimed:
                # it is ready sooner than a fork of our own would be.
                guest = await self._next_pooled(line)
                if self._closed:
                    raise RuntimeError("backend is closed")
            if guest is None:
                try:
                    guest = await self._fork(line)
                except Exception:
                    line.start_failures += 1
                    zygote = line.zygote
                    if zygote is not None and zygote.dead and not self._crash_looping(line):
                        continue  # it died under this request: the next try starts a new one
                    raise
                try:
                    await guest._ready
                except (SandboxUnavailable, OSError) as exc:
                    line.start_failures += 1
                    logger.warning("a forked guest did not start: %s", exc)
                    continue
            if guest._usable():
                return guest
            guest.kill()
        raise SandboxUnavailable("forked guests die before they can be used; run `codemode doctor`")

    async def acquire(self, packages: bool = True) -> ReadyGuest:
        """A pooled guest with its channel and output pipes, made before the request came;
        from the plain zygote when the program imports no ``packages``."""
        line = self._line(packages)
        for _ in range(3):
            ready = (await self._take(line))._take_streams()
            if ready is not None:
                return ready
        raise SandboxUnavailable("forked guests die before they can be used; run `codemode doctor`")

    async def spawn(self, fds: GuestFds) -> GuestProcess:
        for _ in range(3):
            guest = await self._take(self._line(True))
            if guest._hand_over(fds):
                return guest
            guest.kill()
        raise SandboxUnavailable("forked guests die before they can be used; run `codemode doctor`")

    async def _refill(self) -> None:
        for line in self._lines:
            while not self._closed and len(line.pool) + line.forking < self.pool_size:
                try:
                    guest = await self._fork(line)
                except (OSError, SandboxUnavailable) as exc:
                    line.start_failures += 1
                    logger.warning("could not fork a guest ahead: %s", exc)
                    return
                line.refills += 1
                line.forking += 1
                guest._ready.add_done_callback(self._on_pooled_ready(line, guest))

    def _on_pooled_ready(
        self, line: _Line, guest: _ForkGuest
    ) -> Callable[[asyncio.Future[None]], None]:
        def done(future: asyncio.Future[None]) -> None:
            line.forking -= 1
            if future.cancelled() or future.exception() is not None:
                if not self._closed:
                    line.start_failures += 1
                self._hand_over_pooled(line, None)  # one fewer coming: a waiter forks its own
                return
            if self._closed or guest._zygote.dead:
                guest.kill()
                self._hand_over_pooled(line, None)
                return
            if self._hand_over_pooled(line, guest):
                # It went to a waiting request, not to the pool: fork its replacement, or a
                # burst that ends while guests are handed over leaves the pool short.
                self._schedule_refill()
            else:
                line.pool.append(guest)

        return done

    async def _next_pooled(self, line: _Line) -> _ForkGuest | None:
        """The next guest forked for the pool once it is ready; None: fork one yourself."""
        waiter: asyncio.Future[_ForkGuest | None] = asyncio.get_running_loop().create_future()
        line.waiting.append(waiter)
        try:
            return await waiter
        except BaseException:
            # Cancelled just as a guest was handed over: it goes back to the pool, not astray.
            handed = waiter.result() if waiter.done() and not waiter.cancelled() else None
            if handed is not None:
                line.pool.append(handed)
            raise
        finally:
            with contextlib.suppress(ValueError):
                line.waiting.remove(waiter)  # still queued only if cancelled

    def _hand_over_pooled(self, line: _Line, guest: _ForkGuest | None) -> bool:
        """Give a ready guest (or None) to the longest waiting request; whether one took it."""
        while line.waiting:
            waiter = line.waiting.popleft()
            if not waiter.done():
                waiter.set_result(guest)
                return True
        return False

    async def _fork(self, line: _Line) -> _ForkGuest:
        """Ask the line's zygote for one guest; it is ready when ``guest._ready`` is."""
        zygote = await self._ensure_zygote(line)
        group = await self._acquire_group()
        try:
            # The child writes itself into these cgroup.procs files before anything else.
            join = group.open_procs() if group is not None else []
        except OSError:
            assert group is not None
            group.remove_now()  # a group that cannot be opened is not reused
            raise
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError:
            for fd in join:
                os.close(fd)
            if group is not None and self._cgroups is not None:
                self._cgroups.release(group)  # unused, empty: back to the free list
            raise
        uid = self._take_uid()
        self._next_id += 1
        ident = self._next_id
        try:
            # The kernel then attaches the sender's pid and uid to what the guest writes.
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            ours.setblocking(False)
            guest = _ForkGuest(self, zygote, ident, uid, ours)
            guest._group = group
            zygote.children[ident] = guest
            self._live.add(guest)
            if not zygote.send(b"F", ident, uid, [theirs.fileno(), *join]):
                zygote.children.pop(ident, None)
                guest._fork_failed("the zygote is gone")
                raise SandboxUnavailable("the fork-server zygote is gone")
        finally:
            theirs.close()
            for fd in join:
                os.close(fd)
        asyncio.get_running_loop().add_reader(ours.fileno(), guest._on_control)
        return guest

    async def _acquire_group(self) -> cgroups.ExecutionCgroup | None:
        """The cgroups for the next guest (made off the event loop when none is free)."""
        cg = self._cgroups
        if cg is None:
            return None
        limits = self.limits
        if cg.has_free():
            return cg.acquire(limits.memory_bytes, limits.max_processes)  # no I/O
        return await asyncio.to_thread(cg.acquire, limits.memory_bytes, limits.max_processes)

    async def _stop_guests(self) -> None:
        for line in self._lines:
            while self._hand_over_pooled(line, None):  # waiting requests see the backend closed
                pass
            line.pool.clear()
        for guest in list(self._live):
            guest.kill()
        for line in self._lines:
            zygote = line.zygote
            if zygote is not None:
                zygote.kill()
                if zygote.gone is not None:
                    with contextlib.suppress(Exception):
                        await zygote.gone
        waits = [g._finished for g in list(self._live) if g._finished is not None]
        if waits:
            await asyncio.gather(*waits, return_exceptions=True)


class _ForkGuest(HostGuest):
    """One guest forked by the zygote: pool entry, then one execution."""

    def __init__(
        self,
        backend: ForkServerBackend,
        zygote: _Zygote,
        ident: int,
        uid: int,
        control: socket.socket,
    ) -> None:
        self.uid = uid
        self.ident = ident
        self.pid: int | None = None  # host pid, once ready
        self._backend = backend
        self._zygote = zygote
        self._control = control
        self._pidfd = None
        self._group: cgroups.ExecutionCgroup | None = None
        #: Read ends of the guest's stdout and stderr pipes, from its ready message.
        self._streams: list[int] = []
        loop = asyncio.get_running_loop()
        self._ready: asyncio.Future[None] = loop.create_future()
        self._status: asyncio.Future[int | None] = loop.create_future()
        self._exited = loop.create_future()
        self._kill_requested = False
        self._signalled = False  # SIGKILL sent through the pidfd
        self._finished: asyncio.Task[None] | None = asyncio.ensure_future(self._supervise())

    # -- start ---------------------------------------------------------------------------

    def _on_control(self) -> None:
        """The guest's ready byte: its host pid and uid from the kernel, its pipes' read ends."""
        control = self._control
        if control is None:
            return
        try:
            data, ancdata, flags, _ = control.recvmsg(1, _READY_ANCILLARY)
        except BlockingIOError:
            return
        except OSError:
            data, ancdata, flags = b"", [], 0
        asyncio.get_running_loop().remove_reader(control.fileno())
        pid = uid = None
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, uid, _ = _CRED.unpack(payload[: _CRED.size])
            elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                self._streams += struct.unpack(f"{usable // 4}i", payload[:usable])
        if data != b"R" or pid is None or pid <= 0:
            self._not_ready("the guest ended during its set-up")
            return
        if uid != self.uid:
            self._not_ready(f"the guest runs as uid {uid}, not {self.uid}")
            return
        if len(self._streams) != 2 or flags & socket.MSG_CTRUNC:
            self._not_ready("the guest sent no output pipes")
            return
        try:
            # From here on the socket is the guest's channel: no credentials on its frames.
            control.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 0)
            self._pidfd = os.pidfd_open(pid)
        except OSError as exc:
            self._not_ready(f"pidfd_open: {exc}")
            return
        self.pid = pid
        if self._kill_requested:
            self._not_ready("killed before it was used")
            return
        if not self._ready.done():
            self._ready.set_result(None)

    def _not_ready(self, why: str) -> None:
        self.kill()
        if not self._ready.done():
            self._ready.set_exception(SandboxUnavailable(why))
            self._ready.exception()

    def _fork_failed(self, why: str) -> None:
        self._not_ready(f"the zygote could not fork: {why}")
        if not self._status.done():
            self._status.set_result(None)

    def _zygote_reported(self, status: int | None) -> None:
        """The zygote reaped the guest (or died, ``None``): nothing of it runs any more."""
        if not self._status.done():
            self._status.set_result(status)
        if not self._ready.done():
            self._not_ready("the guest exited during its set-up")

    def _usable(self) -> bool:
        return self._control is not None and not self._kill_requested and not self._status.done()

    def _take_streams(self) -> ReadyGuest | None:
        """Give the caller the channel and the pipes' read ends (it closes them)."""
        control = self._control
        if control is None or not self._usable() or len(self._streams) != 2:
            return None
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(control.fileno())
        self._control = None
        out_r, err_r = self._streams
        self._streams = []
        return ReadyGuest(self, control, out_r, err_r)

    def _hand_over(self, fds: GuestFds) -> bool:
        """Send the guest a channel, stdout and stderr of the caller's instead of its own."""
        control = self._control
        if control is None or not self._usable():
            return False
        return self._send_fds(control, fds)

    def _close_control(self) -> None:
        if self._control is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._control.fileno())
            self._control.close()
            self._control = None
        for fd in self._streams:
            os.close(fd)
        self._streams = []

    # -- end -----------------------------------------------------------------------------

    async def _supervise(self) -> None:
        backend = self._backend
        try:
            status = await self._status
            # The counters are read here, once, and the group is taken back for another guest
            # (small reads of cgroupfs: cheaper on the loop than a hop to a thread).
            group = self._group
            memory = pids = False
            if group is not None:
                memory, pids = group.exceeded()
            if not self._exited.done():
                self._exited.set_result(self._outcome(status, memory, pids))
            await self._release_group()
        finally:
            self._close_control()
            self._close_pidfd()
            backend._give_uid(self.uid)
            backend._live.discard(self)
            if not self._exited.done():
                self._exited.set_result(GuestExit(None, signal=signal.SIGKILL))

    @staticmethod
    def _outcome(status: int | None, memory: bool, pids: bool) -> GuestExit:
        if status is None:  # its zygote died, and the kernel killed its pid namespace with it
            return GuestExit(
                None,
                signal=signal.SIGKILL,
                memory_exceeded=memory,
                pids_exceeded=pids,
                sandbox_lost=True,
            )
        return guest_exit(os.waitstatus_to_exitcode(status), memory, pids)

    async def _release_group(self) -> None:
        group, cg = self._group, self._backend._cgroups
        if group is None:
            return
        self._group = None
        if cg is None:  # the backend closed: its groups are removed with it
            return
        for _ in range(500):
            if cg.release(group):
                return
            await asyncio.sleep(0.002)
        logger.warning("a sandbox cgroup could not be emptied: %s", group.procs_files)

    def kill(self) -> None:
        self._kill_requested = True
        if self._status.done() or self._signalled:
            return
        if self._pidfd is not None:
            # pid 1 of its namespace: its death takes every process of the execution along.
            # One SIGKILL from outside its namespace cannot be blocked: it is sent once.
            self._signalled = pidfd_kill(self._pidfd)
            return
        self._zygote.send(b"K", self.ident)
