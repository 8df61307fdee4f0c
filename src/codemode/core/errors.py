"""The SDK's exceptions, and the one place where gRPC status codes become them.

::

    ExecutorClientError                  anything the SDK raises about an execution
    ├── ExecutorConnectionError          no answer: cannot connect, or the connection was lost
    ├── ExecutorTimeoutError             no answer in time, or the program hit its time limit
    ├── ExecutorRequestError             the executor refused the request; nothing ran
    │   ├── ExecutorAuthenticationError  wrong or missing API key (UNAUTHENTICATED)
    │   ├── ExecutorOverloadedError      admission refused (RESOURCE_EXHAUSTED); retried
    │   └── InvalidRequestError          malformed or too large request (INVALID_ARGUMENT)
    ├── ExecutionError                   the program ran and failed: error type, message, traceback
    ├── SessionClosedError               a session used after close()
    └── SessionLostError                 a session's sandbox is gone: executor lost, limit hit, …
        └── SessionExpiredError          … or its TTL or idle timeout passed

Every exception carries ``correlation_id`` (the execution's id, for logs on both sides) and,
when a gRPC status was involved, ``status`` (its name, e.g. ``"UNAVAILABLE"``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc

# Importable from here too, beside the errors whose retrying it decides.
from codemode.wire.names import NOT_STARTED_TRAILER as NOT_STARTED_TRAILER

if TYPE_CHECKING:
    from codemode.core.results import ExecutionResult

__all__ = [
    "ExecutionError",
    "ExecutorAuthenticationError",
    "ExecutorClientError",
    "ExecutorConnectionError",
    "ExecutorOverloadedError",
    "ExecutorRequestError",
    "ExecutorTimeoutError",
    "InvalidRequestError",
    "SessionClosedError",
    "SessionExpiredError",
    "SessionLostError",
    "error_from_rpc",
]


class ExecutorClientError(Exception):
    """Base class of every error the SDK raises for an execution."""

    def __init__(
        self, message: str, *, correlation_id: str | None = None, status: str | None = None
    ) -> None:
        super().__init__(message)
        self.correlation_id = correlation_id
        self.status = status


class ExecutorConnectionError(ExecutorClientError):
    """The executor could not be reached, or the connection broke during the execution.

    ``may_have_run`` is False when nothing was sent (safe to retry, and retried), True when
    the program may have started (never retried: tools could run twice). ``refused`` is True
    when the address refused the connection for a while (nothing listens there): not retried,
    it surfaces within about a second.
    """

    def __init__(
        self, message: str, *, may_have_run: bool, refused: bool = False, **kw: str | None
    ) -> None:
        super().__init__(message, **kw)
        self.may_have_run = may_have_run
        self.refused = refused


class ExecutorTimeoutError(ExecutorClientError):
    """No outcome in time: the program hit its execution timeout, or the client's deadline passed.

    ``result`` holds the failed outcome when the executor reported the timeout itself.
    """

    def __init__(
        self, message: str, *, result: ExecutionResult | None = None, **kw: str | None
    ) -> None:
        super().__init__(message, **kw)
        self.result = result


class ExecutorRequestError(ExecutorClientError):
    """The executor refused the request before running anything."""


class ExecutorAuthenticationError(ExecutorRequestError):
    """The API key is wrong or missing: check ``executor_api_key``."""


class ExecutorOverloadedError(ExecutorRequestError):
    """The executor is at its concurrency limit and its queue is full; retried with backoff."""


class InvalidRequestError(ExecutorRequestError):
    """The request was malformed or too large (code length, JSON values, limits)."""


class ExecutionError(ExecutorClientError):
    """The program ran and failed. ``result`` has its error type, message and traceback."""

    def __init__(self, result: ExecutionResult) -> None:
        message = f"{result.error_type}: {result.error}" if result.error_type else str(result.error)
        super().__init__(message, correlation_id=result.correlation_id)
        self.result = result
        self.error_type = result.error_type
        self.traceback = result.traceback


class ExecutionPausedError(ExecutionError):
    """The program paused at a call that needs approval: ``result.paused`` has the call and the
    execution id to resume (``codemode.resume(execution_id, approve=...)``)."""


class SessionClosedError(ExecutorClientError):
    """The session was closed by the application; open a new one."""


class SessionLostError(ExecutorClientError):
    """The session's sandbox, and with it its state, is gone; it is never re-created silently.

    Raised by the call that finds it so: the connection to its executor broke, the executor
    stopped, an execution hit a limit that killed the sandbox (that result says
    ``session_alive=False``), or an execution of it was cancelled. ``await session.reset()``
    opens a fresh sandbox (perhaps on another executor). ``cause`` holds the underlying
    error, when there was one.
    """

    def __init__(
        self, message: str, *, cause: ExecutorClientError | None = None, **kw: str | None
    ) -> None:
        super().__init__(message, **kw)
        self.cause = cause


class SessionExpiredError(SessionLostError):
    """The session's TTL or idle timeout passed, and the executor ended it."""


_REFUSALS: dict[grpc.StatusCode, type[ExecutorRequestError]] = {
    grpc.StatusCode.UNAUTHENTICATED: ExecutorAuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: ExecutorAuthenticationError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ExecutorOverloadedError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidRequestError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequestError,
}


def error_from_rpc(
    code: grpc.StatusCode,
    details: str,
    *,
    correlation_id: str | None,
    not_started: bool,
    sent: bool,
) -> ExecutorClientError:
    """Map a failed call to the exception the caller sees.

    ``not_started`` is the executor's own statement (trailer) that the program never started;
    ``sent`` tells whether the start frame left this process.
    """
    kw: dict[str, Any] = {"correlation_id": correlation_id, "status": code.name}
    refusal = _REFUSALS.get(code)
    if refusal is not None:
        return refusal(f"executor refused the request ({code.name}): {details}", **kw)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return ExecutorTimeoutError(
            f"no outcome before the client deadline: {details}; raise the timeout", **kw
        )
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN):
        may_have_run = sent and not not_started
        hint = (
            "the program may have run, so it was not retried"
            if may_have_run
            else "nothing ran; check that `codemode serve` is running at executor_url"
        )
        return ExecutorConnectionError(
            f"executor unavailable ({code.name}): {details}; {hint}",
            may_have_run=may_have_run,
            **kw,
        )
    return ExecutorClientError(f"executor error ({code.name}): {details}", **kw)
