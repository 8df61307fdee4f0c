"""Admission: how many executions run at once, and how many may wait for a slot."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator


class Overloaded(Exception):
    """No execution slot could be had."""


class Admission:
    """At most ``limit`` executions at once; up to ``max_queued`` more wait ``queue_timeout`` s."""

    def __init__(self, limit: int, max_queued: int, queue_timeout: float) -> None:
        self._slots = asyncio.Semaphore(limit)
        self._max_queued = max_queued
        self._queue_timeout = queue_timeout
        self._waiting = 0
        self.running = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Hold one slot for the body, which gets the seconds it waited for it (0.0 when one
        was free); raises :class:`Overloaded` when none can be had."""
        waited = 0.0
        if self._slots.locked():
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
            waited = time.monotonic() - queued
        else:
            await self._slots.acquire()
        self.running += 1
        try:
            yield waited
        finally:
            self.running -= 1
            self._slots.release()
