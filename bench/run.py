"""Benchmark our Codemode on loopback: the same workloads as ``baseline_opencodemode.py``.

Run with the project's interpreter::

    .venv/bin/python bench/run.py            # full run -> bench/results/codemode.json
    .venv/bin/python bench/run.py --smoke    # tiny sizes, asserts every workload works (CI)

By default it starts its own executor, ``codemode serve --host 127.0.0.1 --port PORT`` with the
API key in ``CODEMODE_API_KEY``, and stops it at the end; ``--isolation`` and ``--serve-arg`` are
passed on to it. ``--executor-url`` (plus
``--api-key``) benchmarks an executor that is already running instead; its RSS is measured only
when ``--executor-pid`` is given too.

Only the public SDK is used: ``Codemode.from_client_config(ClientConfig(...))``,
``codemode.registry.register_tool``, ``await codemode.execute_async(code)`` (a JSON string).
Inside the program tools are called as ``tools.name(**kw)`` and
``await tools['name'].run_async(**kw)`` at top level.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib

# --------------------------------------------------------------------------------------------
# Tools (application side)


def code_sync_tool(calls: int) -> str:
    return f"for i in range({calls}):\n    tools.echo(i=i)\nresult = {calls}\n"


def code_async_tool(calls: int) -> str:
    return f"for i in range({calls}):\n    await tools['aecho'].run_async(i=i)\nresult = {calls}\n"


def code_gather(calls: int) -> str:
    return (
        "import asyncio\n"
        "replies = await asyncio.gather(\n"
        f"    *[tools['sleepy'].run_async(i=i) for i in range({calls})]\n"
        ")\n"
        "result = len(replies)\n"
    )


# --------------------------------------------------------------------------------------------
# Executor


def _serve_command(port: int, extra: list[str]) -> list[str]:
    """``codemode serve`` from the same environment as this interpreter."""
    script = Path(sys.executable).with_name("codemode")
    if script.exists():
        base = [str(script)]
    elif shutil.which("codemode"):
        base = [str(shutil.which("codemode"))]
    else:
        base = [sys.executable, "-m", "codemode.cli"]
    return [*base, "serve", "--host", "127.0.0.1", "--port", str(port), *extra]


class Executor:
    """A ``codemode serve`` child process on a free loopback port."""

    def __init__(
        self, api_key: str, extra_args: list[str], env: Mapping[str, str] | None = None
    ) -> None:
        self.api_key = api_key
        self.extra_args = extra_args
        self.env = dict(os.environ if env is None else env)
        self.port = benchlib.free_port()
        self.proc: asyncio.subprocess.Process | None = None
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in stop()
            prefix="codemode-executor-", suffix=".log", delete=False
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        env = dict(self.env, CODEMODE_API_KEY=self.api_key)
        self.proc = await asyncio.create_subprocess_exec(
            *_serve_command(self.port, self.extra_args),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
            env=env,
        )
        listening = asyncio.create_task(benchlib.wait_for_port(self.port, timeout_s=30))
        exited = asyncio.create_task(self.proc.wait())
        await asyncio.wait({listening, exited}, return_when=asyncio.FIRST_COMPLETED)
        if exited.done():
            listening.cancel()
            raise RuntimeError(f"executor exited ({self.proc.returncode}):\n{self.log_tail()}")
        exited.cancel()
        if listening.exception() is not None:
            raise RuntimeError(f"executor did not listen:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        self.log.flush()
        text = Path(self.log.name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout=10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.log.close()
        benchlib.remove_file(self.log.name)


@contextlib.asynccontextmanager
async def executor_target(args: argparse.Namespace) -> AsyncIterator[tuple[str, str, int | None]]:
    """(url, api key, pid or None) of the executor to benchmark."""
    if args.executor_url:
        api_key = args.api_key or os.environ.get("CODEMODE_API_KEY", "")
        yield args.executor_url, api_key, args.executor_pid
        return
    extra = [f"--isolation={args.isolation}"] if args.isolation else []
    extra += args.serve_arg
    executor = Executor(secrets.token_hex(16), extra)
    await executor.start()
    try:
        yield executor.url, executor.api_key, executor.pid
    except BaseException:
        if executor.proc is not None and executor.proc.returncode is not None:
            print(f"executor exited ({executor.proc.returncode}):", file=sys.stderr)
        print(f"executor log tail:\n{executor.log_tail()}", file=sys.stderr)
        raise
    finally:
        await executor.stop()


# --------------------------------------------------------------------------------------------


async def _close(codemode: Any) -> None:
    closed = codemode.close()
    if inspect.isawaitable(closed):
        await closed


async def _ready(execute: benchlib.Execute, timeout_s: float = 30.0) -> None:
    """Retry a trivial execution until the executor answers (listening is not serving)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await benchlib.timed(execute, benchlib.CODE_TRIVIAL, 4)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    from codemode import Codemode
    from codemode.config import ClientConfig

    sizes = benchlib.SMOKE if args.smoke else benchlib.FULL
    workloads: dict[str, Any] = {}
    async with executor_target(args) as (url, api_key, pid):
        codemode = Codemode.from_client_config(
            ClientConfig(executor_url=url, executor_api_key=api_key)
        )
        codemode.registry.register_tool("echo", benchlib.Echo())
        codemode.registry.register_tool("aecho", benchlib.AsyncEcho())
        codemode.registry.register_tool("sleepy", benchlib.Sleepy(sizes["e_sleep_s"]))
        execute: benchlib.Execute = codemode.execute_async
        try:
            await _ready(execute)
            await benchlib.sequential(execute, benchlib.CODE_TRIVIAL, 4, sizes["warmup"])
            await benchlib.timed(execute, code_sync_tool(2), 2)
            await benchlib.timed(execute, code_async_tool(2), 2)

            print("a. sequential `result = 2 + 2` ...", flush=True)
            samples = await benchlib.sequential(execute, benchlib.CODE_TRIVIAL, 4, sizes["a_n"])
            workloads["a_trivial"] = {"n": sizes["a_n"], **benchlib.summarize_ms(samples)}

            print("b. tool round trips ...", flush=True)
            workloads["b_tool_sync"] = await benchlib.tool_loop(
                execute, code_sync_tool, sizes["b_calls"], sizes["b_reps"]
            )
            workloads["b_tool_async"] = await benchlib.tool_loop(
                execute, code_async_tool, sizes["b_calls"], sizes["b_reps"]
            )

            print("c/d. concurrent `sum(range(1000))` with RSS/PSS sampling ...", flush=True)
            idle, idle_pss = benchlib.tree_memory_bytes(pid) if pid else (0, 0)
            sampler = benchlib.RssSampler(pid) if pid else None
            with sampler or contextlib.nullcontext(), benchlib.CpuMeter(pid) as cpu:
                workloads["c_concurrent"] = await benchlib.concurrent(
                    execute,
                    benchlib.CODE_SUM,
                    sum(range(1000)),
                    sizes["c_n"],
                    sizes["c_in_flight"],
                )
            workloads["c_concurrent"].update(cpu.per_execution_ms(sizes["c_n"]))
            if sampler is not None:
                workloads["d_rss"] = sampler.summary(idle, idle_pss)

            print("e. tools under asyncio.gather ...", flush=True)
            samples = await benchlib.sequential(
                execute, code_gather(sizes["e_calls"]), sizes["e_calls"], sizes["e_reps"]
            )
            summary = benchlib.summarize_ms(samples)
            workloads["e_gather"] = {
                "calls": sizes["e_calls"],
                "sleep_ms": sizes["e_sleep_s"] * 1000,
                "reps": sizes["e_reps"],
                "total_ms_p50": summary["p50_ms"],
                "total_ms_max": summary["max_ms"],
            }
        finally:
            await _close(codemode)
    return workloads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; checks it works")
    parser.add_argument("--executor-url", help="benchmark a running executor instead")
    parser.add_argument("--api-key", help="its API key (default: $CODEMODE_API_KEY)")
    parser.add_argument("--executor-pid", type=int, help="its pid, to measure its RSS")
    parser.add_argument(
        "--isolation",
        choices=["auto", "forkserver", "bwrap", "process"],
        help="passed to `codemode serve` (default: its own, auto)",
    )
    parser.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra `codemode serve` argument (repeatable), e.g. --serve-arg=--log-level=WARNING",
    )
    args = parser.parse_args()

    from importlib.metadata import PackageNotFoundError, version

    try:
        impl = f"codemode {version('codemode')}"
    except PackageNotFoundError:
        impl = "codemode (source tree)"
    if args.isolation:
        impl += f" isolation={args.isolation}"
    try:
        if version("opencodemode"):
            sys.exit("this interpreter has opencodemode installed: use the project's .venv")
    except PackageNotFoundError:
        pass

    started = time.perf_counter()
    workloads = asyncio.run(bench(args))
    path = benchlib.write_results("codemode", impl, workloads, args.smoke)
    benchlib.print_table(f"{impl} (ours){' [smoke]' if args.smoke else ''}", workloads)
    print(f"wrote {path} in {time.perf_counter() - started:.0f}s")
    if args.smoke:
        print("smoke: all workloads ran and returned the expected results")


if __name__ == "__main__":
    main()
