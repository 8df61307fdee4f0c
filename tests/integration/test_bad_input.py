"""What goes wrong, against a real executor: each failure has its documented error and leaves
the service serving and nothing running."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from codemode import Codemode
from codemode.config import ClientConfig
from codemode.core import (
    ComponentRegistry,
    ExecutionError,
    ExecutorAuthenticationError,
    ExecutorClient,
    ExecutorClientError,
    ExecutorConnectionError,
    ExecutorOverloadedError,
    ExecutorTimeoutError,
    InvalidRequestError,
    RetryPolicy,
)
from codemode.wire import codemode_pb2 as pb
from codemode.wire import codemode_pb2_grpc as pb_grpc
from tests.helpers import (
    ProcRef,
    ServerProcess,
    marked_anywhere,
    marked_program,
    run_program_in_client_process,
    server_env,
    wait_gone,
)
from tests.integration.conftest import Servers

ConfigFactory = Callable[..., ClientConfig]


class Marker:
    """A tool whose only effect is to record that it ran."""

    def __init__(self) -> None:
        self.calls = 0

    def run(self) -> str:
        self.calls += 1
        return "marked"


def closed_port_url() -> str:
    """An http:// URL on loopback where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def wait_for_log(
    server: ServerProcess, correlation_id: str, message: str, timeout: float = 5.0
) -> list[dict[str, Any]]:
    """Wait until ``server`` logged ``message`` for ``correlation_id``; return its records."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = server.records_for(correlation_id)
        if any(r.get("msg") == message for r in records):
            return records
        await asyncio.sleep(0.02)
    pytest.fail(f"the server never logged {message!r} for {correlation_id}")


async def wait_for_program(server: ServerProcess, tag: str, timeout: float = 10.0) -> list[ProcRef]:
    """Wait until ``marked_program(tag)`` runs on ``server``; return its processes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = server.marked_tree(tag)
        if found:
            return found
        await asyncio.sleep(0.02)
    pytest.fail(f"the program {tag!r} was not seen running within {timeout:g}s")


async def assert_serving(server: ServerProcess, program: str = "result = 6 * 7") -> None:
    """The server still runs programs for a well-behaved client."""
    config = ClientConfig(executor_url=server.url, executor_api_key=server.api_key)
    async with Codemode.from_client_config(config) as codemode:
        assert await codemode.execute_async(program) == "42"


async def control_run(server: ServerProcess, make_config: ConfigFactory) -> None:
    """Run a program with a known id and wait for its log, so earlier log lines are written."""
    async with ExecutorClient(config=make_config()) as client:
        result = await client.execute_async(
            "result = 1", correlation_id="control-" + str(id(client))
        )
    await wait_for_log(server, result.correlation_id, "execution finished")


# ------------------------------------------------------------------------------------------
# Refused before anything runs


@pytest.mark.parametrize("key", ["wrong-key-0123456789", None], ids=["wrong", "missing"])
async def test_bad_key_is_refused_and_nothing_runs(
    server: ServerProcess, make_config: ConfigFactory, key: str | None
) -> None:
    """A wrong or missing key raises ExecutorAuthenticationError and the program never starts."""
    registry = ComponentRegistry()
    marker = Marker()
    registry.register_tool("mark", marker)
    client = ExecutorClient(config=make_config(executor_api_key=key), registry=registry)
    async with client:
        with pytest.raises(ExecutorAuthenticationError) as info:
            await client.execute_async("tools.mark()\nresult = 1", correlation_id=f"auth-{key}")
    assert info.value.status == "UNAUTHENTICATED"
    assert marker.calls == 0
    await control_run(server, make_config)
    assert server.records_for(f"auth-{key}") == []


async def test_a_refused_connection_surfaces_at_once_without_retries() -> None:
    """Nothing listening at executor_url: with the default connect timeout (5 s) and retries
    (3), the refusal surfaces in about a second (it took 20 s), typed and not retried."""
    config = ClientConfig(executor_url=closed_port_url(), executor_api_key="some-key-123")
    started = time.perf_counter()
    async with Codemode.from_client_config(config) as codemode:
        with pytest.raises(ExecutorConnectionError) as info:
            await codemode.execute_async("result = 1")
    assert time.perf_counter() - started < 2.5
    assert info.value.may_have_run is False
    assert info.value.refused is True
    assert "nothing listens there" in str(info.value)


async def test_an_executor_slow_to_answer_gets_the_connect_timeout(
    server: ServerProcess, make_config: ConfigFactory
) -> None:
    """An address that accepts the connection but answers late (here a relay that holds
    every connection for 1.5 s before passing it to the executor) still connects."""

    writers: list[asyncio.StreamWriter] = []

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await asyncio.sleep(1.5)
        up_reader, up_writer = await asyncio.open_connection(server.host, server.port)
        writers.append(up_writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    slow = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = slow.sockets[0].getsockname()[1]
    try:
        config = make_config(executor_url=f"http://127.0.0.1:{port}", max_retries=0)
        async with Codemode.from_client_config(config) as codemode:
            assert await codemode.execute_async("result = 6 * 7") == "42"
    finally:
        for writer in writers:
            writer.close()
        slow.close()
        await slow.wait_closed()


async def test_the_connect_timeout_bounds_the_whole_call() -> None:
    """An address that accepts and never answers: one connect_timeout in all, not one per
    retry (there are three)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepted, never answered

    silent = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    config = ClientConfig(executor_url=f"http://127.0.0.1:{port}", connect_timeout=1.0)
    started = time.perf_counter()
    try:
        async with Codemode.from_client_config(config) as codemode:
            with pytest.raises(ExecutorConnectionError, match="within 1s"):
                await codemode.execute_async("result = 1")
    finally:
        for writer in held:
            writer.close()
        silent.close()
        await silent.wait_closed()
    assert time.perf_counter() - started < 2.5


async def test_code_over_max_code_length_is_refused_before_sending(
    server: ServerProcess, make_config: ConfigFactory
) -> None:
    """Code longer than max_code_length raises InvalidRequestError and never reaches the server."""
    registry = ComponentRegistry()
    marker = Marker()
    registry.register_tool("mark", marker)
    async with ExecutorClient(config=make_config(max_code_length=32), registry=registry) as client:
        with pytest.raises(InvalidRequestError, match="limit is 32") as info:
            await client.execute_async(
                "tools.mark()\nresult = 1  # " + "x" * 40, correlation_id="too-long-code"
            )
        assert info.value.correlation_id == "too-long-code"
        short = await client.execute_async("result = 1")
    assert short.success
    assert marker.calls == 0
    await control_run(server, make_config)
    assert server.records_for("too-long-code") == []


async def test_code_over_the_servers_limit_is_invalid_request(
    server: ServerProcess, make_config: ConfigFactory
) -> None:
    """Code larger than the executor's max_code_bytes is refused with InvalidRequestError."""
    code = "result = 1\n" + "#" * (4_000_001)
    async with ExecutorClient(config=make_config(max_code_length=5_000_000)) as client:
        with pytest.raises(InvalidRequestError, match=r"larger than this executor's limit"):
            await client.execute_async(code)
    await assert_serving(server)


# ------------------------------------------------------------------------------------------
# The program fails


async def test_syntax_error_reports_type_and_line(codemode: Codemode) -> None:
    """A syntax error raises ExecutionError, error_type SyntaxError, with the user's line number."""
    with pytest.raises(ExecutionError) as info:
        await codemode.execute_async("x = 1\ny = 2\nz = (\n")
    error = info.value
    assert error.error_type == "SyntaxError"
    assert "line 3" in (error.traceback or "")
    assert "/guest/" not in (error.traceback or "")


async def test_runtime_error_traceback_has_only_user_lines(codemode: Codemode) -> None:
    """A program's exception comes back with a traceback of the user's own lines only."""
    with pytest.raises(ExecutionError) as info:
        await codemode.execute_async("def f():\n    return 1 / 0\n\nf()\n")
    traceback = info.value.traceback or ""
    assert info.value.error_type == "ZeroDivisionError"
    assert "line 4, in <module>" in traceback
    assert "line 2, in f" in traceback
    assert "/guest/" not in traceback
    assert "codemode" not in traceback.replace('"<codemode>"', "")


async def test_undeclared_tool_lists_available_tools(make_config: ConfigFactory) -> None:
    """Calling a tool the request did not declare raises in the guest, listing available ones."""
    registry = ComponentRegistry()
    registry.register_tool("alpha", Marker())
    registry.register_tool("beta", Marker())
    async with Codemode.from_client_config(make_config(), registry) as codemode:
        result = await codemode.execute_async(
            "out = []\n"
            "try:\n    tools.gamma()\nexcept AttributeError as e:\n    out.append(str(e))\n"
            "try:\n    tools['gamma'].run()\nexcept KeyError as e:\n    out.append(e.args[0])\n"
            "result = out",
            available_tools=["alpha", "beta"],
        )
    messages = json.loads(result or "[]")
    assert len(messages) == 2
    for message in messages:
        assert "'gamma'" in message
        assert "available tools: alpha, beta" in message


async def test_declared_but_unregistered_tool_fails_in_the_guest(
    make_config: ConfigFactory,
) -> None:
    """A tool declared in available_tools but not registered raises in the guest, naming it."""
    async with Codemode.from_client_config(make_config()) as codemode:
        with pytest.raises(ExecutionError) as info:
            await codemode.execute_async("tools.weather()", available_tools=["weather"])
    assert "weather" in str(info.value)
    assert "not registered" in str(info.value)


class Failing:
    """A tool that raises what it is given."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def run(self, *args: Any) -> None:
        raise self.error


async def test_tool_exception_reaches_the_guest_as_its_type(make_config: ConfigFactory) -> None:
    """A tool raising ValueError is caught by `except ValueError` in the guest, with its message."""
    registry = ComponentRegistry()
    registry.register_tool("lookup", Failing(ValueError("no such city: Atlantis")))
    async with Codemode.from_client_config(make_config(), registry) as codemode:
        result = await codemode.execute_async(
            "try:\n    tools.lookup('Atlantis')\n"
            "except ValueError as e:\n    result = ['ValueError', str(e)]"
        )
    assert json.loads(result or "null") == ["ValueError", "no such city: Atlantis"]


async def test_tool_custom_exception_names_its_type(make_config: ConfigFactory) -> None:
    """A tool raising an application's own exception fails the program with its type and message."""

    class QuotaExceeded(Exception):
        pass

    registry = ComponentRegistry()
    registry.register_tool("lookup", Failing(QuotaExceeded("quota of 10 calls used")))
    async with Codemode.from_client_config(make_config(), registry) as codemode:
        with pytest.raises(ExecutionError) as info:
            await codemode.execute_async("tools.lookup()")
    assert "QuotaExceeded" in str(info.value)
    assert "quota of 10 calls used" in str(info.value)


class Hanging:
    """An async tool that never answers."""

    async def run_async(self) -> None:
        await asyncio.Event().wait()


async def test_hanging_tool_becomes_timeout_error_in_the_guest(make_config: ConfigFactory) -> None:
    """A tool that outlives tool_timeout raises TimeoutError inside the guest."""
    registry = ComponentRegistry()
    registry.register_tool("hang", Hanging())
    started = time.perf_counter()
    async with Codemode.from_client_config(make_config(tool_timeout=0.5), registry) as codemode:
        result = await codemode.execute_async(
            "try:\n    tools.hang()\n"
            "except TimeoutError as e:\n    result = ['TimeoutError', str(e)]\n"
            "except Exception as e:\n    result = [type(e).__name__, str(e)]"
        )
    assert time.perf_counter() - started < 3.0
    kind, message = json.loads(result or "null")
    assert "did not answer within 0.5s" in message
    assert kind == "TimeoutError"


class TimingOut:
    """An async tool whose own call times out, well within the relay's tool_timeout."""

    async def run_async(self) -> None:
        raise TimeoutError("the upstream service did not answer in 0.2s")


async def test_a_tools_own_timeout_keeps_its_message(make_config: ConfigFactory) -> None:
    """A TimeoutError the tool raises is the tool's error, not the relay's tool_timeout."""
    registry = ComponentRegistry()
    registry.register_tool("upstream", TimingOut())
    async with Codemode.from_client_config(make_config(tool_timeout=30), registry) as codemode:
        result = await codemode.execute_async(
            "try:\n    tools.upstream()\nexcept TimeoutError as e:\n    result = str(e)"
        )
    assert json.loads(result or "null") == "the upstream service did not answer in 0.2s"


async def test_non_serialisable_result_names_its_type(make_config: ConfigFactory) -> None:
    """`result = {1, 2}` is a failed result with error_type ResultNotSerializable naming set."""
    async with ExecutorClient(config=make_config()) as client:
        result = await client.execute_async("result = {1, 2}")
    assert not result.success
    assert result.error_type == "ResultNotSerializable"
    assert "set" in (result.error or "")


# ------------------------------------------------------------------------------------------
# Limits


async def test_execution_timeout(make_config: ConfigFactory, server: ServerProcess) -> None:
    """An overlong program ends as "Timeout" (ExecutorTimeoutError from Codemode), tree and all."""
    async with Codemode.from_client_config(make_config()) as codemode:
        started = time.perf_counter()
        with pytest.raises(ExecutorTimeoutError) as info:
            await codemode.execute_async("import time; time.sleep(30)", execution_timeout=0.5)
        assert time.perf_counter() - started < 3.0
        assert info.value.result is not None
        assert info.value.result.error_type == "Timeout"

    async with ExecutorClient(config=make_config()) as client:
        task = asyncio.create_task(
            client.execute_async(marked_program("timeout"), execution_timeout=1.5)
        )
        tree = await wait_for_program(server, "timeout")
        result = await task
    assert not result.success
    assert result.error_type == "Timeout"
    assert await asyncio.to_thread(wait_gone, tree) == []


async def test_output_limit(make_config: ConfigFactory, server: ServerProcess) -> None:
    """Printing past max_output_bytes always ends the program with OutputLimit, output truncated."""
    # Repeated: a program that finishes right after writing races the output readers.
    async with ExecutorClient(config=make_config()) as client:
        results = [
            await client.execute_async(
                "for _ in range(100):\n    print('x' * 1000)\nresult = 1",
                limits={"max_output_bytes": 4096},
            )
            for _ in range(10)
        ]
        small = await client.execute_async(
            "print('hello')\nresult = 1", limits={"max_output_bytes": 4096}
        )
    assert [r.error_type for r in results] == ["OutputLimit"] * 10
    for result in results:
        assert not result.success
        assert result.output_truncated
        assert len(result.stdout.encode()) <= 4096
    assert small.success
    assert small.stdout == "hello\n"
    await assert_serving(server)


async def test_result_size_limit(make_config: ConfigFactory) -> None:
    """A result larger than max_result_bytes fails with ResultTooLarge."""
    async with ExecutorClient(config=make_config()) as client:
        result = await client.execute_async(
            "result = 'x' * 10_000", limits={"max_result_bytes": 2048}
        )
    assert not result.success
    assert result.error_type == "ResultTooLarge"


# ------------------------------------------------------------------------------------------
# The client goes away


async def test_client_disconnect_kills_the_guest(server: ServerProcess) -> None:
    """Killing a client mid-execution kills its guest, and the server goes on serving."""
    client = run_program_in_client_process(server.url, server.api_key, marked_program("disconnect"))
    try:
        assert client.stdout is not None
        assert await asyncio.to_thread(client.stdout.readline) == "started\n"
        running = await wait_for_program(server, "disconnect")
    finally:
        client.kill()
        client.wait(5)
        client.stdout.close()  # type: ignore[union-attr]
        client.stderr.close()  # type: ignore[union-attr]
    assert await asyncio.to_thread(wait_gone, running) == []
    await assert_serving(server)


# ------------------------------------------------------------------------------------------
# Malformed frames, sent with the raw generated stub


@pytest.fixture
async def raw_stub(server: ServerProcess) -> Any:
    """The generated ExecutorStub on a plain channel to ``server``."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.ExecutorStub(channel)


def auth(server: ServerProcess) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {server.api_key}"),)


async def read_status(call: Any) -> grpc.StatusCode:
    """Read until the call ends; return its status code."""
    try:
        while (await call.read()) is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return await call.code()


async def test_first_frame_must_be_start(server: ServerProcess, raw_stub: Any) -> None:
    """A stream opening with a tool_result is refused with INVALID_ARGUMENT; serving goes on."""
    call = raw_stub.Execute(metadata=auth(server), timeout=10)
    await call.write(pb.ClientFrame(tool_result=pb.ToolResult(call_id="1", ok=True)))
    assert await read_status(call) == grpc.StatusCode.INVALID_ARGUMENT
    await assert_serving(server)


async def test_stream_without_any_frame_is_refused(server: ServerProcess, raw_stub: Any) -> None:
    """A stream closed before its start frame is refused with INVALID_ARGUMENT."""
    call = raw_stub.Execute(metadata=auth(server), timeout=10)
    await call.done_writing()
    assert await read_status(call) == grpc.StatusCode.INVALID_ARGUMENT
    await assert_serving(server)


async def test_tool_result_with_unknown_call_id(server: ServerProcess, raw_stub: Any) -> None:
    """A tool_result for a call never made is INVALID_ARGUMENT, and the running guest is killed."""
    call = raw_stub.Execute(metadata=auth(server), timeout=10)
    start = pb.StartExecution(code=marked_program("unknown-call-id"), timeout_seconds=30)
    await call.write(pb.ClientFrame(start=start))
    running = await wait_for_program(server, "unknown-call-id")
    await call.write(pb.ClientFrame(tool_result=pb.ToolResult(call_id="999", ok=True)))
    assert await read_status(call) == grpc.StatusCode.INVALID_ARGUMENT
    assert await asyncio.to_thread(wait_gone, running) == []
    await assert_serving(server)


@pytest.mark.parametrize(
    "start",
    [
        pb.StartExecution(code="result = 1", config_json=b"{not json"),
        pb.StartExecution(code="result = 1", context_json=b"[1, 2]"),
        pb.StartExecution(code="result = 1", tools=[pb.ToolSpec(name="not a name")]),
        pb.StartExecution(code="result = 1", tools=[pb.ToolSpec(name="a"), pb.ToolSpec(name="a")]),
        pb.StartExecution(code="result = 1", limits=pb.Limits(memory_bytes=-1)),
        pb.StartExecution(code="result = 1", timeout_seconds=-1),
    ],
    ids=[
        "config-not-json",
        "context-not-object",
        "bad-tool-name",
        "dup-tools",
        "neg-limit",
        "neg-timeout",
    ],
)
async def test_malformed_start_frame(
    server: ServerProcess, raw_stub: Any, start: pb.StartExecution
) -> None:
    """A start frame with invalid fields is refused with INVALID_ARGUMENT; serving goes on."""
    call = raw_stub.Execute(metadata=auth(server), timeout=10)
    await call.write(pb.ClientFrame(start=start))
    assert await read_status(call) == grpc.StatusCode.INVALID_ARGUMENT
    await assert_serving(server)


# ------------------------------------------------------------------------------------------
# Admission


@pytest.fixture(scope="module")
def narrow_server(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    """An executor that runs one execution at a time and queues none."""
    config = tmp_path_factory.mktemp("narrow") / "executor.yaml"
    config.write_text("max_queued_executions: 0\n")
    return servers.start(
        api_key="narrow-key-0123456789",
        extra_args=["--max-concurrent", "1", "--config", str(config)],
    )


def narrow_client(server: ServerProcess, policy: RetryPolicy | None = None) -> ExecutorClient:
    config = ClientConfig(executor_url=server.url, executor_api_key=server.api_key)
    return ExecutorClient(config=config, retry_policy=policy)


def refusals(server: ServerProcess, correlation_id: str) -> int:
    return sum(
        1 for r in server.records_for(correlation_id) if str(r.get("msg", "")).startswith("refused")
    )


async def test_admission_refusal_is_retried_then_raised(narrow_server: ServerProcess) -> None:
    """With the one slot busy and no queue, a 2nd run is retried, then ExecutorOverloadedError."""
    async with (
        narrow_client(narrow_server) as first,
        narrow_client(
            narrow_server, RetryPolicy(max_retries=2, base=0.05, max_delay=0.1)
        ) as second,
    ):
        busy = asyncio.create_task(
            first.execute_async(
                "import time; time.sleep(1.5); result = 'first'", correlation_id="busy-1"
            )
        )
        await wait_for_log(narrow_server, "busy-1", "execution started")
        with pytest.raises(ExecutorOverloadedError) as info:
            await second.execute_async("result = 'second'", correlation_id="overloaded-1")
        assert info.value.status == "RESOURCE_EXHAUSTED"
        assert (await busy).value == "first"
    assert refusals(narrow_server, "overloaded-1") == 3  # the first attempt and two retries


async def test_admission_refusal_succeeds_on_retry(narrow_server: ServerProcess) -> None:
    """A refused execution is retried with backoff and runs once the slot frees."""
    patient = RetryPolicy(max_retries=40, base=0.2, max_delay=0.2, budget=30)
    async with (
        narrow_client(narrow_server) as first,
        narrow_client(narrow_server, patient) as second,
    ):
        busy = asyncio.create_task(
            first.execute_async(
                "import time; time.sleep(0.8); result = 'first'", correlation_id="busy-2"
            )
        )
        await wait_for_log(narrow_server, "busy-2", "execution started")
        result = await second.execute_async("result = 'second'", correlation_id="overloaded-2")
        assert (await busy).value == "first"
    assert result.value == "second"
    assert refusals(narrow_server, "overloaded-2") >= 1


# ------------------------------------------------------------------------------------------
# Client lifecycle, correlation, shutdown, health


async def test_use_after_close_raises_and_close_is_idempotent(make_config: ConfigFactory) -> None:
    """After close, execute raises ExecutorClientError; closing again, sync or async, is fine."""
    client = ExecutorClient(config=make_config())
    assert (await client.execute_async("result = 1")).success
    await client.close_async()
    client.close()
    await client.close_async()
    assert client.closed
    with pytest.raises(ExecutorClientError, match="closed"):
        await client.execute_async("result = 1")
    codemode = Codemode.from_client_config(make_config())
    codemode.close()
    codemode.close()
    with pytest.raises(ExecutorClientError, match="closed"):
        await codemode.execute_async("result = 1")


class WhoCalls:
    """A context-aware tool returning the correlation id it was handed."""

    def run_with_context(self, context: Any) -> Any:
        return context.correlation_id


async def test_correlation_id_is_echoed_and_handed_to_tools(
    server: ServerProcess, make_config: ConfigFactory
) -> None:
    """The caller's correlation id comes back in the result, reaches tools and the server's log."""
    registry = ComponentRegistry()
    registry.register_tool("who", WhoCalls())
    async with ExecutorClient(config=make_config(), registry=registry) as client:
        given = await client.execute_async("result = tools.who()", correlation_id="req-7f3a")
        made = await client.execute_async("result = tools.who()")
    assert given.correlation_id == "req-7f3a"
    assert given.value == "req-7f3a"
    assert len(made.correlation_id) == 32
    assert made.value == made.correlation_id
    records = await wait_for_log(server, "req-7f3a", "execution finished")
    assert any(r["msg"] == "execution started" for r in records)


async def test_graceful_shutdown_lets_running_execution_finish(servers: Servers) -> None:
    """SIGTERM during an execution lets it complete; the server then exits cleanly."""
    own = servers.start(api_key="shutdown-key-0123456789")
    config = ClientConfig(executor_url=own.url, executor_api_key=own.api_key, max_retries=0)
    async with ExecutorClient(config=config) as client:
        task = asyncio.create_task(
            client.execute_async(
                "import time; time.sleep(1); result = 'finished'", correlation_id="graceful"
            )
        )
        await wait_for_log(own, "graceful", "execution started")
        own.proc.send_signal(signal.SIGTERM)
        result = await task
    assert result.success, result.error
    assert result.value == "finished"
    assert await asyncio.to_thread(own.proc.wait, 10) == 0
    assert servers.stop(own) == 0


async def test_health_check_reports_serving(server: ServerProcess, codemode: Codemode) -> None:
    """grpc.health.v1 answers SERVING without a key, for the server and the Executor service."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "codemode.v1.Executor"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert await codemode.health_check_async() is True


async def test_health_check_of_unreachable_executor_is_false() -> None:
    """health_check_async is False when nothing listens at executor_url."""
    config = ClientConfig(executor_url=closed_port_url(), connect_timeout=0.5)
    async with Codemode.from_client_config(config) as codemode:
        assert await codemode.health_check_async() is False


def test_serve_refuses_to_start_without_a_key(tmp_path: Path) -> None:
    """`codemode serve` without a key or --insecure-no-auth exits 2 naming CODEMODE_API_KEY."""
    proc = subprocess.run(
        [sys.executable, "-m", "codemode.cli", "serve", "--port", "0", "--isolation", "process"],
        env=server_env(None),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "CODEMODE_API_KEY" in proc.stderr
    assert "listening on" not in proc.stdout


@pytest.fixture(autouse=True)
def _no_leftover_programs() -> Iterator[None]:
    """After each test, no process of a marked program is left anywhere on the host."""
    yield
    assert wait_gone(marked_anywhere()) == []
