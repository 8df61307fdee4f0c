"""A tenant that floods: ``python -m tests.integration.flood_client URL KEY WORKERS SECONDS``.

``WORKERS`` loops each run a program that holds its execution slot for a while, with the
client's default retries. Commands on stdin, one a line: ``flood`` starts them (answered
``flooding``), ``pause`` stops them starting more (answered ``paused`` once none runs). At
the end of stdin, or after ``SECONDS`` whatever happens, it prints how the executions ended
as JSON (``ok``, ``overloaded``: refused after the retries, ``other``) and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import threading

from codemode import ExecutorClient, ExecutorOverloadedError
from codemode.config import ClientConfig

PROGRAM = "import time\ntime.sleep(0.3)\nresult = 1"


async def flood(url: str, key: str, workers: int, seconds: float) -> dict[str, int]:
    counts = {"ok": 0, "overloaded": 0, "other": 0}
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[str] = asyncio.Queue()
    going = asyncio.Event()
    active = 0
    idle = asyncio.Condition()

    def read_commands() -> None:
        for line in sys.stdin:
            with contextlib.suppress(RuntimeError):  # the loop may be closed by then
                loop.call_soon_threadsafe(commands.put_nowait, line.strip())
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(commands.put_nowait, "")

    # A daemon thread, so that a flood ended by its deadline exits with stdin still open.
    threading.Thread(target=read_commands, daemon=True).start()
    config = ClientConfig(executor_url=url, executor_api_key=key)
    async with ExecutorClient(config=config) as client:

        async def work() -> None:
            nonlocal active
            while True:
                await going.wait()
                active += 1
                try:
                    result = await client.execute_async(PROGRAM)
                except ExecutorOverloadedError:
                    counts["overloaded"] += 1
                else:
                    counts["ok" if result.success else "other"] += 1
                finally:
                    active -= 1
                    async with idle:
                        idle.notify_all()

        async def obey() -> None:
            while command := await commands.get():
                if command == "flood":
                    going.set()
                    print("flooding", flush=True)
                elif command == "pause":
                    going.clear()
                    async with idle:
                        await idle.wait_for(lambda: active == 0)
                    print("paused", flush=True)

        tasks = [asyncio.create_task(work()) for _ in range(workers)]
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(obey(), seconds)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return counts


if __name__ == "__main__":
    url, key, workers, seconds = sys.argv[1:5]
    print(json.dumps(asyncio.run(flood(url, key, int(workers), float(seconds)))), flush=True)
