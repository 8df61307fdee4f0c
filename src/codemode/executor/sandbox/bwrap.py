"""The bubblewrap backend: one fresh kernel sandbox per execution.

Launch chain, per execution (the service runs as root)::

    /bin/sh launcher       joins the execution's cgroups, sets rlimit backstops, execs
      bwrap (root)         new pid/net/ipc/uts/mount/cgroup namespaces; a root file system of
                           read-only binds (the Python runtime, its shared libraries, the guest)
                           and private size-bounded tmpfs /tmp and /dev/shm; loads the seccomp
                           filter with no_new_privs; execs, as pid 1 of the new pid namespace,
        setpriv            drops to a non-root host uid/gid of its own (one per live execution),
                           clears groups, the bounding, inheritable and ambient capability sets
          python -I -S -B /codemode/guest --fds-from CONTROL_FD

Sandboxes are started ahead of need (``pool_size``, default 2): the guest imports its runtime and
waits on a control socket; ``spawn`` hands it the channel, stdout and stderr in one
``SCM_RIGHTS`` message, so the launch is off the request path. Each sandbox still serves
exactly one execution.

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
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Unpack

from codemode.config import LimitsConfig
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
)
from codemode.executor.sandbox.runtime import GUEST_MOUNT, RuntimeLayout, SandboxUnavailable

logger = logging.getLogger("codemode.executor")

#: Exit status of the launcher when it cannot join the execution's cgroup.
LAUNCH_FAILED = 125
#: How long a launched sandbox may take to report ready, seconds.
_READY_TIMEOUT_S = 10.0
#: How long the start-up check of the preloads may take, seconds.
_PRELOAD_CHECK_TIMEOUT_S = 120.0


def argv_head(bwrap: str, layout: RuntimeLayout, limits: LimitsConfig) -> list[str]:
    """bwrap's options for one sandbox up to its descriptors: namespaces and file system."""
    tmpfs = str(limits.tmpfs_bytes)
    argv = [*bwrap_namespaces(bwrap), "--proc", "/proc", "--dev", "/dev"]
    # The private /tmp first, so that a runtime path under the host's /tmp (a library an
    # extension loads from there, say) is bound over it rather than hidden by it.
    argv += ["--perms", "01777", "--size", tmpfs, "--tmpfs", SANDBOX_TMP]
    argv += ["--perms", "01777", "--size", tmpfs, "--tmpfs", SANDBOX_SHM]
    argv += bwrap_runtime(layout)
    argv += ["--perms", "0755", "--size", str(limits.max_input_bytes or 4096)]
    argv += ["--tmpfs", INPUT_DIR]
    argv += ["--perms", "01777", "--size", str(limits.max_output_files_bytes or 4096)]
    argv += ["--tmpfs", OUTPUT_DIR]
    argv += ["--remount-ro", "/", "--chdir", SANDBOX_TMP]
    return argv


def sandbox_argv(
    head: list[str],
    layout: RuntimeLayout,
    uid: int,
    program: list[str],
    *,
    seccomp_fd: int | None = None,
    info_fd: int | None = None,
) -> list[str]:
    """``head``, the filter and info descriptors, then setpriv running ``program`` as ``uid``.

    setpriv drops to ``uid``/gid ``uid``, clears groups and every capability set, and sets
    ``no_new_privs`` before it execs the interpreter with ``program`` as its arguments.
    """
    argv = list(head)
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    if info_fd is not None:
        argv += ["--info-fd", str(info_fd)]
    argv += [
        "--",
        layout.setpriv,
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--no-new-privs",
        "--bounding-set=-all",
        "--inh-caps=-all",
        "--ambient-caps=-all",
        "--",
        layout.executable,
        *program,
    ]
    return argv


# --------------------------------------------------------------------------------------------
# The backend


@dataclass(slots=True)
class _Running:
    guest: _BwrapGuest
    finished: asyncio.Task[GuestExit] = field(repr=False)


class BwrapBackend(HostSandboxBackend["_BwrapGuest"]):
    """A bubblewrap sandbox per execution, as a non-root uid, with seccomp and cgroup limits."""

    name = "bwrap"
    _needs_root = (
        "the bwrap backend starts sandboxes as root and drops each to its own uid; "
        "run the service as root (or use another backend)"
    )

    def __init__(
        self, limits: LimitsConfig | None = None, **options: Unpack[BackendOptions]
    ) -> None:
        super().__init__(limits, **options)
        self._argv_head: list[str] = []
        self._launcher = ""
        self._running: dict[int, _Running] = {}
        #: Sandboxes started for the pool, and sandboxes that did not start, for the metrics.
        self._refills = 0
        self._start_failures = 0

    def pool_stats(self) -> tuple[PoolStats, ...]:
        kind = "preloaded" if self.preload_modules else "plain"
        return (PoolStats(kind, len(self._pool), self._refills, self._start_failures),)

    # -- setup ---------------------------------------------------------------------------

    def _prepared(self, bwrap: str, layout: RuntimeLayout) -> None:
        self._argv_head = argv_head(bwrap, layout, self.limits)
        self._launcher = self._build_launcher(self._missing_controllers)

    def _build_launcher(self, missing_controllers: Iterable[str]) -> str:
        limits = self.limits
        ulimits: list[str] = []
        if limits.cpu_seconds > 0:
            ulimits.append(f"ulimit -t {whole_seconds(limits.cpu_seconds) + 1}")
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

    def guest_options(self) -> list[str]:
        """The guest's options: the venv's site-packages, the preloads, the home to create."""
        options: list[str] = []
        for site in self.site_dirs:
            options += ["--path", site]
        if self.preload_modules:
            options += ["--preload", ",".join(self.preload_modules)]
        return [*options, "--home", HOME_TARGET]

    def command(
        self, uid: int, seccomp_fd: int | None, info_fd: int, control_fd: int | None
    ) -> list[str]:
        """The bwrap command line for one sandbox (without the launcher). Its guest waits on
        ``control_fd`` for a request, or, with None, only checks the preloads import."""
        assert self.layout is not None
        program = ["-I", "-S", "-B", GUEST_MOUNT, *self.guest_options()]
        program += ["--check"] if control_fd is None else ["--fds-from", str(control_fd)]
        return sandbox_argv(
            self._argv_head, self.layout, uid, program, seccomp_fd=seccomp_fd, info_fd=info_fd
        )

    def _launched(self, procs_files: list[str], command: list[str]) -> list[str]:
        """``command`` behind the launcher, which first joins the cgroups of ``procs_files``."""
        return ["/bin/sh", "-c", self._launcher, "codemode-launch", *procs_files, "--", *command]

    async def _warm_up(self) -> None:
        """Import the preloads once in a sandbox like the guests': a failure stops the start.

        A pooled guest that fails them only dies, unseen; this one's traceback is the error.
        """
        if not self.preload_modules:
            return
        assert self.layout is not None
        uid = self._take_uid()
        try:
            proc, info_r = await start_bwrap(
                lambda seccomp_fd, info_fd: self._launched(
                    [], self.command(uid, seccomp_fd, info_fd, None)
                ),
                [],
                self._seccomp_bpf,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                async with asyncio.timeout(_PRELOAD_CHECK_TIMEOUT_S):
                    _, pidfd = await child_pidfd(info_r, proc)  # bwrap waits for it to be read
                    if pidfd is not None:
                        os.close(pidfd)
                    _, stderr = await proc.communicate()
            except TimeoutError:
                proc.kill()  # --die-with-parent takes the sandbox along
                await proc.wait()
                raise SandboxUnavailable(
                    f"preloading {', '.join(self.preload_modules)} took longer than "
                    f"{_PRELOAD_CHECK_TIMEOUT_S:g} s"
                ) from None
        finally:
            self._give_uid(uid)
        if proc.returncode != 0:
            text = stderr.decode(errors="replace").strip()[-2000:]
            raise SandboxUnavailable(
                f"preloading {', '.join(self.preload_modules)} in the sandbox failed: "
                f"{text or f'exit status {proc.returncode}'}"
            )

    async def spawn(self, fds: GuestFds) -> GuestProcess:
        if self._closed:
            raise RuntimeError("backend is closed")
        await self.start()
        for _ in range(3):
            guest = self._pool.popleft() if self._pool else await self._launch()
            self._schedule_refill()
            await guest._pid_known.wait()
            if await guest._until_ready() and guest._hand_over(fds):
                return guest
            self._start_failures += 1
            guest.kill()  # it died while waiting; its supervisor cleans up
        raise SandboxUnavailable("sandboxes die before they can be used; run `codemode doctor`")

    async def _refill(self) -> None:
        while not self._closed and len(self._pool) < self.pool_size:
            try:
                guest = await self._launch()
            except (OSError, SandboxUnavailable) as exc:
                logger.warning("could not pre-start a sandbox: %s", exc)
                return
            self._refills += 1
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
            proc, info_r = await start_bwrap(
                lambda seccomp_fd, info_fd: self._launched(
                    procs_files, self.command(uid, seccomp_fd, info_fd, theirs.fileno())
                ),
                [theirs.fileno()],
                self._seccomp_bpf,
                stderr=asyncio.subprocess.DEVNULL,
            )
        except BaseException as exc:
            if isinstance(exc, Exception):
                self._start_failures += 1
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
            guest.pid, guest._pidfd = await child_pidfd(info_r, guest._proc)
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


class _BwrapGuest(HostGuest):
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
        self.pid = None
        self._pidfd = None
        self._pid_known = asyncio.Event()
        self._kill_requested = False
        self._finished: asyncio.Future[GuestExit] | None = None
        self._exited = asyncio.get_running_loop().create_future()

    async def _until_ready(self) -> bool:
        """Wait for the guest's ready byte (its sandbox is set up); False if it never comes."""
        control = self._control
        if control is None:
            return False
        control.setblocking(False)
        try:
            async with asyncio.timeout(_READY_TIMEOUT_S):
                return await asyncio.get_running_loop().sock_recv(control, 1) == b"R"
        except (OSError, TimeoutError):
            return False

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
        if self._pidfd is not None and pidfd_kill(self._pidfd):
            return
        if self._outer_pidfd is not None:
            # Not Popen.kill(): its poll() could reap bwrap under asyncio's child watcher.
            # bwrap's --die-with-parent then kills the namespace too.
            pidfd_kill(self._outer_pidfd)
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
            pidfd_kill(self._pidfd)
        finally:
            loop.remove_reader(self._pidfd)

    def _outcome(self, code: int) -> GuestExit:
        """How the guest ended, with the cgroup's verdict on its limits."""
        memory = self._group.memory_exceeded() if self._group is not None else False
        pids = self._group.pids_exceeded() if self._group is not None else False
        if code > 128 and code - 128 in signal.valid_signals():
            code = -(code - 128)  # the launcher's shell reports a signal as 128 + its number
        return guest_exit(code, memory, pids)

    async def _remove_group(self) -> None:
        """Remove the execution's cgroups, in a thread: a v1 memory rmdir takes milliseconds."""
        group = self._group
        if group is None:
            return
        for _ in range(500):
            if await asyncio.to_thread(group.try_remove):
                return
            await asyncio.sleep(0.002)
        logger.warning("a sandbox cgroup could not be removed: %s", group.procs_files)
