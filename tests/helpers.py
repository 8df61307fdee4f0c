"""Test helpers: a real ``codemode serve`` subprocess, and the processes it starts.

Servers are started as ``python -m codemode.cli serve`` with a key of the test's choosing; the
port comes back from the one ``listening on HOST:PORT`` line the command prints. Processes
are found through ``/proc`` so that a test can check that a guest it saw running is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Isolation the executors under test use; ``process`` while the bwrap backend is not there.
ISOLATION = os.environ.get("CODEMODE_TEST_ISOLATION", "auto")
#: How long a server may take to print its ``listening on`` line, seconds.
START_TIMEOUT_S = 30.0
READY_PREFIX = "codemode serve: listening on "


# ------------------------------------------------------------------------------------------
# Processes


@dataclass(frozen=True)
class ProcRef:
    """One process, told apart from a later one with the same pid by its start time."""

    pid: int
    starttime: int
    cmdline: str

    def describe(self) -> str:
        """State, kernel wait channel, nice value and pending signals, for a failure message."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
            wchan = Path(f"/proc/{self.pid}/wchan").read_text()
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError as exc:
            return f"pid {self.pid}: {exc}"
        keep = ("State", "SigPnd", "ShdPnd", "SigBlk", "Uid", "Threads")
        lines = [line for line in status.splitlines() if line.split(":")[0] in keep]
        nice = stat[stat.rindex(")") + 2 :].split()[16]
        return f"pid {self.pid} wchan={wchan} nice={nice} " + "; ".join(lines)

    def alive(self) -> bool:
        """Whether this very process still exists and is not a zombie."""
        stat = _stat(self.pid)
        return stat is not None and stat[2] == self.starttime and stat[0] != "Z"


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, starttime) of ``pid``, or None when it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def descendants(root: int) -> list[ProcRef]:
    """Every live process below ``root`` in the process tree."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        if stat is None or stat[0] == "Z":
            continue
        children.setdefault(stat[1], []).append(int(entry.name))
        starts[int(entry.name)] = stat[2]
    found: list[ProcRef] = []
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(ProcRef(pid, starts[pid], _cmdline(pid)))
        todo.extend(children.get(pid, []))
    return found


def guests(root: int) -> list[ProcRef]:
    """Processes below ``root`` running the guest runtime (``python ... GUEST_DIR``), idle ones
    included."""
    return [p for p in descendants(root) if any(a.endswith("/guest") for a in p.cmdline.split())]


#: Programs that must be seen running start a child process whose command line holds a marker:
#: with a pool of idle sandboxes, "a guest exists" does not mean "this program runs".
MARKER = f"codemode-test-marker-{uuid.uuid4().hex[:12]}"


def marked_program(tag: str, then: str = "time.sleep(30)") -> str:
    """A program that starts a marked child process (``MARKER:tag``), then runs ``then``."""
    return (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', "
        f"{MARKER + ':' + tag!r}])\n"
        f"{then}\n"
    )


#: In the command line of the fork-server backend's zygote, which serves every execution.
ZYGOTE = "/codemode/guest/zygote.py"


def marked_tree(root: int, tag: str) -> list[ProcRef]:
    """The marked child of ``tag``'s program and its ancestors below ``root``, or []."""
    label = f"{MARKER}:{tag}"
    table: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[0] != "Z":
                table[int(entry.name)] = (stat[1], stat[2])
    for pid in table:
        if _cmdline(pid).endswith(label):
            tree = []
            execution = True  # the fork server's zygote (and its bwrap) outlive executions
            while pid in table and pid != root:
                cmdline = _cmdline(pid)
                execution = execution and ZYGOTE not in cmdline
                if execution:
                    tree.append(ProcRef(pid, table[pid][1], cmdline))
                pid = table[pid][0]
            return tree if pid == root else []
    return []


def marked_anywhere() -> list[ProcRef]:
    """Marked processes of this test session still alive anywhere on the host."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and MARKER in _cmdline(int(entry.name)):
            stat = _stat(int(entry.name))
            if stat is not None and stat[0] != "Z":
                found.append(ProcRef(int(entry.name), stat[2], _cmdline(int(entry.name))))
    return found


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; return it, or the last falsy value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def wait_gone(procs: Iterable[ProcRef], timeout: float = 5.0) -> list[ProcRef]:
    """Wait for ``procs`` to end; return those still alive after ``timeout``."""
    procs = list(procs)
    wait_until(lambda: not any(p.alive() for p in procs), timeout)
    return [p for p in procs if p.alive()]


def open_fds(pid: int, port: int | None = None) -> int:
    """How many descriptors ``pid`` holds open; with ``port``, not counting the connections
    accepted on it (gRPC clients share connections between channels: one may outlive the
    channel that opened it)."""
    fds = os.listdir(f"/proc/{pid}/fd")
    if port is None:
        return len(fds)
    accepted = tcp_connections(pid, port)
    links = []
    for fd in fds:
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return sum(1 for link in links if link not in accepted)


def tcp_connections(pid: int, port: int) -> set[str]:
    """``socket:[inode]`` of ``pid``'s TCP connections whose local port is ``port``."""
    found = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] != "0A":  # 0A: the listening socket
                found.add(f"socket:[{fields[9]}]")
    return found


class ServerCgroups:
    """The cgroups a ``codemode serve`` made: ``codemode-<pid>-*`` under its own group in each
    hierarchy, and the per-execution groups in them. Built while the server runs (its
    ``/proc/PID/cgroup`` says where), read also after it stopped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        mounts = [
            line.split()
            for line in Path("/proc/self/mounts").read_text().splitlines()
            if line.split()[2] in ("cgroup", "cgroup2")
        ]
        self.bases: list[Path] = []
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, names, path = line.split(":", 2)
            for fields in mounts:
                v2 = fields[2] == "cgroup2"
                if (v2 and names == "") or (
                    not v2 and names and set(names.split(",")) & set(fields[3].split(","))
                ):
                    self.bases.append(Path(fields[1]) / path.lstrip("/"))

    def groups(self) -> list[Path]:
        """Every directory of this server's groups, the per-backend ones and their children."""
        found: list[Path] = []
        for base in self.bases:
            for root in base.glob(f"codemode-{self.pid}-*"):
                if root.is_dir():
                    found.append(root)
                    found += [child for child in root.iterdir() if child.is_dir()]
        return found

    def busy(self) -> list[Path]:
        """This server's groups that hold a process."""
        busy = []
        for group in self.groups():
            try:
                if (group / "cgroup.procs").read_text().strip():
                    busy.append(group)
            except OSError:
                continue
        return busy


# ------------------------------------------------------------------------------------------
# Servers


class ServerStartError(RuntimeError):
    """``codemode serve`` exited or stayed silent instead of printing its ready line."""


@dataclass
class ServerProcess:
    """A running ``codemode serve``: where it listens, its key, and its log (stderr)."""

    proc: subprocess.Popen[str]
    host: str
    port: int
    api_key: str
    log_path: Path
    isolation: str
    seen: set[ProcRef] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        """The server's JSON log lines (other stderr lines are skipped)."""
        records = []
        for line in self.log_text().splitlines():
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                records.append(value)
        return records

    def records_for(self, correlation_id: str) -> list[dict[str, Any]]:
        """Log records that carry ``correlation_id``."""
        return [r for r in self.log_records() if r.get("correlation_id") == correlation_id]

    def guests(self) -> list[ProcRef]:
        """Guest processes of this server now (with a sandbox pool, idle ones too)."""
        found = guests(self.pid)
        self.seen.update(descendants(self.pid))
        return found

    def marked_tree(self, tag: str) -> list[ProcRef]:
        """The processes running ``marked_program(tag)`` on this server, or []."""
        tree = marked_tree(self.pid, tag)
        self.seen.update(tree)
        return tree

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout`` s; return the exit code."""
        if self.proc.poll() is None:
            self.seen.update(descendants(self.pid))
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


@contextlib.contextmanager
def announced_process(
    argv: list[str], ready: str, env: Mapping[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Run ``argv`` from the repo's root until the block ends; yield what its first line says
    after ``ready`` (an address, usually) and the process, which is then terminated."""
    proc = subprocess.Popen(
        argv,
        cwd=REPO_ROOT,
        env=None if env is None else dict(env),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(ready), f"unexpected first line: {line!r}"
        yield line[len(ready) :].strip(), proc
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        if proc.stdout is not None:
            proc.stdout.close()


def server_env(api_key: str | None) -> dict[str, str]:
    """The test process's environment without ``CODEMODE_*``, plus the server's key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODEMODE_")}
    if api_key is not None:
        env["CODEMODE_API_KEY"] = api_key
    return env


def start_server(
    *,
    api_key: str,
    host: str = "127.0.0.1",
    port: int = 0,
    isolation: str = ISOLATION,
    extra_args: Sequence[str] = (),
    log_dir: Path | None = None,
    wrapper: Sequence[str] = (),
) -> ServerProcess:
    """Start ``codemode serve`` and wait for its ``listening on`` line.

    ``wrapper``: a command that execs the rest of the command line (``unshare -m ...``), so
    that the server keeps its pid. Raises :class:`ServerStartError` with the server's stderr
    when it does not come up.
    """
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="codemode-test-"))
    log_path = log_dir / f"serve-{host}-{port}-{time.monotonic_ns()}.log"
    argv = [
        *wrapper,
        sys.executable,
        "-m",
        "codemode.cli",
        "serve",
        "--host",
        host,
        "--port",
        str(port),
        "--isolation",
        isolation,
        "--log-format",
        "json",
        *extra_args,
    ]
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=server_env(api_key),
            cwd=REPO_ROOT,
            text=True,
        )
    assert proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if selector.select(timeout=0.1):
                line = proc.stdout.readline()
                if line.startswith(READY_PREFIX):
                    bound = int(line.rsplit(":", 1)[1])
                    return ServerProcess(proc, host, bound, api_key, log_path, isolation)
                if line == "" and proc.poll() is not None:
                    break
            elif proc.poll() is not None:
                break
    finally:
        selector.close()
    if proc.poll() is None:
        proc.kill()
    proc.wait(5)
    proc.stdout.close()
    raise ServerStartError(
        f"`codemode serve --isolation={isolation}` on {host}:{port} did not report "
        f"'listening on' (exit code {proc.returncode}). Its stderr:\n{log_path.read_text()}\n"
        "Hint: CODEMODE_TEST_ISOLATION=process runs the executors as plain processes where "
        "this host (or this checkout) has no bwrap sandbox; `codemode doctor` says what is missing."
    )


def run_program_in_client_process(url: str, api_key: str, code: str) -> subprocess.Popen[str]:
    """Start a separate Python process that runs ``code`` on ``url`` through the SDK."""
    script = (
        "import asyncio, sys\n"
        "from codemode import Codemode\n"
        "from codemode.config import ClientConfig\n"
        "async def main():\n"
        "    config = ClientConfig(executor_url=sys.argv[1], executor_api_key=sys.argv[2])\n"
        "    async with Codemode.from_client_config(config) as codemode:\n"
        "        print('started', flush=True)\n"
        "        await codemode.execute_async(sys.argv[3])\n"
        "asyncio.run(main())\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", script, url, api_key, code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=server_env(None),
        text=True,
    )
