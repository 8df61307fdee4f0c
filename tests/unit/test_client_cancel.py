"""ExecutorClient against a scripted in-process servicer: what it tells the executor on cancel;
the tool relay's end, which must not cancel a write in flight."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc.aio
import pytest

from codemode import tool
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


class SlowWriteCall:
    """Stands in for a grpc.aio stream whose ``write`` is still in flight, as a real one is
    for a moment: cancelling such a write makes grpc.aio cancel the whole call."""

    def __init__(self) -> None:
        self.writing = asyncio.Event()
        self.release = asyncio.Event()
        self.written: list[str | None] = []
        self.cancelled_writes = 0

    async def write(self, frame: pb.ClientFrame) -> None:
        self.writing.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled_writes += 1
            raise
        self.written.append(frame.WhichOneof("frame"))


async def test_the_relay_never_cancels_an_answer_being_written() -> None:
    """When the result arrives while an answer is being written (the program already had
    it), ending the relay leaves that write alone: on a session's stream a cancelled write
    would end the session. Answers not yet writing are cancelled."""
    from codemode.core._exchange import _ToolRelay
    from codemode.core.context import RuntimeContext

    call = SlowWriteCall()
    never = asyncio.Event()

    async def quick() -> int:
        return 1

    async def stuck() -> int:
        await never.wait()
        return 2

    tools = {"quick": tool(quick), "stuck": tool(stuck)}
    relay = _ToolRelay(call, tools, RuntimeContext(), "cid", 30.0)
    relay.start(pb.ToolCall(call_id="1", tool="quick", arguments_json=b"{}"))
    relay.start(pb.ToolCall(call_id="2", tool="stuck", arguments_json=b"{}"))
    await asyncio.wait_for(call.writing.wait(), 5)
    relay.cancel()
    call.release.set()
    for _ in range(100):
        if not relay._tasks:
            break
        await asyncio.sleep(0.01)
    assert call.cancelled_writes == 0
    assert call.written == ["tool_result"]
    assert [event.call_id for event in relay.finished()] == ["1"]
