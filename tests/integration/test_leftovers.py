"""Nothing is left behind by an execution, however it ends: processes, descriptors, cgroups."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from codemode import Codemode
from codemode.config import ClientConfig
from tests.helpers import ServerProcess, descendants, wait_until

ENDINGS = {
    "success": "result = sum(range(100))",
    "exception": "raise ValueError('boom')",
    "timeout": "import time\ntime.sleep(30)",
    "crash": "import ctypes\nctypes.string_at(0)",  # SIGSEGV: reaches even a pid 1
    "output limit": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
    "children left running": "import os, time\nfor _ in range(5):\n"
    "    if os.fork() == 0:\n        time.sleep(60)\n        os._exit(0)\nresult = 'forked'",
}


def _busy_cgroups() -> int:
    """Execution cgroups (named codemode-*) on this host that still hold a process."""
    count = 0
    for root in (
        Path("/sys/fs/cgroup/memory"),
        Path("/sys/fs/cgroup/pids"),
        Path("/sys/fs/cgroup"),
    ):
        if not root.is_dir():
            continue
        for procs in root.glob("**/codemode-*/cgroup.procs"):
            with contextlib.suppress(OSError):
                if procs.read_text().strip():
                    count += 1
    return count


def _snapshot(server: ServerProcess) -> tuple[int, int, int]:
    """(processes under the server, the server's open descriptors, busy execution cgroups)."""
    return (
        len(descendants(server.pid)),
        len(os.listdir(f"/proc/{server.pid}/fd")),
        _busy_cgroups(),
    )


async def test_every_kind_of_ending_leaves_nothing_behind(
    server: ServerProcess, make_config: Callable[..., ClientConfig]
) -> None:
    """After successes, failures, timeouts, crashes, limits and cancels the server is as before."""
    config = make_config(timeout=1.0)
    async with Codemode.from_client_config(config) as codemode:
        await codemode.run_async("result = 1")  # warm: the sandbox pool is full again after this
        await asyncio.sleep(0.5)
        before = _snapshot(server)
        for _ in range(2):
            outcomes = await asyncio.gather(
                *(codemode.run_async(code, execution_timeout=1.0) for code in ENDINGS.values())
            )
            assert [o.error_type for o in outcomes] == [
                None,
                "ValueError",
                "Timeout",
                "Crashed",
                "OutputLimit",
                None,
            ]
            cancelled = asyncio.create_task(codemode.run_async("import time\ntime.sleep(30)"))
            await asyncio.sleep(0.3)
            cancelled.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cancelled
        after = await asyncio.to_thread(
            wait_until, lambda: _snapshot(server) == before and before, 10.0
        )
    assert after == before, f"before {before}, after {_snapshot(server)}"


async def test_sessions_leave_nothing_behind(
    server: ServerProcess, make_config: Callable[..., ClientConfig]
) -> None:
    """Sessions closed, lost to a limit, cancelled or dropped leave the server as before."""
    async with Codemode.from_client_config(make_config(timeout=1.0)) as codemode:
        await codemode.run_async("result = 1")
        await asyncio.sleep(0.5)
        before = _snapshot(server)
        for _ in range(2):
            async with codemode.session() as closed:
                await closed.execute_async(ENDINGS["children left running"])
            for code in (ENDINGS["timeout"], ENDINGS["crash"], ENDINGS["output limit"]):
                async with codemode.session() as lost:
                    await lost.execute_async("x = 1")
                    ended = await lost.run_async(code, execution_timeout=1.0)
                    assert not ended.session_alive
            cancelled = await codemode.client.open_session()
            task = asyncio.create_task(cancelled.execute_async("import time\ntime.sleep(30)"))
            await asyncio.sleep(0.3)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            dropped = await codemode.client.open_session()  # never closed: its stream is cut
            await dropped.execute_async(ENDINGS["children left running"])
            dropped._call.cancel()
        after = await asyncio.to_thread(
            wait_until, lambda: _snapshot(server) == before and before, 10.0
        )
    assert after == before, f"before {before}, after {_snapshot(server)}"
