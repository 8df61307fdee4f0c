"""How the cost of one execution grows with its size, on our Codemode only (loopback).

Run with the project's interpreter (matplotlib comes with the ``bench`` extra)::

    .venv/bin/python bench/growth.py            # -> bench/results/growth.json + growth_*.png
    .venv/bin/python bench/growth.py --smoke    # tiny sizes, checks it works (CI); no plots

It starts its own ``codemode serve`` the way ``bench/run.py`` does (``--isolation`` and
``--serve-arg`` are passed on) and uses only the public SDK: ``Codemode.run_async(code)``, which
returns the full ``ExecutionResult`` (so output and failures can be checked). Each point is the
median of a bounded number of runs, after one warm-up run of the same program. Series:

- ``code_size``: a program padded to N bytes with comment lines, and one holding an N-byte string
  literal (the client's ``max_code_length`` is raised to 2,000,000 so 1 MiB fits; the service
  accepts 4 MB);
- ``output_size``: a program writing N bytes to stdout, up to the output limit (1 MiB);
- ``result_size``: ``result`` a string whose JSON is N bytes, up to the result limit (4 MiB);
- ``tool_calls``: N sequential ``tools.echo(x=i)`` calls in one execution (total, and per call:
  (median with N calls - median of the same loop with 0 calls) / N);
- ``tool_arg_size``: one ``tools.echo(x=s)`` with ``s`` N bytes (echoed back, so N each way);
- ``concurrency``: ``result = sum(range(1000))`` with K in flight from one client (throughput,
  p50, p99).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
import run as runbench

KIB = 1024
MIB = 1024 * 1024

FULL: dict[str, Any] = {
    "code_sizes": [1 * KIB, 16 * KIB, 256 * KIB, 1 * MIB],
    "output_sizes": [1 * KIB, 16 * KIB, 64 * KIB, 256 * KIB, 1 * MIB],
    "result_sizes": [1 * KIB, 16 * KIB, 256 * KIB, 1 * MIB, 4 * MIB],
    "tool_calls": [1, 10, 100, 1000, 10000],
    "tool_arg_sizes": [1 * KIB, 16 * KIB, 256 * KIB, 1 * MIB],
    "concurrency": [1, 2, 4, 8, 16, 32, 64],
    "concurrency_n": 400,
    "reps": 15,
    "reps_slow": 3,
    "point_budget_s": 8.0,
}
SMOKE: dict[str, Any] = {
    "code_sizes": [1 * KIB, 4 * KIB],
    "output_sizes": [1 * KIB, 4 * KIB],
    "result_sizes": [1 * KIB, 4 * KIB],
    "tool_calls": [1, 10],
    "tool_arg_sizes": [1 * KIB, 4 * KIB],
    "concurrency": [1, 4],
    "concurrency_n": 8,
    "reps": 2,
    "reps_slow": 1,
    "point_budget_s": 2.0,
}

#: The JSON keys every series has; the smoke test checks them.
SERIES = ("code_size", "output_size", "result_size", "tool_calls", "tool_arg_size", "concurrency")


# --------------------------------------------------------------------------------------------
# Programs


def code_comments(size: int) -> str:
    """A program of exactly ``size`` bytes: ``result = 1`` then comment lines."""
    head = "result = 1\n"
    line = "# " + "x" * 77 + "\n"  # 80 bytes
    body = line * ((size - len(head)) // len(line))
    rest = size - len(head) - len(body)
    tail = ("#" + "x" * (rest - 2) + "\n") if rest >= 2 else "\n" * rest
    return head + body + tail


def code_literal(size: int) -> str:
    """A program of exactly ``size`` bytes holding one string literal; result is its length."""
    head, tail = "s = '", "'\nresult = len(s)\n"
    return head + "x" * (size - len(head) - len(tail)) + tail


def literal_len(size: int) -> int:
    return size - len("s = '") - len("'\nresult = len(s)\n")


def code_output(size: int) -> str:
    return f"import sys\nsys.stdout.write('x' * {size - 1} + '\\n')\nresult = 1\n"


def code_result(size: int) -> str:
    # json.dumps of a string of n plain characters is n + 2 bytes (the quotes).
    return f"result = 'x' * {size - 2}\n"


def code_tool_calls(calls: int) -> str:
    return f"for i in range({calls}):\n    tools.echo(x=i)\nresult = {calls}\n"


def code_tool_arg(size: int) -> str:
    return f"r = tools.echo(x='x' * {size})\nresult = len(r['x'])\n"


# --------------------------------------------------------------------------------------------
# Measuring


Check = Callable[[Any], None]


class Runner:
    """Times ``Codemode.run_async`` and checks each outcome."""

    def __init__(self, codemode: Any, smoke: bool, sizes: dict[str, Any]) -> None:
        self.codemode = codemode
        self.smoke = smoke
        self.sizes = sizes

    async def once(self, code: str, check: Check) -> tuple[float, float]:
        """(client seconds, executor-reported seconds) of one successful execution."""
        start = time.perf_counter()
        res = await self.codemode.run_async(code)
        elapsed = time.perf_counter() - start
        if not res.success:
            raise AssertionError(f"execution failed: {res.error_type}: {res.error}")
        check(res)
        return elapsed, res.duration_ms / 1000.0

    async def point(self, code: str, check: Check, reps: int) -> dict[str, float]:
        """Median over up to ``reps`` runs (fewer if the point's time budget runs out, min 1)."""
        await self.once(code, check)  # warm-up: pool refill, page cache, code paths
        client, service = [], []
        deadline = time.monotonic() + self.sizes["point_budget_s"]
        for _ in range(reps):
            c, s = await self.once(code, check)
            client.append(c)
            service.append(s)
            if time.monotonic() > deadline:
                break
        return {
            "runs": len(client),
            "p50_ms": round(statistics.median(client) * 1000, 3),
            "min_ms": round(min(client) * 1000, 3),
            "max_ms": round(max(client) * 1000, 3),
            "executor_p50_ms": round(statistics.median(service) * 1000, 3),
        }


def _expect_value(value: Any) -> Check:
    def check(res: Any) -> None:
        if res.value != value:
            raise AssertionError(f"expected {value!r}, got {res.value!r}")

    return check


def _expect_output(size: int) -> Check:
    def check(res: Any) -> None:
        if len(res.stdout) != size or res.output_truncated:
            raise AssertionError(f"expected {size} bytes of output, got {len(res.stdout)}")

    return check


def _expect_result_bytes(size: int) -> Check:
    def check(res: Any) -> None:
        if res.result is None or len(res.result) != size:
            raise AssertionError(f"expected a {size}-byte result, got {len(res.result or '')}")

    return check


async def series_sized(
    r: Runner, sizes: list[int], make: Callable[[int], tuple[str, Check]], label: str
) -> list[dict[str, Any]]:
    points = []
    for size in sizes:
        code, check = make(size)
        point = {"bytes": size, **await r.point(code, check, r.sizes["reps"])}
        print(f"  {label} {size:>9} B: p50 {point['p50_ms']:9.2f} ms", flush=True)
        points.append(point)
    return points


async def growth(args: argparse.Namespace) -> dict[str, Any]:
    from codemode import Codemode
    from codemode.config import ClientConfig

    sizes = SMOKE if args.smoke else FULL
    out: dict[str, Any] = {}
    async with runbench.executor_target(args) as (url, api_key, _pid):
        codemode = Codemode.from_client_config(
            ClientConfig(executor_url=url, executor_api_key=api_key, max_code_length=2_000_000)
        )
        codemode.registry.register_tool("echo", benchlib.Echo())
        r = Runner(codemode, args.smoke, sizes)
        try:
            await runbench._ready(codemode.execute_async)
            trivial = await r.point(benchlib.CODE_TRIVIAL, _expect_value(4), sizes["reps"] * 3)
            out["reference"] = {"code": benchlib.CODE_TRIVIAL, **trivial}
            print(f"reference `result = 2 + 2`: p50 {trivial['p50_ms']:.2f} ms", flush=True)

            print("code size ...", flush=True)
            out["code_size"] = {
                "comments": await series_sized(
                    r,
                    sizes["code_sizes"],
                    lambda n: (code_comments(n), _expect_value(1)),
                    "comments",
                ),
                "literal": await series_sized(
                    r,
                    sizes["code_sizes"],
                    lambda n: (code_literal(n), _expect_value(literal_len(n))),
                    "literal ",
                ),
            }

            print("output size ...", flush=True)
            out["output_size"] = await series_sized(
                r, sizes["output_sizes"], lambda n: (code_output(n), _expect_output(n)), "output"
            )

            print("result size ...", flush=True)
            out["result_size"] = await series_sized(
                r,
                sizes["result_sizes"],
                lambda n: (code_result(n), _expect_result_bytes(n)),
                "result",
            )

            print("tool calls ...", flush=True)
            empty = await r.point(code_tool_calls(0), _expect_value(0), sizes["reps"] * 2)
            print(f"  calls      0: p50 {empty['p50_ms']:9.2f} ms", flush=True)
            points = []
            for calls in sizes["tool_calls"]:
                reps = sizes["reps_slow"] if calls >= 1000 else sizes["reps"]
                point = await r.point(code_tool_calls(calls), _expect_value(calls), reps)
                point["calls"] = calls
                point["per_call_ms"] = round(max(0.0, point["p50_ms"] - empty["p50_ms"]) / calls, 4)
                print(
                    f"  calls {calls:>6}: p50 {point['p50_ms']:9.2f} ms, "
                    f"{point['per_call_ms']:.3f} ms/call",
                    flush=True,
                )
                points.append(point)
            out["tool_calls"] = points
            out["tool_calls_empty"] = {"calls": 0, **empty}

            print("tool argument size ...", flush=True)
            out["tool_arg_size"] = await series_sized(
                r,
                sizes["tool_arg_sizes"],
                lambda n: (code_tool_arg(n), _expect_value(n)),
                "tool arg",
            )

            print("concurrency ...", flush=True)
            points = []
            for k in sizes["concurrency"]:
                n = max(sizes["concurrency_n"], 4 * k)
                await benchlib.concurrent(
                    codemode.execute_async, benchlib.CODE_SUM, sum(range(1000)), k, k
                )  # warm-up at this level
                point = await benchlib.concurrent(
                    codemode.execute_async, benchlib.CODE_SUM, sum(range(1000)), n, k
                )
                print(
                    f"  in flight {k:>3}: {point['exec_per_s']:8.1f} exec/s, "
                    f"p50 {point['p50_ms']:8.2f} ms, p99 {point['p99_ms']:8.2f} ms",
                    flush=True,
                )
                points.append(point)
            out["concurrency"] = points
        finally:
            await runbench._close(codemode)
    return out


# --------------------------------------------------------------------------------------------
# Plots


def _legend(ax1: Any, ax2: Any) -> None:
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, loc="center left", fontsize=8)


def plot(results: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    ref = results["reference"]["p50_ms"]

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        path = benchlib.RESULTS_DIR / f"growth_{name}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)

    def sized(ax: Any, points: list[dict[str, Any]], label: str) -> None:
        xs = [p["bytes"] / KIB for p in points]
        ax.plot(xs, [p["p50_ms"] for p in points], marker="o", label=f"{label} (client)")
        ax.plot(
            xs,
            [p["executor_p50_ms"] for p in points],
            marker=".",
            linestyle=":",
            label=f"{label} (executor)",
        )

    sized_series = [
        ("code_size", "program size"),
        ("output_size", "stdout size"),
        ("result_size", "result size (JSON)"),
        ("tool_arg_size", "tool argument size (each way)"),
    ]
    for key, xlabel in sized_series:
        fig, ax = plt.subplots(figsize=(6, 4))
        data = results[key]
        if isinstance(data, dict):
            for name, points in data.items():
                sized(ax, points, name)
        else:
            sized(ax, data, key.replace("_", " "))
        ax.axhline(ref, color="grey", linewidth=0.8, linestyle="--", label="`result = 2 + 2`")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"{xlabel}, KiB")
        ax.set_ylabel("median ms per execution")
        ax.set_title(f"Cost vs {xlabel}")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        save(fig, key)

    points = results["tool_calls"]
    fig, ax1 = plt.subplots(figsize=(6, 4))
    xs = [p["calls"] for p in points]
    ax1.plot(xs, [p["p50_ms"] for p in points], marker="o", label="total ms")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("sequential tool calls in one execution")
    ax1.set_ylabel("median total ms")
    ax2 = ax1.twinx()
    ax2.plot(xs, [p["per_call_ms"] for p in points], marker="s", color="C1", label="ms per call")
    ax2.set_ylabel("ms per call (total - empty) / calls")
    ax2.set_ylim(bottom=0)
    _legend(ax1, ax2)
    ax1.set_title("Cost vs number of tool calls")
    ax1.grid(True, which="both", alpha=0.3)
    save(fig, "tool_calls")

    points = results["concurrency"]
    fig, ax1 = plt.subplots(figsize=(6, 4))
    xs = [p["in_flight"] for p in points]
    ax1.plot(xs, [p["exec_per_s"] for p in points], marker="o", label="executions/s")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("executions in flight (one client)")
    ax1.set_ylabel("executions/s")
    ax1.set_ylim(bottom=0)
    ax2 = ax1.twinx()
    ax2.plot(xs, [p["p50_ms"] for p in points], marker="s", color="C1", label="p50 ms")
    ax2.plot(xs, [p["p99_ms"] for p in points], marker="^", color="C3", label="p99 ms")
    ax2.set_yscale("log")
    ax2.set_ylabel("latency, ms")
    _legend(ax1, ax2)
    ax1.set_title("`result = sum(range(1000))` under concurrency")
    ax1.grid(True, which="both", alpha=0.3)
    save(fig, "concurrency")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; checks it works")
    parser.add_argument("--no-plots", action="store_true", help="write the JSON only")
    parser.add_argument(
        "--isolation",
        choices=["auto", "forkserver", "bwrap", "process"],
        help="passed to `codemode serve` (default: its own, auto)",
    )
    parser.add_argument(
        "--serve-arg", action="append", default=[], metavar="ARG", help="extra serve argument"
    )
    args = parser.parse_args()
    # executor_target() reads these; growth always starts its own executor.
    args.executor_url = args.api_key = args.executor_pid = None

    started = time.perf_counter()
    results = asyncio.run(growth(args))
    path = benchlib.write_results("growth", "codemode", results, args.smoke)
    print(f"wrote {path} in {time.perf_counter() - started:.0f}s")
    if not args.smoke and not args.no_plots:
        for png in plot(results):
            print(f"wrote {png}")
    if args.smoke:
        print("smoke: every series ran and returned the expected results")


if __name__ == "__main__":
    main()
