"""The one interface every isolation backend implements, and the plain-process backend.

A backend starts the guest runtime (``codemode.executor.guest``) for one execution with three
file descriptors already open in it: the framed channel to the service, and the write ends of
the stdout and stderr pipes. It returns a :class:`GuestProcess` that can be waited on and
killed (the whole process tree, idempotently). Limits that the guest runtime can apply to
itself with ``setrlimit`` are sent to it in the start frame; a backend adds what only the
host can enforce (namespaces, cgroups, seccomp).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

GUEST_PATH = Path(__file__).with_name("guest.py")


@dataclass(frozen=True, slots=True)
class GuestFds:
    """Descriptors the guest must inherit: its channel socket and its output pipes."""

    channel: int
    stdout: int
    stderr: int


@dataclass(frozen=True, slots=True)
class GuestExit:
    """How a guest ended. ``signal`` is set when a signal killed it."""

    returncode: int | None
    signal: int | None = None
    memory_exceeded: bool = False
    pids_exceeded: bool = False


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    """Per-execution limits a backend enforces from the host (0 = not enforced there).

    ``memory_bytes`` and ``max_processes`` are cgroup limits where the host has the controllers
    (else rlimits); ``tmpfs_bytes`` bounds each of the private ``/tmp`` and ``/dev/shm``; the rest
    are rlimit backstops under the guest, which lowers them further from its start frame.
    """

    memory_bytes: int = 512 << 20
    max_processes: int = 64
    tmpfs_bytes: int = 64 << 20
    cpu_seconds: int = 0
    max_file_bytes: int = 0
    max_open_files: int = 0


class GuestProcess(abc.ABC):
    """A running guest: one execution's whole process tree."""

    @abc.abstractmethod
    async def wait(self) -> GuestExit:
        """Wait until the guest's main process has exited and been reaped."""

    @abc.abstractmethod
    def kill(self) -> None:
        """Kill every process of this execution at once. Safe to call more than once."""


@dataclass(frozen=True, slots=True)
class ReadyGuest:
    """A guest already waiting for its start frame on ``channel``, from :meth:`acquire`.

    The caller owns ``channel`` and the read ends ``stdout`` and ``stderr`` of its output pipes.
    """

    process: GuestProcess
    channel: socket.socket
    stdout: int
    stderr: int


class SandboxBackend(abc.ABC):
    """Starts guests. ``start`` may warm a pool; ``close`` must leave nothing running."""

    name: str = "abstract"
    #: True when the backend gives the isolation properties of the design (namespaces etc.).
    isolated: bool = False

    async def start(self) -> None:  # noqa: B027 - optional hook, nothing to warm by default
        """Prepare the backend (warm pools, check the host). Default: nothing."""

    @abc.abstractmethod
    async def spawn(self, fds: GuestFds) -> GuestProcess:
        """Start one guest with ``fds`` open in it; the caller closes its copies afterwards."""

    async def acquire(self) -> ReadyGuest | None:
        """A guest whose channel and pipes were set up ahead, or None (then use ``spawn``)."""
        return None

    def describe(self) -> dict[str, str]:
        """What this backend enforces on this host, for the start-up log line."""
        return {"backend": self.name}

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Stop the backend and everything it started. Default: nothing."""


def guest_argv(channel_fd: int) -> list[str]:
    """Command line that runs the guest runtime on ``channel_fd`` with no site or user paths."""
    return [sys.executable, "-I", "-S", "-B", str(GUEST_PATH), str(channel_fd)]


class _PlainGuest(GuestProcess):
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc

    async def wait(self) -> GuestExit:
        code = await self._proc.wait()
        if code < 0:
            return GuestExit(returncode=None, signal=-code)
        return GuestExit(returncode=code)

    def kill(self) -> None:
        # The guest leads its own session, so its process group holds what it forked.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)


class ProcessBackend(SandboxBackend):
    """A plain child process per execution: no isolation beyond a clean environment.

    Only for development and hosts without namespaces; ``codemode serve`` refuses it unless
    the operator asks for ``--isolation=process``.
    """

    name = "process"
    isolated = False

    async def spawn(self, fds: GuestFds) -> GuestProcess:
        proc = await asyncio.create_subprocess_exec(
            *guest_argv(fds.channel),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=fds.stdout,
            stderr=fds.stderr,
            pass_fds=(fds.channel,),
            start_new_session=True,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            cwd="/",
        )
        return _PlainGuest(proc)
