"""Both host-sandbox backends (bwrap, fork server) against real sandboxes: containment, limits.

Each test here runs once per backend; what only one backend has is tested in its own module
(``test_sandbox_bwrap.py``, ``test_sandbox_forkserver.py``).
"""

from __future__ import annotations

import os
import shutil
import textwrap
from collections.abc import AsyncIterator

import pytest

from codemode.config import LimitsConfig
from codemode.executor.sandbox.bwrap import BwrapBackend
from codemode.executor.sandbox.environment import guest_env
from codemode.executor.sandbox.forkserver import ForkServerBackend
from tests.unit.sandbox_harness import (
    FORKSERVER_UID_BASE,
    HostBackend,
    processes_left,
    run,
    writes_that_succeed,
)

pytestmark = [
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the host-sandbox backends run as root"),
]

LIMITS = LimitsConfig(memory_bytes=256 << 20, max_processes=32, tmpfs_bytes=8 << 20)


@pytest.fixture(scope="module", params=["bwrap", "forkserver"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[HostBackend]:
    """One backend of each kind, shared by this module's tests (pytest runs them in turn)."""
    b: HostBackend
    if request.param == "bwrap":
        b = BwrapBackend(LIMITS)
    else:
        b = ForkServerBackend(LIMITS, uid_base=FORKSERVER_UID_BASE)
    await b.start()
    yield b
    await b.close()


async def test_result_comes_back(backend: HostBackend) -> None:
    out = await run(backend, "print('hi'); result = 2 + 2")
    assert out.result == 4
    assert out.stdout == "hi\n"
    # The service kills the tree once the outcome is in: exit 0 or that SIGKILL, nothing else.
    assert out.exit.returncode == 0 or out.exit.signal == 9


async def test_host_files_are_not_there(backend: HostBackend) -> None:
    code = textwrap.dedent(
        """
        import os
        seen = {}
        site = os.path.join(os.path.dirname(os.__file__), "site-packages", "pip")
        for path in ["/root/.bashrc", "/etc/shadow", "/etc/hostname", "/home/root", "/work",
                     "/var", "/sys/kernel", site]:
            try:
                if os.path.isdir(path):
                    os.listdir(path)
                else:
                    open(path, "rb").read(1)
                seen[path] = "readable"
            except OSError as exc:
                seen[path] = type(exc).__name__
        users = {line.split(":")[0] for line in open("/etc/passwd")}
        result = {"seen": seen, "root": sorted(os.listdir("/")), "etc": sorted(os.listdir("/etc")),
                  "home": os.listdir("/home"), "users": sorted(users)}
        """
    )
    out = await run(backend, code)
    seen = out.result["seen"]
    assert all(v != "readable" for v in seen.values()), seen
    assert set(out.result["root"]) <= {
        "codemode",
        "dev",
        "etc",
        "home",
        "input",
        "lib",
        "lib64",
        "output",
        "proc",
        "root",
        "tmp",
        "usr",
    }
    # Only what the sandbox generates: its own passwd and group, the home link.
    assert out.result["etc"] == ["group", "passwd"]
    assert out.result["home"] == ["codemode"]
    assert out.result["users"] == ["codemode", "nobody", "root"]


async def test_root_fs_and_runtime_are_read_only(backend: HostBackend) -> None:
    code = writes_that_succeed(
        '["/x", "/usr/x", os.path.join(os.path.dirname(os.__file__), "x.py"),'
        ' "/codemode/guest/runtime.py", "/codemode/guest/x.py",'
        ' "/proc/sys/kernel/core_pattern", "/proc/sysrq-trigger"]',
        "a",
    )
    assert (await run(backend, code + "result = failures\n")).result == []


async def test_no_network(backend: HostBackend) -> None:
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


async def test_clean_environment_and_identity(backend: HostBackend) -> None:
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
    assert out["env"] == {"LANG": "C.UTF-8", "PWD": "/tmp", **guest_env()}
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


async def test_seccomp_denies_kernel_surface(backend: HostBackend) -> None:
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


async def test_tmp_is_private_to_each_execution(backend: HostBackend) -> None:
    first = await run(
        backend,
        "import os; open('/tmp/left', 'w').write('x'); open('/dev/shm/left', 'w').write('x')\n"
        "open(os.path.expanduser('~/left'), 'w').write('x'); result = 1",
    )
    assert first.result == 1
    second = await run(
        backend,
        "import os\n"
        "result = [os.listdir('/tmp'), os.listdir('/dev/shm'), os.listdir('/tmp/.home')]",
    )
    assert second.result == [[".home"], [], []]  # a fresh, empty home of its own


async def test_tmpfs_is_size_bounded(backend: HostBackend) -> None:
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


async def test_kill_leaves_nothing(backend: HostBackend) -> None:
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
    assert processes_left(out.uid) == []


async def test_fork_bomb_is_capped(backend: HostBackend) -> None:
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
    assert processes_left(out.uid) == []


async def test_memory_limit_is_reported(backend: HostBackend) -> None:
    code = "blocks = []\nwhile True:\n    blocks.append(bytearray(16 << 20))\n"
    out = await run(backend, code, kill_after=20)
    if backend.cgroup_support and backend.cgroup_support.has("memory"):
        assert out.done is None
        assert out.exit.signal == 9
        assert out.exit.memory_exceeded
    else:
        assert out.done is not None
        assert out.done["type"] == "MemoryLimit"


async def test_guest_rlimits_from_start_frame(backend: HostBackend) -> None:
    code = "while True: pass"
    out = await run(backend, code, {"cpu_seconds": 1}, kill_after=15)
    assert out.done is None
    assert out.exit.signal in (9, 24)
