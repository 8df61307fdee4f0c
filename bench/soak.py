"""Soak: thousands of mixed executions on one executor; nothing grows, nothing is left behind.

    .venv/bin/python bench/soak.py [--executions 10000] [--in-flight 32] [--rounds 10]
                                   [--isolation X] [--serve-arg=ARG] [--smoke]

One ``codemode serve`` on loopback (``run.py``'s ``Executor``, ``--max-concurrent`` set to the
in-flight count) and one client. The executions run in rounds, each a shuffled mix of
:data:`CASES`: values, sync and async tool calls, a failing tool, output, an exception,
output files, children left running, a session, and ends by timeout, output limit, result
size and memory limit. Every execution must end exactly as its case says. After each round,
once the executor is idle again, the service process's RSS and open descriptors, the number
of its processes and of its cgroups (all, and those holding a process) are recorded.

It passes when no execution ended otherwise than expected, the RSS after the last round is
within 10% of the RSS after the first (the warm-up), descriptors, processes and busy cgroups
are back at their warm-up values, and once the executor stopped none of its processes or
cgroups is left. Writes ``bench/results/soak.json`` (``soak.smoke.json``); exits 1 on a
failed criterion.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib

from codemode import ComponentRegistry, tool
from codemode.config import ClientConfig
from codemode.core import ExecutorClient

#: RSS growth of the service process allowed after the warm-up round.
MAX_RSS_GROWTH = 0.10
#: How long the executor may take to be idle again after a round, seconds.
SETTLE_S = 15.0

# ------------------------------------------------------------------------------------------
# The mix


@tool
def echo(i: int) -> int:
    """A sync tool: answers its argument."""
    return i


@tool
async def aecho(i: int) -> int:
    """An async tool: answers its argument after yielding once."""
    await asyncio.sleep(0)
    return i


class RecordMissing(Exception):
    """The application's own error, raised by the ``broken`` tool."""


@tool
def broken(i: int) -> None:
    """A tool that always fails with the application's own error."""
    raise RecordMissing(f"no record {i}")


def registry() -> ComponentRegistry:
    """The tools the mix calls."""
    tools = ComponentRegistry()
    tools.register_tool("echo", echo)
    tools.register_tool("aecho", aecho)
    tools.register_tool("broken", broken)
    return tools


#: One execution of a case: the client and the execution's number; returns what went wrong.
Run = Callable[[ExecutorClient, int], Awaitable[str | None]]


def _expect(result: Any, value: Any = None, error_type: str | None = None) -> str | None:
    """What is wrong with ``result`` against the expected value or error type, or None."""
    if error_type is None:
        if not result.success:
            return f"failed: {result.error_type}: {result.error}"
        if result.value != value:
            return f"value {result.value!r}, expected {value!r}"
        return None
    if result.success or result.error_type != error_type:
        ended = result.error_type or "successfully"
        return f"ended {ended} ({result.error}), expected {error_type}"
    return None


async def _value(client: ExecutorClient, n: int) -> str | None:
    result = await client.execute_async("result = sum(range(config['n']))", config={"n": n})
    return _expect(result, sum(range(n)))


async def _tools(client: ExecutorClient, n: int) -> str | None:
    code = (
        "import asyncio\n"
        "n = config['n']\n"
        "first = tools.echo(i=n)\n"
        "rest = await asyncio.gather(*[tools.aecho.run_async(i=n + k) for k in range(1, 4)])\n"
        "result = [first, *rest]\n"
    )
    result = await client.execute_async(code, config={"n": n})
    return _expect(result, [n, n + 1, n + 2, n + 3])


async def _tool_error(client: ExecutorClient, n: int) -> str | None:
    code = "try:\n    tools.broken(i=config['n'])\nexcept Exception as e:\n    result = str(e)\n"
    result = await client.execute_async(code, config={"n": n})
    if not result.success or f"no record {n}" not in str(result.value):
        return f"the tool's error did not reach the program: {result.value!r} ({result.error})"
    return None


async def _output(client: ExecutorClient, n: int) -> str | None:
    code = (
        "import sys\nfor i in range(50):\n    print(config['n'], 'x' * 100)\n"
        "print('to stderr', file=sys.stderr)\nresult = 1\n"
    )
    result = await client.execute_async(code, config={"n": n})
    problem = _expect(result, 1)
    if problem is None and (result.stdout.count(f"{n} ") != 50 or result.stderr != "to stderr\n"):
        problem = f"output lost: {len(result.stdout)} chars of stdout, stderr {result.stderr!r}"
    return problem


async def _exception(client: ExecutorClient, n: int) -> str | None:
    result = await client.execute_async("raise ValueError(config['n'])", config={"n": n})
    return _expect(result, error_type="ValueError")


async def _files(client: ExecutorClient, n: int) -> str | None:
    code = "open(f\"/output/{config['n']}.txt\", 'w').write('x' * config['n'])\nresult = 1\n"
    result = await client.execute_async(code, config={"n": n})
    problem = _expect(result, 1)
    if problem is None and result.files != {f"{n}.txt": b"x" * n}:
        problem = f"output files {sorted(result.files)}, expected {n}.txt"
    return problem


async def _children(client: ExecutorClient, n: int) -> str | None:
    code = (
        "import os, time\nfor _ in range(3):\n"
        "    if os.fork() == 0:\n        time.sleep(60)\n        os._exit(0)\n"
        "result = config['n']\n"
    )
    return _expect(await client.execute_async(code, config={"n": n}), n)


async def _session(client: ExecutorClient, n: int) -> str | None:
    async with client.session() as session:
        await session.execute_async("import os\nx = 0")
        for _ in range(2):
            await session.execute_async("x += 1")
        result = await session.run_async(f"result = x + {n}")
    return _expect(result, n + 2)


async def _timeout(client: ExecutorClient, n: int) -> str | None:
    result = await client.execute_async("import time\ntime.sleep(30)", execution_timeout=0.3)
    return _expect(result, error_type="Timeout")


async def _output_limit(client: ExecutorClient, n: int) -> str | None:
    code = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n"
    result = await client.execute_async(code, limits={"max_output_bytes": 8192})
    return _expect(result, error_type="OutputLimit")


async def _result_too_large(client: ExecutorClient, n: int) -> str | None:
    result = await client.execute_async("result = 'x' * 100_000", limits={"max_result_bytes": 4096})
    return _expect(result, error_type="ResultTooLarge")


async def _memory_limit(client: ExecutorClient, n: int) -> str | None:
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(8 << 20))\n"
    result = await client.execute_async(code, limits={"memory_bytes": 48 << 20})
    return _expect(result, error_type="MemoryLimit")


#: (name, weight in the mix, run). Weights sum to 100.
CASES: tuple[tuple[str, int, Run], ...] = (
    ("value", 30, _value),
    ("tools", 20, _tools),
    ("tool error", 6, _tool_error),
    ("output", 8, _output),
    ("exception", 8, _exception),
    ("files", 6, _files),
    ("children", 4, _children),
    ("session", 4, _session),
    ("timeout", 4, _timeout),
    ("output limit", 4, _output_limit),
    ("result too large", 4, _result_too_large),
    ("memory limit", 2, _memory_limit),
)


def schedule(executions: int, seed: int) -> list[int]:
    """Which case each execution runs (indexes into :data:`CASES`), shuffled, in proportion."""
    total = sum(weight for _, weight, _ in CASES)
    plan = [i for i, (_, weight, _) in enumerate(CASES) for _ in range(weight)]
    plan = plan * (executions // total) + plan[: executions % total]
    random.Random(seed).shuffle(plan)
    return plan


# ------------------------------------------------------------------------------------------
# What the executor holds


def _cgroup_bases(pid: int) -> list[Path]:
    """Where ``pid``'s cgroups are, in every cgroup hierarchy mounted here."""
    mounts = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] in ("cgroup", "cgroup2"):
            mounts.append(fields)
    bases = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        for fields in mounts:
            unified = fields[2] == "cgroup2" and names == ""
            if unified or (names and set(names.split(",")) & set(fields[3].split(","))):
                bases.append(Path(fields[1]) / path.lstrip("/"))
    return bases


@dataclass
class Snapshot:
    """What the executor holds at one moment."""

    rss_kib: int  # the service process alone (its guests are measured by bench/run.py)
    fds: int  # descriptors the service process holds open (but clients' connections)
    processes: int  # processes below it: the zygotes, their bwraps, idle pooled guests
    cgroups: int  # its cgroup directories (per backend and per execution, all hierarchies)
    busy_cgroups: int  # those holding a process


class Meter:
    """Snapshots of one ``codemode serve`` process, read from ``/proc`` and cgroupfs."""

    def __init__(self, pid: int, port: int) -> None:
        self.pid = pid
        self.port = port
        self._bases = _cgroup_bases(pid)
        self.seen: set[tuple[int, int]] = set()  # (pid, start time) of every process seen

    def cgroup_dirs(self) -> list[Path]:
        """The service's cgroup directories: ``codemode-<pid>-*`` and the groups in them."""
        found: list[Path] = []
        for base in self._bases:
            for root in base.glob(f"codemode-{self.pid}-*"):
                found.append(root)
                try:
                    found += [child for child in root.iterdir() if child.is_dir()]
                except OSError:  # removed meanwhile
                    continue
        return found

    def _busy(self, groups: list[Path]) -> int:
        busy = 0
        for group in groups:
            try:
                busy += bool((group / "cgroup.procs").read_text().strip())
            except OSError:
                continue
        return busy

    def fds(self) -> int:
        """Descriptors the service holds, but the connections clients made to it: gRPC shares
        a connection between a client's channels, and it may outlive the one that opened it."""
        accepted = set()
        for table in ("tcp", "tcp6"):
            for line in Path(f"/proc/{self.pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == self.port and fields[3] != "0A":
                    accepted.add(f"socket:[{fields[9]}]")
        count = 0
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                count += os.readlink(f"/proc/{self.pid}/fd/{fd}") not in accepted
            except OSError:
                continue
        return count

    def processes(self) -> list[tuple[int, int]]:
        """(pid, start time) of every live process below the service."""
        stats = benchlib.proc_stats()
        found = [
            (pid, int(stats[pid][19]))
            for pid in benchlib.tree_pids(self.pid, stats)
            if pid != self.pid and pid in stats and stats[pid][0] != b"Z"
        ]
        self.seen.update(found)
        return found

    def snapshot(self) -> Snapshot:
        with open(f"/proc/{self.pid}/statm", "rb") as statm:
            rss_pages = int(statm.read().split()[1])
        groups = self.cgroup_dirs()
        return Snapshot(
            rss_kib=rss_pages * os.sysconf("SC_PAGE_SIZE") // 1024,
            fds=self.fds(),
            processes=len(self.processes()),
            cgroups=len(groups),
            busy_cgroups=self._busy(groups),
        )

    def left_behind(self) -> dict[str, list[str]]:
        """After the service stopped: its processes still alive, its cgroups still there."""
        stats = benchlib.proc_stats()
        alive = [
            str(pid)
            for pid, start in self.seen
            if pid in stats and int(stats[pid][19]) == start and stats[pid][0] != b"Z"
        ]
        return {"processes": alive, "cgroups": [str(p) for p in self.cgroup_dirs()]}


async def settled(meter: Meter, target: Snapshot | None, timeout_s: float = SETTLE_S) -> Snapshot:
    """A snapshot once the executor is idle: processes, descriptors and busy cgroups at
    ``target``'s (or, with none, unchanged for half a second); the last one on timeout."""
    deadline = time.monotonic() + timeout_s
    last = meter.snapshot()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25 if target is None else 0.05)
        now = meter.snapshot()
        keys = (now.processes, now.fds, now.busy_cgroups)
        if target is not None and keys == (target.processes, target.fds, target.busy_cgroups):
            return now
        if target is None and keys == (last.processes, last.fds, last.busy_cgroups):
            return now
        last = now
    return last


# ------------------------------------------------------------------------------------------
# The soak


async def soak(
    client: ExecutorClient,
    meter: Meter,
    executions: int,
    in_flight: int,
    rounds: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Run ``executions`` of the mix at ``in_flight`` at once on ``client``, in ``rounds``.

    Returns the outcome counts per case, the unexpected ones (at most 20 described), a
    snapshot after each round and the verdict of each criterion (``passed``: all of them;
    the leftovers after the executor stops are the caller's to check).
    """
    plan = schedule(executions, seed)
    per_round = -(-executions // rounds)
    gate = asyncio.Semaphore(in_flight)
    counts = {name: 0 for name, _, _ in CASES}
    unexpected: list[str] = []
    unexpected_count = 0
    latencies: list[float] = []

    async def one(n: int, case: int) -> None:
        nonlocal unexpected_count
        name, _, run = CASES[case]
        async with gate:
            started = time.perf_counter()
            try:
                problem = await run(client, n)
            except Exception as exc:  # a raised error is an unexpected outcome too
                problem = f"raised {exc!r}"[:300]
            latencies.append(time.perf_counter() - started)
        counts[name] += 1
        if problem is not None:
            unexpected_count += 1
            if len(unexpected) < 20:
                unexpected.append(f"#{n} {name}: {problem}")

    snapshots: list[Snapshot] = []
    began = time.perf_counter()
    busy_s = 0.0
    for first in range(0, executions, per_round):
        round_started = time.perf_counter()
        batch = range(first, min(first + per_round, executions))
        await asyncio.gather(*(one(n, plan[n]) for n in batch))
        busy_s += time.perf_counter() - round_started
        snapshots.append(await settled(meter, snapshots[0] if snapshots else None))
    elapsed = time.perf_counter() - began
    warm, last = snapshots[0], snapshots[-1]
    growth = (last.rss_kib - warm.rss_kib) / warm.rss_kib
    checks = {
        "no_unexpected_outcome": unexpected_count == 0,
        "rss_flat": growth <= MAX_RSS_GROWTH,
        "fds_back": last.fds == warm.fds,
        "processes_back": last.processes == warm.processes,
        "busy_cgroups_back": last.busy_cgroups == warm.busy_cgroups,
    }
    return {
        "executions": executions,
        "in_flight": in_flight,
        "rounds": len(snapshots),
        "seed": seed,
        "cases": counts,
        "unexpected": unexpected_count,
        "unexpected_first": unexpected,
        "exec_per_s": round(executions / busy_s, 1),
        "elapsed_s": round(elapsed, 1),
        "latency_ms": benchlib.summarize_ms(latencies),
        "rss_growth_pct": round(growth * 100, 2),
        "rss_max_growth_pct": round(
            (max(s.rss_kib for s in snapshots) - warm.rss_kib) / warm.rss_kib * 100, 2
        ),
        "snapshots": [asdict(s) for s in snapshots],
        "checks": checks,
        "passed": all(checks.values()),
    }


async def main() -> None:
    from run import Executor

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executions", type=int, default=10_000)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--isolation", help="the executor's --isolation (default its own)")
    parser.add_argument("--serve-arg", action="append", default=[], help="more for serve")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; no timing claims")
    args = parser.parse_args()
    executions, in_flight, rounds = (
        (120, 8, 4) if args.smoke else (args.executions, args.in_flight, args.rounds)
    )
    serve_args = [f"--isolation={args.isolation}"] if args.isolation else []
    serve_args += ["--max-concurrent", str(in_flight), "--log-level", "WARNING", *args.serve_arg]
    executor = Executor(secrets.token_hex(16), serve_args)
    await executor.start()
    meter = Meter(executor.pid, executor.port)
    config = ClientConfig(executor_url=executor.url, executor_api_key=executor.api_key)
    try:
        async with ExecutorClient(config=config, registry=registry()) as client:
            first = await client.execute_async("result = 1")  # the zygote is up
            if not first.success:
                raise RuntimeError(f"the executor does not serve: {first.error}")
            result = await soak(client, meter, executions, in_flight, rounds, args.seed)
    except BaseException:
        print(f"executor log tail:\n{executor.log_tail()}", file=sys.stderr)
        raise
    finally:
        meter.processes()
        await executor.stop()
    left = await asyncio.to_thread(_left_behind, meter)
    result["left_behind"] = left
    result["checks"]["nothing_left"] = not left["processes"] and not left["cgroups"]
    result["passed"] = all(result["checks"].values())
    doc = {"machine": benchlib.machine_info(), "smoke": args.smoke, **result}
    benchlib.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = benchlib.RESULTS_DIR / ("soak.smoke.json" if args.smoke else "soak.json")
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: v for k, v in doc.items() if k != "snapshots"}, indent=2))
    if not result["passed"]:
        failed = [name for name, ok in result["checks"].items() if not ok]
        sys.exit(f"soak failed: {', '.join(failed)}")


def _left_behind(meter: Meter, timeout_s: float = 5.0) -> dict[str, list[str]]:
    deadline = time.monotonic() + timeout_s
    while True:
        left = meter.left_behind()
        if not (left["processes"] or left["cgroups"]) or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


if __name__ == "__main__":
    asyncio.run(main())
