"""When to retry and how long to wait: plain functions, no I/O."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from codemode.core.errors import ExecutorConnectionError, ExecutorOverloadedError


def is_retryable(exc: BaseException) -> bool:
    """True only for failures where the program cannot have started.

    That is: no connection could be made before anything was sent (but not an address that
    keeps refusing connections: nothing listens there), or the executor refused the request
    at admission. A program that may have run is never retried, since a second
    run would call its tools twice.
    """
    if isinstance(exc, ExecutorOverloadedError):
        return True
    return isinstance(exc, ExecutorConnectionError) and not exc.may_have_run and not exc.refused


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter, capped in attempts and in total time.

    ``max_retries`` attempts follow the first; the n-th retry waits a uniform random time in
    ``[0, min(max_delay, base * 2**n)]`` seconds. ``budget`` caps the total time spent waiting.
    """

    max_retries: int = 3
    base: float = 0.1
    max_delay: float = 2.0
    budget: float = 30.0

    def next_delay(
        self,
        exc: BaseException,
        attempt: int,
        waited: float,
        rand: Callable[[], float] = random.random,
    ) -> float | None:
        """Seconds to wait before retry number ``attempt`` (0-based), or None to give up."""
        if attempt >= self.max_retries or not is_retryable(exc):
            return None
        delay: float = rand() * min(self.max_delay, self.base * (2**attempt))
        if waited + delay > self.budget:
            return None
        return delay
