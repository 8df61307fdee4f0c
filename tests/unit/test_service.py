"""The executor's gRPC face in the test process: admission, request checks, the wire result,
and one real ``grpc.aio`` server on port 0 driven by the real ``ExecutorClient``."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from pydantic import SecretStr

from codemode import ExecutorAuthenticationError, ExecutorClient
from codemode.config import ExecutorConfig, LimitsConfig
from codemode.core.registry import ComponentRegistry
from codemode.executor.run.outcome import RunOutcome
from codemode.executor.sandbox.factory import PROCESS_WARNING
from codemode.executor.sandbox.process import ProcessBackend
from codemode.executor.service.admission import Admission, Overloaded
from codemode.executor.service.server import RunningServer, start_server
from codemode.executor.service.servicer import ExecutorServicer, decode_json_object, to_wire
from codemode.wire import codemode_pb2 as pb
from tests.helpers import wait_until

API_KEY = "test-key-0123456789"


# ------------------------------------------------------------------------------------------
# Admission


async def _holding(
    admission: Admission, release: asyncio.Event, entered: list[int], n: int
) -> None:
    async with admission.slot():
        entered.append(n)
        await release.wait()


async def _until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    assert await asyncio.to_thread(wait_until, condition, timeout, 0.005)


async def test_admission_runs_up_to_its_limit_at_once() -> None:
    """``limit`` bodies run together and are counted; with no queue, one more is refused."""
    admission = Admission(limit=2, max_queued=0, queue_timeout=1.0)
    release, entered = asyncio.Event(), list[int]()
    holders = [asyncio.create_task(_holding(admission, release, entered, n)) for n in (1, 2)]
    await _until(lambda: len(entered) == 2)
    assert admission.running == 2
    with pytest.raises(Overloaded, match="2 executions running and 0 queued"):
        async with admission.slot():
            pytest.fail("a third body ran past the limit")
    release.set()
    await asyncio.gather(*holders)
    assert admission.running == 0


async def test_admission_queues_then_refuses_past_the_queue() -> None:
    """A full executor queues up to ``max_queued`` callers, who run in turn; the next is refused."""
    admission = Admission(limit=1, max_queued=1, queue_timeout=5.0)
    release, entered = asyncio.Event(), list[int]()
    first = asyncio.create_task(_holding(admission, release, entered, 1))
    await _until(lambda: entered == [1])
    queued = asyncio.create_task(_holding(admission, release, entered, 2))
    await asyncio.sleep(0.02)
    assert entered == [1]  # waiting, not running
    assert admission.running == 1
    with pytest.raises(Overloaded, match="1 executions running and 1 queued"):
        async with admission.slot():
            pytest.fail("a body ran past a full queue")
    release.set()
    await asyncio.gather(first, queued)
    assert entered == [1, 2]
    assert admission.running == 0


async def test_admission_queue_timeout_raises_overloaded_and_frees_the_place() -> None:
    """A queued caller gives up after ``queue_timeout`` with Overloaded; the slot stays usable."""
    admission = Admission(limit=1, max_queued=1, queue_timeout=0.05)
    release, entered = asyncio.Event(), list[int]()
    holder = asyncio.create_task(_holding(admission, release, entered, 1))
    await _until(lambda: entered == [1])
    started = time.monotonic()
    with pytest.raises(Overloaded, match=r"no execution slot within 0\.05s"):
        async with admission.slot():
            pytest.fail("a body ran without a slot")
    assert 0.04 <= time.monotonic() - started < 1.0
    # The place in the queue was given back: another caller may wait (and time out) again.
    with pytest.raises(Overloaded, match="within"):
        async with admission.slot():
            pytest.fail("a body ran without a slot")
    release.set()
    await holder
    async with asyncio.timeout(1):
        async with admission.slot():
            assert admission.running == 1
    assert admission.running == 0


async def test_admission_releases_the_slot_when_the_body_fails() -> None:
    """A body that raises gives its slot back and is no longer counted as running."""
    admission = Admission(limit=1, max_queued=0, queue_timeout=1.0)
    with pytest.raises(RuntimeError, match="boom"):
        async with admission.slot():
            raise RuntimeError("boom")
    assert admission.running == 0
    async with asyncio.timeout(1):
        async with admission.slot():
            assert admission.running == 1


# ------------------------------------------------------------------------------------------
# The start frame's checks


CONFIG = ExecutorConfig(
    api_key=SecretStr(API_KEY),
    isolation="process",
    max_code_bytes=100,
    default_execution_timeout=30.0,
    max_execution_timeout=60.0,
    limits=LimitsConfig(cpu_seconds=10.0, memory_bytes=256 << 20, max_output_bytes=4096),
)


@pytest.fixture(scope="module")
def servicer() -> ExecutorServicer:
    return ExecutorServicer(CONFIG, ProcessBackend())


def _tools(*names: str) -> list[pb.ToolSpec]:
    return [pb.ToolSpec(name=name) for name in names]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"config_json": b"{not json"}, "config is not valid JSON"),
        ({"config_json": b"\xff\xfe"}, "config is not valid JSON"),
        ({"context_json": b"[1, 2]"}, "context must be a JSON object, not list"),
        ({"config_json": b'"text"'}, "config must be a JSON object, not str"),
        ({"timeout_seconds": -1.0}, "timeout_seconds must not be negative"),
        ({"timeout_seconds": float("nan")}, "timeout_seconds must be a finite number"),
        ({"tools": _tools("not-a-name")}, "'not-a-name' is not a Python identifier"),
        ({"tools": _tools("")}, "'' is not a Python identifier"),
        ({"tools": _tools("add", "add")}, "tool names must be unique"),
        ({"code": "x" * 101}, "larger than this executor's limit of 100 bytes"),
        ({"code": "é" * 51}, "larger than this executor's limit of 100 bytes"),  # 102 bytes
        ({"limits": pb.Limits(memory_bytes=-1)}, "limit memory_bytes must not be negative"),
        ({"limits": pb.Limits(cpu_seconds=-0.5)}, "limit cpu_seconds must not be negative"),
    ],
    ids=[
        "bad-json",
        "not-utf8",
        "context-list",
        "config-string",
        "negative-timeout",
        "nan-timeout",
        "tool-dash",
        "tool-empty",
        "tools-duplicate",
        "code-too-long",
        "code-bytes-not-chars",
        "negative-memory",
        "negative-cpu",
    ],
)
def test_malformed_start_frame_is_a_value_error(
    servicer: ExecutorServicer, fields: dict[str, Any], message: str
) -> None:
    """Each malformed start frame is refused with a ValueError that names what is wrong."""
    start = pb.StartExecution(**{"code": "result = 1", **fields})
    with pytest.raises(ValueError, match=re.escape(message)):
        servicer._validate(start, "cid")


def test_valid_start_frame_gives_the_request(servicer: ExecutorServicer) -> None:
    """A valid start frame becomes the request: timeout capped, limits lowered never raised."""
    start = pb.StartExecution(
        code="result = tools.a()",
        tools=_tools("a", "b"),
        config_json=b'{"region": "eu"}',
        context_json=b'{"user": {"id": 7}}',
        timeout_seconds=1000.0,
        limits=pb.Limits(cpu_seconds=2.5, memory_bytes=1 << 40, max_output_bytes=1024),
        stream_output=True,
    )
    request = servicer._validate(start, "cid-1")
    assert request.code == "result = tools.a()"
    assert request.tools == ("a", "b")
    assert request.config == {"region": "eu"}
    assert request.context == {"user": {"id": 7}}
    assert request.timeout == 60.0
    assert request.limits.cpu_seconds == 2.5
    assert request.limits.max_output_bytes == 1024
    assert request.limits.memory_bytes == 256 << 20  # asked for more: the ceiling stays
    assert request.limits.max_processes == CONFIG.limits.max_processes  # not asked: unchanged
    assert request.stream_output is True
    assert request.correlation_id == "cid-1"


def test_start_frame_without_timeout_or_limits_gets_the_defaults(
    servicer: ExecutorServicer,
) -> None:
    """No timeout means the default one; no limits mean the service's, as they are."""
    request = servicer._validate(pb.StartExecution(code="pass"), "cid")
    assert request.timeout == 30.0
    assert request.limits == CONFIG.limits
    assert (request.config, request.context, request.tools) == ({}, {}, ())
    assert request.stream_output is False


@pytest.mark.parametrize(
    ("raw", "value"), [(b"", {}), (b"{}", {}), (b'{"a": [1, null]}', {"a": [1, None]})]
)
def test_decode_json_object_accepts_objects_and_nothing(raw: bytes, value: dict[str, Any]) -> None:
    """Empty bytes are an empty object; a JSON object is decoded as it is."""
    assert decode_json_object(raw, "config") == value


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"null", "context must be a JSON object, not NoneType"),
        (b"3", "context must be a JSON object, not int"),
        (b"{", "context is not valid JSON"),
        (b"\x80", "context is not valid JSON"),
    ],
)
def test_decode_json_object_refuses_the_rest(raw: bytes, message: str) -> None:
    """Anything but a JSON object is a ValueError naming the field."""
    with pytest.raises(ValueError, match=re.escape(message)):
        decode_json_object(raw, "context")


def test_to_wire_copies_every_outcome_field() -> None:
    """Every field of RunOutcome reaches the wire's result, plus the correlation id."""
    outcome = RunOutcome(
        success=True,
        result_json=b'{"n": 1}',
        error_type="ValueError",
        error_message="message",
        traceback="Traceback ...",
        stdout=b"out",
        stderr=b"err",
        output_truncated=True,
        duration_ms=12.5,
        tool_calls=3,
        files=[("report.csv", b"a,b\n")],
        session_alive=True,
    )
    defaults = RunOutcome()
    wire = to_wire(outcome, "cid-9")
    for field in dataclasses.fields(RunOutcome):
        value = getattr(outcome, field.name)
        assert value != getattr(defaults, field.name), f"pick a non-default {field.name}"
        if field.name == "files":  # the result lists them; their bytes go ahead as chunks
            assert [(f.name, f.size) for f in wire.files] == [("report.csv", 4)]
            continue
        assert getattr(wire, field.name) == value, field.name
    assert wire.correlation_id == "cid-9"


# ------------------------------------------------------------------------------------------
# A real server and the real client, in this process


SERVER_CONFIG = ExecutorConfig(
    host="127.0.0.1",
    port=0,
    api_key=SecretStr(API_KEY),
    isolation="process",
    max_execution_timeout=42.0,
    max_concurrent_executions=3,
    limits=LimitsConfig(max_output_bytes=64 * 1024, max_processes=16),
)


@pytest.fixture
async def running() -> AsyncIterator[RunningServer]:
    """An executor on 127.0.0.1, port 0, with an API key, running guests as plain processes."""
    server = await start_server(SERVER_CONFIG, ProcessBackend())
    try:
        yield server
    finally:
        await server.stop(1.0)


def _url(server: RunningServer) -> str:
    return f"http://127.0.0.1:{server.port}"


async def test_client_runs_a_program_calling_a_registered_tool(running: RunningServer) -> None:
    """Through the in-process server: the program calls a tool of the client, and its result,
    output and tool-call count come back."""
    calls: list[tuple[int, int]] = []

    def add(a: int, b: int) -> int:
        calls.append((a, b))
        return a + b

    registry = ComponentRegistry()
    registry.register_tool("add", add)
    assert running.port > 0
    async with ExecutorClient(_url(running), API_KEY, registry=registry) as client:
        result = await client.execute_async("print('adding')\nresult = tools.add(a=2, b=3)")
    assert result.success, result
    assert json.loads(result.result or "null") == 5
    assert calls == [(2, 3)]
    assert result.tool_calls == 1
    assert result.stdout == "adding\n"


async def test_client_with_a_wrong_key_is_refused(running: RunningServer) -> None:
    """A wrong API key raises ExecutorAuthenticationError, and the program's tool never runs."""
    calls: list[str] = []

    def mark() -> str:
        calls.append("ran")
        return "ran"

    registry = ComponentRegistry()
    registry.register_tool("mark", mark)
    async with ExecutorClient(_url(running), "wrong-key-0123456789", registry=registry) as client:
        with pytest.raises(ExecutorAuthenticationError) as info:
            await client.execute_async("result = tools.mark()")
        with pytest.raises(ExecutorAuthenticationError):
            await client.info_async()
    assert info.value.status == "UNAUTHENTICATED"
    assert calls == []


async def test_info_reports_the_configured_limits(running: RunningServer) -> None:
    """``info_async`` returns the service's own ceilings and says it runs without a sandbox."""
    async with ExecutorClient(_url(running), API_KEY) as client:
        info = await client.info_async()
    assert info["limits"] == SERVER_CONFIG.limits.model_dump()
    assert info["max_execution_timeout_seconds"] == 42.0
    assert info["max_concurrent_executions"] == 3
    assert info["running_executions"] == 0
    assert info["isolation"] == "process"
    assert info["isolated"] is False
    assert PROCESS_WARNING in info["warnings"]
