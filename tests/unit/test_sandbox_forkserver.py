"""The fork-server backend against real sandboxes: containment, limits, cleanup, zygote death."""

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

from codemode.executor.bwrap import DEFAULT_UID_BASE, SandboxUnavailable
from codemode.executor.forkserver import ForkServerBackend
from codemode.executor.guest import Channel, encode_frame
from codemode.executor.sandbox import GuestExit, GuestFds, SandboxLimits

pytestmark = [
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the fork-server backend runs as root"),
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
    backend: ForkServerBackend,
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


#: A uid range of this module's own, apart from the other backends' tests.
UID_BASE = DEFAULT_UID_BASE + 300_000


@pytest.fixture(scope="module")
async def backend() -> AsyncIterator[ForkServerBackend]:
    b = ForkServerBackend(
        SandboxLimits(memory_bytes=256 << 20, max_processes=32, tmpfs_bytes=8 << 20),
        uid_base=UID_BASE,
    )
    await b.start()
    yield b
    await b.close()


async def test_result_comes_back(backend: ForkServerBackend) -> None:
    out = await run(backend, "print('hi'); result = 2 + 2")
    assert out.result == 4
    assert out.stdout == "hi\n"
    # The service kills the tree once the outcome is in: exit 0 or that SIGKILL, nothing else.
    assert out.exit.returncode == 0 or out.exit.signal == 9


async def test_host_files_are_not_there(backend: ForkServerBackend) -> None:
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


async def test_root_fs_and_runtime_are_read_only(backend: ForkServerBackend) -> None:
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


async def test_no_network(backend: ForkServerBackend) -> None:
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


async def test_clean_environment_and_identity(backend: ForkServerBackend) -> None:
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


async def test_seccomp_denies_kernel_surface(backend: ForkServerBackend) -> None:
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


async def test_tmp_is_private_to_each_execution(backend: ForkServerBackend) -> None:
    first = await run(
        backend,
        "open('/tmp/left', 'w').write('x'); open('/dev/shm/left', 'w').write('x'); result = 1",
    )
    assert first.result == 1
    second = await run(backend, "import os; result = os.listdir('/tmp') + os.listdir('/dev/shm')")
    assert second.result == []


async def test_tmpfs_is_size_bounded(backend: ForkServerBackend) -> None:
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


async def test_kill_leaves_nothing(backend: ForkServerBackend) -> None:
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


async def test_fork_bomb_is_capped(backend: ForkServerBackend) -> None:
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


async def test_memory_limit_is_reported(backend: ForkServerBackend) -> None:
    code = "blocks = []\nwhile True:\n    blocks.append(bytearray(16 << 20))\n"
    out = await run(backend, code, kill_after=20)
    if backend.cgroup_support and backend.cgroup_support.has("memory"):
        assert out.done is None
        assert out.exit.signal == 9
        assert out.exit.memory_exceeded
    else:
        assert out.done is not None
        assert out.done["type"] == "MemoryLimit"


async def test_reused_cgroups_report_only_their_own_limit_hits(
    backend: ForkServerBackend,
) -> None:
    """Emptied cgroups serve later guests: an earlier guest's OOM kill is not theirs."""
    bomb = "blocks = []\nwhile True:\n    blocks.append(bytearray(16 << 20))\n"
    for _ in range(2):
        await run(backend, bomb, kill_after=20)
    for _ in range(2 * (backend.pool_size + 2)):
        out = await run(backend, "import os\nos._exit(3)\n", kill_after=20)
        assert out.done is None
        assert out.exit.returncode == 3
        assert not out.exit.memory_exceeded
        assert not out.exit.pids_exceeded


async def test_guest_rlimits_from_start_frame(backend: ForkServerBackend) -> None:
    code = "while True: pass"
    out = await run(backend, code, {"cpu_seconds": 1}, kill_after=15)
    assert out.done is None
    assert out.exit.signal in (9, 24)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _zygote_pid(backend: ForkServerBackend) -> int:
    zygote = backend._zygote
    assert zygote is not None
    assert zygote.pid is not None
    return zygote.pid


async def _started(backend: ForkServerBackend, code: str) -> tuple[Any, socket.socket, int]:
    """A guest running ``code`` (not waited for): (guest, channel socket, stdout read end)."""
    ours, theirs = socket.socketpair()
    out_r, out_w = os.pipe()
    guest = await backend.spawn(GuestFds(theirs.fileno(), out_w, out_w))
    theirs.close()
    os.close(out_w)
    ours.sendall(encode_frame({"t": "start", "tools": []}, code.encode()))
    return guest, ours, out_r


async def test_proc_sys_is_not_writable_and_uid_is_unique(backend: ForkServerBackend) -> None:
    code = textwrap.dedent(
        """
        import os
        failures = []
        for path in ["/proc/sys/kernel/hostname", "/proc/sys/kernel/core_pattern",
                     "/proc/sys/vm/overcommit_memory"]:
            try:
                with open(path, "w") as f:
                    f.write("x")
                failures.append(path)
            except OSError:
                pass
        result = {"failures": failures, "uid": os.getuid()}
        """
    )
    outs = await asyncio.gather(*(run(backend, code) for _ in range(4)))
    assert all(o.result["failures"] == [] for o in outs)
    uids = [o.result["uid"] for o in outs]
    assert len(set(uids)) == 4
    assert all(UID_BASE <= u < UID_BASE + backend.uid_count for u in uids)


async def test_zygote_is_out_of_reach(backend: ForkServerBackend) -> None:
    zygote = _zygote_pid(backend)
    code = textwrap.dedent(
        """
        import os, signal
        out = {}
        try:
            os.kill(-1, signal.SIGKILL)  # everything this uid may signal... in its namespace
        except OSError as exc:
            out["kill_all"] = exc.errno
        for pid in (2, 3, 100, ZYGOTE):
            try:
                os.kill(pid, 0)
                out[pid] = "reachable"
            except OSError as exc:
                out[pid] = exc.errno
        out["procs"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        out["ppid"] = os.getppid()
        out["fds"] = sorted(int(f) for f in os.listdir("/proc/self/fd"))
        result = out
        """
    ).replace("ZYGOTE", str(zygote))
    # kill(-1) spares the caller itself; so the program reports.
    out = (await run(backend, code)).result
    assert "reachable" not in out.values(), out
    assert out["procs"] == [1]
    assert out["ppid"] == 0  # its parent lives in another pid namespace
    assert len(out["fds"]) <= 5
    assert _alive(zygote)
    assert (await run(backend, "result = 1")).result == 1


async def test_zygote_has_only_the_capabilities_it_needs(backend: ForkServerBackend) -> None:
    text = await asyncio.to_thread(Path(f"/proc/{_zygote_pid(backend)}/status").read_text)
    status = dict(line.split(":", 1) for line in text.splitlines())
    # CAP_SETGID 6, CAP_SETUID 7, CAP_SETPCAP 8, CAP_KILL 5, CAP_SYS_ADMIN 21.
    wanted = (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 21)
    assert int(status["CapEff"], 16) == wanted
    assert int(status["CapBnd"], 16) == wanted
    assert status["NoNewPrivs"].strip() == "1"
    # Of the service, the zygote holds its control socket and stderr, nothing else: no
    # guest's socket outlives the fork that handed it over.
    fd_dir = f"/proc/{_zygote_pid(backend)}/fd"
    links = [os.readlink(f"{fd_dir}/{fd}") for fd in os.listdir(fd_dir)]
    assert sum(link.startswith("socket:") for link in links) == 1, links
    assert len(links) <= 9, links


async def test_concurrent_executions_do_not_see_each_other(backend: ForkServerBackend) -> None:
    listener = textwrap.dedent(
        """
        import socket, os, time
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind("\\0codemode-spy")
        s.listen()
        open("/tmp/marker", "w").write("secret")
        time.sleep(600)
        """
    )
    first, sock, out_r = await _started(backend, listener)
    await asyncio.sleep(0.3)
    spy = textwrap.dedent(
        """
        import socket, os
        out = {}
        try:
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect("\\0codemode-spy")
            out["abstract"] = "connected"
        except OSError as exc:
            out["abstract"] = exc.errno
        out["tmp"] = os.listdir("/tmp")
        out["procs"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        result = out
        """
    )
    try:
        out = (await run(backend, spy)).result
    finally:
        first.kill()
        await first.wait()
        sock.close()
        os.close(out_r)
    assert out == {"abstract": 111, "tmp": [], "procs": [1]}  # ECONNREFUSED: nobody there


async def test_sixteen_at_once(backend: ForkServerBackend) -> None:
    code = "import os, time; time.sleep(0.2); result = os.getuid()"
    outs = await asyncio.gather(*(run(backend, code) for _ in range(16)))
    uids = [o.result for o in outs]
    assert len(set(uids)) == 16
    for out in outs:
        assert _processes_of(out.uid) == []


def _group_empty(procs: str) -> bool:
    """The execution's cgroup is gone, or empty (the backend keeps emptied ones for reuse)."""
    try:
        with open(procs) as handle:
            return handle.read().split() == []
    except FileNotFoundError:
        return True


async def test_zygote_death_leaves_nothing_and_a_new_one_serves() -> None:
    b = ForkServerBackend(SandboxLimits(max_processes=16), uid_base=UID_BASE + 10_000)
    await b.start()
    try:
        code = "import os, time\nfor _ in range(3):\n    os.fork()\ntime.sleep(600)\n"
        guest, sock, out_r = await _started(b, code)
        await asyncio.sleep(0.5)
        assert len(_processes_of(guest.uid)) == 8
        groups = list(guest._group.procs_files) if guest._group is not None else []
        os.kill(_zygote_pid(b), 9)
        exit_ = await asyncio.wait_for(guest.wait(), 10)
        assert exit_.signal == 9
        assert _processes_of(guest.uid) == []
        await asyncio.sleep(0.2)
        assert not [p for u in range(b.uid_base, b.uid_base + 32) for p in _processes_of(u)]
        for procs in groups:  # removed, or emptied and kept for reuse by the backend
            assert _group_empty(procs)
        sock.close()
        os.close(out_r)
        # The next request starts a new zygote.
        assert (await run(b, "result = 6 * 7")).result == 42  # type: ignore[arg-type]
    finally:
        await b.close()


async def test_zygote_that_cannot_start_is_reported() -> None:
    b = ForkServerBackend(uid_base=UID_BASE + 20_000, pool_size=0)
    b.zygote_argv = lambda *a: ["/bin/false"]  # type: ignore[method-assign]
    with pytest.raises(SandboxUnavailable, match="zygote"):
        await b.start()
    await b.close()


async def test_close_stops_the_zygote_and_leaves_nothing() -> None:
    b = ForkServerBackend(SandboxLimits(max_processes=16), uid_base=UID_BASE + 30_000)
    await b.start()
    guest, sock, out_r = await _started(b, "import time; time.sleep(600)")
    await asyncio.sleep(0.3)
    zygote = _zygote_pid(b)
    sites = b.cgroup_support.sites.values() if b.cgroup_support else []
    groups = [s.parent / b._cgroups.name for s in sites if b._cgroups is not None]
    await b.close()
    exit_ = await guest.wait()
    assert exit_.signal == 9
    assert not _alive(zygote)
    assert not [p for u in range(b.uid_base, b.uid_base + 16) for p in _processes_of(u)]
    for group in groups:
        assert not group.exists()
    sock.close()
    os.close(out_r)


async def test_no_pool() -> None:
    b = ForkServerBackend(pool_size=0, uid_base=UID_BASE + 40_000)
    try:
        out = await run(b, "result = sum(range(10))")  # type: ignore[arg-type]
        assert out.result == 45
    finally:
        await b.close()
