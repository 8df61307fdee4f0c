"""One execution exchanged on an open stream, and the checks and encodings around it.

:func:`exchange` is the client's half of the wire protocol for one execution: the start frame,
the input files, tool calls answered from the registry (each in its own task), output and
output files collected, then the result. ``ExecutorClient`` runs it on an ``Execute`` stream,
a :class:`~codemode.core.session.Session` on its own stream, once per execution.

One module past the usual size: the tool relay's concerns (the journal, the budget, approvals,
tracing) all act on one tool call's life, in one task, in order; split, each would reach into
the others' state. The journal, budgets, approvals and tracing themselves live in their own
modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

import grpc
import grpc.aio

from codemode.config._defaults import CANCEL_NOTICE_S, FILE_CHUNK_BYTES
from codemode.core.approvals import ApprovalGate, PauseSignal, PendingCall
from codemode.core.budget import BUDGET_ERROR, BudgetMeter, Redactor, ToolBudget
from codemode.core.context import RuntimeContext, current_correlation_id
from codemode.core.errors import (
    ExecutorClientError,
    ExecutorConnectionError,
    InvalidRequestError,
    error_from_rpc,
)
from codemode.core.journal import STEP_TOOL, JournalEntry, Recorder, canonical_arguments
from codemode.core.registry import call_tool
from codemode.core.results import (
    ExecutionEvent,
    ExecutionResult,
    OutputEvent,
    ResultEvent,
    ToolCallEvent,
    ToolResultEvent,
)
from codemode.tracing import ExecutionSpan, ToolCallSpan
from codemode.wire import codemode_pb2 as pb
from codemode.wire.names import MAX_INPUT_FILES, NOT_STARTED_TRAILER, file_name_problem

logger = logging.getLogger("codemode.client")
T = TypeVar("T")


def new_correlation_id() -> str:
    """A fresh correlation id (32 hex characters)."""
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class Prepared:
    """A checked request: its start frame, and what answering its tool calls needs."""

    start: pb.StartExecution
    context: RuntimeContext  # carrying the correlation id, for run_with_context tools
    tools: Mapping[str, Any]
    correlation_id: str
    files: tuple[tuple[str, bytes], ...] = ()
    #: What its journal is bound to (:func:`~codemode.core.journal.binding_of`); "" for none.
    binding: str = ""
    budget: ToolBudget | None = None
    approvals: ApprovalGate | None = None
    #: The execution's span, when tracing is on: the parent of its tool calls' spans.
    trace: ExecutionSpan | None = None

    def with_timeout(self, seconds: float) -> Prepared:
        """This request with ``seconds`` left to run (a re-run within the first deadline)."""
        start = pb.StartExecution()
        start.CopyFrom(self.start)
        start.timeout_seconds = seconds
        return replace(self, start=start)


async def exchange(
    call: Any,
    prepared: Prepared,
    tool_timeout: float,
    recorder: Recorder | None = None,
    redactor: Redactor | None = None,
) -> AsyncIterator[ExecutionEvent]:
    """One execution on an open stream: start frame, files, tool calls answered, the result.

    The stream is an ``Execute`` call (one execution) or a session's (one of several). A
    cancelled caller tells the executor with a ``Cancel`` frame; a failed call raises the
    :mod:`codemode.core.errors` exception its status maps to. With a ``recorder``, tool
    calls its journal holds are answered from it (no event is yielded for them), new ones are
    recorded, and a lost stream first lets the calls in flight finish, so that they are
    recorded too. The request's budget is metered here, per attempt (a re-run replays the
    same calls); ``redactor`` cleans the relay's log lines.
    """
    cid = prepared.correlation_id
    meter = BudgetMeter(prepared.budget) if prepared.budget is not None else None
    relay = _ToolRelay(
        call, prepared.tools, prepared.context, cid, tool_timeout, recorder, meter, redactor
    )
    if prepared.approvals is not None:
        relay.pausing = asyncio.get_running_loop().create_future()
        relay.gate = prepared.approvals
    relay.trace = prepared.trace
    sent = False
    try:
        try:
            await call.write(pb.ClientFrame(start=prepared.start))
        except asyncio.InvalidStateError:
            # The call had already ended (a session the executor closed): its status says why.
            raise error_from_rpc(
                await call.code(),
                await call.details() or "",
                correlation_id=cid,
                not_started=True,
                sent=False,
            ) from None
        sent = True
        if prepared.files:
            # The executor sends its headers once it has admitted the execution: only then
            # do the files go (a refusal racing a large upload would reset the stream).
            await call.initial_metadata()
            try:
                for chunk in file_chunks(prepared.files):
                    await call.write(pb.ClientFrame(file=chunk))
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass  # the executor ended the call: the read below says why
        received = _Files()
        while True:
            if relay.pausing is None:
                frame = await read_shielded(call)
            else:  # a call that needs approval may pause the execution instead
                frame = await relay.read_or_pause(call)
            if frame is grpc.aio.EOF:
                await relay.settle()
                raise ExecutorConnectionError(
                    "executor ended the stream without a result; the program may have run",
                    may_have_run=True,
                    correlation_id=cid,
                )
            kind = frame.WhichOneof("frame")
            if kind == "tool_call":
                started = relay.start(frame.tool_call)
                if started is not None:
                    yield started
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
                result = result_from_wire(frame.result, cid, received.take(frame.result))
                if meter is not None and meter.exceeded is not None:
                    result = replace(result, budget_exceeded=meter.exceeded)
                yield ResultEvent(result)
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
        await relay.settle()
        raise rpc_error(exc, cid, sent) from None
    finally:
        relay.cancel()


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
        recorder: Recorder | None = None,
        meter: BudgetMeter | None = None,
        redactor: Redactor | None = None,
    ) -> None:
        self._call = call
        self._recorder = recorder
        self._meter = meter
        self._redactor = redactor
        self.gate: ApprovalGate | None = None
        self.trace: ExecutionSpan | None = None
        #: Set to the call that paused the execution (when approvals apply).
        self.pausing: asyncio.Future[PendingCall] | None = None
        self._tools = tools
        self._context = context
        self._cid = cid
        self._timeout = tool_timeout
        self._tasks: set[asyncio.Task[ToolResultEvent | None]] = set()
        self._done: list[ToolResultEvent] = []
        self._write_lock = asyncio.Lock()
        #: The answer being written now: never cancelled (see :meth:`cancel`).
        self._writing: asyncio.Task[Any] | None = None

    def start(self, frame: pb.ToolCall) -> ToolCallEvent | None:
        """Answer one tool call in a task of its own; its event, or None when it is replayed.

        Raises :class:`~codemode.core.journal.ReplayDivergedError` when the journal holds
        another call at this point: nothing is called then.
        """
        try:
            arguments = json.loads(frame.arguments_json or b"{}")
            args, kwargs = list(arguments.get("args", [])), dict(arguments.get("kwargs", {}))
        except (ValueError, AttributeError, TypeError):
            args, kwargs = [], {}
        name = frame.tool
        journal: tuple[int, str] | None = None
        if self._recorder is not None:
            # A step is matched by its name: its value is what differs between runs.
            canonical = canonical_arguments(args[:1] if name == STEP_TOOL else args, kwargs)
            seq, entry = self._recorder.take(name, canonical)
            if entry is not None:
                if self._meter is not None and name != STEP_TOOL:
                    self._meter.replayed(name, len(entry.value_json))
                self._spawn(self._replay(frame.call_id, entry))
                return None
            journal = (seq, canonical)
        size = len(frame.arguments_json)
        self._spawn(self._answer(frame.call_id, name, args, kwargs, journal, size))
        return ToolCallEvent(frame.call_id, name, args, kwargs)

    def _spawn(self, coro: Coroutine[Any, Any, ToolResultEvent | None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._collect)

    def _collect(self, task: asyncio.Task[ToolResultEvent | None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is None:
            event = task.result()
            if event is not None:
                self._done.append(event)

    async def read_or_pause(self, call: Any) -> Any:
        """The next frame; or, once a call paused the execution, ``Cancel`` sent (the sandbox
        is released), the other calls in flight settled, and :class:`PauseSignal` raised."""
        assert self.pausing is not None
        read = in_background(call.read())
        if not self.pausing.done():
            await asyncio.wait({read, self.pausing}, return_when=asyncio.FIRST_COMPLETED)
        if read.done():
            return read.result()
        await self.send_cancel(CANCEL_NOTICE_S)
        await self.settle()
        raise PauseSignal(self.pausing.result())

    async def settle(self) -> None:
        """Let the answers in flight finish (within the tool timeout), so they are recorded."""
        if self._recorder is not None and self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self._timeout)

    async def _replay(self, call_id: str, entry: JournalEntry) -> None:
        """Answer a call from the journal: the tool does not run again."""
        reply = pb.ToolResult(
            call_id=call_id,
            ok=entry.ok,
            value_json=entry.value_json,
            error_type=entry.error_type,
            error_message=entry.error_message,
        )
        await self._write(reply)

    def finished(self) -> list[ToolResultEvent]:
        done, self._done = self._done, []
        return done

    def cancel(self) -> None:
        """Stop the answers still running, but the one being written.

        grpc.aio cancels the whole call with a cancelled write, and that write may already
        have reached the program that then finished: on a session's stream, cancelling it
        would end the session. The executor ignores an answer to a call of an ended execution.
        """
        for task in self._tasks:
            if task is not self._writing:
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

        task = in_background(write())
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                await asyncio.shield(task)

    async def _answer(
        self,
        call_id: str,
        name: str,
        args: list[Any],
        kwargs: dict[str, Any],
        journal: tuple[int, str] | None,
        size: int = 0,
    ) -> ToolResultEvent | None:
        """:meth:`_respond`, in a span of its own when tracing is on (``size``: the
        arguments' bytes); a step's value is no tool call and gets none."""
        if self.trace is None or name == STEP_TOOL:
            return await self._respond(call_id, name, args, kwargs, journal, None)
        with self.trace.tool_call(name, size) as span:
            return await self._respond(call_id, name, args, kwargs, journal, span)

    async def _respond(
        self,
        call_id: str,
        name: str,
        args: list[Any],
        kwargs: dict[str, Any],
        journal: tuple[int, str] | None,
        span: ToolCallSpan | None,
    ) -> ToolResultEvent | None:
        started = time.perf_counter()
        meter = self._meter
        refused = meter.admit(name) if meter is not None and name != STEP_TOOL else None
        denied = None
        if refused is None and journal is not None and self.gate is not None:
            denied = await self._approve(journal[0], name, args, kwargs)
            if denied is _PAUSE:
                if span is not None:
                    span.paused()
                return None  # no answer: the execution pauses here
        if refused is not None:
            reply = _tool_error(BUDGET_ERROR, refused)
        elif denied is not None:
            reply = _tool_error("PermissionError", denied)
        else:
            reply = await self._run(name, args, kwargs)
            if meter is not None and name != STEP_TOOL:
                over = meter.spent(started, len(reply.value_json))
                if over is not None:
                    reply = _tool_error(BUDGET_ERROR, over)
        if journal is not None and self._recorder is not None:
            seq, canonical = journal
            entry = JournalEntry(
                seq,
                name,
                canonical,
                reply.ok,
                reply.value_json,
                reply.error_type,
                reply.error_message,
            )
            self._recorder.record(entry)
        reply.call_id = call_id
        if span is not None:
            span.answered(len(reply.value_json), reply.error_type)
        if not reply.ok:
            message = reply.error_message
            logger.info(
                "tool %s failed: %s: %s",
                name,
                reply.error_type,
                self._redactor.text(message) if self._redactor is not None else message,
                extra={"correlation_id": self._cid},
            )
        await self._write(reply)
        return ToolResultEvent(
            call_id,
            name,
            reply.ok,
            (time.perf_counter() - started) * 1000,
            reply.error_type or None,
        )

    async def _approve(
        self, seq: int, name: str, args: list[Any], kwargs: dict[str, Any]
    ) -> str | None:
        """None: make the call; a reason: refuse it; :data:`_PAUSE`: pause the execution."""
        gate = self.gate
        if gate is None or name == STEP_TOOL or not gate.applies(name):
            return None
        pending = PendingCall(seq, name, args, kwargs)
        decision = await gate.decide(pending, self._context)
        if decision == "pause":
            if self.pausing is not None and not self.pausing.done():
                self.pausing.set_result(pending)
            return _PAUSE
        if decision is True:
            return None
        return (
            decision
            if isinstance(decision, str)
            else f"the application refused {pending.describe()}"
        )

    async def _write(self, reply: pb.ToolResult) -> None:
        async with self._write_lock:
            self._writing = asyncio.current_task()
            try:
                await self._call.write(pb.ClientFrame(tool_result=reply))
            finally:
                self._writing = None

    async def _run(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> pb.ToolResult:
        if name == STEP_TOOL and self._recorder is not None:
            # codemode.step(name, value): the first run's value, now recorded, is the answer.
            if len(args) != 2 or not isinstance(args[0], str):
                return _tool_error("TypeError", "codemode.step(name, fn) takes a name and fn")
            return pb.ToolResult(ok=True, value_json=json.dumps(args[1]).encode())
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
        current_correlation_id.set(self._cid)  # this task's copy; the tool's thread gets it too
        timeout = self._timeout
        budgeted = self._meter.time_left() if self._meter is not None else None
        if budgeted is not None and budgeted < timeout:
            timeout = budgeted
        deadline = asyncio.timeout(timeout)  # no extra task, unlike wait_for
        try:
            async with deadline:
                value = await call_tool(tool, args, kwargs, self._context, name=name)
        except TimeoutError as exc:
            if not deadline.expired():  # the tool's own TimeoutError, not the relay's
                return _tool_error(type(exc).__name__, str(exc))
            if timeout < self._timeout and self._meter is not None:
                return _tool_error(BUDGET_ERROR, self._meter.timed_out())
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


#: What :meth:`_ToolRelay._approve` returns for a call that pauses the execution.
_PAUSE = "\0pause"

LIMIT_FIELDS = {f.name: f for f in pb.Limits.DESCRIPTOR.fields}


def limit_fields(limits: Mapping[str, float] | None) -> dict[str, Any]:
    """Requested limit overrides as ``pb.Limits`` fields; unknown names are a clear error."""
    out: dict[str, Any] = {}
    for name, value in (limits or {}).items():
        field = LIMIT_FIELDS.get(name)
        if field is None:
            known = ", ".join(sorted(LIMIT_FIELDS))
            raise InvalidRequestError(f"unknown limit {name!r}; known: {known}")
        out[name] = float(value) if field.cpp_type == field.CPPTYPE_DOUBLE else int(value)
    return out


async def read_shielded(call: Any) -> Any:
    """``call.read()``, shielded from the caller's cancellation.

    grpc.aio cancels the whole call when a pending read is cancelled; shielded, the call
    outlives the cancelled caller long enough to send ``Cancel``. The read ends with the call.
    """
    read = in_background(call.read())
    return await asyncio.shield(read)


def _tool_error(error_type: str, message: str) -> pb.ToolResult:
    return pb.ToolResult(ok=False, error_type=error_type, error_message=message)


def result_from_wire(
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
        session_alive=result.session_alive,
    )


def check_files(files: Mapping[str, bytes] | None, cid: str) -> tuple[tuple[str, bytes], ...]:
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


def file_chunks(files: Sequence[tuple[str, bytes]]) -> Iterator[pb.FileChunk]:
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


def rpc_error(exc: grpc.aio.AioRpcError, cid: str, sent: bool) -> ExecutorClientError:
    trailers = exc.trailing_metadata() or ()
    not_started = any(k == NOT_STARTED_TRAILER for k, _ in trailers)
    return error_from_rpc(
        exc.code(), exc.details() or "", correlation_id=cid, not_started=not_started, sent=sent
    )


_BACKGROUND: set[asyncio.Task[Any]] = set()


def in_background(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """A task for ``coro``, kept alive until done; a failure nobody awaited is not logged."""
    task = asyncio.get_running_loop().create_task(coro)
    _BACKGROUND.add(task)
    task.add_done_callback(_forget)
    return task


def _forget(task: asyncio.Task[Any]) -> None:
    _BACKGROUND.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved, so that asyncio does not log it
