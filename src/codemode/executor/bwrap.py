"""The bubblewrap backend: one fresh kernel sandbox per execution.

Launch chain, per execution (the service runs as root)::

    /bin/sh launcher       joins the execution's cgroups, sets rlimit backstops, execs
      bwrap (root)         new pid/net/ipc/uts/mount/cgroup namespaces; a root file system of
                           read-only binds (the Python runtime and its shared libraries, guest.py)
                           and private size-bounded tmpfs /tmp and /dev/shm; loads the seccomp
                           filter with no_new_privs; execs, as pid 1 of the new pid namespace,
        setpriv            drops to a non-root host uid/gid of its own (one per live execution),
                           clears groups, the bounding, inheritable and ambient capability sets
          python -I -S -B /codemode/guest.py FD

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
import json
import os
import shutil
import signal
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from codemode.executor import cgroups, seccomp
from codemode.executor.sandbox import (
    GUEST_PATH,
    GuestExit,
    GuestFds,
    GuestProcess,
    SandboxBackend,
    SandboxLimits,
)

#: Where guest.py appears inside the sandbox.
GUEST_MOUNT = "/codemode/guest.py"
#: First host uid handed to sandboxes: above the ranges systemd and container tools allocate
#: (0x00080000-0x6FFFFFFF), below the values tools treat as negative.
DEFAULT_UID_BASE = 0x70000000
DEFAULT_UID_COUNT = 4096
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
# The backend


@dataclass(slots=True)
class _Running:
    guest: _BwrapGuest
    finished: asyncio.Task[GuestExit] = field(repr=False)


class BwrapBackend(SandboxBackend):
    """A bubblewrap sandbox per execution, as a non-root uid, with seccomp and cgroup limits."""

    name = "bwrap"
    isolated = True

    def __init__(
        self,
        limits: LimitsLike | None = None,
        *,
        uid_base: int = DEFAULT_UID_BASE,
        uid_count: int = DEFAULT_UID_COUNT,
        bwrap: str | None = None,
        require_seccomp: bool = True,
        require_cgroups: bool = False,
    ) -> None:
        if uid_base <= 0 or uid_count <= 0 or uid_base + uid_count >= 0xFFFFFFFF:
            raise ValueError("uid_base/uid_count must name a range of non-root uids")
        self.limits = as_sandbox_limits(limits)
        self.uid_base = uid_base
        self.uid_count = uid_count
        self._bwrap = bwrap
        self.require_seccomp = require_seccomp
        self.require_cgroups = require_cgroups
        self.layout: RuntimeLayout | None = None
        self.cgroup_support: cgroups.CgroupSupport | None = None
        self._cgroups: cgroups.BackendCgroups | None = None
        self._seccomp_bpf: bytes | None = None
        self.seccomp_problem: str | None = None
        self._argv_head: list[str] = []
        self._launcher = ""
        self._free_uids: list[int] = []
        self._next_uid = 0
        self._running: dict[int, _Running] = {}
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
            self._started = True

    def _prepare(self) -> None:
        if os.geteuid() != 0:
            raise SandboxUnavailable(
                "the bwrap backend starts sandboxes as root and drops each to its own uid; "
                "run the service as root (or use another backend)"
            )
        bwrap = self._bwrap or shutil.which("bwrap")
        if bwrap is None:
            raise SandboxUnavailable("bwrap is missing (Debian package bubblewrap)")
        self.layout = discover_runtime()
        try:
            self._seccomp_bpf = seccomp.build_filter_bpf()
        except seccomp.SeccompUnavailable as exc:
            self.seccomp_problem = str(exc)
            if self.require_seccomp:
                raise SandboxUnavailable(str(exc)) from None
        support = cgroups.discover()
        self.cgroup_support = support
        missing = [c for c in cgroups.CONTROLLERS if not support.has(c)]
        if missing and self.require_cgroups:
            raise SandboxUnavailable(
                "cgroup controllers unavailable: " + "; ".join(support.problems)
            )
        if support.sites:
            cgroups.sweep_stale(support)
            self._cgroups = cgroups.BackendCgroups(support)
            self._cgroups.create()
        self._argv_head = self._build_argv_head(bwrap, self.layout)
        self._launcher = self._build_launcher(missing)

    def _build_argv_head(self, bwrap: str, layout: RuntimeLayout) -> list[str]:
        tmpfs = str(self.limits.tmpfs_bytes or 64 << 20)
        argv = [
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
        for directory in layout.dirs:
            argv += ["--perms", "0755", "--dir", directory]
        for path in layout.binds:
            argv += ["--ro-bind", path, path]
        for dest, target in layout.symlinks:
            argv += ["--symlink", target, dest]
        for mask in layout.masks:
            argv += ["--perms", "0555", "--size", "4096", "--tmpfs", mask, "--remount-ro", mask]
        argv += ["--ro-bind", str(GUEST_PATH.resolve()), GUEST_MOUNT]
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

    # -- uids ----------------------------------------------------------------------------

    def _take_uid(self) -> int:
        if self._free_uids:
            return self._free_uids.pop()
        if self._next_uid >= self.uid_count:
            raise SandboxUnavailable(f"all {self.uid_count} sandbox uids are in use")
        self._next_uid += 1
        return self.uid_base + self._next_uid - 1

    def _give_uid(self, uid: int) -> None:
        self._free_uids.append(uid)

    # -- spawning ------------------------------------------------------------------------

    def command(self, fds: GuestFds, uid: int, seccomp_fd: int | None, info_fd: int) -> list[str]:
        """The bwrap command line for one execution (without the launcher)."""
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
            str(fds.channel),
        ]
        return argv

    async def spawn(self, fds: GuestFds) -> GuestProcess:
        if self._closed:
            raise RuntimeError("backend is closed")
        await self.start()
        uid = self._take_uid()
        group: cgroups.ExecutionCgroup | None = None
        opened: list[int] = []
        try:
            if self._cgroups is not None:
                group = self._cgroups.new_execution(
                    self.limits.memory_bytes, self.limits.max_processes
                )
            seccomp_fd: int | None = None
            if self._seccomp_bpf is not None:
                seccomp_fd, seccomp_w = os.pipe()
                opened.append(seccomp_fd)
                try:
                    os.write(seccomp_w, self._seccomp_bpf)  # far below a pipe's capacity
                finally:
                    os.close(seccomp_w)
            info_r, info_w = os.pipe()
            opened += [info_r, info_w]
            os.set_blocking(info_r, False)
            argv = [
                "/bin/sh",
                "-c",
                self._launcher,
                "codemode-launch",
                *(group.procs_files if group else []),
                "--",
                *self.command(fds, uid, seccomp_fd, info_w),
            ]
            passed = [fds.channel, info_w] + ([seccomp_fd] if seccomp_fd is not None else [])
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=fds.stdout,
                stderr=fds.stderr,
                pass_fds=passed,
                env={"LANG": "C.UTF-8"},
                cwd="/",
            )
        except BaseException:
            for fd in opened:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if group is not None:
                group.kill_all()
                group.remove_now()
            self._give_uid(uid)
            raise
        for fd in opened:
            if fd != info_r:
                os.close(fd)
        guest = _BwrapGuest(proc, group)
        finished = asyncio.ensure_future(self._supervise(guest, info_r, uid))
        self._running[id(guest)] = _Running(guest, finished)
        guest._finished = finished
        await guest._pid_known.wait()
        return guest

    async def _supervise(self, guest: _BwrapGuest, info_r: int, uid: int) -> GuestExit:
        """Learn the guest's host pid, wait for the end of everything, clean up."""
        try:
            try:
                pid = await _read_child_pid(info_r, guest._proc)
            finally:
                os.close(info_r)
            if pid is not None:
                with contextlib.suppress(OSError):
                    guest._pidfd = os.pidfd_open(pid)
            guest._pid_known.set()
            if guest._kill_requested:
                guest.kill()
            code = await guest._proc.wait()
            await guest._wait_pidfd()
            return await guest._cleanup(code)
        finally:
            guest._pid_known.set()
            if guest._pidfd is not None:
                os.close(guest._pidfd)
                guest._pidfd = None
            self._give_uid(uid)
            self._running.pop(id(guest), None)

    async def close(self) -> None:
        self._closed = True
        running = list(self._running.values())
        for entry in running:
            entry.guest.kill()
        if running:
            await asyncio.gather(*(e.finished for e in running), return_exceptions=True)
        if self._cgroups is not None:
            self._cgroups.remove()
            self._cgroups = None

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


class _BwrapGuest(GuestProcess):
    def __init__(self, proc: asyncio.subprocess.Process, group: cgroups.ExecutionCgroup | None):
        self._proc = proc
        self._group = group
        self._pidfd: int | None = None
        self._pid_known = asyncio.Event()
        self._kill_requested = False
        self._finished: asyncio.Future[GuestExit] | None = None

    @property
    def pid(self) -> int:
        """The host pid of the outer bwrap process."""
        return self._proc.pid

    async def wait(self) -> GuestExit:
        assert self._finished is not None
        return await asyncio.shield(self._finished)

    def kill(self) -> None:
        self._kill_requested = True
        if self._pidfd is not None:
            # The guest is pid 1 of its namespace: its death takes every process there along,
            # and bwrap, its parent, reaps it and exits. (Killing bwrap first would leave the
            # guest's zombie to the host's init.)
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                return
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()  # bwrap's --die-with-parent then kills the namespace too
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
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        finally:
            loop.remove_reader(self._pidfd)

    async def _cleanup(self, code: int) -> GuestExit:
        memory = pids = False
        if self._group is not None:
            memory = self._group.memory_exceeded()
            pids = self._group.pids_exceeded()
            for _ in range(500):
                if self._group.try_remove():
                    break
                await asyncio.sleep(0.002)
        if code > 128 and code - 128 in signal.valid_signals():
            return GuestExit(None, signal=code - 128, memory_exceeded=memory, pids_exceeded=pids)
        if code < 0:
            return GuestExit(None, signal=-code, memory_exceeded=memory, pids_exceeded=pids)
        return GuestExit(code, memory_exceeded=memory, pids_exceeded=pids)
