"""Prometheus metrics of a real ``codemode serve --metrics-port 0``, scraped over HTTP.

One server with metrics serves the module; each test scrapes before and after what it runs
and checks the difference, so the tests do not depend on their order. The shared ``server``
(started without the flag) shows that no metrics port is opened by default.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from codemode import ExecutorClient
from codemode.core.registry import ComponentRegistry
from codemode.executor.sandbox.forkserver import ForkServerBackend
from tests.helpers import REPO_ROOT, ServerProcess, server_env, wait_until
from tests.integration.conftest import Servers

METRICS_PREFIX = "codemode serve: metrics on "
SANDBOXED = os.environ.get("CODEMODE_TEST_ISOLATION", "auto") != "process"

#: One scrape: (sample name, sorted label pairs) -> value.
Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class MetricsServer:
    def __init__(self, server: ServerProcess, url: str) -> None:
        self.server = server
        self.url = url

    def scrape(self) -> Scrape:
        response = httpx.get(self.url, timeout=5.0)
        response.raise_for_status()
        assert response.headers["content-type"].startswith("text/plain")
        samples: Scrape = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples


def value(scrape: Scrape, name: str, **labels: str) -> float:
    """A sample's value; 0 when absent (a labelled counter not yet incremented)."""
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def executions(before: Scrape, after: Scrape) -> dict[tuple[str, str], float]:
    """How ``codemode_executions_total`` moved, by (outcome, error_type), zeros left out."""
    moved = {}
    for (name, labels), count in after.items():
        if name == "codemode_executions_total":
            change = count - before.get((name, labels), 0.0)
            if change:
                label = dict(labels)
                moved[(label["outcome"], label["error_type"])] = change
    return moved


@pytest.fixture(scope="module")
def metrics(servers: Servers) -> MetricsServer:
    """An executor with ``--metrics-port 0``, and the URL its second ready line names."""
    server = servers.start(api_key=secrets.token_urlsafe(24), extra_args=["--metrics-port", "0"])
    assert server.proc.stdout is not None
    line = server.proc.stdout.readline()
    assert line.startswith(METRICS_PREFIX), line
    url = line.removeprefix(METRICS_PREFIX).strip()
    assert url.startswith("http://127.0.0.1:")
    assert url.endswith("/metrics")
    records = [r for r in server.log_records() if r.get("msg") == "metrics serving"]
    assert records
    assert records[0]["url"] == url
    return MetricsServer(server, url)


@pytest.fixture
async def client(metrics: MetricsServer) -> AsyncIterator[ExecutorClient]:
    """A client of the metrics server: ``lookup`` answers in 0.05 s, ``broken`` raises,
    ``stuck`` answers after 10 s."""

    async def lookup(key: str) -> str:
        await asyncio.sleep(0.05)
        return key.upper()

    async def stuck() -> None:
        await asyncio.sleep(10)

    def broken() -> None:
        raise ValueError("the tool failed")

    registry = ComponentRegistry()
    registry.register_tool("lookup", lookup)
    registry.register_tool("broken", broken)
    registry.register_tool("stuck", stuck)
    server = metrics.server
    async with ExecutorClient(server.url, server.api_key, registry=registry) as instance:
        yield instance


async def test_executions_are_counted_by_outcome_and_error_type(
    metrics: MetricsServer, client: ExecutorClient
) -> None:
    """A success, a builtin exception, a program-defined one and a timeout each move their
    own counter by one, and the duration and queue-wait histograms count all four."""
    before = metrics.scrape()
    ok = await client.execute_async("result = 2 + 2")
    zero = await client.execute_async("result = 1 / 0")
    custom = await client.execute_async("class Boom(Exception):\n    pass\nraise Boom('x')")
    slow = await client.execute_async("while True:\n    pass", execution_timeout=0.5)
    assert ok.success
    assert (zero.error_type, custom.error_type, slow.error_type) == (
        "ZeroDivisionError",
        "Boom",
        "Timeout",
    )
    after = metrics.scrape()
    assert executions(before, after) == {
        ("ok", ""): 1,
        ("error", "ZeroDivisionError"): 1,
        ("error", "ProgramException"): 1,
        ("error", "Timeout"): 1,
    }
    assert delta(before, after, "codemode_execution_duration_seconds_count") == 4
    # The timed-out execution alone ran for at least its timeout.
    assert delta(before, after, "codemode_execution_duration_seconds_sum") >= 0.5
    assert delta(before, after, "codemode_execution_duration_seconds_bucket", le="+Inf") == 4
    assert delta(before, after, "codemode_queue_wait_seconds_count") == 4
    assert value(after, "codemode_executions_in_flight") == 0
    refused = {"reason": "overloaded", "tenant": "default"}
    # Shown from the start, under the tenant of the server's key.
    assert ("codemode_executions_refused_total", tuple(sorted(refused.items()))) in before
    assert delta(before, after, "codemode_executions_refused_total", **refused) == 0


async def test_tool_calls_are_counted_with_their_latency(
    metrics: MetricsServer, client: ExecutorClient
) -> None:
    """An answered call and a failing one count as ok and error, each timed from its frame to
    its answer; a tool name never becomes a label."""
    before = metrics.scrape()
    result = await client.execute_async(
        "a = tools.lookup(key='x')\n"
        "try:\n"
        "    tools.broken()\n"
        "except Exception as exc:\n"
        "    b = type(exc).__name__\n"
        "result = [a, b]"
    )
    assert result.success, result
    assert result.tool_calls == 2
    after = metrics.scrape()
    assert delta(before, after, "codemode_tool_calls_total", outcome="ok") == 1
    assert delta(before, after, "codemode_tool_calls_total", outcome="error") == 1
    assert delta(before, after, "codemode_tool_calls_total", outcome="abandoned") == 0
    assert delta(before, after, "codemode_tool_call_duration_seconds_count") == 2
    assert delta(before, after, "codemode_tool_call_duration_seconds_sum") >= 0.05
    assert executions(before, after) == {("ok", ""): 1}
    assert not [key for key in after if "lookup" in str(key) or "broken" in str(key)]


async def test_a_tool_call_cut_short_by_the_timeout_is_abandoned(
    metrics: MetricsServer, client: ExecutorClient
) -> None:
    """A call still waiting when the execution times out counts as abandoned, not timed."""
    before = metrics.scrape()
    result = await client.execute_async(
        "tools.lookup(key='x')\nwhile True:\n    pass", execution_timeout=0.5
    )
    assert result.error_type == "Timeout"
    stuck = await client.execute_async("tools.stuck()", execution_timeout=0.5)
    assert stuck.error_type == "Timeout"

    def settled() -> Scrape | None:
        scrape = metrics.scrape()
        moved = delta(before, scrape, "codemode_tool_calls_total", outcome="abandoned")
        return scrape if moved else None

    after = await asyncio.to_thread(wait_until, settled, 5.0)
    assert after, "the call cut short was not counted"
    assert executions(before, after) == {("error", "Timeout"): 2}
    assert delta(before, after, "codemode_tool_calls_total", outcome="ok") == 1
    assert delta(before, after, "codemode_tool_calls_total", outcome="abandoned") == 1
    assert delta(before, after, "codemode_tool_call_duration_seconds_count") == 1


async def test_sessions_are_counted_open_and_their_executions_too(
    metrics: MetricsServer, client: ExecutorClient
) -> None:
    """An open session shows in ``codemode_sessions_open`` until it closes; its executions
    count like any other."""
    before = metrics.scrape()
    assert value(before, "codemode_sessions_open") == 0
    async with client.session(ttl=60) as session:
        await session.execute_async("x = 20")
        assert await session.execute_async("result = x + len(tools.lookup(key='a'))") == "21"
        during = metrics.scrape()
        assert value(during, "codemode_sessions_open") == 1
    after = await asyncio.to_thread(
        wait_until, lambda: _with(metrics.scrape(), "codemode_sessions_open", 0), 5.0
    )
    assert after, "the session still counts as open after it closed"
    assert executions(before, after) == {("ok", ""): 2}
    assert delta(before, after, "codemode_execution_duration_seconds_count") == 2
    assert delta(before, after, "codemode_tool_calls_total", outcome="ok") == 1
    # Executions in a session take no execution slot: they never queue.
    assert delta(before, after, "codemode_queue_wait_seconds_count") == 0


def _with(scrape: Scrape, name: str, expected: float) -> Scrape | None:
    return scrape if value(scrape, name) == expected else None


@pytest.mark.skipif(not SANDBOXED, reason="isolation=process keeps no pool of sandboxes")
async def test_the_sandbox_pool_is_sampled(metrics: MetricsServer, client: ExecutorClient) -> None:
    """Each execution takes a pooled sandbox, which is refilled; the pool returns to its size
    and no sandbox failed to start."""
    before = metrics.scrape()
    for _ in range(3):
        assert (await client.execute_async("result = 1")).success

    def refilled() -> Scrape | None:
        scrape = metrics.scrape()
        size = ForkServerBackend.default_pool_size
        full = value(scrape, "codemode_sandbox_pool_size", zygote="plain") == size
        refills = delta(before, scrape, "codemode_sandbox_refills_total", zygote="plain")
        return scrape if full and refills >= 3 else None

    after = await asyncio.to_thread(wait_until, refilled, 10.0)
    assert after, "the pool was not refilled to its size"
    assert value(after, "codemode_sandbox_start_failures_total", zygote="plain") == 0
    assert ("codemode_sandbox_pool_size", (("zygote", "preloaded"),)) not in after


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on, from its socket descriptors and /proc/net."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_without_the_flag_no_metrics_port_is_open(
    server: ServerProcess, metrics: MetricsServer
) -> None:
    """A server started without --metrics-port listens on its gRPC port only; one with it on
    that and the metrics port."""
    assert listening_ports(server.pid) == {server.port}
    metrics_port = int(metrics.url.rsplit(":", 1)[1].split("/")[0])
    assert listening_ports(metrics.server.pid) == {metrics.server.port, metrics_port}


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "codemode.cli", "serve", "--port", "0", *args],
        env=server_env(secrets.token_urlsafe(24)),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port something else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_bad_or_taken_metrics_port_stops_the_start(taken_port: int) -> None:
    """An invalid --metrics-port is a configuration error (exit 2); a taken one refuses the
    start (exit 3), each with a message naming it."""
    bad = _serve("--metrics-port", "70000", "--isolation", "process")
    assert bad.returncode == 2
    assert "metrics_port: Input should be less than or equal to 65535" in bad.stderr
    taken = _serve("--metrics-port", str(taken_port), "--isolation", "process")
    assert taken.returncode == 3, taken.stderr
    assert f"refusing to start: cannot serve metrics on 127.0.0.1:{taken_port}" in taken.stderr
    assert "listening on" not in taken.stdout
