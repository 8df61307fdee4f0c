"""The threads that run sync tools (codemode.core._workers), on a real event loop."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time

import pytest

from codemode.core._workers import SyncWorkers

_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("_VAR", default="unset")


async def test_runs_off_the_loop_with_the_callers_context() -> None:
    workers = SyncWorkers(max_workers=2)
    _VAR.set("mine")
    got = await workers.run(lambda: (threading.get_ident(), _VAR.get()))
    assert got[0] != threading.get_ident()
    assert got[1] == "mine"


async def test_an_exception_reaches_the_caller() -> None:
    def fail() -> None:
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        await SyncWorkers().run(fail)


async def test_stop_iteration_becomes_a_runtime_error() -> None:
    """A future refuses StopIteration; the caller must still get an answer."""

    def stop() -> None:
        raise StopIteration("done")

    with pytest.raises(RuntimeError, match="StopIteration"):
        await asyncio.wait_for(SyncWorkers().run(stop), 5)


async def test_calls_run_in_parallel_up_to_the_bound() -> None:
    """Four calls meet at a four-party barrier, so they ran at once; with two threads, three
    calls never meet at a three-party one, and no third thread is started."""
    four = threading.Barrier(4, timeout=10)
    workers = SyncWorkers(max_workers=4)
    assert await asyncio.gather(*(workers.run(four.wait) for _ in range(4))) is not None
    three = threading.Barrier(3, timeout=0.5)
    two = SyncWorkers(max_workers=2)
    outcomes = await asyncio.gather(
        *(two.run(three.wait) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(o, threading.BrokenBarrierError) for o in outcomes)
    assert two._threads == 2
    idents = await asyncio.gather(*(two.run(threading.get_ident) for _ in range(8)))
    assert len(set(idents)) <= 2  # the same two threads, reused


async def test_a_cancelled_caller_leaves_the_pool_usable() -> None:
    workers = SyncWorkers(max_workers=1)
    waiting = asyncio.ensure_future(workers.run(time.sleep, 0.2))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert await workers.run(lambda: 7) == 7  # after the cancelled call's tool ended
