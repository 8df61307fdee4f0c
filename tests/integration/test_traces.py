"""OpenTelemetry traces against a real executor: the client's spans, the executor's, one trace.

The test process exports to an in-memory exporter; the executor runs with
``OTEL_TRACES_EXPORTER=console``, which writes each span as one JSON line to its stderr (the
log file the tests read).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

from codemode import Codemode, ComponentRegistry, tool, tracing
from codemode.config import ClientConfig
from tests.helpers import ServerProcess, server_env, wait_until
from tests.integration.conftest import Servers

#: Values that must never reach a span: in the code, the arguments, the results.
CODE_SECRET = f"code-secret-{uuid.uuid4().hex}"
ARG_SECRET = f"arg-secret-{uuid.uuid4().hex}"
RESULT_SECRET = f"result-secret-{uuid.uuid4().hex}"
CONTEXT_SECRET = f"context-secret-{uuid.uuid4().hex}"

GATHER = (
    "import asyncio\n"
    f"marker = {CODE_SECRET!r}\n"
    "a, b = await asyncio.gather(\n"
    f"    tools.lookup.run_async(key={ARG_SECRET!r}), tools.lookup.run_async(key='other')\n"
    ")\n"
    "result = [a, b]\n"
)


@tool
async def lookup(key: str) -> str:
    """The value under ``key``; makes a span of its own, as an instrumented client would."""
    with trace.get_tracer("app").start_as_current_span("app.inner"):
        await asyncio.sleep(0.01)
    return RESULT_SECRET if key == ARG_SECRET else "plain"


@tool
def broken(key: str) -> str:
    """Fails, with a message that holds its argument."""
    raise ValueError(f"no such key {key}")


@pytest.fixture(scope="module")
def traced_server(servers: Servers) -> Iterator[ServerProcess]:
    """An executor that exports its spans to its log, batched every 50 ms."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_TRACES_EXPORTER", "console")
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        # CrewAI, imported by other tests of the session, opts its process out of telemetry
        # with OTEL_SDK_DISABLED, which a server started from it would inherit.
        env.delenv("OTEL_SDK_DISABLED", raising=False)
        server = servers.start(api_key=uuid.uuid4().hex)
    yield server
    servers.stop(server)


@pytest.fixture
def exported(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """A tracer provider for the test process, exporting to memory; the one before it (CrewAI,
    imported by other tests, sets its own and opts out with OTEL_SDK_DISABLED) comes back
    afterwards."""
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # The API sets a process's provider once; the SDK's own tests reset it the same way.
    previous = trace._TRACER_PROVIDER
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None
    if previous is not None:
        trace.set_tracer_provider(previous)


@pytest.fixture
async def app(traced_server: ServerProcess) -> AsyncIterator[Codemode]:
    registry = ComponentRegistry()
    registry.register_tool("lookup", lookup)
    registry.register_tool("broken", broken)
    config = ClientConfig(executor_url=traced_server.url, executor_api_key=traced_server.api_key)
    async with Codemode.from_client_config(config, registry) as codemode:
        yield codemode


def executor_spans(server: ServerProcess, cid: str, count: int) -> list[dict[str, Any]]:
    """The executor's spans of the RPC with correlation id ``cid`` (waiting for ``count``)."""

    def find() -> list[dict[str, Any]]:
        records = [r for r in server.log_records() if "context" in r and "parent_id" in r]
        rpc = [r for r in records if r["attributes"].get(tracing.CORRELATION_ID) == cid]
        if not rpc:
            return []
        ids = {rpc[0]["context"]["span_id"]}
        found = [r for r in records if r["context"]["span_id"] in ids or r["parent_id"] in ids]
        return found if len(found) >= count else []

    spans = wait_until(find, timeout=10.0)
    assert spans, f"no executor spans for {cid} in:\n{server.log_text()[-3000:]}"
    return list(spans)


def hex_id(value: int, width: int) -> str:
    return "0x" + format(value, f"0{width}x")


def attribute_values(spans: list[ReadableSpan]) -> list[str]:
    values = []
    for span in spans:
        values += [str(v) for v in (span.attributes or {}).values()]
        values += [str(v) for e in span.events for v in (e.attributes or {}).values()]
        values.append(str(span.status.description))
    return values


async def test_an_execution_and_its_two_tool_calls_make_one_trace_with_the_executor(
    app: Codemode, exported: InMemorySpanExporter, traced_server: ServerProcess
) -> None:
    """The execution span is the caller's child and the parent of both gathered tool calls
    (whose own spans nest in them), the executor's spans join the trace under it, and no
    attribute anywhere holds the code, an argument, a result or the context."""
    cid = uuid.uuid4().hex
    with trace.get_tracer("app").start_as_current_span("agent.step") as step:
        result = await app.client.execute_async(
            GATHER, correlation_id=cid, context={"token": CONTEXT_SECRET}
        )
    assert result.success, result.error
    assert result.value == [RESULT_SECRET, "plain"]

    spans = exported.get_finished_spans()
    by_name: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    [execution] = by_name["codemode.execution"]
    calls = by_name["codemode.tool_call"]
    inner = by_name["app.inner"]
    assert len(calls) == 2
    assert len(inner) == 2
    trace_id = step.get_span_context().trace_id
    assert {s.context.trace_id for s in spans if s.context is not None} == {trace_id}
    assert execution.parent is not None
    assert execution.parent.span_id == step.get_span_context().span_id
    assert execution.context is not None
    exec_id = execution.context.span_id
    assert all(c.parent is not None and c.parent.span_id == exec_id for c in calls)
    call_ids = {c.context.span_id for c in calls if c.context is not None}
    assert {i.parent.span_id for i in inner if i.parent is not None} == call_ids

    attrs = dict(execution.attributes or {})
    assert attrs[tracing.CORRELATION_ID] == cid
    assert attrs[tracing.CODE_BYTES] == len(GATHER.encode())
    assert attrs[tracing.TOOLS_DECLARED] == 2
    assert attrs[tracing.OUTCOME] == "ok"
    assert attrs[tracing.TOOL_CALLS] == 2
    assert attrs[tracing.ATTEMPTS] == 1
    assert attrs[tracing.FAILOVERS] == 0
    sizes = sorted(int(str((c.attributes or {})[tracing.RESULT_BYTES])) for c in calls)
    assert sizes == [len(b'"plain"'), len(json.dumps(RESULT_SECRET).encode())]
    for call in calls:
        call_attrs = dict(call.attributes or {})
        assert call_attrs[tracing.TOOL_NAME] == "lookup"
        assert int(str(call_attrs[tracing.ARGUMENT_BYTES])) > 0
        assert call_attrs[tracing.OUTCOME] == "ok"

    remote = executor_spans(traced_server, cid, count=4)
    names = {r["name"]: r for r in remote}
    assert set(names) == {
        "codemode.executor.execution",
        "codemode.executor.queue",
        "codemode.executor.sandbox",
        "codemode.executor.run",
    }
    root = names["codemode.executor.execution"]
    assert {r["context"]["trace_id"] for r in remote} == {hex_id(trace_id, 32)}
    assert root["parent_id"] == hex_id(exec_id, 16)
    for phase in ("queue", "sandbox", "run"):
        assert names[f"codemode.executor.{phase}"]["parent_id"] == root["context"]["span_id"]
    assert root["attributes"][tracing.OUTCOME] == "ok"
    assert root["attributes"][tracing.TOOL_CALLS] == 2
    assert root["attributes"][tracing.CODE_BYTES] == len(GATHER.encode())
    assert root["attributes"][tracing.TOOLS_DECLARED] == 2
    ordered = sorted(
        (names[f"codemode.executor.{p}"] for p in ("queue", "sandbox", "run")),
        key=lambda r: r["start_time"],
    )
    assert [r["name"] for r in ordered] == [
        "codemode.executor.queue",
        "codemode.executor.sandbox",
        "codemode.executor.run",
    ]

    everything = [*attribute_values(list(spans)), json.dumps(remote)]
    for secret in (CODE_SECRET, ARG_SECRET, RESULT_SECRET, CONTEXT_SECRET):
        assert not any(secret in value for value in everything), secret


async def test_failures_carry_their_type_and_never_their_message(
    app: Codemode, exported: InMemorySpanExporter, traced_server: ServerProcess
) -> None:
    """A failing tool's span and a failed program's spans (both sides) are errors that name the
    exception's type; the message, which holds the argument, is in none of them."""
    cid = uuid.uuid4().hex
    code = (
        "try:\n"
        f"    tools.broken(key={ARG_SECRET!r})\n"
        "except ValueError as e:\n"
        "    raise KeyError(str(e))\n"
    )
    result = await app.client.execute_async(code, correlation_id=cid)
    assert not result.success
    assert result.error_type == "KeyError"
    assert ARG_SECRET in (result.error or "")  # the message is there, for the caller only

    spans = exported.get_finished_spans()
    [call] = [s for s in spans if s.name == "codemode.tool_call"]
    [execution] = [s for s in spans if s.name == "codemode.execution"]
    assert (call.attributes or {})[tracing.ERROR_TYPE] == "ValueError"
    assert (call.attributes or {})[tracing.OUTCOME] == "error"
    assert call.status.status_code is trace.StatusCode.ERROR
    assert (execution.attributes or {})[tracing.ERROR_TYPE] == "KeyError"
    assert (execution.attributes or {})[tracing.OUTCOME] == "error"
    remote = executor_spans(traced_server, cid, count=4)
    [root] = [r for r in remote if r["name"] == "codemode.executor.execution"]
    assert root["attributes"][tracing.ERROR_TYPE] == "KeyError"
    assert root["status"]["status_code"] == "ERROR"
    everything = [*attribute_values(list(spans)), json.dumps(remote)]
    assert not any(ARG_SECRET in value for value in everything)


async def test_session_executions_are_spans_and_the_session_joins_the_trace(
    app: Codemode, exported: InMemorySpanExporter, traced_server: ServerProcess
) -> None:
    """Each execution in a session is a ``codemode.execution`` span with the session's id, and
    the executor's session span is a child of the span current when the session opened."""
    with trace.get_tracer("app").start_as_current_span("agent.run") as run:
        async with app.session() as session:
            await session.execute_async("x = 20")
            assert await session.execute_async("result = x + 1") == "21"
            cid = session.correlation_id
    spans = exported.get_finished_spans()
    executions = [s for s in spans if s.name == "codemode.execution"]
    assert len(executions) == 2
    assert all((s.attributes or {})[tracing.SESSION_ID] == session.session_id for s in executions)
    assert all(
        s.parent is not None and s.parent.span_id == run.get_span_context().span_id
        for s in executions
    )
    [remote] = executor_spans(traced_server, cid, count=1)
    assert remote["name"] == "codemode.executor.session"
    assert remote["parent_id"] == hex_id(run.get_span_context().span_id, 16)


async def test_without_a_tracer_provider_nothing_is_traced_and_nothing_breaks(
    app: Codemode, traced_server: ServerProcess
) -> None:
    """With opentelemetry installed but no provider set, executions and tool calls work, and
    no trace context goes to the executor (its span is a root of a trace of its own)."""
    assert tracing.tracer() is None
    cid = uuid.uuid4().hex
    result = await app.client.execute_async(GATHER, correlation_id=cid)
    assert result.value == [RESULT_SECRET, "plain"]
    [root] = [
        r
        for r in executor_spans(traced_server, cid, count=4)
        if r["name"] == "codemode.executor.execution"
    ]
    assert root["parent_id"] is None


def test_the_sdk_works_without_opentelemetry(traced_server: ServerProcess) -> None:
    """With ``opentelemetry`` hidden, a program that calls a tool runs and nothing imports it."""
    script = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None\n"
        "import asyncio\n"
        "from codemode import Codemode, ComponentRegistry, tracing\n"
        "from codemode.config import ClientConfig\n"
        "def double(x: int) -> int:\n"
        "    return 2 * x\n"
        "async def main():\n"
        "    registry = ComponentRegistry()\n"
        "    registry.register_tool('double', double)\n"
        "    config = ClientConfig(executor_url=sys.argv[1], executor_api_key=sys.argv[2])\n"
        "    async with Codemode.from_client_config(config, registry) as codemode:\n"
        "        print(await codemode.execute_async('result = tools.double(x=21)'))\n"
        "asyncio.run(main())\n"
        "assert tracing.tracer() is None\n"
        "assert tracing.current_metadata() == ()\n"
        "print(sorted(m for m, v in sys.modules.items() if m.startswith('opentelemetry') and v))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, traced_server.url, traced_server.api_key],
        capture_output=True,
        text=True,
        env=server_env(None),
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["42", "[]"]


def test_configure_from_env_does_nothing_unless_asked() -> None:
    """``codemode serve`` sets up no provider without ``OTEL_TRACES_EXPORTER``, with ``none``,
    with the SDK disabled, or with only exporters nothing provides."""
    assert tracing.configure_from_env({}) is None
    assert tracing.configure_from_env({"OTEL_TRACES_EXPORTER": "none"}) is None
    disabled = {"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}
    assert tracing.configure_from_env(disabled) is None
    assert tracing.configure_from_env({"OTEL_TRACES_EXPORTER": "no-such-exporter"}) is None
    assert tracing.tracer() is None
