"""Two versions of Codemode side by side: this checkout against an earlier commit, alternated.

    .venv/bin/python bench/sidebyside.py --base c2c18e2 [--reps 6] [--smoke]

This VM's speed drifts by ~10 % within minutes, more than most single changes are worth, so a
change is judged by running both versions at once and alternating between them. ``--base``
is checked out into a temporary git worktree; each side gets its own ``codemode serve``
(``run.py``'s ``Executor``; both running for the whole comparison, logging at WARNING) and,
for each round, a fresh client process, both importing that side's ``src``. Each round
measures, through the public SDK:

- ``result = 2 + 2`` sequentially (p50, p99);
- a trivial tool called 50 times in one execution, async and sync (per call, as ``run.py``);
- ``result = sum(range(1000))``, 16 in flight (executions/s, p99, CPU per execution of the
  executor's process tree and of the client).

Rounds alternate base/new, then new/base, and so on. Prints one line per side and round and
each figure's range per side; writes ``bench/results/sidebyside.json``
(``sidebyside.smoke.json`` with ``--smoke``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
from run import Executor, code_async_tool, code_sync_tool

ROOT = benchlib.BENCH_DIR.parent

#: Workload sizes of one round, full and --smoke.
SIZES = {"full": (400, 50, 10, 1200), "smoke": (5, 3, 1, 16)}
#: Figures per round: (key, label, format).
FIGURES = [
    ("p50_ms", "2+2 p50 ms", "{:.3f}"),
    ("p99_ms", "2+2 p99 ms", "{:.3f}"),
    ("async_ms", "async tool ms", "{:.3f}"),
    ("sync_ms", "sync tool ms", "{:.3f}"),
    ("exec_per_s", "16 in flight /s", "{:.0f}"),
    ("c_p99_ms", "16 in flight p99 ms", "{:.1f}"),
    ("executor_cpu_ms", "executor CPU ms", "{:.2f}"),
    ("client_cpu_ms", "client CPU ms", "{:.2f}"),
]


async def _measure(url: str, key: str, pid: int, smoke: bool) -> dict[str, float]:
    """One round against one executor, from this process (the side's own client)."""
    from codemode import Codemode
    from codemode.config import ClientConfig

    n_seq, calls, reps, n_conc = SIZES["smoke" if smoke else "full"]
    codemode = Codemode.from_client_config(ClientConfig(executor_url=url, executor_api_key=key))
    codemode.registry.register_tool("echo", benchlib.Echo())
    codemode.registry.register_tool("aecho", benchlib.AsyncEcho())
    execute: benchlib.Execute = codemode.execute_async
    try:
        await benchlib.sequential(execute, benchlib.CODE_TRIVIAL, 4, 30 if not smoke else 2)
        trivial = benchlib.summarize_ms(
            await benchlib.sequential(execute, benchlib.CODE_TRIVIAL, 4, n_seq)
        )
        async_tool = await benchlib.tool_loop(execute, code_async_tool, calls, reps)
        sync_tool = await benchlib.tool_loop(execute, code_sync_tool, calls, reps)
        with benchlib.CpuMeter(pid) as cpu:
            conc = await benchlib.concurrent(
                execute, benchlib.CODE_SUM, sum(range(1000)), n_conc, 16
            )
        conc.update(cpu.per_execution_ms(n_conc))
    finally:
        closed = codemode.close()
        if asyncio.iscoroutine(closed):
            await closed
    return {
        "p50_ms": trivial["p50_ms"],
        "p99_ms": trivial["p99_ms"],
        "async_ms": async_tool["per_call_ms"],
        "sync_ms": sync_tool["per_call_ms"],
        "exec_per_s": conc["exec_per_s"],
        "c_p99_ms": conc["p99_ms"],
        "executor_cpu_ms": conc["executor_cpu_ms"],
        "client_cpu_ms": conc["client_cpu_ms"],
    }


@contextlib.contextmanager
def _worktree(rev: str) -> Iterator[Path]:
    """``rev`` checked out in a temporary git worktree, removed afterwards."""
    git = shutil.which("git")
    if git is None:
        raise SystemExit("sidebyside.py needs git, to check out --base")
    where = Path(tempfile.mkdtemp(prefix="codemode-base-"))
    subprocess.run(
        [git, "-C", str(ROOT), "worktree", "add", "--detach", str(where), rev],
        check=True,
        capture_output=True,
    )
    try:
        yield where
    finally:
        subprocess.run(
            [git, "-C", str(ROOT), "worktree", "remove", "--force", str(where)],
            check=False,
            capture_output=True,
        )


def _side_env(src: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GRPC_EXPERIMENTS", "PYTHONPATH")}
    env["PYTHONPATH"] = str(src)
    return env


def _round(src: Path, url: str, key: str, pid: int, smoke: bool) -> dict[str, float]:
    smoke_flag = ["--smoke"] if smoke else []
    out = subprocess.run(
        [sys.executable, __file__, "--measure", url, key, str(pid), *smoke_flag],
        env=_side_env(src),
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"measurement against {url} failed:\n{out.stderr[-3000:]}")
    figures: dict[str, float] = json.loads(out.stdout)
    return figures


async def compare(base: str, reps: int, smoke: bool, isolation: str | None) -> dict[str, Any]:
    key = secrets.token_hex(16)
    extra = ["--log-level=WARNING"] + ([f"--isolation={isolation}"] if isolation else [])
    rounds: dict[str, list[dict[str, float]]] = {"base": [], "new": []}
    with _worktree(base) as tree:
        sources = {"base": tree / "src", "new": ROOT / "src"}
        executors = {
            name: Executor(key, extra, env=_side_env(src)) for name, src in sources.items()
        }
        try:
            for executor in executors.values():
                await executor.start()
            for rep in range(reps):
                for name in ("base", "new") if rep % 2 == 0 else ("new", "base"):
                    executor = executors[name]
                    figures = await asyncio.to_thread(
                        _round, sources[name], executor.url, key, executor.pid, smoke
                    )
                    rounds[name].append(figures)
                    cells = " ".join(f"{k}={fmt.format(figures[k])}" for k, _, fmt in FIGURES)
                    print(f"{name:4s} {cells}", flush=True)
        finally:
            for executor in executors.values():
                await executor.stop()
    return {"base": base, "reps": reps, "rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD", help="the commit to compare against")
    parser.add_argument("--reps", type=int, default=6, help="rounds per side (default 6)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks it runs")
    parser.add_argument(
        "--isolation",
        choices=["auto", "forkserver", "bwrap", "process"],
        help="passed to both `codemode serve` (default: their own, auto)",
    )
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        url, key, pid = args.measure
        print(json.dumps(asyncio.run(_measure(url, key, int(pid), args.smoke))))
        return
    result = asyncio.run(compare(args.base, args.reps, args.smoke, args.isolation))
    print(f"\nranges over {args.reps} rounds (base = {args.base}, new = this checkout):")
    for key, label, fmt in FIGURES:
        cells = []
        for name in ("base", "new"):
            values = [r[key] for r in result["rounds"][name]]
            cells.append(f"{name} {fmt.format(min(values))}-{fmt.format(max(values))}")
        print(f"  {label:<20}  {cells[0]:<22}  {cells[1]}")
    path = benchlib.write_results("sidebyside", "codemode, two versions", result, args.smoke)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
