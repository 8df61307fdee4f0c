"""The Session RPC: one sandbox kept for several executions, one after another.

A session holds a guest (:class:`~codemode.executor.run.execution.HeldGuest`) from its open
frame to its end, and runs each start frame the client sends in it, so variables, imports and
files survive from one execution to the next. It ends, its guest killed, when the client
closes its side or drops the stream, when its TTL or idle timeout passes, when an execution
ends in a way that kills the sandbox (a limit, a crash, a cancel: that result says
``session_alive = false``), or when the service stops. Open sessions are bounded by
``max_sessions``, and a key's sessions by its own ``max_sessions``; an execution in a session
takes no execution slot and counts against no quota of its key, since its sandbox is already
held.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio

from codemode.config import ExecutorConfig, LimitsConfig
from codemode.executor.run.execution import HeldGuest
from codemode.executor.run.outcome import ExecutionRequest, RunOutcome
from codemode.executor.sandbox import SandboxBackend
from codemode.executor.service.auth import Tenant
from codemode.executor.service.metrics import ExecutorMetrics
from codemode.executor.service.stream import END, ClientProtocolError, ClientStream
from codemode.wire import codemode_pb2 as pb
from codemode.wire.names import NOT_STARTED_TRAILER

logger = logging.getLogger("codemode.executor")

#: Builds an execution's request from its start frame (the servicer's validation).
Validate = Callable[[pb.StartExecution, str, LimitsConfig], ExecutionRequest]
#: Turns an outcome into the wire's result.
ToWire = Callable[[RunOutcome, str], pb.ExecutionResult]


class SessionEnded(Exception):
    """Why the service ends a session: the gRPC status and message the client gets."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Sessions:
    """The sessions open on this executor, each on its own stream."""

    def __init__(
        self,
        config: ExecutorConfig,
        backend: SandboxBackend,
        metrics: ExecutorMetrics | None = None,
    ) -> None:
        self._config = config
        self._backend = backend
        self._metrics = metrics
        self._streams: set[ClientStream] = set()
        # Open sessions by tenant id (ids come from the operator's config: bounded).
        self._by_tenant: dict[str, int] = {}
        self._stopping = False

    @property
    def open(self) -> int:
        return len(self._streams)

    def stop(self) -> None:
        """End every session at its next wait for a start frame (the service is stopping)."""
        self._stopping = True
        for stream in self._streams:
            stream.end_sessions()

    async def serve(
        self,
        opening: pb.OpenSession,
        stream: ClientStream,
        context: grpc.aio.ServicerContext[pb.ClientFrame, pb.ServerFrame],
        cid: str,
        validate: Validate,
        to_wire: ToWire,
        tenant: Tenant | None = None,
    ) -> None:
        """Run the session ``opening`` asks for on ``stream`` until it ends; ``tenant``: whose
        it is (``None``: the service's limits only)."""
        tenant_id = "" if tenant is None else tenant.id
        log = {"correlation_id": cid, "tenant": tenant_id}
        if self._stopping:
            await _refuse(context, grpc.StatusCode.UNAVAILABLE, "executor is shutting down")
        if self.open >= self._config.max_sessions:
            await _refuse(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.open} sessions are open, this executor's limit (max_sessions); close "
                "one or retry later",
            )
        mine = self._by_tenant.get(tenant_id, 0)
        if tenant is not None and tenant.max_sessions is not None and mine >= tenant.max_sessions:
            await _refuse(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"key {tenant_id!r} has {mine} sessions open, its max_sessions; close one or "
                "retry later",
            )
        try:
            ttl, limits = self._settings(opening, tenant)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self._streams.add(stream)
        self._by_tenant[tenant_id] = self._by_tenant.get(tenant_id, 0) + 1
        held: HeldGuest | None = None
        try:
            held = await HeldGuest.attach(self._backend)
            session_id = uuid.uuid4().hex
            idle = self._config.session_idle_timeout
            await stream.write(
                pb.ServerFrame(
                    session_opened=pb.SessionOpened(
                        session_id=session_id, ttl_seconds=ttl, idle_timeout_seconds=idle
                    )
                )
            )
            log["session_id"] = session_id
            logger.info("session opened", extra={**log, "ttl_s": ttl})
            stream.start_reading()
            expires = asyncio.get_running_loop().time() + ttl
            ended = await self._loop(held, stream, (expires, ttl), limits, validate, to_wire, log)
            logger.info("session ended: %s", ended, extra=log)
        except SessionEnded as ended:
            logger.info("session ended: %s", ended, extra=log)
            await context.abort(ended.code, str(ended))
        except ClientProtocolError as exc:
            logger.warning("client broke the protocol: %s", exc, extra=log)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (OSError, RuntimeError) as exc:
            logger.exception("session failed inside the executor", extra=log)
            await context.abort(grpc.StatusCode.INTERNAL, f"executor failed to run: {exc}")
        finally:
            stream.stop_reading()
            self._streams.discard(stream)
            self._by_tenant[tenant_id] -= 1
            if held is not None:
                held.close()

    def _settings(
        self, opening: pb.OpenSession, tenant: Tenant | None = None
    ) -> tuple[float, LimitsConfig]:
        ttl = opening.ttl_seconds or self._config.default_session_ttl
        if not math.isfinite(ttl) or ttl < 0:
            raise ValueError("ttl_seconds must be a finite, positive number")
        requested = {f.name: v for f, v in opening.limits.ListFields()}
        for name, value in requested.items():
            if value < 0:
                raise ValueError(f"limit {name} must not be negative")
        ceiling = self._config.limits if tenant is None else tenant.limits
        return min(ttl, self._config.max_session_ttl), ceiling.lowered(requested)

    async def _loop(
        self,
        held: HeldGuest,
        stream: ClientStream,
        life: tuple[float, float],
        limits: LimitsConfig,
        validate: Validate,
        to_wire: ToWire,
        log: dict[str, Any],
    ) -> str:
        """Run start frames until the client closes or the sandbox ends (return why), or the
        session must end with a status (raise :class:`SessionEnded`)."""
        loop = asyncio.get_running_loop()
        idle = self._config.session_idle_timeout
        expires, ttl = life
        while True:
            left = expires - loop.time()
            try:
                async with asyncio.timeout(max(0.0, min(idle, left))):
                    start = await stream.starts.get()
            except TimeoutError:
                if left <= idle:
                    raise SessionEnded(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"the session expired: its TTL of {ttl:g} s passed; open a new one",
                    ) from None
                raise SessionEnded(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"the session ended after {idle:g} s without an execution "
                    "(session_idle_timeout); open a new one",
                ) from None
            if start is END:
                if stream.protocol_error is not None:
                    raise stream.protocol_error
                if self._stopping:
                    raise SessionEnded(
                        grpc.StatusCode.UNAVAILABLE,
                        "executor is shutting down; the session's state is lost",
                    )
                return "closed by the application"
            cid = start.correlation_id or uuid.uuid4().hex
            try:
                request = validate(start, cid, limits)
            except ValueError as exc:
                raise SessionEnded(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            left = expires - loop.time()
            if request.timeout > left:
                request = dataclasses.replace(request, timeout=max(left, 0.001))
            on_output = stream.on_output if request.stream_output else None
            run = functools.partial(held.run, request, stream.call_tool, on_output, session=True)
            execution = stream.run(request.files, run)
            if self._metrics is not None:
                outcome = await self._metrics.measured(execution, request.tenant)
            else:
                outcome = await execution
            await stream.write_outcome(outcome, to_wire(outcome, cid))
            logger.info(
                "session execution finished",
                extra={
                    **log,
                    "execution_id": cid,
                    "success": outcome.success,
                    "error_type": outcome.error_type or None,
                    "duration_ms": round(outcome.duration_ms, 3),
                    "session_alive": outcome.session_alive,
                },
            )
            if not outcome.session_alive:
                return f"its sandbox ended with the last execution ({outcome.error_type})"


async def _refuse(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, message: str
) -> None:
    """Refuse a session before it holds anything; the client may retry."""
    context.set_trailing_metadata(((NOT_STARTED_TRAILER, "1"),))
    await context.abort(code, message)
