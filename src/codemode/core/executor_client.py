"""``ExecutorClient``: runs programs on an executor and serves their tool calls.

One execution is one bidirectional gRPC stream. :meth:`ExecutorClient.stream` is the
implementation: it yields output, tool-call and result events as they happen, answering each
tool call from the registry on the way; :meth:`ExecutorClient.execute_async` collects it, and
:meth:`ExecutorClient.execute` wraps that for sync callers.

Errors are drawn in :mod:`codemode.core.errors` and re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import grpc
import grpc.aio

from codemode.config import ClientConfig
from codemode.config._defaults import CANCEL_NOTICE_S, DEADLINE_MARGIN_S, FILE_CHUNK_BYTES
from codemode.core._lifecycle import Closing
from codemode.core._request import Request
from codemode.core.channel import open_channel
from codemode.core.context import RuntimeContext, current_context, current_correlation_id
from codemode.core.errors import (
    ExecutionError,
    ExecutorAuthenticationError,
    ExecutorClientError,
    ExecutorConnectionError,
    ExecutorOverloadedError,
    ExecutorRequestError,
    ExecutorTimeoutError,
    InvalidRequestError,
    error_from_rpc,
)
from codemode.core.registry import ComponentRegistry, call_tool
from codemode.core.results import (
    ExecutionEvent,
    ExecutionResult,
    OutputEvent,
    ResultEvent,
    ToolCallEvent,
    ToolResultEvent,
)
from codemode.core.retry import RetryPolicy
from codemode.wire import codemode_pb2 as pb
from codemode.wire import codemode_pb2_grpc as pb_grpc
from codemode.wire.names import (
    AUTHORIZATION,
    CORRELATION_ID,
    MAX_INPUT_FILES,
    NOT_STARTED_TRAILER,
    file_name_problem,
)

__all__ = [
    "ExecutionError",
    "ExecutionResult",
    "ExecutorAuthenticationError",
    "ExecutorClient",
    "ExecutorClientError",
    "ExecutorConnectionError",
    "ExecutorOverloadedError",
    "ExecutorRequestError",
    "ExecutorTimeoutError",
    "InvalidRequestError",
]

logger = logging.getLogger("codemode.client")
T = TypeVar("T")


def new_correlation_id() -> str:
    """A fresh correlation id (32 hex characters)."""
    return uuid.uuid4().hex


class ExecutorClient(Closing):
    """A connection to an executor (or several, round robin) and the tools it may call back.

    ``timeout`` is the default execution timeout in seconds; each call may pass its own.
    ``registry`` holds the tools that programs call; without one, programs can call none.
    The client keeps one channel per event loop it is used on and is safe to share between
    tasks. Close it with :meth:`close_async` (or ``async with``), or :meth:`close` from sync code.
    """

    def __init__(
        self,
        executor_url: str | None = None,
        api_key: str | None = None,
        timeout: float | None = None,
        *,
        registry: ComponentRegistry | None = None,
        config: ClientConfig | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        values: dict[str, Any] = {}
        if executor_url is not None:
            values["executor_url"] = executor_url
        if api_key is not None:
            values["executor_api_key"] = api_key
        if timeout is not None:
            values["timeout"] = timeout
        base = config if config is not None else ClientConfig.load()
        self.config = base.model_copy(update=values) if values else base
        if values:
            # model_copy skips validation; re-validate what the caller passed.
            self.config = ClientConfig.load(**self.config.model_dump())
        self.registry = registry if registry is not None else ComponentRegistry()
        self.retry_policy = retry_policy or RetryPolicy(
            max_retries=self.config.max_retries,
            base=self.config.retry_backoff_base,
            max_delay=self.config.retry_backoff_max,
            budget=self.config.timeout,
        )
        key = self.config.api_key_value()
        self._auth: tuple[tuple[str, str], ...] = ((AUTHORIZATION, f"Bearer {key}"),) if key else ()
        self._channels: dict[asyncio.AbstractEventLoop, grpc.aio.Channel] = {}
        self._lock = threading.Lock()
        self._closed = False

    # Lifecycle -----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` or :meth:`close_async` was called."""
        return self._closed

    def _channel(self) -> grpc.aio.Channel:
        if self._closed:
            raise ExecutorClientError("this ExecutorClient is closed; create a new one")
        loop = asyncio.get_running_loop()
        with self._lock:
            channel = self._channels.get(loop)
            if channel is None:
                # grpc.aio channels belong to one loop; forget those of loops that have ended.
                for old in [lp for lp in self._channels if lp.is_closed()]:
                    del self._channels[old]
                channel = self._channels[loop] = open_channel(self.config)
            return channel

    async def close_async(self) -> None:
        """Close the connections. Idempotent; using the client afterwards raises."""
        self._closed = True
        with self._lock:
            channels, self._channels = self._channels, {}
        loop = asyncio.get_running_loop()
        for owner, channel in channels.items():
            if owner is loop:
                await channel.close()
            else:
                _close_elsewhere(owner, channel)

    def close(self) -> None:
        """Close the connections from sync code (also fine inside a running loop). Idempotent."""
        self._closed = True
        with self._lock:
            channels, self._channels = self._channels, {}
        for owner, channel in channels.items():
            _close_elsewhere(owner, channel)

    async def health_check_async(self) -> bool:
        """Whether the executor's ``grpc.health.v1`` service reports SERVING."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel())
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=""),
                timeout=self.config.connect_timeout,
                metadata=self._auth,
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def health_check(self) -> bool:
        """Blocking :meth:`health_check_async`."""
        return run_sync(self.health_check_async())

    async def info_async(self) -> dict[str, Any]:
        """The executor's details: version, ``isolation`` backend, ``isolated``, ``warnings``,
        ``limits``, concurrency, and what programs can import: ``packages`` (the sandbox
        venv's, as ``{"name", "version"}``) and ``preload_modules``. Raises the errors of
        :mod:`codemode.core.errors`."""
        try:
            reply = await pb_grpc.ExecutorStub(self._channel()).Info(
                pb.InfoRequest(), timeout=self.config.connect_timeout, metadata=self._auth
            )
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(exc, "", sent=False) from None
        return {
            "version": reply.version,
            "isolation": reply.isolation,
            "isolated": reply.isolated,
            "warnings": list(reply.warnings),
            "limits": {name: getattr(reply.limits, name) for name in _LIMIT_FIELDS},
            "max_execution_timeout_seconds": reply.max_execution_timeout_seconds,
            "max_concurrent_executions": reply.max_concurrent_executions,
            "running_executions": reply.running_executions,
            "packages": [{"name": p.name, "version": p.version} for p in reply.packages],
            "preload_modules": list(reply.preload_modules),
        }

    # Executing -----------------------------------------------------------------------------

    async def execute_async(
        self,
        code: str,
        available_tools: Sequence[str] | None = None,
        config: Mapping[str, Any] | None = None,
        execution_timeout: float | None = None,
        context: RuntimeContext | Mapping[str, Any] | None = None,
        *,
        correlation_id: str | None = None,
        limits: Mapping[str, float] | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> ExecutionResult:
        """Run ``code`` and return its outcome; a failed program is a failed result, not an error.

        ``available_tools`` are the registry's tools the program may call (default: all).
        ``config`` becomes the program's read-only ``config``; ``context`` (default: the
        current task's context) its ``context`` and what ``run_with_context`` tools receive.
        ``execution_timeout`` (seconds, default ``config.timeout``) is enforced by the executor.
        ``limits`` lowers the executor's limits for this run. ``files`` (name to bytes) are
        placed read-only under ``/input`` before the program starts; what it leaves in
        ``/output`` comes back as ``ExecutionResult.files``.

        Raises :class:`ExecutorConnectionError`, :class:`ExecutorTimeoutError` (the client
        deadline passed without an outcome), :class:`ExecutorRequestError` subclasses, and
        ``asyncio.CancelledError`` when cancelled (the executor then kills the program).
        """
        return await self._execute(
            Request(
                code,
                available_tools,
                config,
                execution_timeout,
                context,
                correlation_id=correlation_id,
                limits=limits,
                files=files,
            )
        )

    def execute(
        self,
        code: str,
        available_tools: Sequence[str] | None = None,
        config: Mapping[str, Any] | None = None,
        execution_timeout: float | None = None,
        context: RuntimeContext | Mapping[str, Any] | None = None,
        *,
        correlation_id: str | None = None,
        limits: Mapping[str, float] | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> ExecutionResult:
        """Blocking :meth:`execute_async`; works with or without a running event loop."""
        request = Request(
            code,
            available_tools,
            config,
            execution_timeout,
            context,
            correlation_id=correlation_id,
            limits=limits,
            files=files,
        )
        return run_sync(self._execute(request.in_caller_context()))

    def stream(
        self,
        code: str,
        available_tools: Sequence[str] | None = None,
        config: Mapping[str, Any] | None = None,
        execution_timeout: float | None = None,
        context: RuntimeContext | Mapping[str, Any] | None = None,
        *,
        correlation_id: str | None = None,
        limits: Mapping[str, float] | None = None,
        files: Mapping[str, bytes] | None = None,
        stream_output: bool = True,
    ) -> AsyncIterator[ExecutionEvent]:
        """Run ``code``, yielding events as they happen; the last one is a :class:`ResultEvent`.

        Arguments and errors as :meth:`execute_async`. Retries (with backoff) only failures
        where nothing can have run; once the program may have started it is never re-run.
        """
        return self._events(
            Request(
                code,
                available_tools,
                config,
                execution_timeout,
                context,
                correlation_id=correlation_id,
                limits=limits,
                files=files,
                stream_output=stream_output,
            )
        )

    async def _execute(self, request: Request) -> ExecutionResult:
        """:meth:`execute_async` for a built request: the result of its event stream."""
        outcome: ExecutionResult | None = None
        async for event in self._events(request):
            if isinstance(event, ResultEvent):
                outcome = event.result
        if outcome is None:  # the stream always ends with a result or raises
            raise ExecutorClientError("executor closed the stream without a result")
        return outcome

    async def _events(self, request: Request) -> AsyncIterator[ExecutionEvent]:
        """:meth:`stream` for a built request: attempts, with retries where nothing ran."""
        prepared = self._prepare(request)
        cid = prepared.correlation_id
        attempt, waited = 0, 0.0
        while True:
            try:
                async for event in self._stream_once(prepared):
                    yield event
                return
            except ExecutorClientError as exc:
                delay = self.retry_policy.next_delay(exc, attempt, waited)
                if delay is None:
                    raise
                logger.warning(
                    "retrying execution after %s (attempt %d, in %.3fs)",
                    type(exc).__name__,
                    attempt + 1,
                    delay,
                    extra={"correlation_id": cid},
                )
                await asyncio.sleep(delay)
                attempt, waited = attempt + 1, waited + delay

    def _prepare(self, request: Request) -> _Prepared:
        """Check ``request`` and encode it; raises :class:`InvalidRequestError`."""
        cid = request.correlation_id or new_correlation_id()
        code = request.code
        if not isinstance(code, str):
            raise InvalidRequestError(
                f"code must be a str, not {type(code).__name__}", correlation_id=cid
            )
        if len(code) > self.config.max_code_length:
            raise InvalidRequestError(
                f"code is {len(code)} characters; the limit is {self.config.max_code_length} "
                "(ClientConfig.max_code_length)",
                correlation_id=cid,
            )
        timeout = (
            self.config.timeout
            if request.execution_timeout is None
            else float(request.execution_timeout)
        )
        if timeout <= 0:
            raise InvalidRequestError("execution_timeout must be positive", correlation_id=cid)
        context = request.context
        if context is None:
            context = current_context.get() or RuntimeContext()
        elif not isinstance(context, RuntimeContext):
            context = RuntimeContext(variables=context)
        names = (
            self.registry.get_component_names()
            if request.available_tools is None
            else list(request.available_tools)
        )
        tools: dict[str, Any] = {}
        specs = []
        for name in names:
            # Declared but not registered: the program sees it, calling it fails in _ToolRelay.
            if self.registry.has_tool(name):
                tools[name] = self.registry.get_tool(name)
            specs.append(pb.ToolSpec(name=name))
        if names:
            # tools.search / tools.describe, answered in _ToolRelay from this call's tools.
            from codemode.tools.discovery import DISCOVERY_TOOLS

            specs += [pb.ToolSpec(name=n) for n in DISCOVERY_TOOLS if n not in names]
        try:
            config_json = json.dumps(dict(request.config or {}), separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(
                f"config must be JSON-serialisable: {exc}", correlation_id=cid
            ) from None
        files = _check_files(request.files, cid)
        start = pb.StartExecution(
            code=code,
            tools=specs,
            config_json=config_json,
            context_json=context.to_json(),
            timeout_seconds=timeout,
            limits=pb.Limits(**_limit_fields(request.limits)),
            stream_output=request.stream_output,
            files=[pb.FileInfo(name=name, size=len(data)) for name, data in files],
        )
        return _Prepared(start, context.with_correlation_id(cid), tools, cid, files)

    async def _stream_once(self, prepared: _Prepared) -> AsyncIterator[ExecutionEvent]:
        """One attempt: open the stream, send the start frame, relay until the result."""
        cid = prepared.correlation_id
        channel = self._channel()
        await self._wait_connected(channel, cid)
        call = pb_grpc.ExecutorStub(channel).Execute(
            metadata=(*self._auth, (CORRELATION_ID, cid)),
            timeout=prepared.start.timeout_seconds + DEADLINE_MARGIN_S,
        )
        relay = _ToolRelay(call, prepared.tools, prepared.context, cid, self.config.tool_timeout)
        sent = False
        try:
            await call.write(pb.ClientFrame(start=prepared.start))
            sent = True
            if prepared.files:
                # The executor sends its headers once it has admitted the execution: only then
                # do the files go (a refusal racing a large upload would reset the stream).
                await call.initial_metadata()
                try:
                    for chunk in _file_chunks(prepared.files):
                        await call.write(pb.ClientFrame(file=chunk))
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    pass  # the executor ended the call: the read below says why
            received = _Files()
            while True:
                frame = await _read(call)
                if frame is grpc.aio.EOF:
                    raise ExecutorConnectionError(
                        "executor ended the stream without a result; the program may have run",
                        may_have_run=True,
                        correlation_id=cid,
                    )
                kind = frame.WhichOneof("frame")
                if kind == "tool_call":
                    yield relay.start(frame.tool_call)
                elif kind == "output":
                    stream: Literal["stdout", "stderr"] = (
                        "stderr" if frame.output.stream == pb.Output.STDERR else "stdout"
                    )
                    yield OutputEvent(stream, frame.output.data.decode("utf-8", "replace"))
                elif kind == "file":
                    received.add(frame.file)
                elif kind == "result":
                    for event in relay.finished():
                        yield event
                    yield ResultEvent(
                        _result_from_wire(frame.result, cid, received.take(frame.result))
                    )
                    return
                for event in relay.finished():
                    yield event
        except asyncio.CancelledError:
            if sent:
                # Say so rather than just drop the stream: the executor can then tell the
                # application's cancellation from a lost connection (it logs which), and
                # whatever resumes executions after a failure must not re-run a cancelled one.
                await relay.send_cancel(CANCEL_NOTICE_S)
            raise
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(exc, cid, sent) from None
        finally:
            relay.cancel()
            call.cancel()

    async def _wait_connected(self, channel: grpc.aio.Channel, cid: str) -> None:
        if channel.get_state(try_to_connect=True) is grpc.ChannelConnectivity.READY:
            return
        try:
            await asyncio.wait_for(channel.channel_ready(), self.config.connect_timeout)
        except TimeoutError:
            raise ExecutorConnectionError(
                f"cannot connect to the executor at {self.config.executor_url} within "
                f"{self.config.connect_timeout:g}s; check that `codemode serve` runs there",
                may_have_run=False,
                correlation_id=cid,
                status="UNAVAILABLE",
            ) from None


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A checked request: its start frame, and what answering its tool calls needs."""

    start: pb.StartExecution
    context: RuntimeContext  # carrying the correlation id, for run_with_context tools
    tools: Mapping[str, Any]
    correlation_id: str
    files: tuple[tuple[str, bytes], ...] = ()


class _ToolRelay:
    """Answers the program's tool calls, each in its own task so that calls run in parallel.

    It owns the writes after the start frame, so that frames never interleave on the stream.
    """

    def __init__(
        self,
        call: Any,
        tools: Mapping[str, Any],
        context: RuntimeContext,
        cid: str,
        tool_timeout: float,
    ) -> None:
        self._call = call
        self._tools = tools
        self._context = context
        self._cid = cid
        self._timeout = tool_timeout
        self._tasks: set[asyncio.Task[ToolResultEvent]] = set()
        self._done: list[ToolResultEvent] = []
        self._write_lock = asyncio.Lock()

    def start(self, frame: pb.ToolCall) -> ToolCallEvent:
        try:
            arguments = json.loads(frame.arguments_json or b"{}")
            args, kwargs = list(arguments.get("args", [])), dict(arguments.get("kwargs", {}))
        except (ValueError, AttributeError, TypeError):
            args, kwargs = [], {}
        task = asyncio.create_task(self._answer(frame.call_id, frame.tool, args, kwargs))
        self._tasks.add(task)
        task.add_done_callback(self._collect)
        return ToolCallEvent(frame.call_id, frame.tool, args, kwargs)

    def _collect(self, task: asyncio.Task[ToolResultEvent]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is None:
            self._done.append(task.result())

    def finished(self) -> list[ToolResultEvent]:
        done, self._done = self._done, []
        return done

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()

    async def send_cancel(self, timeout: float) -> None:
        """Write a ``Cancel`` frame; best effort, waiting at most ``timeout`` seconds.

        Shielded, because grpc.aio cancels the whole call with a cancelled write: a second
        cancellation of the caller must not take the frame with it. When the write fails or
        takes longer, the caller goes on and cancels the call.
        """
        frame = pb.ClientFrame(cancel=pb.Cancel(reason="the application cancelled the execution"))

        async def write() -> None:
            async with self._write_lock:
                await self._call.write(frame)

        task = _in_background(write())
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                await asyncio.shield(task)

    async def _answer(
        self, call_id: str, name: str, args: list[Any], kwargs: dict[str, Any]
    ) -> ToolResultEvent:
        started = time.perf_counter()
        reply = await self._run(name, args, kwargs)
        reply.call_id = call_id
        if not reply.ok:
            logger.info(
                "tool %s failed: %s: %s",
                name,
                reply.error_type,
                reply.error_message,
                extra={"correlation_id": self._cid},
            )
        async with self._write_lock:
            await self._call.write(pb.ClientFrame(tool_result=reply))
        return ToolResultEvent(
            call_id,
            name,
            reply.ok,
            (time.perf_counter() - started) * 1000,
            reply.error_type or None,
        )

    async def _run(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> pb.ToolResult:
        tool = self._tools.get(name)
        if tool is None and name.startswith("_codemode_"):
            from codemode.tools.discovery import answer_discovery

            try:
                value = answer_discovery(name, args, kwargs, self._tools)
            except Exception as exc:
                return _tool_error(type(exc).__name__, str(exc))
            return pb.ToolResult(ok=True, value_json=json.dumps(value).encode())
        if tool is None:
            return _tool_error(
                "ComponentNotFoundError",
                f"tool {name!r} is declared but not registered in the application",
            )
        current_correlation_id.set(self._cid)  # this task's copy; to_thread carries it along
        try:
            async with asyncio.timeout(self._timeout):  # no extra task, unlike wait_for
                value = await call_tool(tool, args, kwargs, self._context, name=name)
        except TimeoutError:
            return _tool_error(
                "TimeoutError", f"tool {name!r} did not answer within {self._timeout:g}s"
            )
        except Exception as exc:
            return _tool_error(type(exc).__name__, str(exc))
        try:
            encoded = json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            return _tool_error(
                "TypeError", f"tool {name!r} returned a value that is not JSON-serialisable: {exc}"
            )
        return pb.ToolResult(ok=True, value_json=encoded)


_LIMIT_FIELDS = {f.name: f for f in pb.Limits.DESCRIPTOR.fields}


def _limit_fields(limits: Mapping[str, float] | None) -> dict[str, Any]:
    """Requested limit overrides as ``pb.Limits`` fields; unknown names are a clear error."""
    out: dict[str, Any] = {}
    for name, value in (limits or {}).items():
        field = _LIMIT_FIELDS.get(name)
        if field is None:
            known = ", ".join(sorted(_LIMIT_FIELDS))
            raise InvalidRequestError(f"unknown limit {name!r}; known: {known}")
        out[name] = float(value) if field.cpp_type == field.CPPTYPE_DOUBLE else int(value)
    return out


async def _read(call: Any) -> Any:
    """``call.read()``, shielded from the caller's cancellation.

    grpc.aio cancels the whole call when a pending read is cancelled; shielded, the call
    outlives the cancelled caller long enough to send ``Cancel``. The read ends with the call.
    """
    read = _in_background(call.read())
    return await asyncio.shield(read)


def _tool_error(error_type: str, message: str) -> pb.ToolResult:
    return pb.ToolResult(ok=False, error_type=error_type, error_message=message)


def _result_from_wire(
    result: pb.ExecutionResult, cid: str, files: dict[str, bytes] | None = None
) -> ExecutionResult:
    return ExecutionResult(
        success=result.success,
        result=result.result_json.decode() if result.result_json else None,
        error=result.error_message or None,
        error_type=result.error_type or None,
        traceback=result.traceback or None,
        stdout=result.stdout.decode("utf-8", "replace"),
        stderr=result.stderr.decode("utf-8", "replace"),
        duration_ms=result.duration_ms,
        correlation_id=result.correlation_id or cid,
        tool_calls=result.tool_calls,
        output_truncated=result.output_truncated,
        files=files or {},
    )


def _check_files(files: Mapping[str, bytes] | None, cid: str) -> tuple[tuple[str, bytes], ...]:
    """The input files as (name, bytes) pairs, checked; raises :class:`InvalidRequestError`."""
    if not files:
        return ()
    if not isinstance(files, Mapping):
        raise InvalidRequestError(
            f"files must be a mapping of name to bytes, not {type(files).__name__}",
            correlation_id=cid,
        )
    checked = []
    for name, data in files.items():
        problem = file_name_problem(name)
        if problem is not None:
            raise InvalidRequestError(f"input file: {problem}", correlation_id=cid)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidRequestError(
                f"input file {name!r} must be bytes, not {type(data).__name__}",
                correlation_id=cid,
            )
        checked.append((name, bytes(data)))
    if len(checked) > MAX_INPUT_FILES:
        raise InvalidRequestError(
            f"{len(checked)} input files; at most {MAX_INPUT_FILES} are accepted",
            correlation_id=cid,
        )
    return tuple(checked)


def _file_chunks(files: Sequence[tuple[str, bytes]]) -> Iterator[pb.FileChunk]:
    """The input files' bytes as the wire's chunks, file after file (none for empty files)."""
    for name, data in files:
        view = memoryview(data)
        for at in range(0, len(data), FILE_CHUNK_BYTES):
            yield pb.FileChunk(name=name, data=bytes(view[at : at + FILE_CHUNK_BYTES]))


class _Files:
    """The output files' chunks as they arrive, checked against the result's list at the end."""

    def __init__(self) -> None:
        self._parts: dict[str, list[bytes]] = {}

    def add(self, chunk: pb.FileChunk) -> None:
        self._parts.setdefault(chunk.name, []).append(chunk.data)

    def take(self, result: pb.ExecutionResult) -> dict[str, bytes]:
        files = {}
        for info in result.files:
            data = b"".join(self._parts.pop(info.name, ()))
            if len(data) != info.size:
                raise ExecutorClientError(
                    f"output file {info.name!r} arrived with {len(data)} of its {info.size} bytes",
                    correlation_id=result.correlation_id or None,
                )
            files[info.name] = data
        return files


def _rpc_error(exc: grpc.aio.AioRpcError, cid: str, sent: bool) -> ExecutorClientError:
    trailers = exc.trailing_metadata() or ()
    not_started = any(k == NOT_STARTED_TRAILER for k, _ in trailers)
    return error_from_rpc(
        exc.code(), exc.details() or "", correlation_id=cid, not_started=not_started, sent=sent
    )


def _close_elsewhere(loop: asyncio.AbstractEventLoop, channel: grpc.aio.Channel) -> None:
    """Close ``channel`` from sync code, whatever the state of the loop it belongs to."""
    if loop.is_closed():
        return  # its sockets went with the loop; the channel object is just dropped
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        task = loop.create_task(channel.close())
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)
    elif loop.is_running():
        asyncio.run_coroutine_threadsafe(channel.close(), loop)
    else:
        loop.run_until_complete(channel.close())


_BACKGROUND: set[asyncio.Task[Any]] = set()


def _in_background(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """A task for ``coro``, kept alive until done; a failure nobody awaited is not logged."""
    task = asyncio.get_running_loop().create_task(coro)
    _BACKGROUND.add(task)
    task.add_done_callback(_forget)
    return task


def _forget(task: asyncio.Task[Any]) -> None:
    _BACKGROUND.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved, so that asyncio does not log it


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from sync code.

    With no loop running in this thread, ``asyncio.run``; inside a running loop, on a worker
    thread's loop (the caller's loop is blocked meanwhile: prefer the async API there). The
    worker loop lives as long as the process, so the connection it opens is reused and grpc
    never sees its loop closed under it.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    return asyncio.run_coroutine_threadsafe(coro, _worker_loop()).result()


_worker: asyncio.AbstractEventLoop | None = None
_worker_lock = threading.Lock()


def _worker_loop() -> asyncio.AbstractEventLoop:
    """The process-wide loop, on a daemon thread, that sync calls from inside a loop run on."""
    global _worker
    with _worker_lock:
        if _worker is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="codemode-sync", daemon=True).start()
            _worker = loop
        return _worker
