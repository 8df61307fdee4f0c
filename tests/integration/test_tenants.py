"""Tenants on a real ``codemode serve --config executor.yaml`` with hashed keys in ``api_keys``.

One server serves the module: ``alpha`` (one execution at a time), ``beta`` (no limits of
its own), ``gamma`` (ceilings: 1 s of wall time, 2 s of CPU), ``delta`` (3 executions a
minute), ``flood`` (two at a time) and ``calm``, plus ``default``, the server's ``api_key``.
A test's executions end with it, so only delta's minute outlives one: delta is its test's
alone. Key rotation gets a server of its own, whose config file the test rewrites before
each SIGHUP.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from codemode import (
    ExecutorAuthenticationError,
    ExecutorClient,
    ExecutorOverloadedError,
)
from codemode.config import ClientConfig
from codemode.config.executor import hash_api_key
from tests.helpers import REPO_ROOT, ServerProcess, server_env, wait_until
from tests.integration.conftest import Servers

METRICS_PREFIX = "codemode serve: metrics on "
KEYS = {
    name: secrets.token_urlsafe(24) for name in ("alpha", "beta", "gamma", "delta", "flood", "calm")
}
#: The flood tenant's share, and the executor's: two at once leaves room for the others.
FLOOD_SHARE = 2
MAX_CONCURRENT = 4
#: What each tenant may do, as the config file says it.
TENANTS: dict[str, dict[str, Any]] = {
    "alpha": {"max_concurrent_executions": 1},
    "beta": {},
    "gamma": {"max_execution_timeout": 1, "limits": {"cpu_seconds": 2}, "max_sessions": 1},
    "delta": {"max_executions_per_minute": 3},
    "flood": {"max_concurrent_executions": FLOOD_SHARE},
    "calm": {},
}


def api_keys(keys: dict[str, str], settings: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ``api_keys`` mapping: a bare hash for a key with no settings, else a mapping."""
    return {
        name: ({"key_hash": hash_api_key(keys[name]), **settings[name]})
        if settings.get(name)
        else hash_api_key(keys[name])
        for name in keys
    }


def write_config(path: Path, body: dict[str, Any]) -> Path:
    # JSON is YAML: the file is what an operator writes, without a YAML writer in the test.
    path.write_text(json.dumps(body, indent=2))
    return path


class Tenanted:
    """The module's server, and a scraper of its metrics."""

    def __init__(self, server: ServerProcess, metrics_url: str) -> None:
        self.server = server
        self.metrics_url = metrics_url

    def client(self, tenant: str, **overrides: Any) -> ExecutorClient:
        key = self.server.api_key if tenant == "default" else KEYS[tenant]
        values: dict[str, Any] = {"executor_url": self.server.url, "executor_api_key": key}
        return ExecutorClient(config=ClientConfig(**{**values, **overrides}))

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        response = httpx.get(self.metrics_url, timeout=5.0)
        response.raise_for_status()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples
        }

    def count(self, name: str, **labels: str) -> float:
        return self.scrape().get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def tenanted(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Tenanted:
    """A server whose config file holds six hashed keys; its env key is tenant 'default'."""
    path = write_config(
        tmp_path_factory.mktemp("tenants") / "executor.yaml",
        {"max_concurrent_executions": MAX_CONCURRENT, "api_keys": api_keys(KEYS, TENANTS)},
    )
    server = servers.start(
        api_key=secrets.token_urlsafe(24),
        extra_args=["--config", str(path), "--metrics-port", "0"],
    )
    assert server.proc.stdout is not None
    line = server.proc.stdout.readline()
    assert line.startswith(METRICS_PREFIX), line
    serving = [r for r in server.log_records() if r.get("msg") == "executor serving"]
    assert serving[0]["tenants"] == sorted([*KEYS, "default"])
    return Tenanted(server, line.removeprefix(METRICS_PREFIX).strip())


async def test_each_key_runs_as_its_tenant_on_every_log_line(tenanted: Tenanted) -> None:
    """Every key, the env key included, runs a program; each log line of the request names
    the key's id as ``tenant``, and never the key. (delta's three a minute are its own
    test's.)"""
    for tenant in [*(k for k in KEYS if k != "delta"), "default"]:
        async with tenanted.client(tenant) as client:
            result = await client.execute_async("result = 2 + 2")
        assert result.success, result.error
        assert result.value == 4
        records = wait_until(
            lambda r=result: _finished(tenanted.server, r.correlation_id), timeout=5.0
        )
        assert records, f"no 'execution finished' line for {tenant}"
        lines = tenanted.server.records_for(result.correlation_id)
        assert {r["msg"] for r in lines} >= {"execution started", "execution finished"}
        assert {r.get("tenant") for r in lines} == {tenant}, lines
    log = tenanted.server.log_text()
    for key in KEYS.values():
        assert key not in log
    assert tenanted.server.api_key not in log


def _finished(server: ServerProcess, cid: str) -> list[dict[str, Any]]:
    return [r for r in server.records_for(cid) if r["msg"] == "execution finished"]


async def test_a_wrong_key_or_a_hash_as_the_key_is_refused(tenanted: Tenanted) -> None:
    """A key not in api_keys, and the stored hash sent as if it were the key, get
    ExecutorAuthenticationError; nothing runs."""
    for key in (secrets.token_urlsafe(24), hash_api_key(KEYS["beta"])):
        config = ClientConfig(executor_url=tenanted.server.url, executor_api_key=key)
        async with ExecutorClient(config=config) as client:
            with pytest.raises(ExecutorAuthenticationError):
                await client.execute_async("result = 1")
            with pytest.raises(ExecutorAuthenticationError):
                await client.info_async()


async def test_a_key_at_its_concurrency_is_refused_while_another_runs(tenanted: Tenanted) -> None:
    """alpha (one at a time) running, its second execution gets ExecutorOverloadedError
    after the client's retries, while beta runs; both are counted under their tenant."""
    before = tenanted.scrape()
    cid = uuid.uuid4().hex
    async with (
        tenanted.client("alpha") as alpha,
        tenanted.client("alpha", max_retries=1, retry_backoff_base=0.01) as impatient,
        tenanted.client("beta") as beta,
    ):
        running = asyncio.create_task(
            alpha.execute_async("import time\ntime.sleep(2)\nresult = 'first'", correlation_id=cid)
        )
        try:
            started = await asyncio.to_thread(
                wait_until, lambda: tenanted.server.records_for(cid), 10.0
            )
            assert started, "alpha's first execution did not start"
            with pytest.raises(ExecutorOverloadedError, match="max_concurrent_executions"):
                await impatient.execute_async("result = 'second'")
            other = await beta.execute_async("result = 'beta ran'")
            assert other.value == "beta ran"
            assert not running.done()
        finally:
            first = await running
        assert first.value == "first"
        again = await alpha.execute_async("result = 'third'")
        assert again.value == "third"
    after = tenanted.scrape()
    refused = _moved(before, after, "codemode_executions_refused_total")
    assert refused == {(("reason", "tenant_concurrency"), ("tenant", "alpha")): 2}
    ran = _moved(before, after, "codemode_executions_total")
    assert ran == {
        (("error_type", ""), ("outcome", "ok"), ("tenant", "alpha")): 2,
        (("error_type", ""), ("outcome", "ok"), ("tenant", "beta")): 1,
    }


def _moved(before: dict[Any, float], after: dict[Any, float], name: str) -> dict[Any, float]:
    """How the samples named ``name`` moved, by label pairs, zeros left out."""
    return {
        labels: value - before.get((sample, labels), 0.0)
        for (sample, labels), value in after.items()
        if sample == name and value != before.get((sample, labels), 0.0)
    }


async def test_a_key_past_its_rate_is_refused_while_another_runs(tenanted: Tenanted) -> None:
    """delta (3 a minute) runs three; the fourth is refused with ExecutorOverloadedError
    naming max_executions_per_minute, and beta still runs."""
    before = tenanted.count(
        "codemode_executions_refused_total", reason="tenant_rate", tenant="delta"
    )
    async with tenanted.client("delta", max_retries=0) as delta, tenanted.client("beta") as beta:
        for n in range(3):
            assert (await delta.execute_async(f"result = {n}")).value == n
        with pytest.raises(ExecutorOverloadedError, match="max_executions_per_minute") as info:
            await delta.execute_async("result = 3")
        assert "'delta'" in str(info.value)
        assert (await beta.execute_async("result = 'beta'")).value == "beta"
    after = tenanted.count(
        "codemode_executions_refused_total", reason="tenant_rate", tenant="delta"
    )
    assert after - before == 1
    records = [
        r
        for r in tenanted.server.log_records()
        if r.get("tenant") == "delta" and r["msg"].startswith("refused: over its quota")
    ]
    assert len(records) == 1


async def test_a_keys_ceilings_clamp_what_its_requests_ask(tenanted: Tenanted) -> None:
    """gamma's max_execution_timeout of 1 s ends a program sleeping 5 s that asked for 30 s
    with Timeout; its cpu_seconds of 2 is the program's RLIMIT_CPU; Info reports both.
    beta, with none of its own, keeps the service's."""
    async with tenanted.client("gamma") as gamma, tenanted.client("beta") as beta:
        slow = await gamma.execute_async(
            "import time\ntime.sleep(5)\nresult = 1", execution_timeout=30.0
        )
        assert slow.error_type == "Timeout", slow.error
        assert 900 <= slow.duration_ms < 4000
        cpu = "import resource\nresult = resource.getrlimit(resource.RLIMIT_CPU)[0]"
        assert (await gamma.execute_async(cpu)).value == 2
        lower = await gamma.execute_async(cpu, limits={"cpu_seconds": 1})
        assert lower.value == 1  # a request may still lower its key's ceiling
        info = await gamma.info_async()
        assert info["max_execution_timeout_seconds"] == 1.0
        assert info["limits"]["cpu_seconds"] == 2.0
        assert (await beta.execute_async(cpu)).value == 30
        beta_info = await beta.info_async()
        assert beta_info["max_execution_timeout_seconds"] == 300.0
        assert beta_info["limits"]["cpu_seconds"] == 30.0
        sleeper = await beta.execute_async(
            "import time\ntime.sleep(1.5)\nresult = 'slept'", execution_timeout=30.0
        )
        assert sleeper.value == "slept"


async def test_a_keys_sessions_are_bounded_and_get_its_ceilings(tenanted: Tenanted) -> None:
    """gamma (one session) gets its CPU ceiling in its session, and its second session is
    refused with ExecutorOverloadedError while beta opens one; closed, gamma opens again."""
    cpu = "import resource\nresult = resource.getrlimit(resource.RLIMIT_CPU)[0]"
    async with tenanted.client("gamma", max_retries=0) as gamma, tenanted.client("beta") as beta:
        async with gamma.session() as first:
            assert await first.execute_async(cpu) == "2"
            with pytest.raises(ExecutorOverloadedError, match="'gamma' has 1 sessions open"):
                await gamma.open_session()
            async with beta.session() as other:
                assert await other.execute_async(cpu) == "30"
        async with gamma.session() as again:
            assert await again.execute_async("result = 'again'") == '"again"'
    opened = [
        r
        for r in tenanted.server.log_records()
        if r["msg"] == "session opened" and r.get("tenant") in ("gamma", "beta")
    ]
    assert [r["tenant"] for r in opened] == ["gamma", "beta", "gamma"]


# ------------------------------------------------------------------------------------------
# One tenant floods, another keeps its latency

FLOOD_WORKERS = 4 * FLOOD_SHARE
#: The flood process ends by itself after this, whatever the test does, seconds.
FLOOD_MAX_S = 120.0
#: Rounds of (calm alone, calm while flood floods), calm's executions in each half of one,
#: and before the first. Alternating halves spreads whatever else loads the host over both.
ROUNDS = 4
BLOCK = 80
WARM_UP = 20


async def _latencies(client: ExecutorClient, n: int) -> list[float]:
    """Seconds each of ``n`` sequential ``result = 2 + 2`` took, end to end."""
    times = []
    for _ in range(n):
        started = time.perf_counter()
        result = await client.execute_async("result = 2 + 2")
        times.append(time.perf_counter() - started)
        assert result.value == 4
    return times


def _p99(times: list[float]) -> float:
    return statistics.quantiles(times, n=100, method="inclusive")[98]


class Flood:
    """The flooding tenant's process (``flood_client``), driven through its stdin."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def command(self, line: str, answer: str) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(f"{line}\n".encode())
        await self.proc.stdin.drain()
        got = await asyncio.wait_for(self.proc.stdout.readline(), 30.0)
        assert got.decode().strip() == answer

    async def end(self) -> dict[str, int]:
        """Close its stdin; the counts it prints as it exits."""
        out, err = await asyncio.wait_for(self.proc.communicate(b""), FLOOD_MAX_S)
        assert self.proc.returncode == 0, err.decode()
        counts: dict[str, int] = json.loads(out)
        return counts


async def test_a_flooding_tenant_leaves_another_its_latency(tenanted: Tenanted) -> None:
    """While flood runs four times its share in a loop (refused beyond it), calm's
    sequential executions keep their latency: median and p99 within 2x of calm's alone."""
    async with tenanted.client("calm", max_retries=0) as calm:
        await _latencies(calm, WARM_UP)
        flood = Flood(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.integration.flood_client",
                tenanted.server.url,
                KEYS["flood"],
                str(FLOOD_WORKERS),
                str(FLOOD_MAX_S),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=server_env(None),
                cwd=REPO_ROOT,
            )
        )
        idle: list[float] = []
        flooded: list[float] = []
        try:
            for _ in range(ROUNDS):
                idle += await _latencies(calm, BLOCK)
                refused = tenanted.count(
                    "codemode_executions_refused_total", reason="tenant_concurrency", tenant="flood"
                )
                await flood.command("flood", "flooding")
                more = await asyncio.to_thread(
                    wait_until,
                    lambda r=refused: (
                        tenanted.count(
                            "codemode_executions_refused_total",
                            reason="tenant_concurrency",
                            tenant="flood",
                        )
                        > r
                    ),
                    20.0,
                    0.05,
                )
                assert more, "the flood was not refused beyond its share"
                flooded += await _latencies(calm, BLOCK)
                await flood.command("pause", "paused")
        finally:
            counts = await flood.end()
    assert counts["ok"] >= FLOOD_SHARE, counts  # the flood ran its share meanwhile
    assert counts["overloaded"] >= 1, counts  # and was refused beyond it, after its retries
    assert counts["other"] == 0, counts
    summary = (
        f"alone: median {statistics.median(idle) * 1000:.1f} ms, p99 "
        f"{_p99(idle) * 1000:.1f} ms; flooded: median {statistics.median(flooded) * 1000:.1f} "
        f"ms, p99 {_p99(flooded) * 1000:.1f} ms; flood {counts}"
    )
    assert statistics.median(flooded) <= 2 * statistics.median(idle), summary
    assert _p99(flooded) <= 2 * _p99(idle), summary


# ------------------------------------------------------------------------------------------
# Key rotation


class Rotating:
    """A server of its own whose config file the test rewrites, then signals."""

    def __init__(self, server: ServerProcess, path: Path) -> None:
        self.server = server
        self.path = path

    def reload(self, body: dict[str, Any] | str) -> dict[str, Any]:
        """Write ``body`` to the config file, SIGHUP, and return the reload's log line."""
        seen = len(self._reloads())
        if isinstance(body, str):
            self.path.write_text(body)
        else:
            write_config(self.path, body)
        self.server.proc.send_signal(signal.SIGHUP)
        lines = wait_until(lambda: self._reloads()[seen:], timeout=10.0)
        assert lines, "no reload line after SIGHUP"
        return lines[0]

    def _reloads(self) -> list[dict[str, Any]]:
        return [r for r in self.server.log_records() if r["msg"].startswith("API keys ")]

    async def run(self, key: str, code: str = "result = 'ran'", **kwargs: Any) -> Any:
        config = ClientConfig(executor_url=self.server.url, executor_api_key=key, max_retries=0)
        async with ExecutorClient(config=config) as client:
            return (await client.execute_async(code, **kwargs)).value


@pytest.fixture
async def rotating(servers: Servers, tmp_path: Path) -> AsyncIterator[Rotating]:
    keys = {"old": KEYS["alpha"], "stay": KEYS["beta"]}
    path = write_config(tmp_path / "executor.yaml", {"api_keys": api_keys(keys, {})})
    server = servers.start(api_key=secrets.token_urlsafe(24), extra_args=["--config", str(path)])
    yield Rotating(server, path)
    assert servers.stop(server) == 0


async def test_sighup_rotates_keys_and_a_bad_file_keeps_the_old_ones(rotating: Rotating) -> None:
    """After SIGHUP with 'old' removed and 'new' added, 'old' is refused and 'new' runs,
    while an execution 'old' began before runs to its end; a changed setting other than the
    keys is named as needing a restart. A file with a bad hash, a key id given twice, or
    broken YAML is logged as an error and every key stays as it was."""
    new_key = secrets.token_urlsafe(24)
    assert await rotating.run(KEYS["alpha"]) == "ran"
    cid = uuid.uuid4().hex
    begun = asyncio.create_task(
        rotating.run(
            KEYS["alpha"], "import time\ntime.sleep(2)\nresult = 'finished'", correlation_id=cid
        )
    )
    assert await asyncio.to_thread(wait_until, lambda: rotating.server.records_for(cid), 10.0)

    line = rotating.reload(
        {
            "max_queued_executions": 3,
            "api_keys": api_keys({"stay": KEYS["beta"], "new": new_key}, {}),
        }
    )
    assert line["level"] == "info"
    assert (line["added"], line["removed"], line["tenants"]) == (
        ["new"],
        ["old"],
        ["default", "new", "stay"],
    )
    restart = [r for r in rotating.server.log_records() if "only at a restart" in r["msg"]]
    assert restart[-1]["settings"] == ["max_queued_executions"]
    with pytest.raises(ExecutorAuthenticationError):
        await rotating.run(KEYS["alpha"])
    assert await rotating.run(new_key) == "ran"
    assert await rotating.run(KEYS["beta"]) == "ran"
    assert await rotating.run(rotating.server.api_key) == "ran"  # the env key stays
    assert await begun == "finished"

    bad_files: list[tuple[dict[str, Any] | str, str]] = [
        ({"api_keys": {"stay": KEYS["beta"]}}, "key_hash must be 'sha256:'"),
        (
            f"api_keys:\n  stay: {hash_api_key(KEYS['beta'])}\n  stay: {hash_api_key(new_key)}\n",
            "duplicate key 'stay'",
        ),
        ("api_keys: [unclosed\n", "is not valid YAML"),
    ]
    for body, message in bad_files:
        line = rotating.reload(body)
        assert line["level"] == "error"
        assert line["msg"].startswith("API keys not reloaded; the old keys stay")
        assert message in line["msg"]
        assert KEYS["beta"] not in line["msg"]  # the key given in place of its hash
        assert await rotating.run(new_key) == "ran"
        assert await rotating.run(KEYS["beta"]) == "ran"
        with pytest.raises(ExecutorAuthenticationError):
            await rotating.run(KEYS["alpha"])


def test_hash_key_prints_the_hash_of_stdin() -> None:
    """`codemode hash-key` prints sha256:<hex> of the key on stdin, and refuses a short one."""
    key = secrets.token_urlsafe(32)

    def command(stdin: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "codemode.cli", "hash-key"],
            input=stdin,
            capture_output=True,
            text=True,
            env=server_env(None),
            timeout=30,
            check=False,
        )

    done = command(key + "\n")
    assert (done.returncode, done.stdout) == (0, hash_api_key(key) + "\n")
    short = command("short\n")
    assert short.returncode == 2
    assert "at least 8 characters" in short.stderr
