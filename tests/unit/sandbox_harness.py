"""Driving the host-sandbox backends (bwrap, fork server) in tests as the service does."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codemode.executor.guest.protocol import Channel, encode_frame
from codemode.executor.sandbox import GuestExit, GuestFds
from codemode.executor.sandbox.bwrap import BwrapBackend
from codemode.executor.sandbox.forkserver import ForkServerBackend
from codemode.executor.sandbox.host import DEFAULT_UID_BASE
from tests.helpers import wait_until

#: Either backend that runs guests in bubblewrap sandboxes on this host.
HostBackend = BwrapBackend | ForkServerBackend

#: A uid range of the fork-server tests' own, apart from the bwrap backend's tests.
FORKSERVER_UID_BASE = DEFAULT_UID_BASE + 300_000


@dataclass
class Outcome:
    done: dict[str, Any] | None
    payload: bytes
    exit: GuestExit
    stdout: str
    stderr: str
    uid: int

    @property
    def result(self) -> Any:
        assert self.done is not None, self.stderr
        assert self.done.get("ok"), (self.done, self.stderr)
        return json.loads(self.payload) if self.payload else None


async def _read_all(fd: int) -> bytes:
    return await asyncio.to_thread(_drain, fd)


def _drain(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


async def run(
    backend: HostBackend,
    code: str,
    limits: dict[str, Any] | None = None,
    *,
    kill_after: float | None = None,
) -> Outcome:
    """One execution driven as the service does: start frame in, done frame out, then kill."""
    ours, theirs = socket.socketpair()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    guest = await backend.spawn(GuestFds(theirs.fileno(), out_w, err_w))
    theirs.close()
    os.close(out_w)
    os.close(err_w)
    stdout = asyncio.ensure_future(_read_all(out_r))
    stderr = asyncio.ensure_future(_read_all(err_r))
    ours.sendall(encode_frame({"t": "start", "tools": [], "limits": limits or {}}, code.encode()))
    channel = Channel(ours.detach(), 1 << 20)
    done: dict[str, Any] | None = None
    payload = b""

    def receive() -> tuple[dict[str, Any], bytes] | None:
        try:
            return channel.recv()
        except (EOFError, OSError):
            return None

    try:
        frame = await asyncio.wait_for(asyncio.to_thread(receive), kill_after)
        if frame is not None:
            done, payload = frame
    except TimeoutError:
        pass
    guest.kill()
    exit_ = await asyncio.wait_for(guest.wait(), 10)
    channel._sock.close()
    uid = guest.uid  # type: ignore[attr-defined]
    return Outcome(done, payload, exit_, (await stdout).decode(), (await stderr).decode(), uid)


def processes_of(uid: int) -> list[int]:
    """Pids of the host's processes running as ``uid``."""
    return processes_in(range(uid, uid + 1))


def processes_left(uid: int, timeout: float = 5.0) -> list[int]:
    """Pids still running as ``uid`` once the kernel has had ``timeout`` seconds to finish
    killing them: processes of a killed pid namespace exit just after its init does."""
    wait_until(lambda: not processes_of(uid), timeout)
    return processes_of(uid)


def processes_in(uids: range) -> list[int]:
    """Pids of the host's processes running as any uid of ``uids`` (one pass over /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        if int(uid_line.split()[1]) in uids:
            found.append(int(entry.name))
    return found


def backend_uids(backend: Any) -> range:
    """Every uid ``backend`` may give a guest (it starts at a random point of its range)."""
    return range(backend.uid_base, backend.uid_base + backend.uid_count)


def writes_that_succeed(paths: str, mode: str) -> str:
    """A program that sets ``failures`` to those of ``paths`` it could open with ``mode`` and
    write to (none, in a sound sandbox); ``paths`` is a list expression evaluated in the guest,
    which has ``os`` imported."""
    return (
        "import os\n"
        "failures = []\n"
        f"for path in {paths}:\n"
        "    try:\n"
        f"        with open(path, {mode!r}) as f:\n"
        "            f.write('x')\n"
        "        failures.append(path)\n"
        "    except OSError:\n"
        "        pass\n"
    )
