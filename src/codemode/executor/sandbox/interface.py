"""The one interface every isolation backend implements.

A backend starts the guest runtime (:mod:`codemode.executor.guest`) for one execution with three
file descriptors already open in it: the framed channel to the service, and the write ends of
the stdout and stderr pipes. It returns a :class:`GuestProcess` that can be waited on and
killed (the whole process tree, idempotently). Limits that the guest runtime can apply to
itself with ``setrlimit`` are sent to it in the start frame; a backend adds what only the
host can enforce (namespaces, cgroups, seccomp).
"""

from __future__ import annotations

import abc
import socket
from dataclasses import dataclass

from codemode.executor.guest.protocol import INPUT_DIR, OUTPUT_DIR

__all__ = [
    "INPUT_DIR",
    "OUTPUT_DIR",
    "GuestExit",
    "GuestFds",
    "GuestProcess",
    "PoolStats",
    "ReadyGuest",
    "SandboxBackend",
]


@dataclass(frozen=True, slots=True)
class GuestFds:
    """Descriptors the guest must inherit: its channel socket and its output pipes."""

    channel: int
    stdout: int
    stderr: int


@dataclass(frozen=True, slots=True)
class GuestExit:
    """How a guest ended. ``signal`` is set when a signal killed it; ``sandbox_lost`` when it
    died with the sandbox around it (the fork server's zygote), not by anything of its own."""

    returncode: int | None
    signal: int | None = None
    memory_exceeded: bool = False
    pids_exceeded: bool = False
    sandbox_lost: bool = False


class GuestProcess(abc.ABC):
    """A running guest: one execution's whole process tree."""

    @abc.abstractmethod
    async def wait(self) -> GuestExit:
        """Wait until the guest's main process has exited and been reaped."""

    @abc.abstractmethod
    def kill(self) -> None:
        """Kill every process of this execution at once. Safe to call more than once."""

    def open_dir(self, path: str) -> int | None:
        """A descriptor on directory ``path`` of the guest's own file system, for the service.

        None where the guest has no private file system (it then has no ``/input`` or
        ``/output``). Raises ``OSError`` when the directory cannot be opened.
        """
        return None


@dataclass(frozen=True, slots=True)
class ReadyGuest:
    """A guest already waiting for its start frame on ``channel``, from :meth:`acquire`.

    The caller owns ``channel`` and the read ends ``stdout`` and ``stderr`` of its output pipes.
    """

    process: GuestProcess
    channel: socket.socket
    stdout: int
    stderr: int


@dataclass(frozen=True, slots=True)
class PoolStats:
    """One pool of guests started ahead of need, as :meth:`SandboxBackend.pool_stats` sees it.

    ``kind`` is ``"preloaded"`` when its guests have the operator's preloads imported, else
    ``"plain"``. ``refills`` and ``start_failures`` count since the backend was made.
    """

    kind: str
    #: Guests ready and waiting in the pool now.
    size: int
    #: Guests started for the pool (ahead of need).
    refills: int
    #: Guests that failed to start (for the pool or for a request).
    start_failures: int


class SandboxBackend(abc.ABC):
    """Starts guests. ``start`` may warm a pool; ``close`` must leave nothing running."""

    name: str = "abstract"
    #: True when the backend gives the isolation properties of the design (namespaces etc.).
    isolated: bool = False
    #: What programs can import besides the standard library, known once started: the sandbox
    #: venv's distributions as (name, version), and the modules every guest has preloaded.
    packages: tuple[tuple[str, str], ...] = ()
    preload_modules: tuple[str, ...] = ()

    @property
    def memory_cgroup_bytes(self) -> int:
        """The memory a cgroup holds each guest to (real use, bytes), or 0 where none does."""
        return 0

    async def start(self) -> None:  # noqa: B027 - optional hook, nothing to warm by default
        """Prepare the backend (warm pools, check the host). Default: nothing."""

    @abc.abstractmethod
    async def spawn(self, fds: GuestFds) -> GuestProcess:
        """Start one guest with ``fds`` open in it; the caller closes its copies afterwards."""

    async def acquire(self, packages: bool = True) -> ReadyGuest | None:
        """A guest whose channel and pipes were set up ahead, or None (then use ``spawn``).

        ``packages`` False: the program imports only the standard library, so a guest without
        the operator's preloads serves it as well (and, where one is kept, more cheaply).
        """
        return None

    def pool_stats(self) -> tuple[PoolStats, ...]:
        """Its pools now, one per kind of guest; none where guests are not started ahead.

        Cheap and side-effect free: the service's metrics call it on every scrape, from
        another thread, so it only reads counters the event loop keeps.
        """
        return ()

    def describe(self) -> dict[str, str]:
        """What this backend enforces on this host, for the start-up log line."""
        return {"backend": self.name}

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Stop the backend and everything it started. Default: nothing."""
