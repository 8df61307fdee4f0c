"""Failover under load: three executors, one killed (or stopped) halfway, nothing lost.

    .venv/bin/python bench/failover.py [--executions 600] [--in-flight 24] [--isolation X] [--smoke]

Three ``codemode serve`` on loopback (``run.py``'s ``Executor``), one client with the three
addresses (round robin, ``failover="replay"``, the default). Each execution makes three tool
calls (one, then two under ``asyncio.gather``), each counting its call id in this process and
sleeping 20 ms. When half of all calls were made, one executor gets SIGKILL (then, in the
second run, SIGTERM: a drain). Reported per run: executions that failed (must be 0), call ids
made other than exactly once (must be 0), executions that moved to another executor and the
calls they replayed, the throughput and the latency (p50, p99) of all executions against a
run with no fault. Writes ``bench/results/failover.json`` (``failover.smoke.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import secrets
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
from run import Executor

from codemode import Codemode, ComponentRegistry, tool
from codemode.config import ClientConfig

PROGRAM = (
    "import asyncio\n"
    "n = config['n']\n"
    "a = tools.bump(call_id=f'{n}-0')\n"
    "b, c = await asyncio.gather(tools.bump.run_async(call_id=f'{n}-1'),\n"
    "                            tools.bump.run_async(call_id=f'{n}-2'))\n"
    "result = [a, b, c]\n"
)


class Counts:
    """Call ids made, and an event set once ``halfway`` calls were made."""

    def __init__(self, halfway: int) -> None:
        self.made: collections.Counter[str] = collections.Counter()
        self.halfway = halfway
        self.reached = asyncio.Event()

    def registry(self) -> ComponentRegistry:
        @tool
        async def bump(call_id: str) -> int:
            """Count one call of ``call_id``."""
            self.made[call_id] += 1
            if sum(self.made.values()) >= self.halfway:
                self.reached.set()
            await asyncio.sleep(0.02)
            return self.made[call_id]

        registry = ComponentRegistry()
        registry.register_tool("bump", bump)
        return registry


async def one_run(
    count: int, in_flight: int, fault: signal.Signals | None, serve_args: list[str]
) -> dict[str, Any]:
    key = secrets.token_hex(16)
    fleet = [Executor(key, serve_args) for _ in range(3)]
    await asyncio.gather(*(e.start() for e in fleet))
    counts = Counts(count * 3 // 2)
    config = ClientConfig(
        executor_url=",".join(e.url for e in fleet), executor_api_key=key, timeout=60
    )
    latencies: list[float] = []
    outcomes: list[Any] = []
    try:
        async with Codemode.from_client_config(config, counts.registry()) as codemode:
            await codemode.run_async("result = 0")
            await asyncio.sleep(1.0)  # every address connected
            gate = asyncio.Semaphore(in_flight)

            async def execution(n: int) -> None:
                async with gate:
                    started = time.perf_counter()
                    try:
                        outcomes.append(await codemode.run_async(PROGRAM, config={"n": n}))
                    except Exception as exc:
                        outcomes.append(exc)
                    latencies.append((time.perf_counter() - started) * 1000)

            began = time.perf_counter()
            runs = asyncio.gather(*(execution(n) for n in range(count)))
            if fault is not None:
                await counts.reached.wait()
                os.kill(fleet[1].pid, fault)
            await runs
            elapsed = time.perf_counter() - began
    finally:
        await asyncio.gather(*(e.stop() for e in fleet), return_exceptions=True)
    failed = [o for o in outcomes if isinstance(o, BaseException) or not o.success]
    moved = [o for o in outcomes if not isinstance(o, BaseException) and o.attempts > 1]
    ordered = sorted(latencies)
    return {
        "fault": fault.name if fault is not None else "none",
        "executions": count,
        "in_flight": in_flight,
        "failed": len(failed),
        "failures": [repr(f)[:300] for f in failed[:5]],
        "call_ids": len(counts.made),
        "not_exactly_once": sum(1 for v in counts.made.values() if v != 1),
        "moved": len(moved),
        "replayed_tool_calls": sum(o.replayed_tool_calls for o in moved),
        "exec_per_s": round(count / elapsed, 1),
        "p50_ms": round(statistics.median(ordered), 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executions", type=int, default=600)
    parser.add_argument("--in-flight", type=int, default=24)
    parser.add_argument("--isolation", help="the executors' --isolation (default theirs)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; no timing claims")
    args = parser.parse_args()
    serve_args = [f"--isolation={args.isolation}"] if args.isolation else []
    count, in_flight = (30, 6) if args.smoke else (args.executions, args.in_flight)
    runs = []
    for fault in (None, signal.SIGKILL, signal.SIGTERM):
        result = await one_run(count, in_flight, fault, serve_args)
        print(json.dumps(result), flush=True)
        runs.append(result)
    doc = {"machine": benchlib.machine_info(), "smoke": args.smoke, "runs": runs}
    name = "failover.smoke.json" if args.smoke else "failover.json"
    benchlib.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (benchlib.RESULTS_DIR / name).write_text(json.dumps(doc, indent=2) + "\n")
    bad = [r for r in runs if r["failed"] or r["not_exactly_once"] or r["call_ids"] != count * 3]
    if bad:
        sys.exit(f"failover lost work: {bad}")


if __name__ == "__main__":
    asyncio.run(main())
