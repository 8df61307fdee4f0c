"""The Execute, Session and Info RPCs: one stream per execution (or per session).

The servicer stays thin: it validates the start frame into an ``ExecutionRequest``, takes an
admission slot, and hands the execution to :func:`~codemode.executor.run.execution.run_execution`,
relaying tool calls to the client and their answers back (:mod:`.stream`), then turns the
``RunOutcome`` into the wire's result. ``Session`` is handed to :mod:`.sessions`. Refusals go
out through ``context.abort``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from codemode._version import __version__
from codemode.config import ExecutorConfig, LimitsConfig
from codemode.config.executor import DEFAULT_TENANT
from codemode.executor.run.execution import run_execution
from codemode.executor.run.outcome import (
    ExecutionRequest,
    RunOutcome,
)
from codemode.executor.sandbox import SandboxBackend
from codemode.executor.sandbox.factory import PROCESS_WARNING
from codemode.executor.service.admission import Admission, Overloaded
from codemode.executor.service.auth import UNAUTHENTICATED_MESSAGE, Tenant, Tenants
from codemode.executor.service.metrics import ExecutorMetrics
from codemode.executor.service.sessions import Sessions
from codemode.executor.service.stream import (
    MALFORMED,
    ClientProtocolError,
    ClientStream,
    MalformedFrame,
    check_files,
)
from codemode.tracing import ExecutorSpan, start_rpc
from codemode.wire import codemode_pb2 as pb
from codemode.wire import codemode_pb2_grpc as pb_grpc
from codemode.wire.names import (
    CORRELATION_ID,
    NOT_STARTED_TRAILER,
)

logger = logging.getLogger("codemode.executor")

#: How long a client may take to send the start frame after opening the stream, seconds.
START_FRAME_TIMEOUT_S = 10.0
_NO_FILES = (
    "this executor runs programs without a sandbox (isolation=process), which has no /input "
    "or /output: files need --isolation forkserver or bwrap"
)


class ExecutorServicer(pb_grpc.ExecutorServicer):
    """Implements ``Execute`` (one stream, one execution), ``Session`` and ``Info``."""

    def __init__(
        self,
        config: ExecutorConfig,
        backend: SandboxBackend,
        metrics: ExecutorMetrics | None = None,
        tenants: Tenants | None = None,
    ) -> None:
        self._config = config
        self._backend = backend
        self._admission = Admission(
            config.max_concurrent_executions, config.max_queued_executions, config.queue_timeout
        )
        self.accepting = True
        self._metrics = metrics
        #: The accepted keys and their tenants, shared with the auth interceptor.
        self.tenants = tenants if tenants is not None else Tenants(config)
        self._sessions = Sessions(config, backend, metrics)
        if metrics is not None:
            metrics.watch(backend, lambda: self._sessions.open)
            metrics.add_tenants(self.tenants.ids or [DEFAULT_TENANT])

    def stop_accepting(self) -> None:
        """Refuse new executions and sessions; open sessions end at their next idle moment."""
        self.accepting = False
        self._sessions.stop()

    async def Info(
        self, request: pb.InfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.InfoResponse:
        """What this executor enforces for the caller's key: its sandbox, ceilings, warnings."""
        tenant = await self._identify(context)
        warnings = []
        if not self._backend.isolated:
            warnings.append(PROCESS_WARNING)
        if not self.tenants.auth_required:
            warnings.append("insecure-no-auth: any caller that reaches the port can run code")
        return pb.InfoResponse(
            version=__version__,
            isolation=self._backend.name,
            isolated=self._backend.isolated,
            warnings=warnings,
            limits=pb.Limits(**tenant.limits.model_dump()),
            max_execution_timeout_seconds=tenant.max_execution_timeout,
            max_concurrent_executions=self._config.max_concurrent_executions,
            running_executions=self._admission.running,
            packages=[
                pb.InfoResponse.Package(name=name, version=version)
                for name, version in self._backend.packages
            ],
            preload_modules=list(self._backend.preload_modules),
            max_sessions=self._config.max_sessions,
            open_sessions=self._sessions.open,
            max_session_ttl_seconds=self._config.max_session_ttl,
        )

    # Frames are written with context.write (not yielded) so that tool calls and output from
    # concurrent tasks interleave on the stream; hence the override of the generated signature.
    async def Execute(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[pb.ClientFrame],
        context: grpc.aio.ServicerContext[pb.ClientFrame, pb.ServerFrame],
    ) -> None:
        span = start_rpc("codemode.executor.execution", context.invocation_metadata())
        if span is None:
            await self._execute(request_iterator, context, None)
            return
        try:
            await self._execute(request_iterator, context, span)
        except BaseException as exc:
            span.end(exc, _status_name(context))
            raise
        span.end()

    async def _execute(
        self,
        request_iterator: AsyncIterator[pb.ClientFrame],
        context: grpc.aio.ServicerContext[pb.ClientFrame, pb.ServerFrame],
        span: ExecutorSpan | None,
    ) -> None:
        """One execution; ``span`` traces it (queue, sandbox, run) when tracing is on."""
        cid, frames, first = await _opening(request_iterator, context, "start")
        tenant = await self._identify(context)
        log = {"correlation_id": cid, "tenant": tenant.id}
        start = first.start
        try:
            request = self._validate(start, cid, tenant=tenant)
        except ValueError as exc:
            logger.info("refused a malformed request: %s", exc, extra=log)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if request.files and not self._backend.isolated:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, _NO_FILES)
        metrics = self._metrics
        if not self.accepting:
            if metrics is not None:
                metrics.refused("shutting_down", tenant.id)
            await _abort_not_started(
                context, grpc.StatusCode.UNAVAILABLE, "executor is shutting down"
            )
        stream = ClientStream(frames, context, metrics=metrics)
        if span is not None:
            span.describe(cid, start.code, start.tools, request.timeout)
            span.phase("queue")
        try:
            async with self._admission.slot(tenant.quota) as waited:
                if metrics is not None:
                    metrics.admitted(waited)
                if span is not None:
                    span.phase("sandbox")
                logger.info("execution started", extra=log)
                result = await self._run(request, stream, context, span)
                if span is not None:
                    span.finished(result.success, result.error_type, result.tool_calls)
        except Overloaded as exc:
            if span is not None:
                span.refused(exc.reason)
            if metrics is not None:
                metrics.refused(exc.reason, tenant.id)
            whose = "executor overloaded" if exc.reason == "overloaded" else "over its quota"
            logger.warning("refused: %s (%s)", whose, exc, extra=log)
            await _abort_not_started(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{whose}: {exc}; retry later",
            )
        except ClientProtocolError as exc:
            logger.warning("client broke the protocol: %s", exc, extra=log)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (OSError, RuntimeError) as exc:
            # The sandbox could not be started or driven: the executor's fault, not the program's.
            logger.exception("execution failed inside the executor", extra=log)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"executor failed to run the program: {exc}"
            )
        try:
            await stream.write_outcome(result, to_wire(result, cid))
        finally:
            # Logged once the result is on its way, so the client does not wait for the line;
            # also when the client, having read it, cancels the stream while the write ends.
            log_finished(result, log)

    async def Session(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[pb.ClientFrame],
        context: grpc.aio.ServicerContext[pb.ClientFrame, pb.ServerFrame],
    ) -> None:
        span = start_rpc("codemode.executor.session", context.invocation_metadata())
        if span is None:
            await self._session(request_iterator, context, None)
            return
        try:
            await self._session(request_iterator, context, span)
        except BaseException as exc:
            span.end(exc, _status_name(context))
            raise
        span.end()

    async def _session(
        self,
        request_iterator: AsyncIterator[pb.ClientFrame],
        context: grpc.aio.ServicerContext[pb.ClientFrame, pb.ServerFrame],
        span: ExecutorSpan | None,
    ) -> None:
        cid, frames, first = await _opening(request_iterator, context, "open_session")
        if span is not None:
            span.describe(cid)
        tenant = await self._identify(context)
        stream = ClientStream(frames, context, session=True, metrics=self._metrics)

        def validate(start: pb.StartExecution, cid: str, limits: LimitsConfig) -> ExecutionRequest:
            return self._validate(start, cid, limits, tenant)

        await self._sessions.serve(
            first.open_session, stream, context, cid, validate, to_wire, tenant
        )

    async def _identify(self, context: grpc.aio.ServicerContext[Any, Any]) -> Tenant:
        """The caller's tenant. The interceptor let the call in; a reload since may have
        removed its key, and then it is refused the same way."""
        tenant = self.tenants.from_metadata(context.invocation_metadata())
        if tenant is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        assert tenant is not None  # abort raised otherwise
        return tenant

    def _validate(
        self,
        start: pb.StartExecution,
        cid: str,
        session: LimitsConfig | None = None,
        tenant: Tenant | None = None,
    ) -> ExecutionRequest:
        """The execution ``start`` asks for; ``session``: the limits of its session;
        ``tenant``: whose ceilings apply (``None``: the service's)."""
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
        if session is not None:
            if requested:
                raise ValueError("a session's limits are set when it opens, not per execution")
            if start.files and not self._backend.isolated:
                raise ValueError(_NO_FILES)
        ceiling = self._config.limits if tenant is None else tenant.limits
        limits = ceiling.lowered(requested) if session is None else session
        files = check_files(start.files, limits.max_input_bytes)
        longest = (
            self._config.max_execution_timeout if tenant is None else tenant.max_execution_timeout
        )
        return ExecutionRequest(
            code=start.code,
            tools=tuple(names),
            timeout=min(timeout, longest),
            limits=limits,
            config=decode_json_object(start.config_json, "config"),
            context=decode_json_object(start.context_json, "context"),
            stream_output=start.stream_output,
            correlation_id=cid,
            files=files,
            tenant="" if tenant is None else tenant.id,
        )

    async def _run(
        self,
        request: ExecutionRequest,
        stream: ClientStream,
        context: grpc.aio.ServicerContext[pb.ClientFrame, pb.ServerFrame],
        span: ExecutorSpan | None = None,
    ) -> RunOutcome:
        if request.files:
            # Admitted: the client waits for this before it sends the files' bytes.
            await context.send_initial_metadata(())
        on_output = stream.on_output if request.stream_output else None
        stream.start_reading()
        try:
            execution = stream.run(
                request.files,
                lambda inputs: run_execution(
                    self._backend,
                    request,
                    stream.call_tool,
                    on_output,
                    inputs,
                    on_attached=None if span is None else functools.partial(span.phase, "run"),
                ),
            )
            if self._metrics is not None:
                return await self._metrics.measured(execution, request.tenant)
            return await execution
        finally:
            stream.stop_reading()


def log_finished(result: RunOutcome, log: dict[str, Any]) -> None:
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
        session_alive=outcome.session_alive,
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


async def _opening(
    request_iterator: AsyncIterator[pb.ClientFrame],
    context: grpc.aio.ServicerContext[pb.ClientFrame, pb.ServerFrame],
    kind: str,
) -> tuple[str, AsyncIterator[pb.ClientFrame], pb.ClientFrame]:
    """The stream's correlation id, its frames, and the first one, which must be a ``kind``
    frame that arrives within ``START_FRAME_TIMEOUT_S``."""
    metadata = dict(context.invocation_metadata() or ())
    cid = str(metadata.get(CORRELATION_ID) or uuid.uuid4().hex)[:128]
    frames = aiter(request_iterator)
    first: pb.ClientFrame | None = None
    try:
        async with asyncio.timeout(START_FRAME_TIMEOUT_S):  # no task, unlike wait_for
            first = await anext(frames)
    except (StopAsyncIteration, TimeoutError):
        pass
    except MalformedFrame:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, MALFORMED)
    if first is None or first.WhichOneof("frame") != kind:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"the stream must begin with a {kind} frame"
        )
    assert first is not None  # abort raised otherwise
    return cid, frames, first


def _status_name(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The gRPC status the RPC ended with (``RESOURCE_EXHAUSTED``), when it aborted."""
    code: Any = context.code()
    for status in grpc.StatusCode:
        if code is status or code == status.value[0]:
            return str(status.name)
    return None


async def _abort_not_started(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, message: str
) -> None:
    """Refuse with a trailer telling the client that nothing ran, so it may retry."""
    context.set_trailing_metadata(((NOT_STARTED_TRAILER, "1"),))
    await context.abort(code, message)
