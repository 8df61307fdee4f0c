"""The plain-process backend: a child process per execution, with no sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from typing import Unpack

from codemode.executor.guest import GUEST_DIR
from codemode.executor.sandbox.environment import GuestContents, guest_env
from codemode.executor.sandbox.interface import GuestExit, GuestFds, GuestProcess, SandboxBackend
from codemode.executor.sandbox.runtime import SandboxUnavailable
from codemode.executor.sandbox.venv import SandboxVenv, inspect_venv


def guest_argv(channel_fd: int, options: Sequence[str] = ()) -> list[str]:
    """Command line that runs the guest runtime on ``channel_fd`` with no site or user paths."""
    return [sys.executable, "-I", "-S", "-B", GUEST_DIR, *options, str(channel_fd)]


class _PlainGuest(GuestProcess):
    def __init__(self, proc: asyncio.subprocess.Process, home: str) -> None:
        self._proc = proc
        self._home = home

    async def wait(self) -> GuestExit:
        code = await self._proc.wait()
        shutil.rmtree(self._home, ignore_errors=True)
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
    the operator asks for ``--isolation=process``. It honours the sandbox venv (on the
    guest's ``sys.path``) and the guests' environment, with a fresh temporary ``HOME`` per
    execution; preloads are only checked at start, since every guest is a new interpreter.
    """

    name = "process"
    isolated = False

    def __init__(self, **contents: Unpack[GuestContents]) -> None:
        self.sandbox_venv = contents.get("sandbox_venv")
        self.preload_modules = tuple(contents.get("preload", ()))
        self._env = guest_env(contents.get("sandbox_env"))
        self.venv: SandboxVenv | None = None

    def _options(self) -> list[str]:
        return ["--path", self.venv.site_packages] if self.venv is not None else []

    async def start(self) -> None:
        if self.sandbox_venv is not None and self.venv is None:
            self.venv = await asyncio.to_thread(inspect_venv, self.sandbox_venv)
            self.packages = tuple((p.name, p.version) for p in self.venv.packages)
        if self.preload_modules:
            preload = ["--preload", ",".join(self.preload_modules), "--check"]
            proc = await asyncio.create_subprocess_exec(
                *[sys.executable, "-I", "-S", "-B", GUEST_DIR, *self._options(), *preload],
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **self._env},
                cwd="/",
            )
            _, stderr = await proc.communicate()
            if proc.returncode != 0:
                raise SandboxUnavailable(
                    f"preloading {', '.join(self.preload_modules)} failed: "
                    f"{stderr.decode(errors='replace').strip()[-2000:]}"
                )

    async def spawn(self, fds: GuestFds) -> GuestProcess:
        home = tempfile.mkdtemp(prefix="codemode-home-")
        try:
            proc = await asyncio.create_subprocess_exec(
                *guest_argv(fds.channel, self._options()),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=fds.stdout,
                stderr=fds.stderr,
                pass_fds=(fds.channel,),
                start_new_session=True,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **self._env, "HOME": home},
                cwd="/",
            )
        except BaseException:
            shutil.rmtree(home, ignore_errors=True)
            raise
        return _PlainGuest(proc, home)
