"""The service's side of one gRPC stream: its writes, and the client's frames routed.

An ``Execute`` stream carries one execution, a ``Session`` stream several in turn. Either way
one task reads the client's frames for the stream's whole life (:meth:`ClientStream.start_reading`)
and routes them to the execution running: file chunks to its ``/input``, tool results to the
calls waiting for them, a cancel frame to its task. A session's next start frame is queued
for the session's loop (:attr:`ClientStream.starts`); anything else out of place is a protocol
error that ends the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

import grpc.aio
from google.protobuf.message import DecodeError

from codemode.config._defaults import FILE_CHUNK_BYTES
from codemode.executor.run.outcome import FileInfo, RunOutcome, Stream, ToolReply
from codemode.executor.service.metrics import ExecutorMetrics
from codemode.wire import codemode_pb2 as pb
from codemode.wire.names import MAX_INPUT_FILES, ErrorType, file_name_problem

_STREAMS = {"stdout": pb.Output.STDOUT, "stderr": pb.Output.STDERR}
#: Input file chunks read ahead of the writes into the guest (backpressure on the stream).
_QUEUED_CHUNKS = 4
#: What :attr:`ClientStream.starts` yields when no start frame will come: the client closed
#: its side, broke the protocol, or the service is stopping.
END = None

Inputs = asyncio.Queue[tuple[str, bytes]]


#: What a stream's frames raise on bytes that are not a ``ClientFrame`` (grpc parses them).
MalformedFrame = DecodeError
MALFORMED = "the client sent bytes that are not a ClientFrame"


class ClientProtocolError(Exception):
    """The client sent a frame that makes no sense at this point."""


class ClientStream:
    """Writes to one stream and routes the client's frames to the execution running on it.

    Tool-call ids are unique over the stream, so that a late answer to a call of an earlier
    execution of a session finds its (abandoned) call rather than a stranger.
    """

    def __init__(
        self,
        frames: AsyncIterator[pb.ClientFrame],
        context: grpc.aio.ServicerContext[pb.ClientFrame, pb.ServerFrame],
        *,
        session: bool = False,
        metrics: ExecutorMetrics | None = None,
    ) -> None:
        self._frames = frames
        self._metrics = metrics
        self._context = context
        self._session = session
        self._pending: dict[str, asyncio.Future[pb.ToolResult]] = {}
        self._ids = itertools.count(1)
        self._write_lock = asyncio.Lock()
        self._files: FileChunks | None = None
        self._execution: asyncio.Task[RunOutcome] | None = None
        self._cancelled = False
        self._reader: asyncio.Task[None] | None = None
        #: Set when the client broke the protocol; the stream must then end with it.
        self.protocol_error: ClientProtocolError | None = None
        #: A session's next start frames, then :data:`END`.
        self.starts: asyncio.Queue[pb.StartExecution | None] = asyncio.Queue()

    async def write(self, frame: pb.ServerFrame) -> None:
        async with self._write_lock:
            await self._context.write(frame)

    async def call_tool(self, tool: str, arguments: bytes) -> ToolReply:
        call_id = str(next(self._ids))
        future = self._pending[call_id] = asyncio.get_running_loop().create_future()
        metrics = self._metrics
        started = time.perf_counter() if metrics is not None else 0.0
        try:
            await self.write(
                pb.ServerFrame(
                    tool_call=pb.ToolCall(call_id=call_id, tool=tool, arguments_json=arguments)
                )
            )
            answer = await future
        except asyncio.CancelledError:
            if metrics is not None:
                metrics.tool_call("abandoned", None)
            raise
        if metrics is not None:
            metrics.tool_call("ok" if answer.ok else "error", time.perf_counter() - started)
        return ToolReply(answer.ok, answer.value_json, answer.error_type, answer.error_message)

    async def on_output(self, stream: Stream, data: bytes) -> None:
        await self.write(pb.ServerFrame(output=pb.Output(stream=_STREAMS[stream], data=data)))

    async def write_outcome(self, outcome: RunOutcome, result: pb.ExecutionResult) -> None:
        """The output files' chunks, then the result that lists them."""
        for name, data in outcome.files:
            for at in range(0, len(data), FILE_CHUNK_BYTES):
                chunk = pb.FileChunk(name=name, data=data[at : at + FILE_CHUNK_BYTES])
                await self.write(pb.ServerFrame(file=chunk))
        await self.write(pb.ServerFrame(result=result))

    def start_reading(self) -> None:
        self._reader = asyncio.create_task(self._read())

    def stop_reading(self) -> None:
        if self._reader is not None:
            self._reader.cancel()

    def end_sessions(self) -> None:
        """Tell a session waiting for its next start frame that none will come."""
        self.starts.put_nowait(END)

    async def run(
        self,
        files: tuple[FileInfo, ...],
        execution: Callable[[Inputs], Coroutine[Any, Any, RunOutcome]],
    ) -> RunOutcome:
        """Run one execution, routing its file chunks and tool answers, until its outcome.

        ``execution(inputs)`` runs it, reading the chunks of ``files`` from ``inputs``. A
        cancel frame ends it as ``Cancelled``; a protocol error is raised.
        """
        inputs: Inputs = asyncio.Queue(maxsize=_QUEUED_CHUNKS)
        self._files = FileChunks(files, inputs)
        self._cancelled = False
        task = self._execution = asyncio.create_task(execution(inputs))
        try:
            return await task
        except asyncio.CancelledError:
            if self.protocol_error is not None:
                raise self.protocol_error from None
            if self._cancelled and not _cancelling():
                return RunOutcome(
                    error_type=ErrorType.CANCELLED,
                    error_message="the application cancelled the execution",
                )
            raise
        finally:
            self._execution = self._files = None
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def _read(self) -> None:
        try:
            async for frame in self._frames:
                if self._route(frame) == "file" and self._files is not None:
                    await self._files.put(frame.file)
            if self._files is not None and self._files.pending:
                raise ClientProtocolError("the stream ended before the declared input files")
        except (ClientProtocolError, MalformedFrame) as exc:
            if isinstance(exc, MalformedFrame):
                exc = ClientProtocolError(MALFORMED)
            self.protocol_error = exc
            if self._execution is not None:
                self._execution.cancel()
            self.starts.put_nowait(END)
            return
        # The client half-closed: calls still waiting can never be answered.
        for future in self._pending.values():
            if not future.done():
                future.set_result(
                    pb.ToolResult(
                        ok=False,
                        error_type="ConnectionError",
                        error_message="the application closed the stream",
                    )
                )
        self.starts.put_nowait(END)

    def _route(self, frame: pb.ClientFrame) -> str | None:
        """Deliver ``frame``, but a file chunk (which may wait for room); returns its kind."""
        kind = frame.WhichOneof("frame")
        if kind == "tool_result":
            future = self._pending.pop(frame.tool_result.call_id, None)
            if future is None:
                raise ClientProtocolError(
                    f"tool result for unknown call id {frame.tool_result.call_id!r}"
                )
            if not future.done():
                future.set_result(frame.tool_result)
        elif kind == "cancel":
            if self._execution is not None:
                self._cancelled = True
                self._execution.cancel()
        elif kind == "start" and self._session and self._execution is None:
            self.starts.put_nowait(frame.start)
        elif kind == "file":
            if self._files is None:
                raise ClientProtocolError("a file chunk with no execution to take it")
        else:
            what = "between executions" if self._execution is None else "after start"
            raise ClientProtocolError(f"unexpected {kind or 'empty'} frame {what}")
        return kind


def _cancelling() -> bool:
    """Whether the task running this was itself cancelled (not only what it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def check_files(files: Sequence[pb.FileInfo], limit: int) -> tuple[FileInfo, ...]:
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


class FileChunks:
    """Checks the client's file chunks against the declared files and queues them in order."""

    def __init__(self, files: tuple[FileInfo, ...], queue: Inputs) -> None:
        #: (name, bytes still to come) of the files still open, the next one last.
        self._todo = [(f.name, f.size) for f in reversed(files) if f.size > 0]
        self._queue = queue

    @property
    def pending(self) -> bool:
        """Whether bytes of declared files are still to come."""
        return bool(self._todo)

    async def put(self, chunk: pb.FileChunk) -> None:
        if not self._todo:
            raise ClientProtocolError(f"a chunk of file {chunk.name!r}, which was not declared")
        name, left = self._todo.pop()
        size = len(chunk.data)
        if chunk.name != name or size > left or size > FILE_CHUNK_BYTES:
            raise ClientProtocolError(
                f"file chunk for {chunk.name!r} ({size} bytes) does not follow the declared "
                f"files (next: {name!r}, {left} bytes left)"
            )
        if size < left:
            self._todo.append((name, left - size))
        await self._queue.put((chunk.name, chunk.data))
