"""Real programs: pandas in the sandbox, a file in, tool calls; ours and the incumbent, alternated.

    .venv/bin/python bench/programs.py [--rounds 6] [--sandbox-venv DIR] [--no-baseline] [--smoke]

Ours runs as four ``codemode serve`` (``run.py``'s ``Executor``, logging at WARNING), all up for
the whole run: ``preload`` (``--sandbox-venv DIR --preload pandas``), ``warm`` (the same, plus
``--preload-warmup`` with a first tiny DataFrame: :data:`WARMUP`), ``venv`` (the same venv,
nothing preloaded) and ``plain`` (neither). The sandbox venv is ``--sandbox-venv`` or the tests'
(``tests/sandbox_venv.py``: numpy, pandas, tzdata; built on first use). The incumbent runs in
its own process with its own interpreter, ``baseline_opencodemode.py --programs N``, once per
round (``--baseline-python``, default ``$BASELINE_VENV/bin/python``; ``--no-baseline`` skips it).

Each round measures, sequentially, through the public SDK:

1. ``CODE_PANDAS`` (``import pandas as pd`` and a sum over a DataFrame) on ``warm`` and on
   ``preload``;
2. the same on ``venv``: the import that preloading saves;
3. the same on the incumbent, with pandas in its venv (``bench/setup_baseline.sh``), against
   ``warm``;
4. ``result = 2 + 2`` on ``preload`` and on ``plain``: what a preloaded zygote costs programs
   that do not use it;
5. a 10 MiB text file in (``files={"big.txt": ...}``), the program counting its lines from
   ``/input/big.txt``, on ``plain``;
6. a sync tool's round trip, per call, on ``plain`` and on the incumbent (``run.py``'s workload
   b: (median with 50 calls - median with 0 calls) / 50).

7. a session on ``plain``: ``x = 0``, then 100 executions of ``x += 1``, each timed (the
   last one's ``x`` checked).

Rounds alternate ours/incumbent, then incumbent/ours, and ours reverses its order of blocks
every other round, so that this VM's drift hits every side alike. Latencies are pooled over all
rounds (p50, nearest-rank p99); the tool's per-call figure is the median of the rounds'. Every
result is checked. ``--smoke`` runs tiny sizes and makes no timing claims. Writes
``bench/results/programs.json`` (``programs.smoke.json`` with ``--smoke``).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
from run import Executor, _close, _ready, code_sync_tool

ROOT = benchlib.BENCH_DIR.parent
BASELINE_SCRIPT = benchlib.BENCH_DIR / "baseline_opencodemode.py"

#: Sizes per round: executions of each block, the file, the tool loop, the incumbent's share.
FULL = {
    "rounds": 6,
    "pandas_n": 100,
    "venv_n": 8,
    "trivial_n": 150,
    "session_n": 100,
    "file_n": 20,
    "file_bytes": 10 * 1024 * 1024,
    "tool_calls": 50,
    "tool_reps": 10,
    "baseline_pandas_n": 12,
    "baseline_tool_reps": 8,
}
SMOKE = {
    "rounds": 2,
    "pandas_n": 2,
    "venv_n": 1,
    "trivial_n": 2,
    "session_n": 3,
    "file_n": 1,
    "file_bytes": 256 * 1024,
    "tool_calls": 3,
    "tool_reps": 1,
    "baseline_pandas_n": 1,
    "baseline_tool_reps": 1,
}

CODE_LINES = "with open('/input/big.txt') as f:\n    result = sum(1 for _ in f)\n"


def text_file(size: int) -> tuple[bytes, int]:
    """``size`` bytes of 64-byte text lines (``size`` a multiple of 64) and their count."""
    filler = b"the quick brown fox jumps over the lazy dog, again and again"[:54]
    lines = size // 64
    data = b"".join(b"%08d %s\n" % (i, filler) for i in range(lines))
    assert len(data) == size, "size must be a multiple of 64"
    return data, lines


def default_sandbox_venv() -> Path:
    """The tests' sandbox venv (numpy, pandas, tzdata), built if missing."""
    sys.path.insert(0, str(ROOT))
    from tests.sandbox_venv import build_sandbox_venv

    return build_sandbox_venv()


def _ms(seconds: list[float]) -> dict[str, float]:
    return {"n": len(seconds), **benchlib.summarize_ms(seconds)}


# --------------------------------------------------------------------------------------------
# Ours


#: What an operator whose programs build DataFrames gives ``--preload-warmup``: a first, tiny
#: DataFrame and a reduction, so that pandas' first-use set-up happens once in the zygote.
WARMUP = "import pandas as pd; pd.DataFrame({'a': range(10)}).a.sum()"


class Ours:
    """Our four executors and a client on each, for the whole run."""

    def __init__(self, venv: Path, extra: list[str]) -> None:
        key = secrets.token_hex(16)
        base = ["--log-level=WARNING", *extra]
        with_venv = [*base, f"--sandbox-venv={venv}"]
        self.executors = {
            "preload": Executor(key, [*with_venv, "--preload=pandas"]),
            "warm": Executor(key, [*with_venv, "--preload=pandas", f"--preload-warmup={WARMUP}"]),
            "venv": Executor(key, with_venv),
            "plain": Executor(key, base),
        }
        self.clients: dict[str, Any] = {}

    async def start(self) -> None:
        from codemode import Codemode
        from codemode.config import ClientConfig

        for name, executor in self.executors.items():
            await executor.start()
            client = Codemode.from_client_config(
                ClientConfig(executor_url=executor.url, executor_api_key=executor.api_key)
            )
            client.registry.register_tool("echo", benchlib.Echo())
            self.clients[name] = client
            await _ready(client.execute_async)

    async def stop(self) -> None:
        for client in self.clients.values():
            await _close(client)
        for executor in self.executors.values():
            await executor.stop()

    def log_tails(self) -> str:
        return "\n".join(f"{n}:\n{e.log_tail()}" for n, e in self.executors.items())

    async def round(self, sizes: dict[str, int], big: bytes, lines: int, flip: bool) -> dict:
        """One round of ours: each block warmed up, then timed, in reverse order when ``flip``."""
        c = self.clients
        with_file = functools.partial(c["plain"].execute_async, files={"big.txt": big})
        pandas = (benchlib.CODE_PANDAS, benchlib.PANDAS_RESULT)
        trivial = (benchlib.CODE_TRIVIAL, 4)
        blocks: list[tuple[str, benchlib.Execute, tuple[str, Any], int, int]] = [
            ("pandas_preload", c["preload"].execute_async, pandas, sizes["pandas_n"], 2),
            ("pandas_warm", c["warm"].execute_async, pandas, sizes["pandas_n"], 2),
            ("pandas_venv", c["venv"].execute_async, pandas, sizes["venv_n"], 1),
            ("trivial_preload", c["preload"].execute_async, trivial, sizes["trivial_n"], 3),
            ("trivial_plain", c["plain"].execute_async, trivial, sizes["trivial_n"], 3),
            ("file", with_file, (CODE_LINES, lines), sizes["file_n"], 1),
            ("sync_tool", c["plain"].execute_async, ("", None), 0, 0),
            ("session", c["plain"].execute_async, ("", None), sizes["session_n"], 0),
        ]
        samples: dict[str, Any] = {}
        for name, execute, (code, expect), n, warmup in blocks[::-1] if flip else blocks:
            if name == "session":
                samples[name] = await session_increments(c["plain"], n)
                continue
            if name == "sync_tool":  # run.py's workload b, with its warm-up
                await benchlib.timed(execute, code_sync_tool(2), 2)
                samples[name] = await benchlib.tool_loop(
                    execute, code_sync_tool, sizes["tool_calls"], sizes["tool_reps"]
                )
                continue
            await benchlib.sequential(execute, code, expect, warmup)
            samples[name] = await benchlib.sequential(execute, code, expect, n)
        return samples

    def idle_memory(self) -> dict[str, float]:
        """PSS-sum of each executor's process tree, MiB."""
        mib = 1024.0 * 1024.0
        return {
            name: round(benchlib.tree_memory_bytes(e.pid)[1] / mib, 1)
            for name, e in self.executors.items()
        }


async def session_increments(codemode: Any, n: int) -> list[float]:
    """``n`` executions of ``x += 1`` in one session (after ``x = 0``), each timed."""
    async with codemode.session() as session:
        await session.execute_async("x = 0")
        samples = []
        for _ in range(n):
            started = time.perf_counter()
            await session.execute_async("x += 1")
            samples.append(time.perf_counter() - started)
        got = await session.execute_async("result = x")
    if got != str(n):
        raise AssertionError(f"the session counted to {got}, not {n}")
    return samples


# --------------------------------------------------------------------------------------------
# The incumbent


async def incumbent_round(python: str, sizes: dict[str, int]) -> dict[str, Any]:
    """One round of the incumbent, in its own process with its own interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = await asyncio.create_subprocess_exec(
        python,
        str(BASELINE_SCRIPT),
        "--programs",
        str(sizes["baseline_pandas_n"]),
        "--tool-calls",
        str(sizes["tool_calls"]),
        "--tool-reps",
        str(sizes["baseline_tool_reps"]),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"the incumbent's round failed:\n{err.decode()[-3000:]}")
    doc: dict[str, Any] = json.loads(out.decode().splitlines()[-1])
    return doc


def check_baseline(python: str) -> None:
    """Exit with the fix when the baseline interpreter is missing or lacks pandas."""
    fix = "run `bash bench/setup_baseline.sh`, or pass --no-baseline"
    if not Path(python).exists():
        sys.exit(f"no baseline interpreter at {python}: {fix}")
    check = "import pandas; from importlib.metadata import version; version('opencodemode')"
    done = subprocess.run([python, "-c", check], capture_output=True, check=False, timeout=60)
    if done.returncode != 0:
        sys.exit(f"{python} lacks opencodemode or pandas: {fix}")


# --------------------------------------------------------------------------------------------
# The run


def _line(side: str, figures: dict[str, float]) -> str:
    return f"{side:10s} " + " ".join(f"{k}={v:.3f}" for k, v in figures.items())


async def measure(args: argparse.Namespace, sizes: dict[str, int], venv: Path) -> dict[str, Any]:
    big, lines = text_file(sizes["file_bytes"])
    extra = ([f"--isolation={args.isolation}"] if args.isolation else []) + args.serve_arg
    ours = Ours(venv, extra)
    pooled: dict[str, list[float]] = {}
    rounds: dict[str, list[dict[str, Any]]] = {"ours": [], "opencodemode": []}
    try:
        await ours.start()
        for rep in range(sizes["rounds"]):
            sides = ["ours", "opencodemode"] if rep % 2 == 0 else ["opencodemode", "ours"]
            for side in sides:
                if side == "opencodemode" and args.no_baseline:
                    continue
                load = round(os.getloadavg()[0], 2)
                if side == "ours":
                    got = await ours.round(sizes, big, lines, flip=rep % 2 == 1)
                    figures = {}
                    for name, samples in got.items():
                        if name == "sync_tool":
                            figures["sync_tool_per_call_ms"] = samples["per_call_ms"]
                            continue
                        pooled.setdefault(name, []).extend(samples)
                        figures[f"{name}_p50_ms"] = round(statistics.median(samples) * 1000, 3)
                    rounds["ours"].append({**figures, "loadavg_1m": load})
                else:
                    got = await incumbent_round(args.baseline_python, sizes)
                    pooled.setdefault("baseline_pandas", []).extend(got["pandas_s"])
                    figures = {
                        "pandas_p50_ms": round(statistics.median(got["pandas_s"]) * 1000, 3),
                        "sync_tool_per_call_ms": got["sync_tool"]["per_call_ms"],
                    }
                    rounds["opencodemode"].append({**figures, "loadavg_1m": load})
                print(_line(side, figures), flush=True)
        memory = ours.idle_memory()
    except BaseException:
        print(f"executor log tails:\n{ours.log_tails()}", file=sys.stderr)
        raise
    finally:
        await ours.stop()

    def per_call(side: str) -> float | None:
        values = [r["sync_tool_per_call_ms"] for r in rounds[side]]
        return round(statistics.median(values), 4) if values else None

    return {
        "sizes": sizes,
        "sandbox_venv": str(venv),
        "pandas_preload": _ms(pooled["pandas_preload"]),
        "pandas_warm": _ms(pooled["pandas_warm"]),
        "pandas_venv": _ms(pooled["pandas_venv"]),
        "pandas_baseline": _ms(pooled["baseline_pandas"]) if "baseline_pandas" in pooled else None,
        "trivial_preload": _ms(pooled["trivial_preload"]),
        "trivial_plain": _ms(pooled["trivial_plain"]),
        "file": {"bytes": len(big), "lines": lines, **_ms(pooled["file"])},
        "sync_tool_per_call_ms": {
            "codemode": per_call("ours"),
            "opencodemode": per_call("opencodemode"),
        },
        "session_increment": _ms(pooled["session"]),
        "idle_pss_mib": memory,
        "rounds": rounds,
    }


def _times(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing or ``b`` is not positive (smoke sizes)."""
    return a / b if a is not None and b is not None and b > 0 else None


def table(w: dict[str, Any], smoke: bool) -> list[dict[str, Any]]:
    """The report's rows: workload, unit, opencodemode, codemode, ratio, target, met."""
    pre, venv, warm = w["pandas_preload"], w["pandas_venv"], w["pandas_warm"]
    inc = w["pandas_baseline"] or {"p50_ms": None, "p99_ms": None}
    plain, pre2 = w["trivial_plain"]["p50_ms"], w["trivial_preload"]["p50_ms"]
    tool = w["sync_tool_per_call_ms"]
    file_p50 = w["file"]["p50_ms"]
    rows: list[dict[str, Any]] = []

    def row(workload: str, unit: str, theirs: Any, ours: Any, ratio: str = "", **kw: Any) -> None:
        met = kw.get("met")
        rows.append(
            {
                "workload": workload,
                "unit": unit,
                "opencodemode": theirs,
                "codemode": ours,
                "ratio": ratio,
                "target": kw.get("target", ""),
                "met": None if smoke or met is None else ("yes" if met else "no"),
            }
        )

    def text(ratio: float | None, fmt: str, what: str) -> str:
        if ratio is None:
            return "not measured (--no-baseline)" if w["pandas_baseline"] is None else "n/a"
        return f"{ratio:{fmt}}x {what}"

    slower = _times(venv["p50_ms"], pre["p50_ms"])
    faster = _times(inc["p50_ms"], warm["p50_ms"])
    faster99 = _times(inc["p99_ms"], warm["p99_ms"])
    overhead = _times(pre2, plain)
    tool_ratio = _times(tool["opencodemode"], tool["codemode"])
    row(
        "1. pandas program, preloaded and warmed up, p50",
        "ms",
        None,
        warm["p50_ms"],
        target="<= 8 ms",
        met=warm["p50_ms"] <= 8,
    )
    row("1. pandas program, preloaded and warmed up, p99", "ms", None, warm["p99_ms"])
    row("1. pandas program, preloaded, no warm-up, p50", "ms", None, pre["p50_ms"])
    row(
        "2. pandas program, venv without preload, p50",
        "ms",
        None,
        venv["p50_ms"],
        f"{slower:.0f}x the preloaded p50" if slower else "",
    )
    row(
        "3. pandas program, incumbent vs ours preloaded and warmed up, p50",
        "ms",
        inc["p50_ms"],
        warm["p50_ms"],
        text(faster, ".0f", "better"),
        target=">= 50x",
        met=None if faster is None else faster >= 50,
    )
    row(
        "3. pandas program, incumbent vs ours preloaded and warmed up, p99",
        "ms",
        inc["p99_ms"],
        warm["p99_ms"],
        text(faster99, ".0f", "better"),
    )
    row("4. `result = 2 + 2`, no venv or preload, p50", "ms", None, plain)
    row(
        "4. `result = 2 + 2`, pandas preloaded, p50",
        "ms",
        None,
        pre2,
        f"{overhead:.2f}x the plain p50" if overhead else "",
        target="within 15 %",
        met=None if overhead is None else overhead <= 1.15,
    )
    row(
        f"5. {w['file']['bytes'] / 2**20:g} MiB file in, count its lines, p50",
        "ms",
        None,
        file_p50,
        target="<= 60 ms",
        met=file_p50 <= 60,
    )
    row(
        "6. sync tool, per call",
        "ms",
        tool["opencodemode"],
        tool["codemode"],
        text(tool_ratio, ".1f", "better"),
        target=">= 3x",
        met=None if tool_ratio is None else tool_ratio >= 3,
    )
    session = w["session_increment"]["p50_ms"]
    in_session = _times(session, plain)
    row(
        f"7. session: {w['sizes']['session_n']} executions of `x += 1`, p50 each",
        "ms",
        None,
        session,
        f"{in_session:.2f}x a fresh sandbox's `2 + 2`" if in_session else "",
        target="<= `2 + 2` in a fresh sandbox",
        met=None if in_session is None else in_session <= 1,
    )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if value < 100 else f"{value:,.0f}"
        return str(value)

    head = ["workload", "unit", "opencodemode", "codemode", "ratio", "target", "met?"]
    lines = [
        [
            r["workload"],
            r["unit"],
            cell(r["opencodemode"]),
            cell(r["codemode"]),
            r["ratio"],
            r["target"],
            r["met"] or "",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    print()
    for line in [head, *lines]:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; checks every value")
    parser.add_argument("--rounds", type=int, help="rounds per side (default 6, smoke 2)")
    parser.add_argument("--sandbox-venv", type=Path, help="default: the tests' sandbox venv")
    parser.add_argument(
        "--baseline-python",
        default=str(Path(os.environ.get("BASELINE_VENV", "/work/baseline-venv")) / "bin/python"),
        help="the incumbent's interpreter (default $BASELINE_VENV/bin/python)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="measure ours only")
    parser.add_argument(
        "--isolation",
        choices=["auto", "forkserver", "bwrap", "process"],
        help="passed to each `codemode serve` (default: its own, auto)",
    )
    parser.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra `codemode serve` argument (repeatable)",
    )
    args = parser.parse_args()

    sizes = dict(SMOKE if args.smoke else FULL)
    if args.rounds:
        sizes["rounds"] = args.rounds
    if not args.no_baseline:
        check_baseline(args.baseline_python)
    venv = args.sandbox_venv or default_sandbox_venv()
    started = time.perf_counter()
    load = round(os.getloadavg()[0], 2)
    workloads = asyncio.run(measure(args, sizes, venv))
    workloads["loadavg_1m_at_start"] = load
    workloads["table"] = table(workloads, args.smoke)
    impl = "codemode (working tree) and opencodemode 0.3.0b13"
    if args.isolation:
        impl += f", ours isolation={args.isolation}"
    path = benchlib.write_results("programs", impl, workloads, args.smoke)
    print_table(workloads["table"])
    print(f"\nwrote {path} in {time.perf_counter() - started:.0f}s")
    if args.smoke:
        print("smoke: every program ran and returned the expected value (no timing claims)")


if __name__ == "__main__":
    main()
