"""``ExecutorClient``: runs programs on an executor and serves their tool calls.

One execution is one bidirectional gRPC stream. :meth:`ExecutorClient.stream` is the
implementation: it yields output, tool-call and result events as they happen, answering each
tool call from the registry on the way; :meth:`ExecutorClient.execute_async` collects it, and
:meth:`ExecutorClient.execute` wraps that for sync callers.

Errors are drawn in :mod:`codemode.core.errors` and re-exported here.

One module past the usual size: the public execution API, each method with its documented
signature (the seed document's contract), and the one attempt loop they all share (retries,
failover with replay, redaction, tracing, pauses). What stands apart is elsewhere: the wire
exchange in :mod:`._exchange`, pausing and resuming in :mod:`._resume`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import threading
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio

from codemode.config import ClientConfig
from codemode.config._defaults import DEADLINE_MARGIN_S, REFUSED_GRACE_S
from codemode.core._exchange import (
    LIMIT_FIELDS,
    Prepared,
    check_files,
    exchange,
    in_background,
    limit_fields,
    new_correlation_id,
    rpc_error,
)
from codemode.core._lifecycle import Closing
from codemode.core._request import Request
from codemode.core._resume import paused_result, resumed_request
from codemode.core.approvals import (
    ApprovalGate,
    PauseSignal,
    tool_needs_approval,
)
from codemode.core.budget import Redaction, Redactor, ToolBudget
from codemode.core.channel import open_channel
from codemode.core.context import RuntimeContext, current_context
from codemode.core.errors import (
    ExecutionError,
    ExecutorAuthenticationError,
    ExecutorClientError,
    ExecutorConnectionError,
    ExecutorOverloadedError,
    ExecutorRequestError,
    ExecutorTimeoutError,
    InvalidRequestError,
)
from codemode.core.journal import (
    STEP_TOOL,
    JournalStore,
    MemoryJournalStore,
    Recorder,
    SqliteJournalStore,
    binding_of,
)
from codemode.core.registry import ComponentRegistry
from codemode.core.results import (
    ExecutionEvent,
    ExecutionResult,
    OutputEvent,
    ResultEvent,
)
from codemode.core.retry import RetryPolicy
from codemode.core.session import Session
from codemode.tracing import start_execution
from codemode.wire import codemode_pb2 as pb
from codemode.wire import codemode_pb2_grpc as pb_grpc
from codemode.wire.names import (
    AUTHORIZATION,
    CORRELATION_ID,
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
        self._journals: JournalStore | None = None
        urls = self.config.executor_url
        #: Whether a failed executor leaves another to fail over to (several, or DNS's).
        self.fails_over = self.config.failover == "replay" and (
            "," in urls or urls.startswith("dns:")
        )

    # Lifecycle -----------------------------------------------------------------------------

    @property
    def journals(self) -> JournalStore:
        """Where this client keeps tool-call journals: ``ClientConfig.journal_path`` (SQLite),
        else memory."""
        with self._lock:
            if self._journals is None:
                path = self.config.journal_path
                self._journals = MemoryJournalStore() if path is None else SqliteJournalStore(path)
            return self._journals

    @property
    def journaling(self) -> bool:
        """Whether executions keep a journal: when a failover can use it (several executors),
        or in a file (``journal_path``); approvals always do. With one executor and no file
        there is nothing to replay on, and tool calls skip the recording."""
        return self.fails_over or self.config.journal_path is not None

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
        venv's, as ``{"name", "version"}``) and ``preload_modules``; sessions (``max_sessions``,
        ``open_sessions``, ``max_session_ttl_seconds``). Raises the errors of
        :mod:`codemode.core.errors`."""
        try:
            reply = await pb_grpc.ExecutorStub(self._channel()).Info(
                pb.InfoRequest(), timeout=self.config.connect_timeout, metadata=self._auth
            )
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, "", sent=False) from None
        return {
            "version": reply.version,
            "isolation": reply.isolation,
            "isolated": reply.isolated,
            "warnings": list(reply.warnings),
            "limits": {name: getattr(reply.limits, name) for name in LIMIT_FIELDS},
            "max_execution_timeout_seconds": reply.max_execution_timeout_seconds,
            "max_concurrent_executions": reply.max_concurrent_executions,
            "running_executions": reply.running_executions,
            "packages": [{"name": p.name, "version": p.version} for p in reply.packages],
            "preload_modules": list(reply.preload_modules),
            "max_sessions": reply.max_sessions,
            "open_sessions": reply.open_sessions,
            "max_session_ttl_seconds": reply.max_session_ttl_seconds,
        }

    # Sessions ------------------------------------------------------------------------------

    def session(
        self, *, ttl: float | None = None, limits: Mapping[str, float] | None = None
    ) -> Session:
        """A :class:`~codemode.core.session.Session` on this client's executor, not yet open:
        ``async with client.session(ttl=600) as s: await s.execute_async(code)``."""
        return Session(self, ttl=ttl, limits=limits)

    async def open_session(
        self, *, ttl: float | None = None, limits: Mapping[str, float] | None = None
    ) -> Session:
        """An open :meth:`session`; end it with ``await session.close_async()``."""
        session = self.session(ttl=ttl, limits=limits)
        await session.open_async()
        return session

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
        budget: ToolBudget | None = None,
        redact: Redaction | None = None,
    ) -> ExecutionResult:
        """Run ``code`` and return its outcome; a failed program is a failed result, not an error.

        ``available_tools`` are the registry's tools the program may call (default: all).
        ``config`` becomes the program's read-only ``config``; ``context`` (default: the
        current task's context) its ``context`` and what ``run_with_context`` tools receive.
        ``execution_timeout`` (seconds, default ``config.timeout``) is enforced by the executor.
        ``limits`` lowers the executor's limits for this run. ``files`` (name to bytes) are
        placed read-only under ``/input`` before the program starts; what it leaves in
        ``/output`` comes back as ``ExecutionResult.files``. ``budget`` bounds its tool calls
        (a call past it raises ``ToolBudgetExceeded`` in the program, and
        ``ExecutionResult.budget_exceeded`` names the budget); ``redact`` (secret strings, or a
        callable of the text) is applied to its output, result and the client's log lines.

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
                budget=budget,
                redact=redact,
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
        budget: ToolBudget | None = None,
        redact: Redaction | None = None,
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
            budget=budget,
            redact=redact,
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
        budget: ToolBudget | None = None,
        redact: Redaction | None = None,
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
                budget=budget,
                redact=redact,
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
        """:meth:`stream` for a built request: attempts, with retries where nothing ran, and
        failover with replay where the program ran on an executor that died."""
        prepared = self._prepare(request)
        cid = prepared.correlation_id
        try:
            redactor = Redactor(request.redact) if request.redact is not None else None
        except TypeError as exc:
            raise InvalidRequestError(str(exc), correlation_id=cid) from None
        recorder = Recorder(self.journals, cid, prepared.binding) if prepared.binding else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + prepared.start.timeout_seconds
        attempt, waited, failovers = 0, 0.0, 0
        # The connect timeout bounds the whole call (its retries too), not each attempt.
        connect_by = loop.time() + self.config.connect_timeout
        shown = _Shown()
        keep_journal = False
        span = start_execution(cid, prepared.start.code, prepared.start.tools)
        if span is not None:
            prepared = dataclasses.replace(prepared, trace=span)
        try:
            while True:
                shown.new_attempt()
                if span is not None:
                    span.attempt()
                try:
                    async for event in self._stream_once(prepared, recorder, redactor, connect_by):
                        if isinstance(event, OutputEvent):
                            unseen = shown.unseen(event)
                            if unseen is not None and redactor is not None:
                                unseen = redactor.chunk(unseen)
                            if unseen is None:
                                continue
                            event = unseen
                        elif isinstance(event, ResultEvent):
                            result = event.result
                            if recorder is not None:
                                result = dataclasses.replace(
                                    result,
                                    attempts=failovers + 1,
                                    replayed_tool_calls=recorder.replayed,
                                )
                            if redactor is not None:
                                for held in redactor.flush():
                                    yield held
                                result = redactor.result(result)
                            event = ResultEvent(result)
                            if span is not None:
                                span.finished(
                                    success=result.success,
                                    error_type=result.error_type,
                                    tool_calls=result.tool_calls,
                                    replayed=result.replayed_tool_calls,
                                )
                        yield event
                    return
                except PauseSignal as signal:
                    assert recorder is not None  # approvals always keep a journal
                    keep_journal = True
                    paused = paused_result(self.journals, request, prepared, signal.call)
                    if span is not None:
                        span.finished(
                            success=False,
                            error_type=paused.error_type,
                            tool_calls=0,
                            replayed=recorder.replayed,
                            paused=True,
                        )
                    yield ResultEvent(paused)
                    return
                except ExecutorClientError as exc:
                    left = deadline - loop.time()
                    if (
                        recorder is not None
                        and self.fails_over
                        and isinstance(exc, ExecutorConnectionError)
                        and exc.may_have_run
                        and left > 0
                    ):
                        failovers += 1
                        if span is not None:
                            span.failover(exc.status or type(exc).__name__)
                        logger.warning(
                            "executor lost mid-execution (%s); running it again on another "
                            "with replay (failover %d, %.1fs left)",
                            exc.status or type(exc).__name__,
                            failovers,
                            left,
                            extra={"correlation_id": cid},
                        )
                        recorder.rewind()
                        prepared = prepared.with_timeout(left)
                        connect_by = loop.time() + self.config.connect_timeout
                        continue
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
                    if span is not None:
                        span.retry(type(exc).__name__, delay)
                    await asyncio.sleep(delay)
                    attempt, waited = attempt + 1, waited + delay
        except BaseException as exc:
            if span is not None:
                span.failed(exc)
            raise
        finally:
            if recorder is not None and not keep_journal:
                recorder.discard()
            if span is not None:
                span.end()

    async def resume(
        self, execution_id: str, *, approve: bool, redact: Redaction | None = None
    ) -> ExecutionResult:
        """Run a paused execution again, its earlier calls replayed from the journal: the
        paused call is made (``approve=True``) or raises ``PermissionError`` in the program.

        It may pause again at a later call. Raises :class:`ExecutionNotPausedError` for an
        unknown, expired or already resumed id (of two concurrent resumes, one proceeds), and
        :class:`~codemode.core.journal.JournalMismatchError` when the tools it declared are
        no longer those of the registry.
        """
        request = resumed_request(
            self.journals, self.config.paused_ttl, execution_id, approve=approve, redact=redact
        )
        return await self._execute(request)

    def _prepare(self, request: Request) -> Prepared:
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
        needs = frozenset(n for n, t in tools.items() if tool_needs_approval(t))
        policy = self.registry.approval_policy
        gate = None
        if needs or policy is not None:
            gate = ApprovalGate(
                policy, needs, dict(request.decisions or {}), self.config.max_pauses
            )
        binding = ""
        if self.journaling or gate is not None:
            # codemode.step() in the program: its values are journaled like tool answers.
            specs.append(pb.ToolSpec(name=STEP_TOOL))
            binding = binding_of(code, names)
        try:
            config_json = json.dumps(dict(request.config or {}), separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(
                f"config must be JSON-serialisable: {exc}", correlation_id=cid
            ) from None
        files = check_files(request.files, cid)
        start = pb.StartExecution(
            code=code,
            tools=specs,
            config_json=config_json,
            context_json=context.to_json(),
            timeout_seconds=timeout,
            limits=pb.Limits(**limit_fields(request.limits)),
            stream_output=request.stream_output,
            files=[pb.FileInfo(name=name, size=len(data)) for name, data in files],
        )
        return Prepared(
            start,
            context.with_correlation_id(cid),
            tools,
            cid,
            files,
            binding,
            request.budget,
            gate,
        )

    async def _stream_once(
        self,
        prepared: Prepared,
        recorder: Recorder | None = None,
        redactor: Redactor | None = None,
        connect_by: float | None = None,
    ) -> AsyncIterator[ExecutionEvent]:
        """One attempt: open the stream, send the start frame, relay until the result."""
        channel = self._channel()
        await self._wait_connected(channel, prepared.correlation_id, connect_by)
        trace = prepared.trace.metadata if prepared.trace is not None else ()
        call = pb_grpc.ExecutorStub(channel).Execute(
            metadata=(*self._auth, (CORRELATION_ID, prepared.correlation_id), *trace),
            timeout=prepared.start.timeout_seconds + DEADLINE_MARGIN_S,
        )
        try:
            async for event in exchange(
                call, prepared, self.config.tool_timeout, recorder, redactor
            ):
                yield event
        finally:
            call.cancel()

    async def _wait_connected(
        self, channel: grpc.aio.Channel, cid: str, connect_by: float | None = None
    ) -> None:
        """Wait until the channel is ready, until ``connect_by`` (loop time; default
        ``connect_timeout`` from now). An address that keeps refusing connections for
        ``REFUSED_GRACE_S`` fails at once (``refused``); one that accepts but is slow to
        answer gets the whole time."""
        ready = grpc.ChannelConnectivity.READY
        state = channel.get_state(try_to_connect=True)
        if state is ready:
            return
        loop = asyncio.get_running_loop()
        if connect_by is None:
            connect_by = loop.time() + self.config.connect_timeout
        failing_since: float | None = None
        while state is not ready:
            now = loop.time()
            if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE and failing_since is None:
                failing_since = now
            if failing_since is not None and now - failing_since >= REFUSED_GRACE_S:
                raise ExecutorConnectionError(
                    f"the executor at {self.config.executor_url} refuses connections: nothing "
                    "listens there; check that `codemode serve` runs at executor_url",
                    may_have_run=False,
                    refused=True,
                    correlation_id=cid,
                    status="UNAVAILABLE",
                )
            left = connect_by - now
            if left <= 0:
                raise ExecutorConnectionError(
                    f"cannot connect to the executor at {self.config.executor_url} within "
                    f"{self.config.connect_timeout:g}s; check that `codemode serve` runs there",
                    may_have_run=False,
                    correlation_id=cid,
                    status="UNAVAILABLE",
                )
            if failing_since is not None:
                left = min(left, failing_since + REFUSED_GRACE_S - now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(channel.wait_for_state_change(state), left)
            state = channel.get_state(try_to_connect=True)


class _Shown:
    """How much of each output stream was yielded, so that a re-run after a failover (which
    prints the same again) yields only what is new."""

    def __init__(self) -> None:
        self.yielded = {"stdout": 0, "stderr": 0}
        self.seen = {"stdout": 0, "stderr": 0}

    def new_attempt(self) -> None:
        self.seen = {"stdout": 0, "stderr": 0}

    def unseen(self, event: OutputEvent) -> OutputEvent | None:
        start = self.seen[event.stream]
        end = self.seen[event.stream] = start + len(event.text)
        already = self.yielded[event.stream]
        if end <= already:
            return None
        self.yielded[event.stream] = end
        return (
            event if start >= already else OutputEvent(event.stream, event.text[already - start :])
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
        in_background(channel.close())
    elif loop.is_running():
        asyncio.run_coroutine_threadsafe(channel.close(), loop)
    else:
        loop.run_until_complete(channel.close())


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
