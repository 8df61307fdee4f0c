"""ExecutorClient against a scripted in-process servicer: what it tells the executor on cancel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc.aio
import pytest

from codemode.config import ClientConfig
from codemode.config._defaults import CANCEL_NOTICE_S
from codemode.core import ExecutorClient
from codemode.wire import codemode_pb2 as pb
from codemode.wire import codemode_pb2_grpc as pb_grpc


class SilentExecutor(pb_grpc.ExecutorServicer):
    """Records the kind of every frame a client sends and never answers."""

    def __init__(self) -> None:
        self.kinds: list[str | None] = []
        self.started = asyncio.Event()
        self.ended = asyncio.Event()

    async def Execute(self, request_iterator: AsyncIterator[pb.ClientFrame], context: Any) -> None:
        try:
            async for frame in request_iterator:
                self.kinds.append(frame.WhichOneof("frame"))
                self.started.set()
        finally:
            self.ended.set()


@pytest.fixture
async def silent() -> AsyncIterator[tuple[SilentExecutor, ClientConfig]]:
    """A SilentExecutor served on a free port, and a client config that reaches it."""
    server = grpc.aio.server()
    executor = SilentExecutor()
    pb_grpc.add_ExecutorServicer_to_server(executor, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield executor, ClientConfig(executor_url=f"http://127.0.0.1:{port}", max_retries=0)
    finally:
        await server.stop(None)


async def test_cancelling_after_start_sends_cancel(
    silent: tuple[SilentExecutor, ClientConfig],
) -> None:
    """A task cancelled after the start frame sends `Cancel`, then re-raises within the bound."""
    executor, config = silent
    async with ExecutorClient(config=config) as client:
        task = asyncio.create_task(client.execute_async("result = 1"))
        await asyncio.wait_for(executor.started.wait(), 10)
        cancelled_at = time.perf_counter()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.perf_counter() - cancelled_at < CANCEL_NOTICE_S + 0.5
        await asyncio.wait_for(executor.ended.wait(), 10)
    assert executor.kinds == ["start", "cancel"]
