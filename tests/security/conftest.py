"""Security-suite fixtures: one real ``codemode serve`` (default isolation, bwrap) with small
limits, host-side canaries and listeners, and the invariants checked after every attack.

The server runs with a distinctive API key and an extra environment variable holding a secret;
host files, a TCP/UDP listener on loopback, an abstract and a filesystem unix socket, and two
victim processes are set up around it. After each test the ``contained`` fixture checks, from
outside the sandbox, that nothing of the host changed, that no process of the test's sandboxes
is left, and that the service still answers ``result = 2 + 2`` and its health check.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from codemode import Codemode, ComponentRegistry, ExecutionResult, RuntimeContext
from codemode.config import ClientConfig
from tests.helpers import (
    REPO_ROOT,
    ProcRef,
    ServerProcess,
    descendants,
    start_server,
    wait_gone,
    wait_until,
)

#: Small limits so that every limit is reached in a second or two.
LIMITS = {
    "memory_bytes": 128 * 1024 * 1024,
    "cpu_seconds": 2,
    "max_output_bytes": 64 * 1024,
    "max_result_bytes": 64 * 1024,
    "max_processes": 16,
    "max_file_bytes": 4 * 1024 * 1024,
    "max_open_files": 64,
    "tmpfs_bytes": 8 * 1024 * 1024,
}
DEFAULT_TIMEOUT_S = 3.0
MAX_TIMEOUT_S = 8.0
#: The context the application attaches to every request of the suite.
APP_CONTEXT = {"user": "alice", "tenant": "t-1"}
#: Root-owned sysctls an escape would write (core_pattern is a host-root escape).
WATCHED_SYSCTLS = (
    "/proc/sys/kernel/core_pattern",
    "/proc/sys/kernel/hostname",
    "/proc/sys/kernel/domainname",
    "/proc/sys/kernel/modprobe",
    "/proc/sys/vm/overcommit_memory",
    "/proc/sys/fs/suid_dumpable",
)


#: What attacks write into files they should not be able to write.
ATTACK_MARKER = b"pwned"
#: Host files bound read-only into every sandbox.
RUNTIME_FILES = (
    REPO_ROOT / "src/codemode/executor/guest/runtime.py",
    Path(os.__file__),
    Path(sys.executable).resolve(),
    Path("/usr/bin/setpriv"),
)


#: A host process of an unprivileged uid, for attacks to try to kill.
NOBODY_SLEEP = (
    "/usr/bin/setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "/bin/sleep",
    "3600",
)


def _token() -> str:
    return secrets.token_hex(8)


# ------------------------------------------------------------------------------------------
# The host around the sandbox


class _Listener:
    """A host socket that records every connection or datagram it receives."""

    def __init__(self, sock: socket.socket, name: str, stream: bool) -> None:
        self.sock = sock
        self.name = name
        self.stream = stream
        self.hits: list[str] = []
        self._stop = False
        sock.settimeout(0.1)
        if stream:
            sock.listen(16)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                if self.stream:
                    conn, peer = self.sock.accept()
                    self.hits.append(f"connection from {peer!r}")
                    conn.close()
                else:
                    data, peer = self.sock.recvfrom(65536)
                    self.hits.append(f"datagram {data[:40]!r} from {peer!r}")
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return

    def close(self) -> None:
        self._stop = True
        self._thread.join(1)
        self.sock.close()


@dataclass
class Host:
    """Everything outside the sandbox an attack could reach, and its state before the suite."""

    token: str
    api_key: str
    env_secret: str
    file_secret: str
    canary_files: list[Path]
    shadow_lines: list[str]
    tcp: _Listener
    udp: _Listener
    tcp6: _Listener | None
    abstract: _Listener
    unix: _Listener
    unix_path: Path
    victims: list[subprocess.Popen[bytes]]
    sysctls: dict[str, str] = field(default_factory=dict)
    hashes: dict[Path, str] = field(default_factory=dict)
    mounts: str = ""

    @property
    def secrets(self) -> dict[str, str]:
        """Strings that no program may ever get hold of."""
        found = {
            "api key": self.api_key,
            "service env secret": self.env_secret,
            "host file secret": self.file_secret,
        }
        for number, line in enumerate(self.shadow_lines):
            found[f"/etc/shadow line {number}"] = line
        return found

    @property
    def listeners(self) -> list[_Listener]:
        found = [self.tcp, self.udp, self.abstract, self.unix]
        return [*found, self.tcp6] if self.tcp6 else found


def _hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_sysctls() -> dict[str, str]:
    values = {}
    for name in WATCHED_SYSCTLS:
        with contextlib.suppress(OSError):
            values[name] = Path(name).read_text()
    return values


@pytest.fixture(scope="session")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    """Canary files, listeners and victim processes on the host, removed after the session."""
    token = _token()
    file_secret = f"cm-file-secret-{token}"
    canaries = [
        Path(f"/root/codemode-security-canary-{token}.txt"),
        Path(f"/tmp/codemode-security-canary-{token}.txt"),
        REPO_ROOT / f".codemode-security-canary-{token}.txt",
    ]
    for path in canaries:
        path.write_text(file_secret + "\n")
        path.chmod(0o644)
    try:
        shadow = [line for line in Path("/etc/shadow").read_text().splitlines() if len(line) > 12]
    except OSError:
        shadow = []

    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    tcp6_listener = None
    with contextlib.suppress(OSError):
        tcp6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        tcp6.bind(("::1", 0))
        tcp6_listener = _Listener(tcp6, "tcp6", stream=True)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind(f"\0codemode-security-{token}")
    unix_path = Path(f"/run/codemode-security-{token}.sock")
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(unix_path))
    unix_path.chmod(0o777)
    # A root process and an unprivileged one the attacks try to kill.
    victims = [
        subprocess.Popen(["/bin/sleep", "3600"]),
        subprocess.Popen(NOBODY_SLEEP),
    ]
    state = Host(
        token=token,
        api_key=f"cm-api-key-{token}-{_token()}",
        env_secret=f"cm-env-secret-{token}-{_token()}",
        file_secret=file_secret,
        canary_files=canaries,
        shadow_lines=shadow,
        tcp=_Listener(tcp, "tcp", stream=True),
        udp=_Listener(udp, "udp", stream=False),
        tcp6=tcp6_listener,
        abstract=_Listener(abstract, "abstract unix", stream=True),
        unix=_Listener(unix, "unix", stream=True),
        unix_path=unix_path,
        victims=victims,
    )
    state.sysctls = _read_sysctls()
    state.hashes = {p: _hash(p) for p in canaries}
    state.mounts = Path("/proc/self/mountinfo").read_text()
    try:
        yield state
    finally:
        for listener in state.listeners:
            listener.close()
        unix_path.unlink(missing_ok=True)
        for victim in victims:
            victim.kill()
            victim.wait(5)
        for path in canaries:
            path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------
# The server


@pytest.fixture(scope="session")
def sec_server(
    host: Host, tmp_path_factory: pytest.TempPathFactory, sandbox_venv: Path
) -> Iterator[ServerProcess]:
    """``codemode serve`` with the default isolation, small limits, a distinctive key and env,
    and the test sandbox venv (numpy, pandas) with pandas preloaded. Attacks built with
    ``program()`` import pandas, so they run on the zygote that preloaded it, third-party
    native code and all; the others import only the standard library and run on the plain
    zygote beside it."""
    log_dir = tmp_path_factory.mktemp("security-serve")
    config = log_dir / "executor.yaml"
    lines = [
        f"default_execution_timeout: {DEFAULT_TIMEOUT_S}",
        f"max_execution_timeout: {MAX_TIMEOUT_S}",
        "max_concurrent_executions: 8",
        "limits:",
        *(f"  {name}: {value}" for name, value in LIMITS.items()),
    ]
    config.write_text("\n".join(lines) + "\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SECURITY_SUITE_SECRET", host.env_secret)
        try:
            # The default isolation (or CODEMODE_TEST_SECURITY_ISOLATION), never
            # CODEMODE_TEST_ISOLATION: these programs kill -1, fork-bomb and write sysctls,
            # and must never run unsandboxed (checked below and before the first attack).
            server = start_server(
                api_key=host.api_key,
                isolation=os.environ.get("CODEMODE_TEST_SECURITY_ISOLATION", "auto"),
                extra_args=[
                    "--config",
                    str(config),
                    "--sandbox-venv",
                    str(sandbox_venv),
                    "--preload",
                    "pandas",
                ],
                log_dir=log_dir,
            )
        except Exception as exc:  # the reason is in the message (the server's stderr)
            pytest.fail(str(exc), pytrace=False)
    serving = [r for r in server.log_records() if r.get("msg") == "executor serving"]
    if not serving or serving[0].get("isolation") in (None, "process"):
        server.stop()
        pytest.fail(f"the security suite needs a kernel sandbox; the server said {serving}")
    try:
        yield server
    finally:
        server.seen.update(descendants(server.pid))
        server.stop()
        leftover = wait_gone(server.seen)
        assert not leftover, f"processes of the security server outlived it: {leftover}"


# ------------------------------------------------------------------------------------------
# The application's tools


class Recorder:
    """A tool that records each call (and the context it received)."""

    def __init__(self, answer: Any = "ok") -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.contexts: list[dict[str, Any]] = []
        self.answer = answer

    def run_with_context(self, context: RuntimeContext, /, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        self.contexts.append(dict(context.variables))
        return self.answer


@dataclass
class App:
    """The application side: its Codemode client and the tools it registered."""

    codemode: Codemode
    echo: Recorder
    whoami: Recorder
    admin: Recorder

    async def run(
        self,
        code: str,
        *,
        timeout: float | None = None,
        tools: list[str] | None = None,
        context: dict[str, Any] | None = None,
    ) -> ExecutionResult:
        """Run ``code`` with the application's context and only the declared tools."""
        return await self.codemode.run_async(
            code,
            available_tools=["echo", "whoami"] if tools is None else tools,
            execution_timeout=timeout,
            context=APP_CONTEXT if context is None else context,
        )


@pytest.fixture
async def app(sec_server: ServerProcess) -> AsyncIterator[App]:
    """A Codemode connected to the security server, with tools echo, whoami and admin_only.

    ``admin_only`` is registered but never declared to a program: calling it is an escape.
    """
    registry = ComponentRegistry()
    echo, whoami, admin = Recorder("echo"), Recorder("me"), Recorder("admin-secret-action")
    registry.register_tool("echo", echo)
    registry.register_tool("whoami", whoami)
    registry.register_tool("admin_only", admin)
    config = ClientConfig(
        executor_url=sec_server.url,
        executor_api_key=sec_server.api_key,
        timeout=MAX_TIMEOUT_S,
        max_retries=0,
    )
    async with Codemode.from_client_config(config, registry) as codemode:
        yield App(codemode, echo, whoami, admin)


# ------------------------------------------------------------------------------------------
# What must hold after every attack


_sandbox_verified: list[bool] = []


def _uid(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _is_sandbox_uid(uid: int | None) -> bool:
    """Whether a descendant of the server runs as a sandbox: any non-root uid (the backends
    drop every guest to a uid of its own; the bwrap backend's range starts at 0x70000000)."""
    return uid is not None and uid != 0


def busy_sandbox_processes(server: ServerProcess) -> list[str]:
    """Sandbox processes of ``server`` other than idle pre-started guests.

    A pre-started guest is alone under its uid and its stdout is still ``/dev/null``; once it
    runs a program its stdout is the execution's pipe.
    """
    by_uid: dict[int, list[int]] = {}
    for proc in descendants(server.pid):
        uid = _uid(proc.pid)
        if _is_sandbox_uid(uid):
            assert uid is not None
            by_uid.setdefault(uid, []).append(proc.pid)
    busy = []
    for uid, pids in by_uid.items():
        for pid in pids:
            try:
                stdout = os.readlink(f"/proc/{pid}/fd/1")
            except OSError:
                continue  # gone (or just going)
            if len(pids) > 1 or stdout != "/dev/null":
                busy.append(f"pid {pid} uid {uid} stdout {stdout}")
    return busy


class Sampler:
    """Samples, from outside, the tasks and memory of the server's busy sandboxes."""

    def __init__(self, server: ServerProcess, interval: float = 0.02) -> None:
        self.server = server
        self.interval = interval
        self.max_tasks_per_uid = 0
        self.max_pss_per_uid = 0
        #: Every sandbox process seen running a program (its stdout not /dev/null).
        self.busy_seen: set[ProcRef] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            tasks: dict[int, int] = {}
            pss: dict[int, int] = {}
            for proc in descendants(self.server.pid):
                uid = _uid(proc.pid)
                if not _is_sandbox_uid(uid):
                    continue
                assert uid is not None
                with contextlib.suppress(OSError, ValueError):
                    if os.readlink(f"/proc/{proc.pid}/fd/1") != "/dev/null":
                        self.busy_seen.add(proc)
                    tasks[uid] = tasks.get(uid, 0) + len(os.listdir(f"/proc/{proc.pid}/task"))
                    for line in Path(f"/proc/{proc.pid}/smaps_rollup").read_text().splitlines():
                        # Anonymous and shmem pages are what a bomb allocates and the memory
                        # cgroup charges; file pages of the shared runtime are neither.
                        if line.startswith(("Pss_Anon:", "Pss_Shmem:")):
                            pss[uid] = pss.get(uid, 0) + int(line.split()[1]) * 1024
            self.max_tasks_per_uid = max([self.max_tasks_per_uid, *tasks.values()])
            self.max_pss_per_uid = max([self.max_pss_per_uid, *pss.values()])
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)


@pytest.fixture
def sampler(sec_server: ServerProcess) -> Iterator[Sampler]:
    """Tasks and memory of the test's sandboxes, sampled from the host while the test runs."""
    with Sampler(sec_server) as running:
        yield running


def leaks(result: ExecutionResult, host: Host, *extra: str) -> list[str]:
    """Names of the secrets (and ``extra`` strings) found anywhere in ``result``."""
    blob = "\n".join(
        str(part)
        for part in (result.result, result.stdout, result.stderr, result.error, result.traceback)
    )
    found = [name for name, value in host.secrets.items() if value and value in blob]
    return found + [value for value in extra if value in blob]


async def _still_serves(app: App) -> None:
    follow_up = await app.run("result = 2 + 2", tools=[])
    assert (follow_up.success, follow_up.result) == (True, "4"), f"follow-up failed: {follow_up}"
    assert await app.codemode.health_check_async(), "health check is not SERVING"


@pytest.fixture(autouse=True)
async def contained(
    host: Host, sec_server: ServerProcess, app: App, sampler: Sampler
) -> AsyncIterator[None]:
    """After the attack: the service serves, and nothing outside the sandbox changed.

    Before the first attack of the session it also checks that programs really run sandboxed
    (a sandbox uid, no_new_privs, seccomp): these programs must never run on the bare host.
    """
    if not _sandbox_verified:
        probe = await app.run(
            "import os\nstatus = open('/proc/self/status').read()\n"
            "result = [os.getuid(), 'NoNewPrivs:\\t1' in status, 'Seccomp:\\t2' in status]",
            tools=[],
        )
        uid, nnp, filtered = probe.value if probe.success else (None, False, False)
        if not (_is_sandbox_uid(uid) and nnp and filtered):
            pytest.exit(f"programs do not run in the bwrap sandbox ({probe}); refusing to attack")
        _sandbox_verified.append(True)
    hits_before = {listener.name: len(listener.hits) for listener in host.listeners}
    yield
    # Nothing of the attack runs any more: no process seen running it, and no busy sandbox.
    left = await asyncio.to_thread(wait_gone, sampler.busy_seen, 5.0)
    assert not left, f"processes of the attack outlived it: {[p.describe() for p in left]}"
    idle = await asyncio.to_thread(wait_until, lambda: not busy_sandbox_processes(sec_server), 5)
    assert idle, f"sandbox processes left after the attack: {busy_sandbox_processes(sec_server)}"
    assert sec_server.proc.poll() is None, "the service died"
    await _still_serves(app)
    await asyncio.to_thread(_host_unchanged, host, hits_before)


def _host_unchanged(host: Host, hits_before: dict[str, int]) -> None:
    """The host is as it was before the attack."""
    for listener in host.listeners:
        assert len(listener.hits) == hits_before[listener.name], (
            f"host {listener.name} listener was reached: {listener.hits}"
        )
    assert _read_sysctls() == host.sysctls, "a host sysctl changed"
    for path, digest in host.hashes.items():
        assert path.exists(), f"host file {path} was removed"
        assert _hash(path) == digest, f"host file {path} was modified"
    # Files the sandbox sees read-only (their content may change under colleagues' edits,
    # so they are checked for the attacks' own marker rather than by hash).
    for path in RUNTIME_FILES:
        assert ATTACK_MARKER not in path.read_bytes(), f"an attack wrote into {path}"
    assert Path("/proc/self/mountinfo").read_text() == host.mounts, "host mount table changed"
    for victim in host.victims:
        assert victim.poll() is None, f"host process {victim.pid} was killed"
        state = Path(f"/proc/{victim.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert state != "T", f"host process {victim.pid} was stopped"
