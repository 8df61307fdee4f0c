"""Shared, standard-library-only helpers for the benchmark scripts.

Imported by both ``bench/run.py`` (our SDK, project venv) and ``bench/baseline_opencodemode.py``
(the incumbent, in its own venv), so it must not import ``codemode`` or any third-party package.
Both scripts describe one run with the same workload names and keys so ``compare.py`` can line
them up.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import json
import os
import platform
import socket
import statistics
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
#: Where result files go; ``CODEMODE_BENCH_RESULTS`` overrides it (the smoke test uses a tmp dir).
RESULTS_DIR = Path(os.environ.get("CODEMODE_BENCH_RESULTS") or BENCH_DIR / "results")

#: Workload sizes for a full run and for ``--smoke`` (CI: proves it works, asserts no speed).
FULL = {
    "a_n": 200,
    "b_calls": 50,
    "b_reps": 10,
    "c_n": 400,
    "c_in_flight": 16,
    "e_calls": 10,
    "e_sleep_s": 0.1,
    "e_reps": 5,
    "warmup": 5,
}
SMOKE = {
    "a_n": 5,
    "b_calls": 5,
    "b_reps": 2,
    "c_n": 16,
    "c_in_flight": 4,
    "e_calls": 10,
    "e_sleep_s": 0.1,
    "e_reps": 1,
    "warmup": 1,
}

# The programs each side runs. The tool-calling ones differ in surface syntax only, since the
# incumbent's guest has no top-level ``await`` and proxies a tool as ``tools[name].run``.
CODE_TRIVIAL = "result = 2 + 2"
CODE_SUM = "result = sum(range(1000))"
#: bench/programs.py's program with a package: the sandbox imports pandas (the incumbent's guest
#: imports it from its own venv, where ``bench/setup_baseline.sh`` installs it).
CODE_PANDAS = "import pandas as pd; result = int(pd.DataFrame({'a': range(1000)}).a.sum())"
PANDAS_RESULT = sum(range(1000))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100.0 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summarize_ms(samples_s: list[float]) -> dict[str, float]:
    """p50/p99/mean/min/max in milliseconds from samples in seconds."""
    ms = [s * 1000.0 for s in samples_s]
    return {
        "p50_ms": round(statistics.median(ms), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "min_ms": round(min(ms), 3),
        "max_ms": round(max(ms), 3),
    }


def remove_file(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for_port(port: int, timeout_s: float = 30.0, host: str = "127.0.0.1") -> None:
    """Wait until something accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nothing listening on {host}:{port} after {timeout_s}s"
                ) from None
            await asyncio.sleep(0.05)
        else:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return


# --------------------------------------------------------------------------------------------
# Memory of a process tree, from /proc (Linux only; no psutil in either venv)
#
# Two measures, taken by the same code on both sides:
#
# - RSS-sum: the resident set sizes of every process in the tree added up. A page shared by N
#   processes (copy-on-write pages of a forked parent, shared libraries) is counted N times, so a
#   fork server whose guests share the zygote's imported modules looks N times bigger than it is.
# - PSS-sum: the proportional set sizes (``Pss:`` of ``/proc/PID/smaps_rollup``) added up. A page
#   shared by N processes counts 1/N in each, so the sum is what the tree really holds in RAM.
#   This is the one to compare; RSS-sum is kept because it is what ``ps``/``top`` would suggest.

_PAGE = os.sysconf("SC_PAGE_SIZE")


def proc_stats() -> dict[int, list[bytes]]:
    """Every process's /proc/PID/stat fields from the state on (``[0]`` is field 3)."""
    stats: dict[int, list[bytes]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may contain spaces or parentheses: split after the last ')'.
        stats[int(entry.name)] = stat[stat.rfind(b")") + 2 :].split()
    return stats


def _children_map(stats: dict[int, list[bytes]] | None = None) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for pid, fields in (stats if stats is not None else proc_stats()).items():
        children.setdefault(int(fields[1]), []).append(pid)
    return children


def tree_pids(root: int, stats: dict[int, list[bytes]] | None = None) -> list[int]:
    children = _children_map(stats)
    pids, stack = [], [root]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        stack.extend(children.get(pid, []))
    return pids


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


def tree_rss_bytes(root: int) -> int:
    """Sum of resident set sizes over ``root`` and all its descendants."""
    return sum(_rss_bytes(pid) for pid in tree_pids(root))


def tree_pss_bytes(root: int) -> int:
    """Sum of proportional set sizes over ``root`` and all its descendants."""
    return sum(_pss_bytes(pid) for pid in tree_pids(root))


def tree_memory_bytes(root: int) -> tuple[int, int]:
    """(RSS-sum, PSS-sum) of ``root``'s tree, from one listing of its processes."""
    pids = tree_pids(root)
    return sum(_rss_bytes(p) for p in pids), sum(_pss_bytes(p) for p in pids)


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int) -> float:
    """CPU time used so far by ``root``'s process tree, children already reaped included.

    A process that exited is counted once its parent in the tree has waited for it (its
    time moves into the parent's cutime/cstime); kernel threads working for the tree (network
    namespace clean-up, RCU) are not counted.
    """
    stats = proc_stats()  # one read of each process: utime, stime, cutime, cstime
    ticks = sum(sum(int(x) for x in stats[pid][11:15]) for pid in tree_pids(root, stats))
    return ticks / _CLK_TCK


def own_cpu_seconds() -> float:
    """CPU time of this process (all threads): user + system."""
    t = os.times()
    return t.user + t.system


class CpuMeter:
    """CPU seconds used during ``with`` by this process and by an executor's process tree."""

    def __init__(self, executor_pid: int | None) -> None:
        self.executor_pid = executor_pid
        self.client_s = 0.0
        self.executor_s = 0.0

    def __enter__(self) -> CpuMeter:
        self._client0 = own_cpu_seconds()
        self._executor0 = tree_cpu_seconds(self.executor_pid) if self.executor_pid else 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.client_s = own_cpu_seconds() - self._client0
        if self.executor_pid:
            self.executor_s = tree_cpu_seconds(self.executor_pid) - self._executor0

    def per_execution_ms(self, n: int) -> dict[str, float]:
        """``client_cpu_ms`` and ``executor_cpu_ms`` per execution (the sampler thread and the
        harness are in the client's figure)."""
        out = {"client_cpu_ms": round(self.client_s * 1000 / n, 3)}
        if self.executor_pid:
            out["executor_cpu_ms"] = round(self.executor_s * 1000 / n, 3)
        return out


class RssSampler:
    """Samples RSS-sum and PSS-sum of a process tree on a background thread during ``with``."""

    def __init__(self, root_pid: int, interval_s: float = 0.1) -> None:
        self.root_pid = root_pid
        self.interval_s = interval_s
        self.samples: list[int] = []
        self.pss_samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss, pss = tree_memory_bytes(self.root_pid)
            self.samples.append(rss)
            self.pss_samples.append(pss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self, idle_bytes: int, idle_pss_bytes: int | None = None) -> dict[str, float]:
        """RSS keys as before (``idle_mib``, ``peak_mib``, ``median_mib``) plus ``pss_*``."""
        mib = 1024.0 * 1024.0
        samples = self.samples or [0]
        pss = self.pss_samples or [0]
        out = {
            "idle_mib": round(idle_bytes / mib, 1),
            "peak_mib": round(max(samples) / mib, 1),
            "median_mib": round(statistics.median(samples) / mib, 1),
            "samples": len(self.samples),
            "pss_peak_mib": round(max(pss) / mib, 1),
            "pss_median_mib": round(statistics.median(pss) / mib, 1),
        }
        if idle_pss_bytes is not None:
            out["pss_idle_mib"] = round(idle_pss_bytes / mib, 1)
        return out


# --------------------------------------------------------------------------------------------
# Workload drivers: each side supplies ``execute(code) -> awaitable JSON string``


Execute = Callable[[str], Awaitable[str]]


def decode(result: str) -> Any:
    """The Python value of an execution's JSON-encoded result (fails loudly on an error)."""
    try:
        return json.loads(result)
    except (TypeError, ValueError):
        raise AssertionError(f"execution did not return a JSON result: {result!r}") from None


async def timed(execute: Execute, code: str, expect: Any) -> float:
    start = time.perf_counter()
    out = await execute(code)
    elapsed = time.perf_counter() - start
    value = decode(out)
    if value != expect:
        raise AssertionError(f"expected {expect!r}, got {value!r} for {code!r}")
    return elapsed


async def sequential(execute: Execute, code: str, expect: Any, n: int) -> list[float]:
    return [await timed(execute, code, expect) for _ in range(n)]


async def tool_loop(
    execute: Execute, make_code: Callable[[int], str], calls: int, reps: int
) -> dict[str, float]:
    """Per-call cost of a tool: (median time with ``calls`` calls - median with 0) / calls."""
    with_calls, without = [], []
    for _ in range(reps):
        # Interleave so drift (thermal, GC, page cache) hits both sides alike.
        without.append(await timed(execute, make_code(0), 0))
        with_calls.append(await timed(execute, make_code(calls), calls))
    full = statistics.median(with_calls)
    empty = statistics.median(without)
    return {
        "calls": calls,
        "reps": reps,
        "per_call_ms": round((full - empty) * 1000.0 / calls, 4),
        "total_ms_p50": round(full * 1000.0, 3),
        "empty_ms_p50": round(empty * 1000.0, 3),
    }


async def concurrent(
    execute: Execute, code: str, expect: Any, n: int, in_flight: int
) -> dict[str, float]:
    """``n`` executions with ``in_flight`` outstanding at any time from one client."""
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker() -> None:
        while True:
            try:
                queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            latencies.append(await timed(execute, code, expect))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    wall = time.perf_counter() - start
    out: dict[str, float] = {"n": n, "in_flight": in_flight, "wall_s": round(wall, 3)}
    out["exec_per_s"] = round(n / wall, 2)
    out.update(summarize_ms(latencies))
    return out


# --------------------------------------------------------------------------------------------
# Output


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        # Other work on the machine skews timings: the 1-minute load average when the run ended.
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                info["os"] = line.split("=", 1)[1].strip('"')
    return info


def write_results(name: str, impl: str, workloads: dict[str, Any], smoke: bool) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    doc = {
        "impl": impl,
        "smoke": smoke,
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine_info(),
        "workloads": workloads,
    }
    path = RESULTS_DIR / (f"{name}.smoke.json" if smoke else f"{name}.json")
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


#: Rows shown for information without a ratio: RSS-sum counts pages shared between a fork server
#: and its forked guests once per process, so it is not comparable across designs (PSS is).
NO_RATIO: frozenset[tuple[str, str]] = frozenset({("d_rss", "peak_mib"), ("d_rss", "idle_mib")})

#: (workload, key, label, unit, higher_is_better)
METRICS: list[tuple[str, str, str, str, bool]] = [
    ("a_trivial", "p50_ms", "a. `result = 2 + 2` p50", "ms", False),
    ("a_trivial", "p99_ms", "a. `result = 2 + 2` p99", "ms", False),
    ("b_tool_sync", "per_call_ms", "b. sync tool, per call", "ms", False),
    ("b_tool_async", "per_call_ms", "b. async tool, per call", "ms", False),
    ("c_concurrent", "exec_per_s", "c. 16 in flight, throughput", "exec/s", True),
    ("c_concurrent", "p50_ms", "c. 16 in flight, p50", "ms", False),
    ("c_concurrent", "p99_ms", "c. 16 in flight, p99", "ms", False),
    ("c_concurrent", "executor_cpu_ms", "c. executor CPU per execution", "ms", False),
    ("c_concurrent", "client_cpu_ms", "c. client CPU per execution", "ms", False),
    ("d_rss", "pss_peak_mib", "d. executor PSS-sum peak (during c)", "MiB", False),
    ("d_rss", "pss_idle_mib", "d. executor PSS-sum idle", "MiB", False),
    ("d_rss", "peak_mib", "d. executor RSS-sum peak (during c)", "MiB", False),
    ("d_rss", "idle_mib", "d. executor RSS-sum idle", "MiB", False),
    ("e_gather", "total_ms_p50", "e. 10 x 100 ms tools under gather", "ms", False),
]


def iter_metrics(workloads: dict[str, Any]) -> Iterator[tuple[str, str, Any]]:
    for workload, key, label, unit, _ in METRICS:
        yield label, unit, workloads.get(workload, {}).get(key)


def print_table(title: str, workloads: dict[str, Any]) -> None:
    rows = [
        (label, "-" if v is None else f"{v:g}", unit) for label, unit, v in iter_metrics(workloads)
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{title}")
    print("-" * (width + 22))
    for label, value, unit in rows:
        print(f"{label:<{width}}  {value:>12} {unit}")
    print("-" * (width + 22))


# Tools both sides register (the application side of the tool workloads).


class Echo:
    """Trivial synchronous tool."""

    def run(self, **kwargs: Any) -> dict[str, Any]:
        return kwargs


class AsyncEcho:
    """Trivial asynchronous tool."""

    async def run_async(self, **kwargs: Any) -> dict[str, Any]:
        return kwargs


class Sleepy:
    """Asynchronous tool that sleeps for a fixed time."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def run_async(self, **kwargs: Any) -> dict[str, Any]:
        await asyncio.sleep(self.seconds)
        return kwargs
