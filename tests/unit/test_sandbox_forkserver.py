"""The fork-server backend's own behaviour against real sandboxes: zygote, uids, reuse, death.

What it shares with the bwrap backend (containment, limits, cleanup after a kill) is tested
for both in ``test_sandbox_backends.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from codemode.config import LimitsConfig
from codemode.executor.guest.protocol import encode_frame
from codemode.executor.sandbox import GuestFds
from codemode.executor.sandbox.forkserver import ForkServerBackend
from codemode.executor.sandbox.runtime import SandboxUnavailable
from tests.helpers import wait_until
from tests.unit.sandbox_harness import FORKSERVER_UID_BASE as UID_BASE
from tests.unit.sandbox_harness import (
    backend_uids,
    processes_in,
    processes_of,
    run,
    writes_that_succeed,
)

pytestmark = [
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the fork-server backend runs as root"),
]


@pytest.fixture(scope="module")
async def backend() -> AsyncIterator[ForkServerBackend]:
    b = ForkServerBackend(
        LimitsConfig(memory_bytes=256 << 20, max_processes=32, tmpfs_bytes=8 << 20),
        uid_base=UID_BASE,
    )
    await b.start()
    yield b
    await b.close()


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


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _zygote_pid(backend: ForkServerBackend) -> int:
    zygote = backend._plain.zygote
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
    code = writes_that_succeed(
        '["/proc/sys/kernel/hostname", "/proc/sys/kernel/core_pattern",'
        ' "/proc/sys/vm/overcommit_memory"]',
        "w",
    )
    code += 'result = {"failures": failures, "uid": os.getuid()}\n'
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
    # Besides the network namespaces it lends to guests (and its own), see NetnsLease.
    assert len([link for link in links if not link.startswith("net:")]) <= 9, links


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
    assert out == {"abstract": 111, "tmp": [".home"], "procs": [1]}  # ECONNREFUSED: nobody there


async def test_sixteen_at_once(backend: ForkServerBackend) -> None:
    code = "import os, time; time.sleep(0.2); result = os.getuid()"
    outs = await asyncio.gather(*(run(backend, code) for _ in range(16)))
    uids = [o.result for o in outs]
    assert len(set(uids)) == 16
    for out in outs:
        assert processes_of(out.uid) == []


def _group_empty(procs: str) -> bool:
    """The execution's cgroup is gone, or empty (the backend keeps emptied ones for reuse)."""
    try:
        with open(procs) as handle:
            return handle.read().split() == []
    except FileNotFoundError:
        return True


async def test_zygote_death_leaves_nothing_and_a_new_one_serves() -> None:
    b = ForkServerBackend(LimitsConfig(max_processes=16), uid_base=UID_BASE + 10_000)
    await b.start()
    try:
        code = "import os, time\nfor _ in range(3):\n    os.fork()\ntime.sleep(600)\n"
        guest, sock, out_r = await _started(b, code)
        await asyncio.sleep(0.5)
        assert len(processes_of(guest.uid)) == 8
        groups = list(guest._group.procs_files) if guest._group is not None else []
        os.kill(_zygote_pid(b), 9)
        exit_ = await asyncio.wait_for(guest.wait(), 10)
        assert exit_.signal == 9
        assert processes_of(guest.uid) == []
        await asyncio.sleep(0.2)
        assert not processes_in(backend_uids(b))
        for procs in groups:  # removed, or emptied and kept for reuse by the backend
            assert _group_empty(procs)
        sock.close()
        os.close(out_r)
        # The next request starts a new zygote.
        assert (await run(b, "result = 6 * 7")).result == 42
    finally:
        await b.close()


async def test_zygote_that_cannot_start_is_reported() -> None:
    b = ForkServerBackend(uid_base=UID_BASE + 20_000, pool_size=0)
    b.zygote_argv = lambda *a: ["/bin/false"]  # type: ignore[method-assign]
    with pytest.raises(SandboxUnavailable, match="zygote"):
        await b.start()
    await b.close()


async def test_close_stops_the_zygote_and_leaves_nothing() -> None:
    b = ForkServerBackend(LimitsConfig(max_processes=16), uid_base=UID_BASE + 30_000)
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
    assert not processes_in(backend_uids(b))
    for group in groups:
        assert not group.exists()
    sock.close()
    os.close(out_r)


async def test_a_pooled_guest_is_already_in_its_cgroups(backend: ForkServerBackend) -> None:
    """Each child joins its execution's cgroups itself, first thing after the fork."""
    if backend._cgroups is None:
        pytest.skip("no cgroup controller is usable on this host; limits fall back to rlimits")
    ready = await backend.acquire()
    assert ready is not None
    guest = ready.process
    try:
        group = guest._group  # type: ignore[attr-defined]
        assert group is not None
        assert len(group.procs_files) == len(backend._cgroups.controllers) >= 1
        for procs in group.procs_files:
            assert (await asyncio.to_thread(Path(procs).read_text)).split() == [str(guest.pid)]
    finally:
        guest.kill()
        ready.channel.close()
        os.close(ready.stdout)
        os.close(ready.stderr)
        await asyncio.wait_for(guest.wait(), 10)


async def test_a_guest_s_mounts_are_all_private(backend: ForkServerBackend) -> None:
    """Made private once in the zygote; each guest's copy of the tree is private too."""
    code = (
        "lines = open('/proc/self/mountinfo').read().splitlines()\n"
        "result = {'n': len(lines), 'propagating': [l for l in lines\n"
        "    if 'shared:' in l.split(' - ')[0] or 'master:' in l.split(' - ')[0]]}\n"
    )
    out = (await run(backend, code)).result
    assert out["n"] > 10  # the runtime's read-only binds, /tmp, /proc...
    assert out["propagating"] == []


async def test_zygote_ignores_malformed_control_messages(backend: ForkServerBackend) -> None:
    """The control protocol is fixed binary (zygote.MESSAGE): anything else is dropped, and the
    zygote goes on forking."""
    from codemode.executor.guest import zygote as protocol

    zygote = backend._plain.zygote
    assert zygote is not None
    pid = _zygote_pid(backend)
    for junk in (
        b"",
        b"F",
        b"F" + bytes(40),
        b'F{"id": 1, "uid": 1}',
        protocol.MESSAGE.pack(b"Q", 7, 7),
    ):
        if junk:
            zygote.control.send(junk)
    for _ in range(backend.pool_size + 2):  # past the pool: new forks after the junk
        assert (await run(backend, "result = 6 * 7")).result == 42
    assert _alive(pid)
    assert backend._plain.zygote is zygote


async def test_no_pool() -> None:
    b = ForkServerBackend(pool_size=0, uid_base=UID_BASE + 40_000)
    try:
        out = await run(b, "result = sum(range(10))")
        assert out.result == 45
    finally:
        await b.close()


async def test_warm_up_leaves_nothing_behind(backend: ForkServerBackend) -> None:
    """Pooled guests run a dummy program before they are ready; a real one sees none of it."""
    code = (
        "result = {'globals': sorted(k for k in globals() if not k.startswith('__')),\n"
        "          'lines': sorted(k for k in __import__('linecache').cache if k[0] == '<')}\n"
    )
    out = (await run(backend, code)).result
    assert out == {
        "globals": ["codemode", "config", "context", "tools"],
        "lines": ["<codemode>"],
    }


async def test_a_reused_network_namespace_keeps_nothing_of_the_last_execution() -> None:
    """Network namespaces are lent again after their guest is reaped; nothing of it is left.

    With no pool, each execution forks after the previous guest was reaped, so it gets the
    namespace just given back (the test checks that it does: same inode), and finds the
    abstract socket the previous program left listening gone with it.
    """
    b = ForkServerBackend(pool_size=0, uid_base=UID_BASE + 50_000)
    leave = (
        "import os, socket\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
        "s.bind('\\0codemode-left-behind')\n"
        "s.listen()\n"
        "result = os.readlink('/proc/self/ns/net')\n"
    )
    probe = (
        "import os, socket\n"
        "c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
        "try:\n"
        "    c.connect('\\0codemode-left-behind')\n"
        "    found = 'connected'\n"
        "except OSError as exc:\n"
        "    found = exc.errno\n"
        "links = open('/proc/net/dev').read().split('\\n')[2:]\n"
        "result = [os.readlink('/proc/self/ns/net'), found, [l.split(':')[0].strip()\n"
        "          for l in links if l.strip()], open('/proc/net/unix').read().splitlines()]\n"
    )
    try:
        first = (await run(b, leave)).result
        netns, found, interfaces, unix_lines = (await run(b, probe)).result
    finally:
        await b.close()
    assert netns == first  # the namespace was reused, so the rest of the test means something
    assert found == 111  # ECONNREFUSED: the name went with the socket
    assert interfaces == ["lo"]
    # The header and the probe's own socket: none of the earlier program's is left.
    assert len(unix_lines) == 2, unix_lines
    assert not any("left-behind" in line for line in unix_lines)


async def test_guests_forked_without_at_fork_hooks_are_sound(backend: ForkServerBackend) -> None:
    """The zygote forks with libc's fork (zygote._fork): threads, asyncio, subprocesses and
    random numbers still work as after os.fork, and no two guests share a random stream."""
    code = textwrap.dedent(
        """
        import asyncio, random, subprocess, sys, threading
        box = []
        t = threading.Thread(target=lambda: box.append(threading.get_ident()))
        t.start(); t.join()
        async def main():
            await asyncio.sleep(0)
            return threading.current_thread() is threading.main_thread()
        child = subprocess.run(
            [sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True
        )
        result = [random.getrandbits(64), len(box), asyncio.run(main()), child.stdout.strip()]
        """
    )
    first, second = [(await run(backend, code)).result for _ in range(2)]
    assert first[1:] == second[1:] == [1, True, "42"]
    assert first[0] != second[0]


def test_after_a_raw_fork_random_is_reseeded() -> None:
    """If the zygote had imported random, _after_fork gives each child its own stream."""
    import random

    from codemode.executor.guest import zygote

    state = random.getstate()
    zygote._after_fork()
    assert random.getstate() != state


async def _until(condition: Any, what: str, timeout_s: float = 10.0) -> None:
    met = await asyncio.to_thread(wait_until, condition, timeout_s, 0.005)
    assert met, f"timed out waiting for {what}"


def _release(ready: Any) -> None:
    """Let go of an acquired guest that was never used."""
    ready.process.kill()
    ready.channel.close()
    os.close(ready.stdout)
    os.close(ready.stderr)


@contextlib.asynccontextmanager
async def _drained_pool(pool_size: int, uid_offset: int) -> AsyncIterator[tuple[Any, int, list]]:
    """A backend whose pool was emptied while its zygote is stopped (``SIGSTOP``), so the
    refills stay in flight: (backend, zygote pid, the guests taken, released at the end)."""
    b = ForkServerBackend(pool_size=pool_size, uid_base=UID_BASE + uid_offset)
    await b.start()
    taken: list[Any] = []
    try:
        await _until(lambda: len(b._plain.pool) == pool_size, "a full pool")
        zygote = _zygote_pid(b)
        os.kill(zygote, signal.SIGSTOP)
        taken += [await b.acquire() for _ in range(pool_size)]
        await _until(lambda: b._plain.forking == pool_size, "the refills in flight")
        yield b, zygote, taken
    finally:
        for ready in taken:
            _release(ready)
        await b.close()


async def _waiting_acquire(b: ForkServerBackend) -> asyncio.Future[Any]:
    waiting = asyncio.ensure_future(b.acquire())
    await _until(lambda: len(b._plain.waiting) == 1, "the request to wait")
    return waiting


async def test_an_empty_pool_hands_over_a_guest_already_being_forked() -> None:
    """A request that finds the pool empty while guests are being forked for it takes the
    first of them ready, instead of forking one more of its own."""
    async with _drained_pool(2, 60_000) as (b, zygote, taken):
        forks = b._next_id
        waiting = await _waiting_acquire(b)
        os.kill(zygote, signal.SIGCONT)
        taken.append(await asyncio.wait_for(waiting, 10))
        assert b._next_id == forks  # it forked none of its own
        assert not b._plain.waiting
        assert (await run(b, "result = 6 * 7")).result == 42


async def test_a_waiting_request_forks_its_own_when_the_forks_in_flight_fail() -> None:
    """The guests it waited for die with their zygote: the request still gets one."""
    async with _drained_pool(2, 70_000) as (b, zygote, taken):
        waiting = await _waiting_acquire(b)
        os.kill(zygote, signal.SIGKILL)
        taken.append(await asyncio.wait_for(waiting, 20))
        assert not b._plain.waiting
        assert _zygote_pid(b) != zygote
        assert (await run(b, "result = 6 * 7")).result == 42


async def test_a_cancelled_wait_leaves_the_guest_to_the_pool() -> None:
    async with _drained_pool(1, 80_000) as (b, zygote, _):
        waiting = await _waiting_acquire(b)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert not b._plain.waiting
        os.kill(zygote, signal.SIGCONT)
        await _until(lambda: len(b._plain.pool) == 1, "the forked guest in the pool")


async def test_a_guest_handed_over_as_its_request_is_cancelled_goes_back_to_the_pool() -> None:
    b = ForkServerBackend(pool_size=1, uid_base=UID_BASE + 90_000)
    await b.start()
    try:
        await _until(lambda: len(b._plain.pool) == 1, "a full pool")
        guest = b._plain.pool.popleft()
        waiting = asyncio.ensure_future(b._next_pooled(b._plain))
        await _until(lambda: len(b._plain.waiting) == 1, "the request to wait")
        assert b._hand_over_pooled(b._plain, guest)
        waiting.cancel()  # before the request has run again to take it
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert list(b._plain.pool) == [guest]
        assert (await run(b, "result = 6 * 7")).result == 42
    finally:
        await b.close()
