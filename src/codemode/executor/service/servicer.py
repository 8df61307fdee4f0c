"""The Execute and Info RPCs: one stream per execution, relayed to :mod:`codemode.executor.run`.

The servicer stays thin: it validates the start frame into an ``ExecutionRequest``, takes an
admission slot, and hands the execution to :func:`~codemode.executor.run.execution.run_execution`,
relaying tool calls to the client and their answers back, then turns the ``RunOutcome`` into
the wire's result. Refusals go out through ``context.abort``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from codemode._version import __version__
from codemode.config import ExecutorConfig
from codemode.executor.run.execution import run_execution
from codemode.executor.run.outcome import ExecutionRequest, RunOutcome, Stream, ToolReply
from codemode.executor.sandbox import SandboxBackend
from codemode.executor.sandbox.factory import PROCESS_WARNING
from codemode.executor.service.admission import Admission, Overloaded
from codemode.wire import codemode_pb2 as pb
from codemode.wire import codemode_pb2_grpc as pb_grpc
from codemode.wire.names import CORRELATION_ID, NOT_STARTED_TRAILER, ErrorType

logger = logging.getLogger("codemode.executor")

#: How long a client may take to send the start frame after opening the stream, seconds.
START_FRAME_TIMEOUT_S = 10.0
_STREAMS = {"stdout": pb.Output.STDOUT, "stderr": pb.Output.STDERR}


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
        warnings = []
        if not self._backend.isolated:
            warnings.append(PROCESS_WARNING)
        if self._config.api_key is None:
            warnings.append("insecure-no-auth: any caller that reaches the port can run code")
        return pb.InfoResponse(
            version=__version__,
            isolation=self._backend.name,
            isolated=self._backend.isolated,
            warnings=warnings,
            limits=pb.Limits(**self._config.limits.model_dump()),
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
        cid = str(metadata.get(CORRELATION_ID) or uuid.uuid4().hex)[:128]
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
            request = self._validate(start, cid)
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
                result = await self._run(request, frames, context)
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

    def _validate(self, start: pb.StartExecution, cid: str) -> ExecutionRequest:
        if len(start.code.encode()) > self._config.max_code_bytes:
            raise ValueError(
                f"code is larger than this executor's limit of {self._config.max_code_bytes} bytes"
            )
        timeout = start.timeout_seconds or self._config.default_execution_timeout
        if not math.isfinite(timeout):
            raise ValueError("timeout_seconds must be a finite number")
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
        return ExecutionRequest(
            code=start.code,
            tools=tuple(names),
            timeout=min(timeout, self._config.max_execution_timeout),
            limits=self._config.limits.lowered(requested),
            config=decode_json_object(start.config_json, "config"),
            context=decode_json_object(start.context_json, "context"),
            stream_output=start.stream_output,
            correlation_id=cid,
        )

    async def _run(
        self,
        request: ExecutionRequest,
        frames: AsyncIterator[pb.ClientFrame],
        context: grpc.aio.ServicerContext[pb.ClientFrame, pb.ServerFrame],
    ) -> pb.ExecutionResult:
        pending: dict[str, asyncio.Future[pb.ToolResult]] = {}
        ids = itertools.count(1)
        write_lock = asyncio.Lock()

        async def write(frame: pb.ServerFrame) -> None:
            async with write_lock:
                await context.write(frame)

        async def call_tool(tool: str, arguments: bytes) -> ToolReply:
            call_id = str(next(ids))
            future = pending[call_id] = asyncio.get_running_loop().create_future()
            await write(
                pb.ServerFrame(
                    tool_call=pb.ToolCall(call_id=call_id, tool=tool, arguments_json=arguments)
                )
            )
            answer = await future
            return ToolReply(answer.ok, answer.value_json, answer.error_type, answer.error_message)

        async def on_output(stream: Stream, data: bytes) -> None:
            await write(pb.ServerFrame(output=pb.Output(stream=_STREAMS[stream], data=data)))

        execution = asyncio.create_task(
            run_execution(
                self._backend,
                request,
                call_tool,
                on_output if request.stream_output else None,
            )
        )
        reader = asyncio.create_task(_read_client(frames, pending, execution))
        try:
            return to_wire(await execution, request.correlation_id)
        except asyncio.CancelledError:
            if not reader.done() or reader.cancelled():
                raise
            if isinstance(reader.exception(), _ClientProtocolError):
                raise reader.exception() from None  # type: ignore[misc]
            if reader.result() == "cancel":
                return pb.ExecutionResult(
                    error_type=ErrorType.CANCELLED,
                    error_message="the application cancelled the execution",
                    correlation_id=request.correlation_id,
                )
            raise
        finally:
            reader.cancel()
            execution.cancel()
            with contextlib.suppress(BaseException):
                await execution


def to_wire(outcome: RunOutcome, correlation_id: str) -> pb.ExecutionResult:
    """The wire's result for ``outcome``."""
    return pb.ExecutionResult(
        success=outcome.success,
        result_json=outcome.result_json,
        error_type=outcome.error_type,
        error_message=outcome.error_message,
        traceback=outcome.traceback,
        stdout=outcome.stdout,
        stderr=outcome.stderr,
        duration_ms=outcome.duration_ms,
        correlation_id=correlation_id,
        tool_calls=outcome.tool_calls,
        output_truncated=outcome.output_truncated,
    )


def decode_json_object(raw: bytes, what: str) -> dict[str, Any]:
    """Decode a JSON object sent by the client; raises ``ValueError`` naming ``what``."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object, not {type(value).__name__}")
    return value


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
