"""Every Python snippet of docs/async-patterns.md, run as written against a real executor.

The snippets expect an executor at http://localhost:8001 with the key "your-api-key": the
``seed_server`` fixture starts one there. Each snippet is executed in a fresh namespace; names
the document leaves to the reader (``logger``, ``aiohttp``, ``DB_URL``, ``registry``, ``app``,
``codemode`` …) are given real objects. Functions a snippet only defines are called the way
the document describes. The two snippets that illustrate internals ("Internal retry logic
(simplified)" and "How Sync Methods Work") are checked through the behaviour they describe.
"""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import aiohttp.web
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from codemode import Codemode
from codemode.config import ClientConfig
from codemode.core import ExecutorClient
from codemode.core.executor_client import (
    ExecutorConnectionError,
    ExecutorTimeoutError,
)
from codemode.core.registry import _is_tool_async
from tests.helpers import REPO_ROOT, ServerProcess, marked_program, wait_gone

DOC = REPO_ROOT / "docs" / "async-patterns.md"
SEED = REPO_ROOT.parent / "shared" / "seeds" / "async-patterns.md"
SEED_URL, SEED_KEY = "http://localhost:8001", "your-api-key"

pytestmark = pytest.mark.usefixtures("seed_server")


def snippets() -> dict[str, str]:
    """The document's python code blocks, keyed by the heading above each."""
    found: dict[str, str] = {}
    heading = ""
    for match in re.finditer(
        r"^(#{1,6}) (?P<title>[^\n]+)$|^```python\n(?P<code>.*?)^```$",
        DOC.read_text(encoding="utf-8"),
        flags=re.MULTILINE | re.DOTALL,
    ):
        if match["title"] is not None:
            heading = match["title"].strip()
        else:
            assert heading not in found, f"two snippets under {heading!r}"
            found[heading] = match["code"]
    return found


SNIPPETS = snippets()


def run_script(heading: str, **given: Any) -> dict[str, Any]:
    """Execute a snippet as a module in a fresh namespace holding ``given``; return it."""
    namespace: dict[str, Any] = {"__name__": "seed_snippet", **given}
    code = compile(SNIPPETS[heading], f"<async-patterns.md: {heading}>", "exec")
    exec(code, namespace)  # noqa: S102 - running the document's code is the point
    return namespace


async def run_fragment(heading: str, **given: Any) -> dict[str, Any]:
    """Execute a snippet written for the inside of an ``async def`` (top-level await)."""
    namespace: dict[str, Any] = {"__name__": "seed_snippet", **given}
    code = compile(
        SNIPPETS[heading],
        f"<async-patterns.md: {heading}>",
        "exec",
        flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
    )
    outcome = eval(code, namespace)  # noqa: S307 - the document's own code
    if outcome is not None:
        await outcome
    return namespace


def seed_config(**overrides: Any) -> ClientConfig:
    """The configuration the snippets write, with ``overrides``."""
    return ClientConfig(executor_url=SEED_URL, executor_api_key=SEED_KEY, **overrides)


def closed_port_url() -> str:
    """An http:// URL on loopback where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def max_tick_gap(work: Awaitable[Any]) -> tuple[Any, float]:
    """Await ``work`` while a ticker runs on the loop; return its value and the longest gap."""
    gaps: list[float] = []
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)  # let the ticker take its first time stamp
    try:
        value = await work
    finally:
        stop.set()
        await ticker
    return value, max(gaps, default=0.0)


async def wait_for_program(server: ServerProcess, tag: str, timeout: float = 10.0) -> list[Any]:
    """Wait until ``marked_program(tag)`` runs on ``server``; return its processes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = server.marked_tree(tag)
        if found:
            return found
        await asyncio.sleep(0.02)
    pytest.fail(f"the program {tag!r} was not seen running within {timeout:g}s")


# ------------------------------------------------------------------------------------------
# The document


def test_doc_is_a_verbatim_copy_of_the_seed() -> None:
    """docs/async-patterns.md is byte for byte the user's seed document beside the repository."""
    if not SEED.exists():
        pytest.skip(f"no seed document at {SEED}")
    assert DOC.read_bytes() == SEED.read_bytes()


def test_every_snippet_has_a_test() -> None:
    """Each python block of the document is covered by exactly one test below."""
    assert set(SNIPPETS) == {
        "Simple Execution",
        "Using Async Context Manager",
        "execute_async",
        "Async Context Manager",
        "Non-Blocking Retries",
        "Concurrent Execution",
        "FastAPI Integration",
        "How Sync Methods Work",
        "Async Tool Callbacks",
        "Error Handling in Async Code",
        "Timeouts",
        "1. Always Use Async in Async Contexts",
        "2. Use Context Managers",
        "3. Handle Cancellation",
        "4. Limit Concurrency",
        "CrewAI Integration",
    }


# ------------------------------------------------------------------------------------------
# Basic async usage


def test_simple_execution_prints_4(capsys: pytest.CaptureFixture[str]) -> None:
    """The first snippet runs as a script and prints the result "4"."""
    run_script("Simple Execution")
    assert capsys.readouterr().out == "4\n"


def test_async_context_manager_prints_4(capsys: pytest.CaptureFixture[str]) -> None:
    """The `async with Codemode...` snippet's main() prints "4"."""
    namespace = run_script(
        "Using Async Context Manager", asyncio=asyncio, ClientConfig=ClientConfig, Codemode=Codemode
    )
    asyncio.run(namespace["main"]())
    assert capsys.readouterr().out == "4\n"


def test_executor_client_execute_async_prints_the_sum(capsys: pytest.CaptureFixture[str]) -> None:
    """The ExecutorClient snippet's execute_code() prints "Result: 4950" and closes the client."""
    namespace = run_script("execute_async")
    asyncio.run(namespace["execute_code"]())
    assert capsys.readouterr().out == "Result: 4950\n"


async def test_executor_client_async_context_manager() -> None:
    """`async with ExecutorClient(...)` returns a successful result "42" and closes the client."""
    namespace = await run_fragment("Async Context Manager", ExecutorClient=ExecutorClient)
    result = namespace["result"]
    assert result.success, result.error
    assert result.result == "42"
    assert namespace["client"].closed


# ------------------------------------------------------------------------------------------
# Retries (the snippet illustrates internals: its behaviour is checked instead)


async def test_retries_sleep_without_blocking_the_loop(caplog: pytest.LogCaptureFixture) -> None:
    """Retrying an unreachable executor logs each retry and ends in ExecutorConnectionError."""
    config = ClientConfig(
        executor_url=closed_port_url(),
        executor_api_key=SEED_KEY,
        connect_timeout=0.5,
        max_retries=2,
        retry_backoff_base=0.2,
        retry_backoff_max=0.4,
    )
    caplog.set_level(logging.WARNING, logger="codemode.client")
    started = time.perf_counter()
    async with ExecutorClient(config=config) as client:
        with pytest.raises(ExecutorConnectionError) as info:
            await max_tick_gap(client.execute_async("result = 1", available_tools=[]))
    elapsed = time.perf_counter() - started
    retries = [r for r in caplog.records if r.getMessage().startswith("retrying execution")]
    assert len(retries) == 2
    assert info.value.may_have_run is False
    # Three attempts of at most connect_timeout each, plus at most 0.2 + 0.4 s of backoff.
    assert elapsed < 3 * 0.5 + 0.6 + 1.0


async def test_retry_backoff_keeps_other_tasks_ticking() -> None:
    """While the client retries, another task on the same loop keeps running every few ms."""
    config = ClientConfig(
        executor_url=closed_port_url(),
        executor_api_key=SEED_KEY,
        connect_timeout=0.3,
        max_retries=2,
        retry_backoff_base=0.3,
        retry_backoff_max=0.3,
    )
    async with ExecutorClient(config=config) as client:

        async def attempt() -> BaseException:
            try:
                await client.execute_async("result = 1", available_tools=[])
            except ExecutorConnectionError as exc:
                return exc
            raise AssertionError("an unreachable executor answered")

        error, gap = await max_tick_gap(attempt())
    assert isinstance(error, ExecutorConnectionError)
    assert gap < 0.2, f"the event loop was blocked for {gap:.3f}s"


# ------------------------------------------------------------------------------------------
# Concurrency


def test_concurrent_execution_prints_three_results(capsys: pytest.CaptureFixture[str]) -> None:
    """The gather snippet prints ["2", "4", "6"]."""
    namespace = run_script("Concurrent Execution")
    asyncio.run(namespace["main"]())
    assert ast.literal_eval(capsys.readouterr().out) == ["2", "4", "6"]


async def test_concurrent_executions_overlap_in_time() -> None:
    """Three one-second programs gathered as in the seed finish in well under three seconds."""
    async with Codemode.from_client_config(seed_config()) as codemode:
        started = time.perf_counter()
        tasks = [
            codemode.execute_async("import time; time.sleep(1); result = 1"),
            codemode.execute_async("import time; time.sleep(1); result = 2"),
            codemode.execute_async("import time; time.sleep(1); result = 3"),
        ]
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    assert results == ["1", "2", "3"]
    assert 1.0 <= elapsed < 2.2


# ------------------------------------------------------------------------------------------
# FastAPI


class WhoAmI:
    """A context-aware tool that waits until ``parties`` calls are in flight at once."""

    def __init__(self, parties: int) -> None:
        self.barrier = threading.Barrier(parties, timeout=10)

    def run_with_context(self, context: Any) -> str:
        self.barrier.wait()
        return str(context["client_id"])


def test_fastapi_concurrent_requests_see_their_own_context() -> None:
    """Two overlapping requests with different client_id each see only their own context."""
    namespace = run_script("FastAPI Integration")
    program = 'result = [context["client_id"], tools.whoami()]'
    with TestClient(namespace["app"]) as http:
        namespace["codemode"].registry.register_tool("whoami", WhoAmI(parties=2))

        def post(client_id: str) -> Any:
            return http.post("/execute", params={"code": program, "client_id": client_id})

        with ThreadPoolExecutor(max_workers=2) as pool:
            replies = list(pool.map(post, ["alice", "bob"]))
    for reply, client_id in zip(replies, ["alice", "bob"], strict=True):
        assert reply.status_code == 200, reply.text
        assert json.loads(reply.json()["result"]) == [client_id, client_id]


def test_fastapi_failed_program_is_a_500_with_the_error() -> None:
    """A failing program becomes HTTP 500 whose detail names the program's error."""
    namespace = run_script("FastAPI Integration")
    with TestClient(namespace["app"]) as http:
        reply = http.post("/execute", params={"code": "1 / 0", "client_id": "x"})
    assert reply.status_code == 500
    assert "ZeroDivisionError" in reply.json()["detail"]


# ------------------------------------------------------------------------------------------
# Sync methods (the snippet illustrates internals: its behaviour is checked instead)


def test_sync_execute_outside_a_loop() -> None:
    """execute() from plain sync code returns "4"."""
    with Codemode.from_client_config(seed_config()) as codemode:
        assert codemode.execute("result = 2 + 2") == "4"
        assert codemode.execute("result = 3 + 3") == "6"


async def test_sync_execute_inside_a_running_loop() -> None:
    """execute() called inside a running event loop still returns "4" (from a worker thread)."""
    async with Codemode.from_client_config(seed_config()) as codemode:
        assert codemode.execute("result = 2 + 2") == "4"
        assert await codemode.execute_async("result = 3 + 3") == "6"


async def test_sync_execute_inside_a_loop_leaves_the_loops_clean(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Repeated execute() calls inside a running loop make asyncio log no error."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    async with Codemode.from_client_config(seed_config()) as codemode:
        assert await codemode.execute_async("result = 0") == "0"
        for _ in range(25):
            assert codemode.execute("result = 3") == "3"
            assert await codemode.execute_async("result = 4") == "4"
        await asyncio.sleep(0.2)
    errors = [r.getMessage().splitlines()[0] for r in caplog.records if r.name == "asyncio"]
    assert errors == []


# ------------------------------------------------------------------------------------------
# Async tool callbacks


async def test_async_tool_callbacks() -> None:
    """The seed's AsyncDatabaseTool is detected as async and answers programs over real HTTP."""
    queries: list[str] = []

    async def handle(request: aiohttp.web.Request) -> aiohttp.web.Response:
        query = (await request.json())["query"]
        queries.append(query)
        return aiohttp.web.json_response([{"query": query, "rows": len(queries)}])

    web = aiohttp.web.Application()
    web.router.add_post("/query", handle)
    runner = aiohttp.web.AppRunner(web)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with Codemode.from_client_config(seed_config()) as codemode:
            namespace = run_script(
                "Async Tool Callbacks",
                asyncio=asyncio,
                aiohttp=aiohttp,
                DB_URL=f"http://127.0.0.1:{port}/query",
                registry=codemode.registry,
            )
            tool = codemode.registry.get_tool("database")
            assert _is_tool_async(tool)

            class SyncForbidden(namespace["AsyncDatabaseTool"]):  # type: ignore[misc]
                def run(self, query: str) -> list[Any]:
                    raise AssertionError("the SDK called run() although run_async() exists")

            codemode.registry.register_tool("strict_database", SyncForbidden())
            result = await codemode.execute_async(
                "a = tools.database('select 1')\n"
                "b = await tools['strict_database'].run_async(query='select 2')\n"
                "result = [a, b]"
            )
    finally:
        await runner.cleanup()
    assert json.loads(result or "null") == [
        [{"query": "select 1", "rows": 1}],
        [{"query": "select 2", "rows": 2}],
    ]
    assert queries == ["select 1", "select 2"]


# ------------------------------------------------------------------------------------------
# Errors and timeouts


async def test_safe_execute_maps_each_error(caplog: pytest.LogCaptureFixture) -> None:
    """safe_execute returns the result, or logs the matching message and returns None."""
    logger = logging.getLogger("seed.safe_execute")
    namespace = run_script("Error Handling in Async Code", logger=logger)
    safe_execute: Callable[..., Awaitable[str | None]] = namespace["safe_execute"]
    caplog.set_level(logging.INFO, logger="seed.safe_execute")

    def messages() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "seed.safe_execute"]

    async with Codemode.from_client_config(seed_config(timeout=0.5)) as codemode:
        assert await safe_execute(codemode, "result = 2 + 2") == "4"
        assert messages() == []
        assert await safe_execute(codemode, "import time; time.sleep(5)") is None
        assert messages() == ["Execution timed out"]
        assert await safe_execute(codemode, "1 / 0") is None
        assert messages()[-1] == "Execution error: ZeroDivisionError: division by zero"
    unreachable = ClientConfig(
        executor_url=closed_port_url(),
        executor_api_key=SEED_KEY,
        connect_timeout=0.5,
        max_retries=0,
    )
    async with Codemode.from_client_config(unreachable) as cm:
        assert await safe_execute(cm, "result = 1") is None
    assert messages()[-1] == "Connection to executor failed"


async def test_timeouts_snippet() -> None:
    """The Timeouts snippet runs: client timeout, per-request timeout, and the wait_for wrapper."""
    namespace = await run_fragment(
        "Timeouts",
        asyncio=asyncio,
        ExecutorClient=ExecutorClient,
        ExecutorTimeoutError=ExecutorTimeoutError,
    )
    client = namespace["client"]
    try:
        assert client.config.timeout == 60
        # The program calls long_running_computation(), the reader's own function: the executor
        # ran it (per-request timeout accepted) and reports that the name is undefined there.
        result = namespace["result"]
        assert not result.success
        assert result.error_type == "NameError"
        assert "long_running_computation" in (result.error or "")
    finally:
        await client.close_async()

    execute_with_timeout = namespace["execute_with_timeout"]
    async with Codemode.from_client_config(seed_config()) as codemode:
        started = time.perf_counter()
        with pytest.raises(ExecutorTimeoutError, match="Client-side timeout exceeded"):
            await execute_with_timeout(codemode, "import time; time.sleep(10)", 0.5)
        assert time.perf_counter() - started < 2.0
        assert await execute_with_timeout(codemode, "result = 2 + 2", 10) == "4"


# ------------------------------------------------------------------------------------------
# Best practices


async def test_blocking_and_non_blocking_endpoints() -> None:
    """The "Bad" endpoint blocks the event loop for the whole execution; the "Good" one does not."""
    app = FastAPI()
    async with Codemode.from_client_config(seed_config()) as codemode:
        run_script("1. Always Use Async in Async Contexts", app=app, codemode=codemode)
        bad, good = [r.endpoint for r in app.routes if getattr(r, "path", "") == "/execute"]
        program = "import time; time.sleep(0.6); result = 1"
        value, bad_gap = await max_tick_gap(bad(code=program))
        assert value == "1"
        value, good_gap = await max_tick_gap(good(code=program))
        assert value == "1"
    assert bad_gap >= 0.5, f"the blocking call let the loop run (longest gap {bad_gap:.3f}s)"
    assert good_gap < 0.2, f"the async call blocked the loop for {good_gap:.3f}s"


async def test_context_manager_best_practice() -> None:
    """`async with Codemode.from_client_config(config)` runs the code and closes the client."""
    namespace = await run_fragment(
        "2. Use Context Managers", Codemode=Codemode, config=seed_config(), code="result = 2 + 2"
    )
    assert namespace["result"] == "4"
    assert namespace["codemode"].client.closed


async def test_cancellable_execution(
    seed_server: ServerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """Cancelling cancellable_execution mid-run logs, re-raises CancelledError, kills the guest."""
    logger = logging.getLogger("seed.cancel")
    namespace = run_script("3. Handle Cancellation", asyncio=asyncio, logger=logger)
    caplog.set_level(logging.INFO, logger="seed.cancel")
    async with Codemode.from_client_config(seed_config()) as codemode:
        task = asyncio.create_task(
            namespace["cancellable_execution"](codemode, marked_program("cancel"))
        )
        running = await wait_for_program(seed_server, "cancel")
        started = time.perf_counter()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.perf_counter() - started < 1.0
        assert [r.getMessage() for r in caplog.records if r.name == "seed.cancel"] == [
            "Execution was cancelled"
        ]
        assert await asyncio.to_thread(wait_gone, running) == []
        assert await codemode.execute_async("result = 'still serving'") == '"still serving"'


async def test_rate_limited_execution() -> None:
    """rate_limited_execution returns results in order and runs at most max_concurrent at once."""
    namespace = run_script("4. Limit Concurrency")
    codes = [f"import time; time.sleep(0.5); result = {i}" for i in range(4)]
    async with Codemode.from_client_config(seed_config()) as codemode:
        started = time.perf_counter()
        results = await namespace["rate_limited_execution"](codemode, codes, max_concurrent=2)
        elapsed = time.perf_counter() - started
        assert await namespace["rate_limited_execution"](codemode, ["result = 7"]) == ["7"]
    assert results == ["0", "1", "2", "3"]
    # Two waves of two: at least two sleeps long, clearly less than four in a row.
    assert 1.0 <= elapsed < 1.9


def test_crewai_integration(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CrewAI snippet runs with a scripted LLM; only its ``...`` placeholders are filled in.

    ``codemode.yaml`` names the seed executor; the Agent gets a goal, a backstory and the
    scripted LLM where the document writes ``...``, and ``tasks=[...]`` becomes one real Task.
    Both kickoffs must run the program through the tool and return its result.
    """
    from crewai import Task

    from tests.integration.test_agents_crewai import EXPECTED, ScriptedLLM, fx_rate, get_order

    (tmp_path / "codemode.yaml").write_text(
        f"executor_url: {SEED_URL}\nexecutor_api_key: {SEED_KEY}\n", encoding="utf-8"
    )
    monkeypatch.chdir(tmp_path)
    code = SNIPPETS["CrewAI Integration"]
    filled = code.replace(
        "    tools=[tool],  # Async tool works seamlessly\n    ...\n",
        "    tools=[tool],  # Async tool works seamlessly\n"
        "    goal='Answer order questions', backstory='Writes Python.', llm=LLM,\n",
    ).replace("tasks=[...]", "tasks=[make_task(orchestrator)]")
    assert filled.count("LLM") == 1, "the snippet's Agent(...) changed"
    assert filled.count("make_task") == 2, "the snippet's Crew(...) calls changed"
    filled = filled.replace(
        "tool = codemode.as_crewai_tool()",
        "codemode.registry.register_tool('get_order', get_order)\n"
        "codemode.registry.register_tool('fx_rate', fx_rate)\n"
        "codemode.with_context(customer='c-seed')\n"
        "tool = codemode.as_crewai_tool()",
    )

    def make_task(agent: Any) -> Task:
        return Task(
            description="What is order A1's total in EUR?",
            expected_output="The order id and its EUR total",
            agent=agent,
        )

    namespace: dict[str, Any] = {
        "__name__": "seed_snippet",
        "LLM": ScriptedLLM(model="scripted"),
        "make_task": make_task,
        "get_order": get_order,
        "fx_rate": fx_rate,
    }
    exec(compile(filled, "<async-patterns.md: CrewAI Integration>", "exec"), namespace)  # noqa: S102
    assert namespace["result"].raw == EXPECTED
    assert asyncio.run(namespace["run_crew"]()).raw == EXPECTED
    namespace["codemode"].close()
