"""The gRPC side of the executor: authentication, admission, and the Execute stream.

The servicer stays thin: it validates the first frame, takes an admission slot, and hands the
execution to :func:`codemode.executor.execution.run_execution`, relaying tool calls to the
client and their answers back. Refusals go out through ``context.abort``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from codemode.config import ExecutorConfig
from codemode.core.errors import NOT_STARTED_TRAILER
from codemode.executor.execution import decode_json_object, run_execution
from codemode.executor.sandbox import SandboxBackend
from codemode.wire import codemode_pb2 as pb
from codemode.wire import codemode_pb2_grpc as pb_grpc

logger = logging.getLogger("codemode.executor")

#: How long a client may take to send the start frame after opening the stream, seconds.
START_FRAME_TIMEOUT_S = 10.0
#: How long a refused call may take to deliver its first message, seconds.
REJECT_READ_TIMEOUT_S = 1.0
_UNAUTHENTICATED_PATHS_PREFIX = "/grpc.health.v1.Health/"


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """Rejects every call without ``authorization: Bearer <key>`` before its handler runs.

    The key is compared in constant time. Health checks are exempt so that load balancers and
    Kubernetes probes, which cannot send headers, work; they reveal only serving status.
    """

    def __init__(self, api_key: str) -> None:
        self._expected = f"Bearer {api_key}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.startswith(_UNAUTHENTICATED_PATHS_PREFIX):
            return await continuation(handler_call_details)
        presented = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                presented = value.encode() if isinstance(value, str) else value
        if hmac.compare_digest(presented, self._expected):
            return await continuation(handler_call_details)
        logger.warning("rejected a call with a wrong or missing API key", extra={"method": method})
        return _REJECT


async def _reject(
    requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
) -> None:
    # Take the first message before refusing: a refusal racing the client's first write makes
    # grpc reset the stream, and the client then sees INTERNAL instead of UNAUTHENTICATED.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(anext(aiter(requests)), REJECT_READ_TIMEOUT_S)
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key (authorization: Bearer <key>)"
    )


_REJECT = grpc.stream_stream_rpc_method_handler(_reject)


class Overloaded(Exception):
    """No execution slot could be had."""


class Admission:
    """At most ``limit`` executions at once; up to ``max_queued`` more wait ``queue_timeout`` s."""

    def __init__(self, limit: int, max_queued: int, queue_timeout: float) -> None:
        self._slots = asyncio.Semaphore(limit)
        self._max_queued = max_queued
        self._queue_timeout = queue_timeout
        self._waiting = 0
        self.running = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the body; raises :class:`Overloaded` when none can be had."""
        if self._slots.locked():
            if self._waiting >= self._max_queued:
                raise Overloaded(f"{self.running} executions running and {self._waiting} queued")
            self._waiting += 1
            try:
                await asyncio.wait_for(self._slots.acquire(), self._queue_timeout)
            except TimeoutError:
                raise Overloaded(f"no execution slot within {self._queue_timeout:g}s") from None
            finally:
                self._waiting -= 1
        else:
            await self._slots.acquire()
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()


class ExecutorServicer(pb_grpc.ExecutorServicer):
    """Implements ``Execute`` (one stream, one execution) and ``Info``."""

    def __init__(self, config: ExecutorConfig, backend: SandboxBackend) -> None:
        self._config = config
        self._backend = backend
        self._admission = Admission(
            config.max_concurrent_executions, config.max_queued_executions, config.queue_timeout
        )
        self.accepting = True

    async def Info(
        self, request: pb.InfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.InfoResponse:
        """What this executor enforces: its sandbox, ceilings, and any warnings."""
        from codemode._version import __version__
        from codemode.executor.backends import PROCESS_WARNING

        warnings = []
        if not self._backend.isolated:
            warnings.append(PROCESS_WARNING)
        if self._config.api_key is None:
            warnings.append("insecure-no-auth: any caller that reaches the port can run code")
        limits = self._config.limits
        return pb.InfoResponse(
            version=__version__,
            isolation=self._backend.name,
            isolated=self._backend.isolated,
            warnings=warnings,
            limits=pb.Limits(
                cpu_seconds=limits.cpu_seconds,
                memory_bytes=limits.memory_bytes,
                max_processes=limits.max_processes,
                max_file_bytes=limits.max_file_bytes,
                max_open_files=limits.max_open_files,
                max_output_bytes=limits.max_output_bytes,
                max_result_bytes=limits.max_result_bytes,
                tmpfs_bytes=limits.tmpfs_bytes,
            ),
            max_execution_timeout_seconds=self._config.max_execution_timeout,
            max_concurrent_executions=self._config.max_concurrent_executions,
            running_executions=self._admission.running,
        )

    # Frames are written with context.write (not yielded) so that tool calls and output from
    # concurrent tasks interleave on the stream; hence the override of the generated signature.
    async def Execute(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[pb.ClientFrame],
        context: grpc.aio.ServicerContext[pb.ClientFrame, pb.ServerFrame],
    ) -> None:
        metadata = dict(context.invocation_metadata() or ())
        cid = str(metadata.get("x-correlation-id") or uuid.uuid4().hex)[:128]
        log = {"correlation_id": cid}
        frames = aiter(request_iterator)
        try:
            async with asyncio.timeout(START_FRAME_TIMEOUT_S):  # no task, unlike wait_for
                first = await anext(frames)
        except (StopAsyncIteration, TimeoutError):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the stream must begin with a start frame"
            )
        if first.WhichOneof("frame") != "start":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first frame must be a start frame"
            )
        start = first.start
        try:
            request = self._validate(start)
        except ValueError as exc:
            logger.info("refused a malformed request: %s", exc, extra=log)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not self.accepting:
            await _abort_not_started(
                context, grpc.StatusCode.UNAVAILABLE, "executor is shutting down"
            )
        try:
            async with self._admission.slot():
                logger.info("execution started", extra=log)
                result = await self._run(request, frames, context, cid)
        except Overloaded as exc:
            logger.warning("refused: executor overloaded (%s)", exc, extra=log)
            await _abort_not_started(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"executor overloaded: {exc}; retry later",
            )
        except _ClientProtocolError as exc:
            logger.warning("client broke the protocol: %s", exc, extra=log)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (OSError, RuntimeError) as exc:
            # The sandbox could not be started or driven: the executor's fault, not the program's.
            logger.exception("execution failed inside the executor", extra=log)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"executor failed to run the program: {exc}"
            )
        try:
            await context.write(pb.ServerFrame(result=result))
        finally:
            # Logged once the result is on its way, so the client does not wait for the line;
            # also when the client, having read it, cancels the stream while the write ends.
            logger.info(
                "execution finished",
                extra={
                    **log,
                    "success": result.success,
                    "error_type": result.error_type or None,
                    "duration_ms": round(result.duration_ms, 3),
                    "tool_calls": result.tool_calls,
                },
            )

    def _validate(self, start: pb.StartExecution) -> dict[str, Any]:
        if len(start.code.encode()) > self._config.max_code_bytes:
            raise ValueError(
                f"code is larger than this executor's limit of {self._config.max_code_bytes} bytes"
            )
        timeout = start.timeout_seconds or self._config.default_execution_timeout
        if timeout < 0:
            raise ValueError("timeout_seconds must not be negative")
        names = [t.name for t in start.tools]
        for name in names:
            if not name.isidentifier():
                raise ValueError(f"tool name {name!r} is not a Python identifier")
        if len(set(names)) != len(names):
            raise ValueError("tool names must be unique")
        requested = {f.name: v for f, v in start.limits.ListFields()}
        for name, value in requested.items():
            if value < 0:
                raise ValueError(f"limit {name} must not be negative")
        return {
            "code": start.code,
            "tools": names,
            "config": decode_json_object(start.config_json, "config"),
            "context": decode_json_object(start.context_json, "context"),
            "timeout": min(timeout, self._config.max_execution_timeout),
            "limits": self._config.limits.lowered(requested),
            "stream_output": start.stream_output,
        }

    async def _run(
        self,
        request: dict[str, Any],
        frames: AsyncIterator[pb.ClientFrame],
        context: grpc.aio.ServicerContext[pb.ClientFrame, pb.ServerFrame],
        cid: str,
    ) -> pb.ExecutionResult:
        pending: dict[str, asyncio.Future[pb.ToolResult]] = {}
        ids = itertools.count(1)
        write_lock = asyncio.Lock()

        async def write(frame: pb.ServerFrame) -> None:
            async with write_lock:
                await context.write(frame)

        async def call_tool(tool: str, arguments: bytes) -> tuple[bool, bytes, str, str]:
            call_id = str(next(ids))
            future = pending[call_id] = asyncio.get_running_loop().create_future()
            await write(
                pb.ServerFrame(
                    tool_call=pb.ToolCall(call_id=call_id, tool=tool, arguments_json=arguments)
                )
            )
            answer = await future
            return answer.ok, answer.value_json, answer.error_type, answer.error_message

        async def on_output(stream: int, data: bytes) -> None:
            await write(pb.ServerFrame(output=pb.Output(stream=stream, data=data)))  # type: ignore[arg-type]

        execution = asyncio.create_task(
            run_execution(
                backend=self._backend,
                code=request["code"],
                tools=request["tools"],
                config=request["config"],
                context=request["context"],
                timeout=request["timeout"],
                limits=request["limits"],
                call_tool=call_tool,
                on_output=on_output if request["stream_output"] else None,
                correlation_id=cid,
            )
        )
        reader = asyncio.create_task(_read_client(frames, pending, execution))
        try:
            return await execution
        except asyncio.CancelledError:
            if not reader.done() or reader.cancelled():
                raise
            if isinstance(reader.exception(), _ClientProtocolError):
                raise reader.exception() from None  # type: ignore[misc]
            if reader.result() == "cancel":
                return pb.ExecutionResult(
                    error_type="Cancelled",
                    error_message="the application cancelled the execution",
                    correlation_id=cid,
                )
            raise
        finally:
            reader.cancel()
            execution.cancel()
            with contextlib.suppress(BaseException):
                await execution


class _ClientProtocolError(Exception):
    """The client sent a frame that makes no sense at this point."""


async def _read_client(
    frames: AsyncIterator[pb.ClientFrame],
    pending: dict[str, asyncio.Future[pb.ToolResult]],
    execution: asyncio.Task[Any],
) -> str:
    """Route tool results to their calls; a cancel frame or a protocol error stops the execution."""
    try:
        async for frame in frames:
            kind = frame.WhichOneof("frame")
            if kind == "tool_result":
                future = pending.pop(frame.tool_result.call_id, None)
                if future is None:
                    raise _ClientProtocolError(
                        f"tool result for unknown call id {frame.tool_result.call_id!r}"
                    )
                if not future.done():
                    future.set_result(frame.tool_result)
            elif kind == "cancel":
                execution.cancel()
                return "cancel"
            else:
                raise _ClientProtocolError(f"unexpected {kind or 'empty'} frame after start")
    except _ClientProtocolError:
        execution.cancel()
        raise
    # The client half-closed: calls still waiting can never be answered.
    for future in pending.values():
        if not future.done():
            future.set_result(
                pb.ToolResult(
                    ok=False,
                    error_type="ConnectionError",
                    error_message="the application closed the stream",
                )
            )
    return "closed"


async def _abort_not_started(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, message: str
) -> None:
    """Refuse with a trailer telling the client that nothing ran, so it may retry."""
    context.set_trailing_metadata(((NOT_STARTED_TRAILER, "1"),))
    await context.abort(code, message)
