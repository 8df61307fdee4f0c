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
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc
import grpc.aio

from codemode._version import __version__
from codemode.config import ExecutorConfig
from codemode.config._defaults import FILE_CHUNK_BYTES
from codemode.executor.run.execution import run_execution
from codemode.executor.run.outcome import (
    ExecutionRequest,
    FileInfo,
    RunOutcome,
    Stream,
    ToolReply,
)
from codemode.executor.sandbox import SandboxBackend
from codemode.executor.sandbox.factory import PROCESS_WARNING
from codemode.executor.service.admission import Admission, Overloaded
from codemode.wire import codemode_pb2 as pb
from codemode.wire import codemode_pb2_grpc as pb_grpc
from codemode.wire.names import (
    CORRELATION_ID,
    MAX_INPUT_FILES,
    NOT_STARTED_TRAILER,
    ErrorType,
    file_name_problem,
)

logger = logging.getLogger("codemode.executor")

#: How long a client may take to send the start frame after opening the stream, seconds.
START_FRAME_TIMEOUT_S = 10.0
_STREAMS = {"stdout": pb.Output.STDOUT, "stderr": pb.Output.STDERR}
#: Input file chunks read ahead of the writes into the guest (backpressure on the stream).
_QUEUED_CHUNKS = 4


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
            packages=[
                pb.InfoResponse.Package(name=name, version=version)
                for name, version in self._backend.packages
            ],
            preload_modules=list(self._backend.preload_modules),
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
        if request.files and not self._backend.isolated:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this executor runs programs without a sandbox (isolation=process), which has "
                "no /input or /output: files need --isolation forkserver or bwrap",
            )
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
            for frame in _file_frames(result):
                await context.write(frame)
            await context.write(pb.ServerFrame(result=to_wire(result, cid)))
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
        limits = self._config.limits.lowered(requested)
        files = _check_files(start.files, limits.max_input_bytes)
        return ExecutionRequest(
            code=start.code,
            tools=tuple(names),
            timeout=min(timeout, self._config.max_execution_timeout),
            limits=limits,
            config=decode_json_object(start.config_json, "config"),
            context=decode_json_object(start.context_json, "context"),
            stream_output=start.stream_output,
            correlation_id=cid,
            files=files,
        )

    async def _run(
        self,
        request: ExecutionRequest,
        frames: AsyncIterator[pb.ClientFrame],
        context: grpc.aio.ServicerContext[pb.ClientFrame, pb.ServerFrame],
    ) -> RunOutcome:
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

        if request.files:
            # Admitted: the client waits for this before it sends the files' bytes.
            await context.send_initial_metadata(())
        inputs: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(maxsize=_QUEUED_CHUNKS)
        execution = asyncio.create_task(
            run_execution(
                self._backend,
                request,
                call_tool,
                on_output if request.stream_output else None,
                inputs,
            )
        )
        reader = asyncio.create_task(
            _read_client(frames, pending, execution, _FileChunks(request.files, inputs))
        )
        try:
            return await execution
        except asyncio.CancelledError:
            if not reader.done() or reader.cancelled():
                raise
            if isinstance(reader.exception(), _ClientProtocolError):
                raise reader.exception() from None  # type: ignore[misc]
            if reader.result() == "cancel":
                return RunOutcome(
                    error_type=ErrorType.CANCELLED,
                    error_message="the application cancelled the execution",
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
        files=[pb.FileInfo(name=name, size=len(data)) for name, data in outcome.files],
    )


def _file_frames(outcome: RunOutcome) -> Iterator[pb.ServerFrame]:
    """The output files' chunks, sent before the result that lists them."""
    for name, data in outcome.files:
        for at in range(0, len(data), FILE_CHUNK_BYTES):
            chunk = pb.FileChunk(name=name, data=data[at : at + FILE_CHUNK_BYTES])
            yield pb.ServerFrame(file=chunk)


def _check_files(files: Sequence[pb.FileInfo], limit: int) -> tuple[FileInfo, ...]:
    """The declared input files, checked; raises ``ValueError``."""
    if len(files) > MAX_INPUT_FILES:
        raise ValueError(f"{len(files)} input files; at most {MAX_INPUT_FILES} are accepted")
    names = set()
    for info in files:
        problem = file_name_problem(info.name)
        if problem is not None:
            raise ValueError(f"input file: {problem}")
        if info.name in names:
            raise ValueError(f"input file {info.name!r} is declared twice")
        if info.size < 0:
            raise ValueError(f"input file {info.name!r} has a negative size")
        names.add(info.name)
    total = sum(info.size for info in files)
    if total > limit:
        raise ValueError(
            f"the input files are {total} bytes; this executor's limit is {limit} "
            "(limits.max_input_bytes)"
        )
    return tuple(FileInfo(info.name, info.size) for info in files)


class _FileChunks:
    """Checks the client's file chunks against the declared files and queues them in order."""

    def __init__(
        self, files: tuple[FileInfo, ...], queue: asyncio.Queue[tuple[str, bytes]]
    ) -> None:
        #: (name, bytes still to come) of the files still open, the next one last.
        self._todo = [(f.name, f.size) for f in reversed(files) if f.size > 0]
        self._queue = queue

    async def put(self, chunk: pb.FileChunk) -> None:
        if not self._todo:
            raise _ClientProtocolError(f"a chunk of file {chunk.name!r}, which was not declared")
        name, left = self._todo.pop()
        size = len(chunk.data)
        if chunk.name != name or size > left or size > FILE_CHUNK_BYTES:
            raise _ClientProtocolError(
                f"file chunk for {chunk.name!r} ({size} bytes) does not follow the declared "
                f"files (next: {name!r}, {left} bytes left)"
            )
        if size < left:
            self._todo.append((name, left - size))
        await self._queue.put((chunk.name, chunk.data))


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
    files: _FileChunks,
) -> str:
    """Route file chunks and tool results; a cancel frame or a protocol error stops the run."""
    try:
        async for frame in frames:
            kind = frame.WhichOneof("frame")
            if kind == "file":
                await files.put(frame.file)
            elif kind == "tool_result":
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
