"""Sessions: one sandbox kept on one executor between executions.

::

    async with codemode.session(ttl=600) as s:
        await s.execute_async("import pandas as pd; df = pd.DataFrame({'a': [1, 2]})")
        await s.execute_async("result = int(df.a.sum())")   # "3"

A session is one ``Session`` stream to one executor (see ``codemode.proto``), so it is pinned
there by construction; its executions run one at a time, in the order they are called.
Variables, imports and the files in ``/input`` and ``/output`` survive from one to the next.
Wall time applies to each execution; CPU time, memory, processes and disk to the whole session. An
execution that ends the sandbox (a limit, a crash, cancelling it) says so in
``ExecutionResult.session_alive``; the session is then lost and the next call raises
:class:`SessionLostError` until :meth:`Session.reset` opens a fresh sandbox. Nothing is ever
re-created silently.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import grpc
import grpc.aio

from codemode.config._defaults import DEADLINE_MARGIN_S
from codemode.core._exchange import (
    exchange,
    limit_fields,
    new_correlation_id,
    read_shielded,
    rpc_error,
)
from codemode.core._request import Request
from codemode.core.context import RuntimeContext
from codemode.core.errors import (
    ExecutorClientError,
    ExecutorConnectionError,
    ExecutorTimeoutError,
    SessionClosedError,
    SessionExpiredError,
    SessionLostError,
)
from codemode.core.results import ExecutionEvent, ExecutionResult, ResultEvent, unwrap
from codemode.tracing import current_metadata, start_execution
from codemode.wire import codemode_pb2 as pb
from codemode.wire import codemode_pb2_grpc as pb_grpc
from codemode.wire.names import CORRELATION_ID

if TYPE_CHECKING:
    from codemode.core.executor_client import ExecutorClient

__all__ = ["Session"]


class Session:
    """A sandbox kept between executions; made by ``Codemode.session()`` or
    ``ExecutorClient.session()``.

    ``ttl`` (seconds; default the executor's ``default_session_ttl``, capped by its
    ``max_session_ttl``) bounds the session's whole life; the executor also ends it after
    ``session_idle_timeout`` without an execution. ``limits`` lowers the executor's limits for
    the whole session. Use it as ``async with``, or call :meth:`open_async` and
    :meth:`close_async`. It belongs to the event loop it was opened on.
    """

    def __init__(
        self,
        client: ExecutorClient,
        *,
        ttl: float | None = None,
        limits: Mapping[str, float] | None = None,
        correlation_id: str | None = None,
    ) -> None:
        if ttl is not None and not ttl > 0:
            raise ValueError("ttl must be a positive number of seconds")
        self._client = client
        self._ttl = ttl
        self._limits = dict(limits or {})
        #: The session's own correlation id, on the executor's session log lines.
        self.correlation_id = correlation_id or new_correlation_id()
        #: The executor's id of the session, once open.
        self.session_id: str | None = None
        #: The TTL and idle timeout the executor granted, seconds.
        self.ttl: float | None = None
        self.idle_timeout: float | None = None
        self._call: Any = None
        self._lock = asyncio.Lock()
        self._expires = 0.0
        self._lost: SessionLostError | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # Lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.open_async()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close_async()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def alive(self) -> bool:
        """Whether the session is open and its sandbox still holds its state."""
        return self._call is not None and self._lost is None and not self._closed

    async def open_async(self) -> None:
        """Open the session: the executor starts its sandbox. Raises the errors of
        :mod:`codemode.core.errors` (``ExecutorOverloadedError`` beyond ``max_sessions``)."""
        if self._closed:
            raise SessionClosedError("this session is closed; open a new one")
        if self._call is not None:
            return
        client, cid = self._client, self.correlation_id
        channel = client._channel()
        await client._wait_connected(channel, cid)
        call = pb_grpc.ExecutorStub(channel).Session(
            metadata=(*client._auth, (CORRELATION_ID, cid), *current_metadata()),
            timeout=None if self._ttl is None else self._ttl + DEADLINE_MARGIN_S,
        )
        opening = pb.OpenSession(
            ttl_seconds=self._ttl or 0, limits=pb.Limits(**limit_fields(self._limits))
        )
        try:
            await call.write(pb.ClientFrame(open_session=opening))
            frame = await read_shielded(call)
        except grpc.aio.AioRpcError as exc:
            call.cancel()
            raise rpc_error(exc, cid, sent=False) from None
        except BaseException:
            call.cancel()
            raise
        if frame is grpc.aio.EOF or frame.WhichOneof("frame") != "session_opened":
            call.cancel()
            raise ExecutorConnectionError(
                "the executor did not open the session", may_have_run=False, correlation_id=cid
            )
        opened = frame.session_opened
        self._loop = asyncio.get_running_loop()
        self._call, self.session_id = call, opened.session_id
        self.ttl, self.idle_timeout = opened.ttl_seconds, opened.idle_timeout_seconds
        self._expires = time.monotonic() + opened.ttl_seconds
        self._lost = None

    async def close_async(self) -> None:
        """End the session: the executor kills its sandbox. Idempotent."""
        self._closed = True
        await self._hang_up()

    async def reset(self) -> None:
        """Replace the sandbox with a fresh one: every variable, import and file is gone."""
        if self._closed:
            raise SessionClosedError("this session is closed; open a new one")
        async with self._lock:
            await self._hang_up()
            await self.open_async()

    async def _hang_up(self) -> None:
        call, self._call = self._call, None
        if call is None:
            return
        try:
            await asyncio.wait_for(call.done_writing(), DEADLINE_MARGIN_S)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError):
            pass
        finally:
            call.cancel()

    # Executing ------------------------------------------------------------------------------

    async def run_async(
        self,
        code: str,
        *,
        available_tools: Sequence[str] | None = None,
        config: Mapping[str, Any] | None = None,
        execution_timeout: float | None = None,
        context: RuntimeContext | Mapping[str, Any] | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> ExecutionResult:
        """Run ``code`` in the session and return its full result, failed or not.

        As ``Codemode.run_async``; raises :class:`SessionClosedError`,
        :class:`SessionLostError` (:class:`SessionExpiredError`) when the session cannot run it.
        """
        request = Request(code, available_tools, config, execution_timeout, context, files=files)
        return await self._run(request)

    async def execute_async(
        self,
        code: str,
        *,
        available_tools: Sequence[str] | None = None,
        config: Mapping[str, Any] | None = None,
        execution_timeout: float | None = None,
        context: RuntimeContext | Mapping[str, Any] | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> str | None:
        """Run ``code`` in the session; its ``result`` JSON-encoded, as in ``execute_async``."""
        request = Request(code, available_tools, config, execution_timeout, context, files=files)
        return unwrap(await self._run(request))

    async def _run(self, request: Request) -> ExecutionResult:
        outcome: ExecutionResult | None = None
        async for event in self._events(request):
            if isinstance(event, ResultEvent):
                outcome = event.result
        if outcome is None:  # the stream always ends with a result or raises
            raise ExecutorClientError("executor closed the stream without a result")
        return outcome

    async def run_on_its_loop(self, code: str, **options: Any) -> ExecutionResult:
        """:meth:`run_async` on the loop the session was opened on, from any loop or thread
        (for adapters whose framework calls from threads or loops of its own)."""
        loop = self._loop
        if loop is None or loop is asyncio.get_running_loop() or loop.is_closed():
            return await self.run_async(code, **options)
        future = asyncio.run_coroutine_threadsafe(self.run_async(code, **options), loop)
        return await asyncio.wrap_future(future)

    def check_not_blocking(self) -> None:
        """Raise ``RuntimeError`` when called, to block, from the thread running the session's
        loop: the call would wait for that very loop."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return
        if running is self._loop:
            raise RuntimeError(
                "this session's event loop is the one this blocking call would stop: use the "
                "framework's async API (ainvoke, kickoff_async), or open the session on "
                "another loop"
            )

    def stream(
        self,
        code: str,
        *,
        available_tools: Sequence[str] | None = None,
        config: Mapping[str, Any] | None = None,
        execution_timeout: float | None = None,
        context: RuntimeContext | Mapping[str, Any] | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> AsyncIterator[ExecutionEvent]:
        """Run ``code`` in the session, yielding events as ``Codemode.stream`` does.

        Leaving the loop before the result ends the session, as cancelling would.
        """
        return self._events(
            Request(
                code,
                available_tools,
                config,
                execution_timeout,
                context,
                files=files,
                stream_output=True,
            )
        )

    async def _events(self, request: Request) -> AsyncIterator[ExecutionEvent]:
        async with self._lock:
            self._check_usable()
            prepared = self._client._prepare(request)
            prepared.start.correlation_id = prepared.correlation_id
            finished = False
            span = start_execution(
                prepared.correlation_id,
                prepared.start.code,
                prepared.start.tools,
                session_id=self.session_id,
            )
            if span is not None:
                span.attempt()
                prepared = dataclasses.replace(prepared, trace=span)
            try:
                async for event in exchange(self._call, prepared, self._client.config.tool_timeout):
                    if isinstance(event, ResultEvent):
                        finished = True
                        if span is not None:
                            result = event.result
                            span.finished(
                                success=result.success,
                                error_type=result.error_type,
                                tool_calls=result.tool_calls,
                            )
                        if not event.result.session_alive:
                            self._lose(
                                SessionLostError(
                                    f"the session's sandbox ended with its last execution "
                                    f"({event.result.error_type}: {event.result.error}); "
                                    "reset() for a fresh one",
                                    correlation_id=prepared.correlation_id,
                                )
                            )
                    yield event
            except ExecutorClientError as exc:
                if span is not None:
                    span.failed(exc)
                raise self._lose(self._lost_by(exc)) from exc
            except BaseException as exc:
                if span is not None:
                    span.failed(exc)
                raise
            finally:
                if span is not None:
                    span.end()
                if not finished and self._lost is None:
                    # Cancelled, or the caller left the loop: the sandbox is killed with it.
                    self._lose(
                        SessionLostError(
                            "an execution of this session was cancelled, which ends its "
                            "sandbox; reset() for a fresh one",
                            correlation_id=prepared.correlation_id,
                        )
                    )

    def _check_usable(self) -> None:
        if self._closed:
            raise SessionClosedError(
                "this session is closed; open a new one", correlation_id=self.correlation_id
            )
        if self._lost is not None:
            raise self._lost
        if self._call is None:
            raise SessionClosedError(
                "this session is not open: use `async with` or await open_async()",
                correlation_id=self.correlation_id,
            )
        if self.ttl and time.monotonic() >= self._expires:
            raise self._lose(
                SessionExpiredError(
                    f"the session expired: its TTL of {self.ttl:g} s passed; reset() or open "
                    "a new one",
                    correlation_id=self.correlation_id,
                )
            )

    def _lost_by(self, exc: ExecutorClientError) -> SessionLostError:
        kind = SessionExpiredError if _expired(exc) else SessionLostError
        return kind(
            f"the session is lost: {exc}; its state is gone, reset() for a fresh sandbox",
            cause=exc,
            correlation_id=exc.correlation_id,
            status=exc.status,
        )

    def _lose(self, error: SessionLostError) -> SessionLostError:
        self._lost = error
        call, self._call = self._call, None
        if call is not None:
            call.cancel()
        return error


def _expired(exc: ExecutorClientError) -> bool:
    return isinstance(exc, ExecutorTimeoutError) and exc.status == "DEADLINE_EXCEEDED"
