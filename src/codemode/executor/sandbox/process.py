"""The plain-process backend: a child process per execution, with no sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys

from codemode.executor.guest import GUEST_DIR
from codemode.executor.sandbox.interface import GuestExit, GuestFds, GuestProcess, SandboxBackend


def guest_argv(channel_fd: int) -> list[str]:
    """Command line that runs the guest runtime on ``channel_fd`` with no site or user paths."""
    return [sys.executable, "-I", "-S", "-B", GUEST_DIR, str(channel_fd)]


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
