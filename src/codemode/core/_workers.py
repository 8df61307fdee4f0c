"""The threads that run sync tools: never the event loop's.

``asyncio.to_thread`` goes through the loop's default ``ThreadPoolExecutor`` and chains a
``concurrent.futures.Future`` into an asyncio one: a work item, a lock and a semaphore on the
way in, and on the way out one loop iteration more than the answer needs. A tool call pays
that twice per round trip, on the application's path. Here a job is one queue entry and its
answer one ``call_soon_threadsafe`` that settles the awaited future directly (``bench/floor.py``
times both hand-offs).

Threads start as calls need them, up to :data:`MAX_WORKERS`, and then wait for the next job;
they are daemons, as an interpreter at exit must not wait for a tool that hangs. A call whose
caller is cancelled (the tool timeout, the execution ending) runs on to its end in its thread,
as with ``to_thread``: a thread cannot be stopped, only no longer awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

#: At most this many sync tools run at once in one process; more wait their turn. The same
#: bound as ``ThreadPoolExecutor``'s default, which ``to_thread`` used.
MAX_WORKERS = min(32, (os.cpu_count() or 1) + 4)

_Job = tuple[
    asyncio.AbstractEventLoop,
    "asyncio.Future[Any]",
    contextvars.Context,
    Callable[..., Any],
    tuple[Any, ...],
    dict[str, Any],
]


class SyncWorkers:
    """A pool of threads for sync callables, awaited from an event loop."""

    def __init__(self, max_workers: int = MAX_WORKERS) -> None:
        self._max = max_workers
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0  # threads waiting for a job and not yet promised one

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in a worker thread, in a copy of the caller's context."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._idle:
                self._idle -= 1
                start = False
            else:
                start = self._threads < self._max
                self._threads += start
        self._jobs.put((loop, future, contextvars.copy_context(), fn, args, kwargs))
        if start:
            threading.Thread(target=self._work, name="codemode-tool", daemon=True).start()
        return await future

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            loop, future, context, fn, args, kwargs = jobs.get()
            try:
                value, error = context.run(fn, *args, **kwargs), None
            except BaseException as exc:  # handed to the caller, whatever it is
                value, error = None, exc
            with self._lock:
                self._idle += 1
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody awaits the answer
                loop.call_soon_threadsafe(_settle, future, value, error)
            del future, context, fn, args, kwargs, value, error  # nothing held while idle

    def _forget_threads(self) -> None:
        """In a forked child: the parent's threads are not there."""
        self._lock = threading.Lock()
        self._jobs = queue.SimpleQueue()
        self._threads = self._idle = 0


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled while the tool ran
        return
    if error is None:
        future.set_result(value)
    elif isinstance(error, StopIteration):  # a future refuses it, as a coroutine would
        future.set_exception(RuntimeError(f"the tool raised StopIteration: {error}"))
    else:
        future.set_exception(error)


#: The process's pool, shared by every client (as the loop's default executor was).
WORKERS = SyncWorkers()
os.register_at_fork(after_in_child=WORKERS._forget_threads)
