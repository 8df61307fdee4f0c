"""error_from_rpc: the one place where a gRPC status becomes an SDK exception."""

from __future__ import annotations

import grpc
import pytest

from codemode.core import (
    ExecutionError,
    ExecutionResult,
    ExecutorAuthenticationError,
    ExecutorClientError,
    ExecutorConnectionError,
    ExecutorOverloadedError,
    ExecutorRequestError,
    ExecutorTimeoutError,
    InvalidRequestError,
)
from codemode.core.errors import error_from_rpc
from codemode.core.retry import is_retryable

S = grpc.StatusCode
EXPECTED: dict[grpc.StatusCode, type[ExecutorClientError]] = {
    S.OK: ExecutorClientError,
    S.CANCELLED: ExecutorConnectionError,
    S.UNKNOWN: ExecutorConnectionError,
    S.INVALID_ARGUMENT: InvalidRequestError,
    S.DEADLINE_EXCEEDED: ExecutorTimeoutError,
    S.NOT_FOUND: ExecutorClientError,
    S.ALREADY_EXISTS: ExecutorClientError,
    S.PERMISSION_DENIED: ExecutorAuthenticationError,
    S.RESOURCE_EXHAUSTED: ExecutorOverloadedError,
    S.FAILED_PRECONDITION: InvalidRequestError,
    S.ABORTED: ExecutorClientError,
    S.OUT_OF_RANGE: InvalidRequestError,
    S.UNIMPLEMENTED: ExecutorClientError,
    S.INTERNAL: ExecutorClientError,
    S.UNAVAILABLE: ExecutorConnectionError,
    S.DATA_LOSS: ExecutorClientError,
    S.UNAUTHENTICATED: ExecutorAuthenticationError,
}


def test_every_status_code_is_mapped_here() -> None:
    """The table above names every gRPC status code."""
    assert set(EXPECTED) == set(grpc.StatusCode)


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda c: c.name)
def test_status_maps_to_its_exception(code: grpc.StatusCode) -> None:
    """Each status becomes exactly its documented class, carrying status, details and id."""
    exc = error_from_rpc(code, "the details", correlation_id="cid-1", not_started=False, sent=True)
    assert type(exc) is EXPECTED[code]
    assert exc.status == code.name
    assert exc.correlation_id == "cid-1"
    assert "the details" in str(exc)


@pytest.mark.parametrize("code", [S.UNAVAILABLE, S.CANCELLED, S.UNKNOWN], ids=lambda c: c.name)
@pytest.mark.parametrize(
    ("sent", "not_started", "may_have_run"),
    [(False, False, False), (True, False, True), (True, True, False), (False, True, False)],
)
def test_connection_errors_know_whether_the_program_may_have_run(
    code: grpc.StatusCode, sent: bool, not_started: bool, may_have_run: bool
) -> None:
    """A lost call may have run the program only if the start frame left and no trailer says no."""
    exc = error_from_rpc(code, "x", correlation_id=None, not_started=not_started, sent=sent)
    assert isinstance(exc, ExecutorConnectionError)
    assert exc.may_have_run is may_have_run
    assert is_retryable(exc) is not may_have_run


def test_error_tree() -> None:
    """The exception classes form the tree drawn in codemode.core.errors."""
    for cls in (
        ExecutorConnectionError,
        ExecutorTimeoutError,
        ExecutorRequestError,
        ExecutionError,
    ):
        assert issubclass(cls, ExecutorClientError)
    for cls in (ExecutorAuthenticationError, ExecutorOverloadedError, InvalidRequestError):
        assert issubclass(cls, ExecutorRequestError)
    assert not issubclass(ExecutionError, ExecutorRequestError)
    assert not issubclass(ExecutorTimeoutError, ExecutorConnectionError)


def test_execution_error_carries_the_result() -> None:
    """ExecutionError's message is "Type: message" and it exposes the failed result's details."""
    result = ExecutionResult(
        success=False,
        error="division by zero",
        error_type="ZeroDivisionError",
        traceback="Traceback ...",
        correlation_id="cid-2",
    )
    exc = ExecutionError(result)
    assert str(exc) == "ZeroDivisionError: division by zero"
    assert exc.result is result
    assert exc.error_type == "ZeroDivisionError"
    assert exc.traceback == "Traceback ..."
    assert exc.correlation_id == "cid-2"
