"""The bubblewrap backend against real sandboxes: containment, limits, cleanup."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from codemode.executor.bwrap import DEFAULT_UID_BASE, BwrapBackend
from codemode.executor.guest import Channel, encode_frame
from codemode.executor.sandbox import GuestExit, GuestFds, SandboxLimits

pytestmark = [
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the bwrap backend runs as root"),
]


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
    backend: BwrapBackend,
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


@pytest.fixture(scope="module")
async def backend() -> AsyncIterator[BwrapBackend]:
    b = BwrapBackend(SandboxLimits(memory_bytes=256 << 20, max_processes=32, tmpfs_bytes=8 << 20))
    await b.start()
    yield b
    await b.close()


async def test_result_comes_back(backend: BwrapBackend) -> None:
    out = await run(backend, "print('hi'); result = 2 + 2")
    assert out.result == 4
    assert out.stdout == "hi\n"
    # The service kills the tree once the outcome is in: exit 0 or that SIGKILL, nothing else.
    assert out.exit.returncode == 0 or out.exit.signal == 9


async def test_host_files_are_not_there(backend: BwrapBackend) -> None:
    code = textwrap.dedent(
        """
        import os
        seen = {}
        site = os.path.join(os.path.dirname(os.__file__), "site-packages", "pip")
        for path in ["/root/.bashrc", "/etc/shadow", "/etc/passwd", "/home", "/work",
                     "/etc", "/var", "/sys/kernel", site]:
            try:
                if os.path.isdir(path):
                    os.listdir(path)
                else:
                    open(path, "rb").read(1)
                seen[path] = "readable"
            except OSError as exc:
                seen[path] = type(exc).__name__
        result = {"seen": seen, "root": sorted(os.listdir("/"))}
        """
    )
    out = await run(backend, code)
    seen = out.result["seen"]
    assert all(v != "readable" for v in seen.values()), seen
    assert set(out.result["root"]) <= {
        "codemode",
        "dev",
        "lib",
        "lib64",
        "proc",
        "root",
        "tmp",
        "usr",
    }


async def test_root_fs_and_runtime_are_read_only(backend: BwrapBackend) -> None:
    code = textwrap.dedent(
        """
        import os, sys
        failures = []
        for path in ["/x", "/usr/x", os.path.join(os.path.dirname(os.__file__), "x.py"),
                     "/codemode/guest.py", "/proc/sys/kernel/core_pattern", "/proc/sysrq-trigger"]:
            try:
                with open(path, "a") as f:
                    f.write("x")
                failures.append(path)
            except OSError:
                pass
        result = failures
        """
    )
    assert (await run(backend, code)).result == []


async def test_no_network(backend: BwrapBackend) -> None:
    code = textwrap.dedent(
        """
        import socket
        errors = []
        for family, addr in [(socket.AF_INET, ("127.0.0.1", 22)), (socket.AF_INET, ("1.1.1.1", 53)),
                             (socket.AF_INET6, ("::1", 22))]:
            try:
                s = socket.socket(family, socket.SOCK_STREAM)
                s.settimeout(1)
                s.connect(addr)
                errors.append("connected")
            except OSError as exc:
                errors.append(exc.errno)
        try:
            socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)
            errors.append("netlink")
        except OSError as exc:
            errors.append(exc.errno)
        a, b = socket.socketpair()  # local pairs stay usable (asyncio needs one)
        a.send(b"x")
        result = {"errors": errors, "pair": b.recv(1).decode()}
        """
    )
    out = (await run(backend, code)).result
    assert "connected" not in out["errors"]
    assert "netlink" not in out["errors"]
    assert out["pair"] == "x"


async def test_clean_environment_and_identity(backend: BwrapBackend) -> None:
    os.environ["CODEMODE_TEST_SECRET"] = "hunter2"
    try:
        code = textwrap.dedent(
            """
            import os
            status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
            result = {
                "env": dict(os.environ),
                "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
                "caps": {k: status[k].strip() for k in
                         ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
                "nnp": status["NoNewPrivs"].strip(), "seccomp": status["Seccomp"].strip(),
                "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
                "hostname": os.uname().nodename,
                "fds": sorted(int(f) for f in os.listdir("/proc/self/fd")),
            }
            """
        )
        out = (await run(backend, code)).result
    finally:
        del os.environ["CODEMODE_TEST_SECRET"]
    assert out["env"] == {"LANG": "C.UTF-8", "PWD": "/tmp"}
    assert out["uid"] >= backend.uid_base
    assert out["gid"] == out["uid"]
    assert out["groups"] == []
    assert set(out["caps"].values()) == {"0000000000000000"}
    assert out["nnp"] == "1"
    assert out["seccomp"] == "2"
    assert out["pids"] == [1]  # alone in its pid namespace
    assert out["hostname"] == "codemode"
    # stdin, stdout, stderr, the channel, and the fd listing itself: nothing else leaked in.
    assert len(out["fds"]) <= 5, out["fds"]


async def test_seccomp_denies_kernel_surface(backend: BwrapBackend) -> None:
    code = textwrap.dedent(
        """
        import ctypes, errno, os
        libc = ctypes.CDLL(None, use_errno=True)
        def call(nr, *args):
            r = libc.syscall(nr, *args)
            return 0 if r >= 0 else ctypes.get_errno()
        result = {
            "unshare_user": call(272, 0x10000000),      # unshare(CLONE_NEWUSER)
            "ptrace": call(101, 16, 1, 0, 0),          # PTRACE_ATTACH
            "io_uring_setup": call(425, 1, 0),
            "bpf": call(321, 0, 0, 0),
            "keyctl": call(250, 0, 0),
            "mount": call(165, 0, 0, 0, 0, 0),
        }
        try:
            os.fork_and_unshare = None
            import threading
            t = threading.Thread(target=lambda: None); t.start(); t.join()
            result["threads"] = "ok"
        except Exception as exc:
            result["threads"] = repr(exc)
        """
    )
    out = (await run(backend, code)).result
    assert out.pop("threads") == "ok"
    assert all(v == 1 for v in out.values()), out  # EPERM


async def test_tmp_is_private_to_each_execution(backend: BwrapBackend) -> None:
    first = await run(
        backend,
        "open('/tmp/left', 'w').write('x'); open('/dev/shm/left', 'w').write('x'); result = 1",
    )
    assert first.result == 1
    second = await run(backend, "import os; result = os.listdir('/tmp') + os.listdir('/dev/shm')")
    assert second.result == []


async def test_tmpfs_is_size_bounded(backend: BwrapBackend) -> None:
    code = textwrap.dedent(
        """
        try:
            with open("/tmp/big", "wb") as f:
                for _ in range(64):
                    f.write(b"x" * (1 << 20))
            result = "wrote 64 MiB"
        except OSError as exc:
            result = exc.errno
        """
    )
    assert (await run(backend, code)).result == 28  # ENOSPC at the 8 MiB bound


def _processes_of(uid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        if int(uid_line.split()[1]) == uid:
            found.append(int(entry.name))
    return found


async def test_kill_leaves_nothing(backend: BwrapBackend) -> None:
    code = textwrap.dedent(
        """
        import os, time, subprocess, sys
        for _ in range(5):
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    time.sleep(600)
                os._exit(0)
        time.sleep(600)
        """
    )
    out = await run(backend, code, kill_after=1.5)
    assert out.done is None
    assert out.exit.signal == 9
    assert _processes_of(out.uid) == []


async def test_fork_bomb_is_capped(backend: BwrapBackend) -> None:
    code = textwrap.dedent(
        """
        import os, time
        made = 0
        try:
            for _ in range(1000):
                pid = os.fork()
                if pid == 0:
                    time.sleep(60)
                    os._exit(0)
                made += 1
        except OSError as exc:
            result = {"made": made, "errno": exc.errno}
        """
    )
    out = await run(backend, code)
    assert out.result["made"] < 32
    assert out.exit.pids_exceeded or out.result["errno"] == 11
    assert _processes_of(out.uid) == []


async def test_memory_limit_is_reported(backend: BwrapBackend) -> None:
    code = "blocks = []\nwhile True:\n    blocks.append(bytearray(16 << 20))\n"
    out = await run(backend, code, kill_after=20)
    if backend.cgroup_support and backend.cgroup_support.has("memory"):
        assert out.done is None
        assert out.exit.signal == 9
        assert out.exit.memory_exceeded
    else:
        assert out.done is not None
        assert out.done["type"] == "MemoryLimit"


async def test_guest_rlimits_from_start_frame(backend: BwrapBackend) -> None:
    code = "while True: pass"
    out = await run(backend, code, {"cpu_seconds": 1}, kill_after=15)
    assert out.done is None
    assert out.exit.signal in (9, 24)


async def test_close_leaves_no_cgroup_or_process() -> None:
    # A uid range of its own: the module's backend has sandboxes waiting in its pool.
    b = BwrapBackend(SandboxLimits(max_processes=16), uid_base=DEFAULT_UID_BASE + 100_000)
    await b.start()
    ours, theirs = socket.socketpair()
    out_r, out_w = os.pipe()
    guest = await b.spawn(GuestFds(theirs.fileno(), out_w, out_w))
    theirs.close()
    os.close(out_w)
    ours.sendall(encode_frame({"t": "start", "tools": []}, b"import time; time.sleep(600)"))
    await asyncio.sleep(0.5)
    sites = b.cgroup_support.sites.values() if b.cgroup_support else []
    groups = [s.parent / b._cgroups.name for s in sites if b._cgroups is not None]
    await b.close()
    exit_ = await guest.wait()
    assert exit_.signal == 9
    assert _processes_of(guest.uid) == []  # type: ignore[attr-defined]
    assert not [p for u in range(b.uid_base, b.uid_base + 8) for p in _processes_of(u)]
    for group in groups:
        assert not group.exists()
    ours.close()
    os.close(out_r)


async def test_cold_start_without_pool() -> None:
    b = BwrapBackend(pool_size=0, uid_base=DEFAULT_UID_BASE + 200_000)
    try:
        out = await run(b, "result = sum(range(10))")
        assert out.result == 45
    finally:
        await b.close()
