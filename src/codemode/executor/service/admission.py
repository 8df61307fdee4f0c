"""Admission: how many executions run at once, and how many may wait for a slot.

Each tenant (API key) may also have a :class:`Quota`: executions of its own running or queued
at once, and starts in any 60 s. A tenant's quota is checked before the shared queue, so one
tenant over its quota is refused at once and never takes the others' queue places or slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal

#: Why an execution was refused: the executor's own slots, or its tenant's quota.
Reason = Literal["overloaded", "tenant_concurrency", "tenant_rate"]
#: The window of ``Quota.per_minute``, seconds.
RATE_WINDOW_S = 60.0


class Overloaded(Exception):
    """No execution slot could be had; ``reason`` says whose limit refused it."""

    def __init__(self, message: str, reason: Reason = "overloaded") -> None:
        super().__init__(message)
        self.reason: Reason = reason


@dataclass(frozen=True, slots=True)
class Quota:
    """One tenant's share: executions running or queued at once, and starts in any 60 s.

    ``None`` leaves that to the executor's own limits.
    """

    tenant: str
    max_concurrent: int | None = None
    per_minute: int | None = None


@dataclass(slots=True)
class _Usage:
    """What a tenant holds now: executions admitted and not ended, recent start times."""

    held: int = 0
    starts: deque[float] = field(default_factory=deque)


class Admission:
    """At most ``limit`` executions at once; up to ``max_queued`` more wait ``queue_timeout`` s."""

    def __init__(
        self,
        limit: int,
        max_queued: int,
        queue_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._slots = asyncio.Semaphore(limit)
        self._max_queued = max_queued
        self._queue_timeout = queue_timeout
        self._waiting = 0
        self._clock = clock
        # By tenant id, which comes from the operator's config: bounded.
        self._usage: dict[str, _Usage] = {}
        self.running = 0

    def held(self, tenant: str) -> int:
        """Executions of ``tenant`` running or queued now."""
        usage = self._usage.get(tenant)
        return 0 if usage is None else usage.held

    @contextlib.asynccontextmanager
    async def slot(self, quota: Quota | None = None) -> AsyncIterator[float]:
        """Hold one slot for the body, which gets the seconds it waited for it (0.0 when one
        was free); raises :class:`Overloaded` when ``quota`` or the executor refuses."""
        usage, started = self._take_share(quota) if quota is not None else (None, None)
        try:
            waited = await self._acquire()
        except BaseException:
            if usage is not None:
                usage.held -= 1
                if started is not None:
                    # Refused by the executor, not by the quota: this start does not count.
                    with contextlib.suppress(ValueError):
                        usage.starts.remove(started)
            raise
        self.running += 1
        try:
            yield waited
        finally:
            self.running -= 1
            self._slots.release()
            if usage is not None:
                usage.held -= 1

    def _take_share(self, quota: Quota) -> tuple[_Usage, float | None]:
        """Count one execution against ``quota``; return the usage and its start time (None
        when starts are not counted), or raise :class:`Overloaded`."""
        usage = self._usage.setdefault(quota.tenant, _Usage())
        now = self._clock()
        if quota.per_minute is not None:
            while usage.starts and usage.starts[0] <= now - RATE_WINDOW_S:
                usage.starts.popleft()
            if len(usage.starts) >= quota.per_minute:
                wait = usage.starts[0] + RATE_WINDOW_S - now
                raise Overloaded(
                    f"key {quota.tenant!r} started {len(usage.starts)} executions in the last "
                    f"minute, its max_executions_per_minute; the next may start in {wait:.1f}s",
                    "tenant_rate",
                )
        if quota.max_concurrent is not None and usage.held >= quota.max_concurrent:
            raise Overloaded(
                f"key {quota.tenant!r} has {usage.held} executions running or queued, its "
                "max_concurrent_executions",
                "tenant_concurrency",
            )
        usage.held += 1
        if quota.per_minute is None:
            return usage, None
        usage.starts.append(now)
        return usage, now

    async def _acquire(self) -> float:
        """Take one of the executor's slots, queueing when none is free; the seconds waited."""
        if not self._slots.locked():
            await self._slots.acquire()
            return 0.0
        if self._waiting >= self._max_queued:
            raise Overloaded(f"{self.running} executions running and {self._waiting} queued")
        self._waiting += 1
        queued = time.monotonic()
        try:
            await asyncio.wait_for(self._slots.acquire(), self._queue_timeout)
        except TimeoutError:
            raise Overloaded(f"no execution slot within {self._queue_timeout:g}s") from None
        finally:
            self._waiting -= 1
        return time.monotonic() - queued
