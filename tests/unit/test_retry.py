"""RetryPolicy: which failures are retried, and how long to wait before each retry."""

from __future__ import annotations

import random

import pytest

from codemode.core import (
    ExecutionError,
    ExecutionResult,
    ExecutorAuthenticationError,
    ExecutorClientError,
    ExecutorConnectionError,
    ExecutorOverloadedError,
    ExecutorTimeoutError,
    InvalidRequestError,
    RetryPolicy,
)
from codemode.core.retry import is_retryable

RETRYABLE = [
    ExecutorConnectionError("refused", may_have_run=False),
    ExecutorOverloadedError("busy"),
]
NOT_RETRYABLE = [
    ExecutorConnectionError("lost mid-run", may_have_run=True),
    ExecutorAuthenticationError("bad key"),
    InvalidRequestError("too long"),
    ExecutorTimeoutError("deadline"),
    ExecutionError(ExecutionResult(success=False, error="boom", error_type="ValueError")),
    ExecutorClientError("other"),
    ValueError("not ours"),
]


@pytest.mark.parametrize("exc", RETRYABLE, ids=lambda e: type(e).__name__)
def test_retryable_errors_get_a_delay(exc: BaseException) -> None:
    """Failures where nothing ran (no connection, admission refused) are retried."""
    assert is_retryable(exc)
    assert RetryPolicy().next_delay(exc, 0, 0.0, rand=lambda: 0.5) is not None


@pytest.mark.parametrize("exc", NOT_RETRYABLE, ids=lambda e: type(e).__name__)
def test_other_errors_are_never_retried(exc: BaseException) -> None:
    """A program that may have run, a refusal by auth or validation, or a timeout is not retried."""
    assert not is_retryable(exc)
    assert RetryPolicy(max_retries=10).next_delay(exc, 0, 0.0, rand=lambda: 0.5) is None


def test_full_jitter_bounds() -> None:
    """The n-th retry waits rand() times min(max_delay, base * 2**n)."""
    policy = RetryPolicy(max_retries=10, base=0.1, max_delay=2.0, budget=100)
    exc = RETRYABLE[0]
    assert policy.next_delay(exc, 0, 0.0, rand=lambda: 0.0) == 0.0
    assert policy.next_delay(exc, 0, 0.0, rand=lambda: 1.0) == pytest.approx(0.1)
    assert policy.next_delay(exc, 2, 0.0, rand=lambda: 1.0) == pytest.approx(0.4)
    assert policy.next_delay(exc, 2, 0.0, rand=lambda: 0.5) == pytest.approx(0.2)


def test_delay_is_capped_by_max_delay() -> None:
    """However many retries came before, one wait never exceeds max_delay."""
    policy = RetryPolicy(max_retries=20, base=0.1, max_delay=2.0, budget=1000)
    assert policy.next_delay(RETRYABLE[0], 15, 0.0, rand=lambda: 1.0) == pytest.approx(2.0)


def test_default_rand_stays_within_bounds() -> None:
    """With the real random source every delay lies in [0, cap]."""
    random.seed(1234)
    policy = RetryPolicy(max_retries=5, base=0.1, max_delay=0.3, budget=100)
    for attempt in range(5):
        for _ in range(200):
            delay = policy.next_delay(RETRYABLE[1], attempt, 0.0)
            assert delay is not None
            assert 0.0 <= delay <= min(0.3, 0.1 * 2**attempt)


def test_attempts_are_capped_by_max_retries() -> None:
    """Retry number max_retries (0-based) is refused; the ones before are allowed."""
    policy = RetryPolicy(max_retries=3)
    exc = RETRYABLE[0]
    assert [policy.next_delay(exc, n, 0.0, rand=lambda: 0.0) is not None for n in range(5)] == [
        True,
        True,
        True,
        False,
        False,
    ]
    assert RetryPolicy(max_retries=0).next_delay(exc, 0, 0.0, rand=lambda: 0.0) is None


def test_total_wait_is_capped_by_budget() -> None:
    """A delay that would take the total wait past budget is refused; up to it is allowed."""
    policy = RetryPolicy(max_retries=10, base=1.0, max_delay=1.0, budget=2.0)
    exc = RETRYABLE[0]
    assert policy.next_delay(exc, 1, 1.0, rand=lambda: 1.0) == pytest.approx(1.0)
    assert policy.next_delay(exc, 1, 1.5, rand=lambda: 1.0) is None
    assert policy.next_delay(exc, 1, 1.5, rand=lambda: 0.25) == pytest.approx(0.25)


def test_policy_is_immutable() -> None:
    """A RetryPolicy cannot be changed after it is made (it is shared between calls)."""
    policy = RetryPolicy()
    with pytest.raises(AttributeError):
        policy.max_retries = 5  # type: ignore[misc]
