"""Escape attempts an LLM-written program could make, against a real sandboxed ``codemode serve``.

Every test runs attacks through the public client (``Codemode``) and checks containment from
outside the sandbox where it can: the host's secrets never appear in what comes back, its
listeners get no connection, its files, sysctls, mounts and processes are unchanged, limits end
the execution with their typed error, and (the autouse ``contained`` fixture) nothing of the
attack is left running and the service still answers ``result = 2 + 2`` and its health check.

Programs get their parameters as a ``P = {...}`` line in front of their code, and report what
they managed to do as their ``result``; the assertions read that report and the host's state.
"""

from __future__ import annotations

import asyncio
import errno
import json
import platform
import textwrap
import time
from typing import Any

import pytest

from codemode import ExecutionResult, OutputEvent, ResultEvent
from codemode.executor.sandbox.environment import guest_env
from tests.helpers import ServerProcess
from tests.security.conftest import (
    APP_CONTEXT,
    LIMITS,
    App,
    Host,
    Sampler,
    busy_sandbox_processes,
    leaks,
)

pytestmark = pytest.mark.security

MEMORY = LIMITS["memory_bytes"]
MAX_PROCESSES = LIMITS["max_processes"]
OUTPUT = LIMITS["max_output_bytes"]
TMPFS = LIMITS["tmpfs_bytes"]

#: What the suite's secrets look like (conftest: ``cm-api-key-<hex>-<hex>`` …), as a pattern
#: that does not match itself: a program searching for it does not find its own code.
SECRET_PATTERN = r"cm-(?:api-key|env-secret)-[0-9a-f]{16}|Bearer [A-Za-z0-9]"

#: Helpers every attack program starts with.
PRELUDE = '''
import errno, json, os, sys
import pandas  # so the attack runs on the zygote that preloaded pandas, native code and all
def attempt(fn, *args):
    """("ok", repr) or ("err", exception type, errno): what one try achieved."""
    try:
        return ["ok", repr(fn(*args))[:4000]]
    except BaseException as exc:
        return ["err", type(exc).__name__, getattr(exc, "errno", None)]
def read(path, size=1 << 20):
    with open(path, "rb") as handle:
        return handle.read(size).decode("latin-1")
def libc():
    import ctypes
    lib = ctypes.CDLL(None, use_errno=True)
    lib.syscall.restype = ctypes.c_long
    return lib
def channel_fd():
    """The descriptor of the guest's channel to the service (the runtime's Channel object)."""
    import gc
    for obj in gc.get_objects():
        if type(obj).__name__ == "Channel" and hasattr(obj, "_sock"):
            return obj._sock.fileno()
    return 3
def syscall(number, *args):
    """A raw system call through libc: [return value, errno]."""
    import ctypes
    lib = libc()
    conv = [a if not isinstance(a, int) else ctypes.c_long(a) for a in args]
    ctypes.set_errno(0)
    ret = lib.syscall(ctypes.c_long(number), *conv)
    return [ret, ctypes.get_errno()]
'''


def program(body: str, **params: Any) -> str:
    """An attack program: its parameters, the prelude, then ``body``."""
    return f"P = {json.dumps(params)}\n{PRELUDE}\n{textwrap.dedent(body)}"


class TypedErrorGap(AssertionError):
    """A limit was enforced, but the execution did not end with the limit's typed error."""


def expect_error(result: ExecutionResult, *types: str) -> None:
    """The execution failed with one of ``types`` (a hit limit's typed error)."""
    if result.success or result.error_type not in types:
        raise TypedErrorGap(
            f"expected {' or '.join(types)}, got success={result.success} "
            f"{result.error_type}: {result.error}"
        )


def no_leak(result: ExecutionResult, host: Host, *extra: str) -> None:
    found = leaks(result, host, *extra)
    assert not found, f"the program got hold of {found}: {result}"


def report(result: ExecutionResult) -> Any:
    """The program's own report (its ``result``), asserting it finished."""
    assert result.success, f"the attack program itself failed: {result}"
    return result.value


def all_failed(outcomes: dict[str, list[Any]]) -> None:
    """Every attempt in a report ``{what: attempt(...)}`` failed."""
    succeeded = {what: out for what, out in outcomes.items() if out[0] != "err"}
    assert not succeeded, f"attempts that succeeded: {succeeded}"


# ==========================================================================================
# Host files, /proc of other processes


READ_PATHS = """
out = {}
for path in P["paths"]:
    out[path] = attempt(read, path)
    out["list " + path] = attempt(os.listdir, path)
result = out
"""


def _file_attacks(host: Host, server: ServerProcess) -> dict[str, list[str]]:
    pid = server.pid
    root_canary, tmp_canary, repo_canary = (str(p) for p in host.canary_files)
    return {
        "etc-shadow": ["/etc/shadow", "/etc/passwd", "/etc/sudoers"],
        "root-home": [root_canary, "/root/.ssh/id_rsa", "/root/.bash_history", "/root"],
        "host-tmp": [tmp_canary, "/var/tmp", "/tmp/.."],
        "repo": [repo_canary, "/work/main/pyproject.toml", "/work/main/.git/config", "/work"],
        "service-proc-environ": [f"/proc/{pid}/environ", f"/proc/{pid}/cmdline"],
        "service-proc-root": [f"/proc/{pid}/root{root_canary}", f"/proc/{pid}/cwd/pyproject.toml",
                              f"/proc/{pid}/mem", f"/proc/{pid}/maps", f"/proc/{pid}/fd"],
        "proc-1": ["/proc/1/environ", "/proc/1/cmdline", f"/proc/1/root{root_canary}",
                   f"/proc/1/cwd/{tmp_canary}", "/proc/1/root/etc/shadow"],
        "runtime-neighbours": ["/codemode", "/codemode/../work/main/pyproject.toml",
                               "/usr/lib/x86_64-linux-gnu/../../../etc/shadow",
                               "/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages",
                               "/sys/kernel", "/run", "/var/run/docker.sock", "/home"],
        "raw-disk": ["/dev/vda", "/dev/sda", "/dev/mem", "/dev/kmsg", "/proc/kcore",
                     "/proc/kallsyms", "/proc/sysrq-trigger"],
    }  # fmt: skip


FILE_ATTACKS = [
    "etc-shadow",
    "root-home",
    "host-tmp",
    "repo",
    "service-proc-environ",
    "service-proc-root",
    "proc-1",
    "runtime-neighbours",
    "raw-disk",
]


@pytest.mark.parametrize("attack", FILE_ATTACKS)
async def test_reading_host_files(app: App, host: Host, sec_server: ServerProcess, attack: str):
    """Reading host files and the service's /proc entries must yield none of their secrets."""
    paths = _file_attacks(host, sec_server)[attack]
    result = await app.run(program(READ_PATHS, paths=paths))
    no_leak(result, host)
    outcomes = report(result)
    # Nothing outside the sandbox's own runtime is there: each read fails.
    readable = {
        path: out
        for path, out in outcomes.items()
        if out[0] == "ok" and not path.startswith("list ") and out[1] not in ("''", "b''")
    }
    allowed = {"/proc/1/cmdline", "/proc/1/environ", "/proc/kallsyms"}  # the guest's own, and
    # kallsyms, which the kernel zeroes for unprivileged readers
    passwd = readable.pop("/etc/passwd", None)
    if passwd is not None:  # the sandbox's own, naming its uids: none of the host's accounts
        lines = passwd[1].strip("'").split("\\n")[:-1]  # a repr, cut short: drop the last
        names = {line.split(":")[0] for line in lines}
        assert names <= {"root", "codemode", "nobody"}, f"host accounts listed: {names}"
    assert set(readable) <= allowed, f"host files readable: {readable}"
    listed = {p: out for p, out in outcomes.items() if p.startswith("list ") and out[0] == "ok"}
    assert "codemode-security-canary" not in json.dumps(listed), listed
    if "/proc/kallsyms" in readable:
        assert "ffffffff" not in readable["/proc/kallsyms"][1], "kernel addresses exposed"


async def test_filesystem_walk_finds_no_secret(app: App, host: Host):
    """Walking and reading every file reachable from / must find no host secret or canary."""
    code = program(
        """
        import stat
        found, files = [], 0
        for top in ("/",):
            for root, dirs, names in os.walk(top):
                if root.startswith(("/proc", "/sys")):
                    dirs[:] = []
                    continue
                for name in names:
                    path = os.path.join(root, name)
                    try:
                        if not stat.S_ISREG(os.stat(path).st_mode):
                            continue
                        with open(path, "rb") as handle:
                            data = handle.read(4 << 20)
                    except OSError:
                        continue
                    files += 1
                    for secret in P["needles"]:
                        if secret.encode() in data:
                            found.append(path)
        result = {"found": found, "files": files}
        """,
        needles=[host.file_secret, "codemode-security-canary"],
    )
    result = await app.run(code, timeout=8)
    no_leak(result, host)
    assert report(result)["found"] == []


async def test_other_processes_proc_entries(app: App, host: Host, sec_server: ServerProcess):
    """Listing /proc and reading every pid's environ/cmdline/maps must show only the guest's own."""
    code = program(
        """
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        seen = {}
        for pid in pids:
            for part in ("environ", "cmdline", "status"):
                seen[f"{pid}/{part}"] = attempt(read, f"/proc/{pid}/{part}")
        probe = {str(pid): attempt(os.stat, f"/proc/{pid}") for pid in P["host_pids"]}
        result = {"pids": pids, "seen": seen, "host": probe}
        """,
        host_pids=[sec_server.pid, *(v.pid for v in host.victims), 1],
    )
    result = await app.run(code)
    no_leak(result, host)
    got = report(result)
    assert got["pids"] == [1], f"the guest sees processes other than itself: {got['pids']}"
    reachable = {pid: out for pid, out in got["host"].items() if out[0] == "ok" and pid != "1"}
    assert not reachable, f"host processes visible in /proc: {reachable}"


# ==========================================================================================
# Environment and memory scans for secrets


async def test_environment_has_no_secret(app: App, host: Host):
    """Dumping os.environ and /proc/self/environ must show no API key or service environment."""
    code = program(
        "result = [dict(os.environ), attempt(read, '/proc/self/environ'),"
        " attempt(read, '/proc/1/environ')]"
    )
    result = await app.run(code)
    no_leak(result, host, "CODEMODE_", "SECURITY_SUITE_SECRET")
    environ = report(result)[0]
    # What every guest is given (a home, a user name, one thread per numeric library), only.
    environ.pop("PWD", None)
    assert environ == {"LANG": "C.UTF-8", **guest_env()}, f"unexpected environment: {environ}"


async def test_own_memory_scan_finds_no_secret(app: App, host: Host):
    """Scanning all of the guest's own anonymous memory must find neither secret."""
    code = program(
        """
        import ctypes, re
        pattern = re.compile(P["pattern"].encode())
        hits, scanned = [], 0
        for line in read("/proc/self/maps").splitlines():
            fields = line.split()
            span, perms, name = fields[0], fields[1], fields[5] if len(fields) > 5 else ""
            # Anonymous memory (heap, stack, arenas) is where an inherited or received secret
            # would be; file mappings are the read-only runtime (and may SIGBUS past EOF).
            if not perms.startswith("r") or name not in ("", "[heap]", "[stack]"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            data = ctypes.string_at(start, end - start)  # the process's own readable pages
            scanned += len(data)
            hits += [m.decode("latin-1") for m in pattern.findall(data)]
        result = {"hits": hits, "scanned": scanned}
        """,
        pattern=SECRET_PATTERN,
    )
    result = await app.run(code)
    no_leak(result, host)
    got = report(result)
    assert got["scanned"] > 1 << 20, "the scan read too little to mean anything"
    assert got["hits"] == [], f"secrets in the guest's memory: {got['hits']}"


async def test_gc_object_scan_finds_no_secret(app: App, host: Host):
    """Walking every live Python object (gc, frames, modules) must find neither secret."""
    code = program(
        """
        import gc
        blob = []
        for obj in gc.get_objects():
            try:
                blob.append(repr(obj)[:2000])
            except Exception:
                pass
        blob += [repr(sys.modules), repr(sys.argv), repr(sys.flags)]
        f = sys._getframe()
        while f is not None:
            blob.append(repr(f.f_locals)[:5000])
            f = f.f_back
        import re
        text = "\\n".join(blob)
        result = {"hits": re.findall(P["pattern"], text), "size": len(text)}
        """,
        pattern=SECRET_PATTERN,
    )
    result = await app.run(code)
    no_leak(result, host)
    assert report(result)["hits"] == []


# ==========================================================================================
# Network: host, loopback, out; raw, netlink, packet and unix sockets


NETWORK_ATTACKS = {
    "tcp-host-loopback": """
        import socket
        result = {"connect": attempt(socket.create_connection, ("127.0.0.1", P["tcp"]), 1),
                  "localhost": attempt(socket.create_connection, ("localhost", P["tcp"]), 1)}
    """,
    "udp-host-loopback": """
        import socket
        def send(addr):
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"escape", addr)
        result = {"send": attempt(send, ("127.0.0.1", P["udp"]))}
    """,
    "tcp6-host-loopback": """
        import socket
        def connect(addr):
            s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            s.settimeout(1)
            s.connect(addr)
        result = {"connect": attempt(connect, ("::1", P["tcp6"] or 1))}
    """,
    "executor-own-port": """
        import socket
        result = {"connect": attempt(socket.create_connection, ("127.0.0.1", P["executor"]), 1)}
    """,
    "dns": """
        import socket
        result = {"resolve": attempt(socket.getaddrinfo, "example.com", 80),
                  "resolv.conf": attempt(read, "/etc/resolv.conf")}
    """,
    "tcp-internet": """
        import socket
        def send(addr):
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", addr)
        result = {"1.1.1.1": attempt(socket.create_connection, ("1.1.1.1", 80), 1),
                  "udp 8.8.8.8:53": attempt(send, ("8.8.8.8", 53))}
    """,
    "raw-socket-syscall": """
        # socket(2) straight through libc: AF_INET/SOCK_RAW, AF_PACKET, AF_NETLINK, AF_INET6
        result = {"raw icmp": syscall(41, 2, 3, 1), "packet": syscall(41, 17, 3, 0x300),
                  "netlink route": syscall(41, 16, 3, 0), "inet6 stream": syscall(41, 10, 1, 0),
                  "vsock": syscall(41, 40, 1, 0), "inet stream": syscall(41, 2, 1, 0)}
        result = {k: ["err", "syscall", v[1]] if v[0] < 0 else ["ok", v] for k, v in result.items()}
    """,
    "raw-netlink-packet-sockets": """
        import socket
        result = {
            "raw": attempt(socket.socket, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
            "packet": attempt(socket.socket, socket.AF_PACKET, socket.SOCK_RAW, 0x0300),
            "netlink": attempt(socket.socket, socket.AF_NETLINK, socket.SOCK_RAW, 0),
        }
    """,
    "abstract-unix-to-host": """
        import socket
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.settimeout(1)
        result = {"connect": attempt(s.connect, "\\0" + P["abstract"])}
    """,
    "unix-socket-files": """
        import socket, glob
        found = glob.glob("/run/*.sock") + glob.glob("/var/run/*.sock") + glob.glob("/tmp/*.sock")
        out = {"glob": ["err" if not found else "ok", found]}
        for path in [P["unix"], "/var/run/docker.sock", "/run/containerd/containerd.sock",
                     "/run/dbus/system_bus_socket"] + found:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.settimeout(1)
            out[path] = attempt(s.connect, path)
        result = out
    """,
}


@pytest.mark.parametrize("attack", list(NETWORK_ATTACKS))
async def test_network(app: App, host: Host, sec_server: ServerProcess, attack: str):
    """Opening a network path (loopback, host listeners, the executor, internet) must fail."""
    params = {
        "tcp": host.tcp.sock.getsockname()[1],
        "udp": host.udp.sock.getsockname()[1],
        "tcp6": host.tcp6.sock.getsockname()[1] if host.tcp6 else 0,
        "executor": sec_server.port,
        "abstract": f"codemode-security-{host.token}",
        "unix": str(host.unix_path),
    }
    result = await app.run(program(NETWORK_ATTACKS[attack], **params))
    no_leak(result, host)
    all_failed(report(result))  # the host listeners' silence is checked by `contained`


# ==========================================================================================
# Fork, thread, memory, CPU, disk and output bombs


async def test_fork_bomb(app: App, host: Host, sampler: Sampler):
    """A fork bomb in every process must stay under max_processes and end by the time limit."""
    code = program(
        """
        import time
        while True:
            try:
                os.fork()
            except OSError:
                time.sleep(0.001)
        """
    )
    started = time.monotonic()
    result = await app.run(code, timeout=1.5)
    assert time.monotonic() - started < 6
    assert sampler.max_tasks_per_uid <= MAX_PROCESSES, sampler.max_tasks_per_uid
    expect_error(result, "Timeout", "ProcessLimit")


async def test_fork_until_refused(app: App, host: Host, sampler: Sampler):
    """Forking until refused must stop at max_processes and end as ProcessLimit."""
    code = program(
        """
        import time
        while True:
            if os.fork() == 0:
                time.sleep(30)
                os._exit(0)
        """
    )
    result = await app.run(code)
    assert sampler.max_tasks_per_uid <= MAX_PROCESSES, sampler.max_tasks_per_uid
    expect_error(result, "ProcessLimit")


async def test_thread_bomb(app: App, host: Host, sampler: Sampler):
    """Starting threads until refused must stop at max_processes and end as ProcessLimit."""
    code = program(
        """
        import threading, time
        while True:
            threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
        """
    )
    result = await app.run(code)
    assert sampler.max_tasks_per_uid <= MAX_PROCESSES, sampler.max_tasks_per_uid
    expect_error(result, "ProcessLimit")


async def test_subprocess_pythons(app: App, host: Host, sampler: Sampler):
    """Spawning interpreters with subprocess must stay under max_processes and leave none."""
    code = program(
        """
        import subprocess
        procs, errors = [], []
        for _ in range(40):
            try:
                argv = [sys.executable, "-c", "import time; time.sleep(60)"]
                procs.append(subprocess.Popen(argv))
            except OSError as exc:
                errors.append(exc.errno)
        result = {"started": len(procs), "errors": sorted(set(errors))}
        """
    )
    result = await app.run(code)
    got = report(result)
    assert got["started"] < MAX_PROCESSES, got
    assert sampler.max_tasks_per_uid <= MAX_PROCESSES


MEMORY_BOMBS = {
    "sudden-bytearray": ("x = bytearray(10**10)", ["MemoryLimit"], None),
    "gradual-list": (
        "chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 20))",
        ["MemoryLimit"],
        None,
    ),
    "string-doubling": ("s = 'x'\nwhile True:\n    s += s", ["MemoryLimit"], None),
    "mmap-chunks": (
        "import mmap\nmaps = []\nwhile True:\n"
        "    m = mmap.mmap(-1, 8 << 20); m.write(b'x' * (8 << 20)); maps.append(m)",
        ["MemoryLimit"],
        None,
    ),
    "mmap-huge": (
        "import mmap\nm = mmap.mmap(-1, 1 << 34)",
        ["MemoryLimit"],
        None,
    ),
}


@pytest.mark.parametrize(
    "attack",
    [
        pytest.param(
            name,
            marks=[pytest.mark.xfail(strict=True, raises=TypedErrorGap, reason=gap)] if gap else [],
        )
        for name, (_, _, gap) in MEMORY_BOMBS.items()
    ],
)
async def test_memory_bomb(app: App, host: Host, sampler: Sampler, attack: str):
    """A memory bomb must stay under the memory limit and end as MemoryLimit."""
    code, errors, _ = MEMORY_BOMBS[attack]
    result = await app.run(code)
    assert sampler.max_pss_per_uid <= MEMORY * 1.1, sampler.max_pss_per_uid
    expect_error(result, *errors)


async def test_memory_bomb_across_children(app: App, host: Host, sampler: Sampler):
    """Children each under their own RLIMIT_AS must together stay under the memory limit."""
    code = program(
        """
        import time
        pids = []
        for _ in range(8):
            pid = os.fork()
            if pid == 0:
                block = bytearray(60 << 20)
                for i in range(0, len(block), 4096):
                    block[i] = 1
                time.sleep(1)
                os._exit(0)
            pids.append(pid)
        result = [os.waitpid(pid, 0)[1] for pid in pids]
        """
    )
    result = await app.run(code)
    # One pass of the sampler reads the children's smaps_rollup one after the other, not at
    # once: a child it has counted can be killed and another fill its place before the pass
    # ends, so a pass may count up to one child's block twice (seen: 142 MiB). Without the
    # limit the children would hold 480 MiB.
    assert sampler.max_pss_per_uid <= MEMORY + (60 << 20), sampler.max_pss_per_uid
    if result.success:  # the OOM killer took the children; the parent reports it
        assert any(status != 0 for status in result.value), result.value
    else:
        expect_error(result, "MemoryLimit")


async def test_cpu_spin_ignoring_sigxcpu(app: App, host: Host):
    """Spinning with SIGXCPU ignored must end as CpuLimit (the hard limit's SIGKILL)."""
    code = program(
        """
        import signal
        for sig in (signal.SIGXCPU, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        while True:
            pass
        """
    )
    result = await app.run(code, timeout=8)
    expect_error(result, "CpuLimit")


async def test_cpu_spin_in_threads(app: App, host: Host):
    """Spinning in several threads with SIGXCPU ignored must end as CpuLimit or Timeout."""
    code = program(
        """
        import signal, threading
        signal.signal(signal.SIGXCPU, signal.SIG_IGN)
        def spin():
            while True:
                pass
        for _ in range(4):
            threading.Thread(target=spin, daemon=True).start()
        spin()
        """
    )
    result = await app.run(code, timeout=8)
    expect_error(result, "CpuLimit", "Timeout")


async def test_cpu_spin_in_children(app: App, host: Host):
    """Spreading a CPU loop over forked children must still end by the time limit."""
    code = program(
        """
        import signal
        signal.signal(signal.SIGXCPU, signal.SIG_IGN)
        for _ in range(6):
            if os.fork() == 0:
                break
        while True:
            pass
        """
    )
    started = time.monotonic()
    result = await app.run(code, timeout=1.5)
    assert time.monotonic() - started < 5
    expect_error(result, "Timeout", "CpuLimit")


async def test_raise_rlimits(app: App, host: Host):
    """Raising any rlimit back up (setrlimit, prlimit) must fail, and memory stays capped."""
    code = program(
        """
        import resource
        out = {}
        for name in ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_FSIZE",
                     "RLIMIT_CORE"):
            which = getattr(resource, name)
            inf = resource.RLIM_INFINITY
            out[name] = attempt(resource.setrlimit, which, (inf, inf))
            out["prlimit " + name] = attempt(resource.prlimit, 0, which, (inf, inf))
        print(json.dumps(out), flush=True)
        try:
            x = bytearray(1 << 30)
            out["allocate 1 GiB"] = ["ok", len(x)]
        except MemoryError:
            out["allocate 1 GiB"] = ["err", "MemoryError", None]
        result = out
        """
    )
    result = await app.run(code)
    if result.success:  # the address-space cap refused the allocation inside the program
        all_failed(report(result))
    else:  # the memory cgroup ended it: what it tried before that all failed
        expect_error(result, "MemoryLimit")
        all_failed(json.loads(result.stdout.splitlines()[0]))


async def test_blocked_sleep(app: App, host: Host):
    """A program blocked in sleep must end as Timeout at the requested time limit."""
    started = time.monotonic()
    result = await app.run("import time\ntime.sleep(1000)", timeout=1.0)
    elapsed = time.monotonic() - started
    expect_error(result, "Timeout")
    assert elapsed < 3, f"the time limit of 1 s took {elapsed:.1f} s"


async def test_blocked_with_signals_masked(app: App, host: Host):
    """Blocking every signal, ignoring SIGTERM and waiting must still end as Timeout."""
    code = program(
        """
        import signal, threading
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM):
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        threading.Event().wait()
        """
    )
    result = await app.run(code, timeout=1.0)
    expect_error(result, "Timeout")


async def test_daemonized_child_outlives_program(app: App, host: Host, sec_server: ServerProcess):
    """A double-forked setsid daemon must not outlive its execution (checked from the host)."""
    code = program(
        """
        import signal, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                    signal.signal(sig, signal.SIG_IGN)
                time.sleep(600)
            os._exit(0)
        time.sleep(0.2)
        result = "parent done"
        """
    )
    result = await app.run(code)
    assert result.value == "parent done"
    # `contained` then checks that no process of this sandbox is left


async def test_fill_tmp_and_shm(app: App, host: Host):
    """Filling /tmp and /dev/shm must stop at the tmpfs size and touch no host disk."""
    code = program(
        """
        written, errors = {}, {}
        for top in ("/tmp", "/dev/shm"):
            total = 0
            for n in range(40):
                try:
                    with open(f"{top}/fill-{n}", "wb") as handle:
                        for _ in range(4):
                            handle.write(b"x" * (1 << 20))
                            handle.flush()
                            total += 1 << 20
                except OSError as exc:
                    errors[top] = errno.errorcode.get(exc.errno, exc.errno)
                    break
            written[top] = total
        result = {"written": written, "errors": errors}
        """
    )
    result = await app.run(code)
    got = report(result)
    for top in ("/tmp", "/dev/shm"):
        assert got["written"][top] <= TMPFS, got
        assert got["errors"].get(top) in ("ENOSPC", "EFBIG"), got


async def test_big_file_over_rlimit_fsize(app: App, host: Host):
    """One file larger than max_file_bytes must be refused with EFBIG."""
    code = program(
        """
        with open("/tmp/big", "wb") as handle:
            handle.truncate(1 << 30)
        """
    )
    result = await app.run(code)
    assert not result.success, result
    assert "File too large" in (result.error or ""), result


async def test_read_only_root_and_runtime(app: App, host: Host):
    """Writing the root, the Python runtime or the guest must fail (host copies unchanged)."""
    code = program(
        """
        import os.path
        stdlib = os.path.dirname(os.__file__)
        targets = ["/escape", "/codemode/guest/runtime.py", "/codemode/guest/x.py",
                   "/codemode/x", stdlib + "/os.py", stdlib + "/site-packages/evil.pth",
                   sys.executable, "/usr/bin/setpriv",
                   "/dev/escape", "/proc/escape", "/root/.pyenv/escape"]
        def write(path):
            with open(path, "ab") as handle:
                handle.write(b"pwned")
        out = {path: attempt(write, path) for path in targets}
        out["chmod runtime.py"] = attempt(os.chmod, "/codemode/guest/runtime.py", 0o777)
        out["rename runtime.py"] = attempt(os.rename, "/codemode/guest/runtime.py", "/tmp/g")
        out["mknod"] = attempt(os.mknod, "/tmp/vda", 0o600 | 0o60000, os.makedev(254, 0))
        result = out
        """
    )
    result = await app.run(code)
    all_failed(report(result))


async def test_open_files_limit(app: App, host: Host):
    """Opening descriptors until refused must stop at max_open_files with EMFILE."""
    code = program(
        """
        fds = []
        try:
            while True:
                fds.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as exc:
            result = {"opened": len(fds), "errno": errno.errorcode[exc.errno]}
        """
    )
    got = report(await app.run(code))
    assert got["errno"] == "EMFILE", got
    assert got["opened"] < LIMITS["max_open_files"], got


OUTPUT_FLOODS = {
    "stdout-print": "while True:\n    print('x' * 1000)",
    "stderr-print": "while True:\n    print('x' * 1000, file=sys.stderr)",
    "os-write-fd1": "while True:\n    os.write(1, b'y' * 65536)",
    "os-write-fd2-unbuffered": "while True:\n    os.write(2, b'z' * 4096)",
    "children-flood": "for _ in range(3):\n    os.fork()\n"
    "while True:\n    os.write(1, b'c' * 8192)",
}


@pytest.mark.parametrize("attack", list(OUTPUT_FLOODS))
async def test_output_flood(app: App, host: Host, attack: str):
    """Flooding stdout/stderr (print, raw os.write, from children) must end as OutputLimit."""
    result = await app.run(program(OUTPUT_FLOODS[attack]))
    expect_error(result, "OutputLimit")
    assert len(result.stdout.encode()) + len(result.stderr.encode()) <= OUTPUT
    assert result.output_truncated


async def test_huge_result(app: App, host: Host):
    """A result over max_result_bytes must end as ResultTooLarge."""
    result = await app.run(f"result = 'x' * {4 * LIMITS['max_result_bytes']}")
    expect_error(result, "ResultTooLarge")
    assert result.result is None


async def test_huge_forged_result_frame(app: App, host: Host):
    """A done frame on the channel announcing a 4 GiB payload must end as ResultTooLarge."""
    code = program(
        """
        import struct
        head = json.dumps({"t": "done", "ok": True}).encode()
        os.write(channel_fd(), struct.pack(">II", len(head), 0xFFFFFFFF) + head + b"x" * 65536)
        import time; time.sleep(5)
        """
    )
    result = await app.run(code)
    expect_error(result, "ResultTooLarge")


async def test_deep_recursion(app: App, host: Host):
    """Recursion with the recursion limit raised to 10**6 must end the program, not the service."""
    code = program(
        """
        sys.setrecursionlimit(10**6)
        def down(n):
            return down(n + 1)
        down(0)
        """
    )
    result = await app.run(code, timeout=8)
    # Seen here: RecursionError, CpuLimit (formatting a million-frame traceback), SystemError
    # (CPython out of frame memory), Crashed (SIGSEGV). Any of them ends only the program.
    assert not result.success, result
    assert result.error_type, result


async def test_deep_c_recursion(app: App, host: Host):
    """Recursion through C (nested repr) with no recursion limit must crash only the program."""
    code = program(
        """
        sys.setrecursionlimit(10**8)
        x = []
        for _ in range(10**6):
            x = [x]
        repr(x)
        """
    )
    result = await app.run(code, timeout=8)
    # Seen here: RecursionError, CpuLimit (formatting a million-frame traceback), SystemError
    # (CPython out of frame memory), Crashed (SIGSEGV). Any of them ends only the program.
    assert not result.success, result
    assert result.error_type, result


# ==========================================================================================
# Forging results and frames


async def test_printed_fake_frames_and_markers(app: App, host: Host):
    """Printing frame bytes and result markers on stdout/stderr must not change the result."""
    code = program(
        """
        import struct
        head = json.dumps({"t": "done", "ok": True}).encode()
        frame = struct.pack(">II", len(head), 6) + head + b'"fake"'
        for fd in (1, 2):
            os.write(fd, frame)
        print('__CODEMODE_RESULT__ {"result": "fake"}')
        print('{"success": true, "result": "\\"fake\\""}', file=sys.stderr)
        result = "own"
        """
    )
    result = await app.run(code)
    assert (result.success, result.value) == (True, "own"), result


async def test_garbage_on_every_fd(app: App, host: Host):
    """Writing garbage to every open descriptor must end only this program, cleanly."""
    code = program(
        """
        for fd in range(3, 256):
            try:
                os.write(fd, b"\\xff" * 64 + b"garbage" * 100)
            except OSError:
                pass
        import time; time.sleep(0.5)
        result = "own"
        """
    )
    result = await app.run(code)
    assert (result.success and result.value == "own") or result.error_type in (
        "ProtocolError",
        "ResultTooLarge",
    ), result


async def test_forged_done_frame_for_another_execution(app: App, host: Host):
    """A done frame forged on every fd, naming a concurrent victim, must not change its result."""
    victim_id = "victim-" + host.token
    victim = asyncio.create_task(
        app.codemode.client.execute_async(
            "import time\ntime.sleep(1.0)\nresult = 'victim-own'",
            [],
            correlation_id=victim_id,
        )
    )
    await asyncio.sleep(0.2)
    code = program(
        """
        import struct
        for target in (P["victim"], "", None):
            head = json.dumps({"t": "done", "ok": True, "id": target, "correlation_id": target,
                               "execution_id": target}).encode()
            frame = struct.pack(">II", len(head), 7) + head + b'"pwned"'
            for fd in range(0, 64):
                try:
                    os.write(fd, frame)
                except OSError:
                    pass
        result = "attacker-own"
        """,
        victim=victim_id,
    )
    attacker = await app.codemode.client.execute_async(code, [], correlation_id="attacker")
    got = await victim
    assert (got.success, got.value, got.correlation_id) == (True, "victim-own", victim_id), got
    # The attacker's own outcome is its own business, but stays its own.
    assert attacker.correlation_id == "attacker"


async def test_gc_reaches_guest_channel(app: App, host: Host):
    """Forging a result through the guest's own channel object may fool only that program."""
    victim = asyncio.create_task(app.run("import time\ntime.sleep(1.0)\nresult = 'victim-own'"))
    await asyncio.sleep(0.2)
    code = program(
        """
        import gc
        channel = next(o for o in gc.get_objects() if type(o).__name__ == "Channel")
        channel.send({"t": "done", "ok": True, "correlation_id": "anything"}, b'"forged"')
        result = "own"
        """
    )
    attacker = await app.run(code)
    # By design not a boundary: a program forging its own result only forges its own output.
    assert attacker.success, attacker
    assert attacker.value in ("forged", "own"), attacker
    got = await victim
    assert (got.success, got.value) == (True, "victim-own"), got


async def test_forged_reply_and_start_frames(app: App, host: Host):
    """Sending service-only frames (start, reply) from the guest must end only this program."""
    code = program(
        """
        import gc
        channel = next(o for o in gc.get_objects() if type(o).__name__ == "Channel")
        channel.send({"t": "reply", "id": "1", "ok": True}, b'"x"')
        channel.send({"t": "start", "tools": ["admin_only"]}, b"result = 1")
        import time; time.sleep(2)
        """
    )
    result = await app.run(code)
    expect_error(result, "ProtocolError")
    assert app.admin.calls == []


async def test_forged_call_to_undeclared_tool(app: App, host: Host):
    """A call frame for a registered but undeclared tool, written on fd 3, must not run it."""
    code = program(
        """
        import gc, struct
        def frame(header, payload=b""):
            head = json.dumps(header).encode()
            return struct.pack(">II", len(head), len(payload)) + head + payload
        def read_exact(n):
            buf = b""
            while len(buf) < n:
                chunk = os.read(CH, n - len(buf))
                if not chunk:
                    raise EOFError
                buf += chunk
            return buf
        replies, CH = [], channel_fd()
        for i, tool in enumerate(["admin_only", "__init__", "../admin_only", "", "ADMIN_ONLY"]):
            args = json.dumps({"args": [], "kwargs": {}}).encode()
            os.write(channel_fd(), frame({"t": "call", "id": f"f{i}", "tool": tool}, args))
            head_len, payload_len = struct.unpack(">II", read_exact(8))
            replies.append([json.loads(read_exact(head_len)), read_exact(payload_len).decode()])
        result = replies
        """
    )
    result = await app.run(code, tools=["echo"])
    replies = report(result)
    assert app.admin.calls == [], "the undeclared tool ran"
    for head, payload in replies:
        assert head["ok"] is False, (head, payload)
        assert "not available" in head["message"], (head, payload)
    assert "admin-secret-action" not in json.dumps(replies)


async def test_discovery_hides_undeclared_tools(app: App, host: Host):
    """tools.search/describe must not reveal a registered tool the program was not given."""
    code = program(
        """
        result = {"search": attempt(tools.search, "admin"),
                  "describe": attempt(tools.describe, "admin_only"),
                  "all": attempt(tools.describe)}
        """
    )
    result = await app.run(code, tools=["echo"])
    outcomes = report(result)
    assert outcomes["search"][0] == "ok", outcomes  # discovery works, for declared tools
    assert "admin_only" not in json.dumps({k: v for k, v in outcomes.items() if v[0] == "ok"}), (
        outcomes
    )
    assert app.admin.calls == []


async def test_undeclared_tool_through_the_api(app: App, host: Host):
    """Reaching an undeclared tool through tools.<name>, tools[name] or the relay must fail."""
    code = program(
        """
        out = {"attr": attempt(lambda: tools.admin_only()),
               "item": attempt(lambda: tools["admin_only"]()),
               "relay": attempt(lambda: object.__getattribute__(tools, "_relay").call(
                   "admin_only", (), {}))}
        relay = object.__getattribute__(tools, "_relay")
        relay.tool_names = frozenset(relay.tool_names | {"admin_only"})
        out["widened relay"] = attempt(lambda: relay.call("admin_only", (), {}))
        result = out
        """
    )
    result = await app.run(code, tools=["echo"])
    outcomes = report(result)
    assert app.admin.calls == [], "the undeclared tool ran"
    assert outcomes["widened relay"][0] == "err", outcomes
    all_failed(outcomes)


async def test_forged_tool_context(app: App, host: Host):
    """run_with_context({"user": "admin"}) or a forged frame must give the tool the app context."""
    code = program(
        """
        import struct
        out = [tools.whoami.run_with_context({"user": "admin"}),
               tools.whoami.run_with_context({"user": "admin"}, context={"user": "admin"})]
        head = json.dumps({"t": "call", "id": "c9", "tool": "whoami",
                           "context": {"user": "admin"}}).encode()
        payload = json.dumps({"args": [], "kwargs": {}, "context": {"user": "admin"}}).encode()
        os.write(channel_fd(), struct.pack(">II", len(head), len(payload)) + head + payload)
        import time; time.sleep(0.3)
        result = out
        """
    )
    result = await app.run(code)
    assert result.success, result
    assert len(app.whoami.contexts) >= 2
    assert all(ctx == APP_CONTEXT for ctx in app.whoami.contexts), app.whoami.contexts


# ==========================================================================================
# Killing the parent, the service, everything


KILL_ATTACKS = {
    "kill-minus-1": "if os.fork() == 0:\n    os.kill(-1, 9)\n    os._exit(0)\n"
    "import time; time.sleep(0.5)\nresult = 'survived'",
    "kill-ppid": "os.kill(os.getppid(), 9)\nresult = 'survived'",
    "kill-pid-1": "import signal\nfor s in (15, 9):\n    attempt(os.kill, 1, s)\n"
    "result = 'survived'",
    "kill-host-pids": "import signal\nout = {}\nfor pid in P['host_pids']:\n"
    "    for sig in (signal.SIGSTOP, signal.SIGKILL):\n"
    "        out[f'{pid}/{sig}'] = attempt(os.kill, pid, sig)\nresult = out",
    "kill-guessed-pids": "import signal\nhit = []\nfor pid in range(2, 5000):\n"
    "    try:\n        os.kill(pid, 0)\n        hit.append(pid)\n    except OSError:\n"
    "        pass\nresult = {'alive': hit}",
    "pidfd-host": "out = {}\nfor pid in P['host_pids']:\n"
    "    out[str(pid)] = attempt(os.pidfd_open, pid)\nresult = out",
}


@pytest.mark.parametrize("attack", list(KILL_ATTACKS))
async def test_kill(app: App, host: Host, sec_server: ServerProcess, attack: str):
    """Signalling -1, the parent, pid 1 or host pids must harm nothing outside the sandbox."""
    host_pids = [sec_server.pid, *(v.pid for v in host.victims)]
    result = await app.run(program(KILL_ATTACKS[attack], host_pids=host_pids))
    if attack in ("kill-host-pids", "pidfd-host"):
        all_failed(report(result))
    elif attack == "kill-guessed-pids":
        assert report(result) == {"alive": []}
    # Host processes alive and not stopped, the service serving: checked by `contained`.


# ==========================================================================================
# Kernel surface: mount, namespaces, ptrace, chroot, bpf, perf, keys, io_uring …

# x86_64 numbers; each call is made with arguments that would act if the call were allowed.
SYSCALL_ATTACKS: dict[str, tuple[str, set[str]]] = {
    "mount-tmpfs": ("syscall(165, b'none', b'/tmp', b'tmpfs', 0, None)", {"EPERM"}),
    "umount-proc": ("syscall(166, b'/proc', 2)", {"EPERM"}),
    "unshare-user": ("syscall(272, 0x10000000)", {"EPERM"}),
    "unshare-mount-net": ("syscall(272, 0x00020000 | 0x40000000)", {"EPERM"}),
    "os-unshare-or-clone-newuser": (
        "r = syscall(56, 0x10000000 | 17, 0, 0, 0, 0)\nif r[0] == 0:\n    os._exit(0)\nresult = r",
        {"EPERM"},
    ),
    "clone3": ("syscall(435, bytes(88), 88)", {"ENOSYS"}),
    "setns": (
        "fd = os.open('/proc/self/ns/mnt', os.O_RDONLY)\nresult = syscall(308, fd, 0)",
        {"EPERM"},
    ),
    "ptrace-attach-service": ("syscall(101, 16, P['service'], 0, 0)", {"EPERM"}),
    "ptrace-traceme": ("syscall(101, 0, 0, 0, 0)", {"EPERM"}),
    "process-vm-readv": ("syscall(310, P['service'], bytes(16), 1, bytes(16), 1, 0)", {"EPERM"}),
    "chroot": ("syscall(161, b'/tmp')", {"EPERM"}),
    "pivot-root": ("syscall(155, b'/tmp', b'/tmp')", {"EPERM"}),
    "bpf-prog-load": ("syscall(321, 5, bytes(128), 128)", {"EPERM"}),
    "perf-event-open": ("syscall(298, bytes(128), 0, -1, -1, 0)", {"EPERM"}),
    "keyctl": ("syscall(250, 0, -3, 1)", {"EPERM"}),
    "add-key": ("syscall(248, b'user', b'x', b'data', 4, -2)", {"EPERM"}),
    "io-uring-setup": ("syscall(425, 8, bytes(120))", {"EPERM"}),
    "userfaultfd": ("syscall(323, 0)", {"EPERM"}),
    "open-by-handle-at": (
        "fd = os.open('/', os.O_RDONLY)\nresult = syscall(304, fd, bytes(136), 0)",
        {"EPERM"},
    ),
    "init-module": ("syscall(175, bytes(64), 64, b'')", {"EPERM"}),
    "kexec-load": ("syscall(246, 0, 0, 0, 0)", {"EPERM"}),
    "syslog-read": ("syscall(103, 3, bytes(4096), 4096)", {"EPERM"}),
    "fsopen": ("syscall(430, b'tmpfs', 0)", {"EPERM"}),
    "pidfd-getfd": ("syscall(438, 0, 3, 0)", {"EPERM"}),
    "setuid-0": ("syscall(105, 0)", {"EPERM"}),
    "sethostname": ("syscall(170, b'pwned', 5)", {"EPERM"}),
}


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86_64 syscall numbers")
@pytest.mark.parametrize("attack", list(SYSCALL_ATTACKS))
async def test_kernel_syscalls(app: App, host: Host, sec_server: ServerProcess, attack: str):
    """A raw privileged syscall via ctypes (mount, unshare, ptrace, bpf …) must be refused."""
    call, expected = SYSCALL_ATTACKS[attack]
    body = call if "result" in call else f"result = {call}"
    result = await app.run(program(body, service=sec_server.pid))
    ret, err = report(result)
    assert ret == -1, f"{attack} returned {ret}"
    assert errno.errorcode.get(err) in expected, f"{attack}: {errno.errorcode.get(err, err)}"
    # Host mounts, sysctls, processes unchanged: checked by `contained`.


async def test_python_level_namespace_calls(app: App, host: Host):
    """os.unshare/setns/chroot, setuid and capabilities from Python must all fail."""
    code = program(
        """
        out = {"chroot": attempt(os.chroot, "/tmp"),
               "setuid": attempt(os.setuid, 0), "setresuid": attempt(os.setresuid, 0, 0, 0),
               "setgid": attempt(os.setgid, 0), "setgroups": attempt(os.setgroups, [0]),
               "unshare": attempt(getattr(os, "unshare", lambda f: syscall(272, f)), 0x10000000)}
        status = dict(l.split(":", 1) for l in read("/proc/self/status").splitlines())
        if out["unshare"][0] == "ok" and "-1" in out["unshare"][1]:
            out["unshare"] = ["err", "syscall", None]
        result = {"out": out, "caps": [status[k].strip() for k in
                  ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")],
                  "nnp": status["NoNewPrivs"].strip(), "seccomp": status["Seccomp"].strip(),
                  "uid": os.getuid()}
        """
    )
    got = report(await app.run(code))
    all_failed(got["out"])
    assert set(got["caps"]) == {"0000000000000000"}, got["caps"]
    assert (got["nnp"], got["seccomp"]) == ("1", "2"), got
    assert got["uid"] != 0


async def test_setuid_binaries(app: App, host: Host):
    """Finding and running setuid/setcap binaries must give no privilege (no_new_privs)."""
    code = program(
        """
        import stat, subprocess
        found = []
        for root, dirs, names in os.walk("/"):
            if root.startswith("/proc"):
                dirs[:] = []
                continue
            for name in names:
                path = os.path.join(root, name)
                try:
                    mode = os.lstat(path).st_mode
                except OSError:
                    continue
                if mode & (stat.S_ISUID | stat.S_ISGID):
                    found.append(path)
        run = subprocess.run(["/usr/bin/setpriv", "--reuid=0", "--regid=0", "--clear-groups",
                              sys.executable, "-c", "import os; print(os.getuid())"],
                             capture_output=True, text=True)
        result = {"setuid": found, "setpriv": [run.returncode, run.stdout.strip()]}
        """
    )
    got = report(await app.run(code))
    assert got["setuid"] == [], got
    assert got["setpriv"][0] != 0, got
    assert got["setpriv"][1] != "0", got


# ==========================================================================================
# /proc/sys, /sys, and the guest's own OOM and core settings


async def test_write_proc_sys_and_sys(app: App, host: Host):
    """Writing core_pattern and other sysctls, sysrq, /sys and cgroup files must fail."""
    code = program(
        """
        def write(path, data):
            with open(path, "w") as handle:
                handle.write(data)
        targets = {
            "/proc/sys/kernel/core_pattern": "|/tmp/pwn",
            "/proc/sys/kernel/hostname": "pwned",
            "/proc/sys/kernel/modprobe": "/tmp/pwn",
            "/proc/sys/vm/overcommit_memory": "1",
            "/proc/sys/fs/suid_dumpable": "2",
            "/proc/sysrq-trigger": "h",
            "/proc/self/oom_score_adj": "-1000",
            "/proc/1/oom_score_adj": "-1000",
            "/proc/self/setgroups": "allow",
            "/proc/self/uid_map": "0 0 1",
            "/sys/kernel/uevent_helper": "/tmp/pwn",
            "/sys/fs/cgroup/cgroup.procs": "1",
            "/sys/fs/cgroup/memory/cgroup.procs": "1",
        }
        result = {path: attempt(write, path, data) for path, data in targets.items()}
        """
    )
    all_failed(report(await app.run(code)))
    # The host's sysctls are compared with their values before the suite by `contained`.


# ==========================================================================================
# Persisting into the next execution


async def test_persist_into_next_execution(app: App, host: Host):
    """Files, environment and modules left by one execution must be gone in the next ones."""
    marker = "persist-" + host.token
    write = program(
        """
        out = {}
        for top in ("/tmp", "/dev/shm", os.path.expanduser("~"), os.getcwd(), "/var/tmp", "/"):
            out[top] = attempt(lambda t=top: open(f"{t}/{P['marker']}", "w").write(P["marker"]))
        os.environ["PERSIST"] = P["marker"]
        import builtins, string
        string.capwords = lambda *a, **k: P["marker"]
        builtins.PERSIST = P["marker"]
        result = "written"
        """,
        marker=marker,
    )
    assert (await app.run(write)).success
    check = program(
        """
        import builtins, glob, string
        found = []
        for top in ("/tmp", "/dev/shm", os.path.expanduser("~"), os.getcwd(), "/var/tmp", "/"):
            found += glob.glob(f"{top}/persist-*")
        result = {"files": found, "env": os.environ.get("PERSIST"),
                  "builtins": getattr(builtins, "PERSIST", None), "module": string.capwords("a b"),
                  "tmp": os.listdir("/tmp"), "shm": os.listdir("/dev/shm")}
        """
    )
    # Enough runs to go through every pre-started sandbox.
    for _ in range(4):
        got = report(await app.run(check))
        assert got == {
            "files": [],
            "env": None,
            "builtins": None,
            "module": "A B",
            "tmp": [".home"],  # the execution's own fresh home, nothing else
            "shm": [],
        }, got


# ==========================================================================================
# Two concurrent executions spying on each other


async def test_concurrent_executions_cannot_spy(app: App, host: Host, sec_server: ServerProcess):
    """A program must not find, reach or kill a concurrent one's files, memory, sockets, pids."""
    secret = "spy-secret-" + host.token
    holder = program(
        """
        import ctypes, socket, time
        keep = P["secret"] * 100                                   # in memory
        for top in ("/tmp", "/dev/shm"):
            with open(f"{top}/holder", "w") as handle:             # in its tmpfs
                handle.write(P["secret"])
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind("\\0" + P["secret"])                         # an abstract socket
        listener.listen(4)
        listener.settimeout(0.1)
        os.environ["HOLDER"] = P["secret"]
        libc().prctl(15, P["secret"][:15].encode(), 0, 0, 0)       # its process name
        shm = libc().shmget(0x5EC, 4096, 0o1666)                   # SysV shared memory
        print("ready", flush=True)
        accepted = 0
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                listener.accept()
                accepted += 1
            except OSError:
                pass
        result = {"intact": True, "accepted": accepted, "shm": shm}
        """,
        secret=secret,
    )
    events = app.codemode.stream(
        holder, available_tools=[], context=APP_CONTEXT, execution_timeout=6
    )
    holder_result: list[ExecutionResult] = []
    ready = asyncio.Event()

    async def consume() -> None:
        async for event in events:
            if isinstance(event, OutputEvent) and "ready" in event.text:
                ready.set()
            elif isinstance(event, ResultEvent):
                holder_result.append(event.result)
        ready.set()

    consumer = asyncio.create_task(consume())
    await asyncio.wait_for(ready.wait(), 5)
    holder_pids = [int(entry.split()[1]) for entry in busy_sandbox_processes(sec_server)]
    spy = program(
        """
        import glob, signal, socket
        seen = {}
        for path in glob.glob("/proc/*/*"):
            if path.rsplit("/", 1)[1] in ("environ", "cmdline", "comm", "maps", "status"):
                seen[path] = attempt(read, path)
        seen["files"] = glob.glob("/tmp/*") + glob.glob("/dev/shm/*") + glob.glob("/*")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        seen["abstract"] = attempt(s.connect, "\\0" + P["secret"])
        seen["unix"] = attempt(read, "/proc/net/unix")
        seen["shm"] = syscall(29, 0x5EC, 4096, 0)
        killed = []
        for pid in list(range(2, 2000)) + P["holder_pids"]:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
        seen["killed"] = killed
        seen["holder mem"] = [attempt(read, f"/proc/{pid}/mem") for pid in P["holder_pids"]]
        result = seen
        """,
        secret=secret,
        holder_pids=holder_pids,
    )
    spied = await app.run(spy)
    await asyncio.wait_for(consumer, 10)
    no_leak(spied, host, secret, secret[:15])
    got = report(spied)
    assert got["abstract"][0] == "err", got
    assert got["killed"] == [], got
    assert got["shm"][0] == -1, f"the spy attached the holder's SysV segment: {got['shm']}"
    assert all(out[0] == "err" for out in got["holder mem"]), got["holder mem"]
    assert len(holder_result) == 1, holder_result
    assert holder_result[0].success, holder_result
    assert holder_result[0].value == {
        "intact": True,
        "accepted": 0,
        "shm": holder_result[0].value["shm"],
    }
