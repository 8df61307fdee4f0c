"""A sync tool's round trip with each way of handing it to a thread, side by side.

    .venv/bin/python bench/handoff.py [--rounds 24] [--calls 200] [--isolation X] [--smoke]

One ``codemode serve`` and one client. Round by round (the order reversed every other round),
the client answers the same program's sync tool calls through each hand-off in turn:

- ``workers``: the client's own worker threads (``codemode.core._workers``, what it uses);
- ``to_thread``: ``asyncio.to_thread``, what it used before.

A round's figure for a hand-off is as ``run.py``'s workload b: (time of the program with
``--calls`` calls minus time with 0) / ``--calls``. Both run on the same executor, the same
stream set-up and the same VM minute, so the ratio of the medians is the hand-off's share.

Prints the medians and writes ``bench/results/handoff.json`` (``handoff.smoke.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
from run import Executor, _ready, code_sync_tool

import codemode.core.registry as registry
from codemode import Codemode
from codemode.config import ClientConfig
from codemode.core._workers import SyncWorkers


class _ToThread:
    """``asyncio.to_thread`` behind the pool's one method."""

    async def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)


HAND_OFFS: dict[str, Any] = {"workers": SyncWorkers(), "to_thread": _ToThread()}


async def _per_call(execute: Callable[[str], Awaitable[Any]], calls: int) -> float:
    started = time.perf_counter()
    await execute(code_sync_tool(0))
    empty = time.perf_counter() - started
    started = time.perf_counter()
    result = await execute(code_sync_tool(calls))
    full = time.perf_counter() - started
    if benchlib.decode(result) != calls:
        raise AssertionError(f"expected {calls}, got {result!r}")
    return (full - empty) / calls * 1000


async def measure(rounds: int, calls: int, isolation: str | None) -> dict[str, Any]:
    executor = Executor(secrets.token_hex(16), [f"--isolation={isolation}"] if isolation else [])
    await executor.start()
    saved = registry.WORKERS
    try:
        codemode = Codemode.from_client_config(
            ClientConfig(executor_url=executor.url, executor_api_key=executor.api_key)
        )
        codemode.registry.register_tool("echo", benchlib.Echo())
        await _ready(codemode.execute_async)
        figures: dict[str, list[float]] = {name: [] for name in HAND_OFFS}
        names = list(HAND_OFFS)
        for number in range(rounds):
            for name in names if number % 2 == 0 else names[::-1]:
                registry.WORKERS = HAND_OFFS[name]
                await codemode.execute_async(code_sync_tool(2))  # its threads are up
                figures[name].append(await _per_call(codemode.execute_async, calls))
        codemode.close()
    finally:
        registry.WORKERS = saved
        await executor.stop()
    out: dict[str, Any] = {"rounds": rounds, "calls": calls}
    for name, values in figures.items():
        out[f"{name}_per_call_ms"] = round(statistics.median(values), 4)
        out[f"{name}_range_ms"] = [round(min(values), 4), round(max(values), 4)]
    out["workers_vs_to_thread"] = round(
        out["workers_per_call_ms"] / out["to_thread_per_call_ms"], 3
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--isolation", choices=["auto", "forkserver", "bwrap", "process"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks it runs")
    args = parser.parse_args()
    rounds, calls = (2, 5) if args.smoke else (args.rounds, args.calls)
    results = asyncio.run(measure(rounds, calls, args.isolation))
    for name in HAND_OFFS:
        low, high = results[f"{name}_range_ms"]
        median = results[f"{name}_per_call_ms"]
        print(f"{name:<10} per call {median:.3f} ms (rounds {low:.3f}-{high:.3f})")
    print(f"workers / to_thread: {results['workers_vs_to_thread']:.3f}")
    path = benchlib.write_results("handoff", "sync tool hand-off", results, args.smoke)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
