"""Benchmark the incumbent, PyPI ``opencodemode==0.3.0b13``, on loopback, without Docker.

Run with the baseline venv's interpreter (``bench/setup_baseline.sh`` makes it)::

    /work/baseline-venv/bin/python bench/baseline_opencodemode.py [--smoke]

``--programs N`` runs only the incumbent's round of ``bench/programs.py`` (which starts it) and
prints it as JSON.

The incumbent installs under the import name ``codemode`` too, which is why it lives in its own
venv and this script must never run with the project's interpreter.

Topology (what the incumbent needs): the application runs a gRPC *ToolService* that the executor
dials back into for every tool call, and the executor service runs user code in a fresh
``python -c`` subprocess per execution. Here:

* the ToolService is served from this process, on the asyncio loop, bound to 127.0.0.1;
* the executor service is a child process (``--serve-executor`` below) built from the package's
  own ``ExecutorGrpcService`` and bound to 127.0.0.1 (the package's ``python -m
  codemode.executor.service`` entry point binds ``[::]``, i.e. every interface);
* configuration goes through the package's environment variables (``CODEMODE_API_KEY``,
  ``CODEMODE_MAIN_APP_TARGET``, ``CODEMODE_LOG_LEVEL``).

``Codemode.execute_async`` in this version calls the blocking ``execute`` on the event loop, so
with the ToolService on the same loop it cannot answer the executor's tool-metadata fetch; every
execution is therefore made with ``Codemode.execute`` on a worker thread (one per in-flight
execution), which is how an asyncio application has to drive it.
"""

# `codemode` here is the incumbent's package, not ours: ruff's first-party guess (from src/)
# would split its imports oddly, so import sorting is off for this file.
# ruff: noqa: I001

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib

PINNED = "0.3.0b13"
SCRIPT = str(Path(__file__).resolve())


def _check_incumbent() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        got = version("opencodemode")
    except PackageNotFoundError:
        sys.exit(
            "opencodemode is not installed in this interpreter; run bench/setup_baseline.sh and "
            "use /work/baseline-venv/bin/python"
        )
    if got != PINNED:
        sys.exit(f"expected opencodemode=={PINNED}, found {got}")
    return got


# --------------------------------------------------------------------------------------------
# Executor child process


async def _serve_executor() -> None:
    import grpc
    from codemode.config.sidecar_config import SidecarConfig
    from codemode.executor.service import ExecutorGrpcService
    from codemode.protos import codemode_pb2_grpc

    config = SidecarConfig.from_env()
    server = grpc.aio.server()
    codemode_pb2_grpc.add_ExecutorServiceServicer_to_server(
        ExecutorGrpcService.from_config(config), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"PORT {port}", flush=True)
    await server.wait_for_termination()


# --------------------------------------------------------------------------------------------
# Tools (application side)


def code_sync_tool(calls: int) -> str:
    return f"for i in range({calls}):\n    tools['echo'].run(i=i)\nresult = {calls}\n"


def code_async_tool(calls: int) -> str:
    # No top-level await in the incumbent's guest (it runs ``python -c``).
    return (
        "import asyncio\n"
        "async def main():\n"
        f"    for i in range({calls}):\n"
        "        await tools['aecho'].run(i=i)\n"
        f"    return {calls}\n"
        "result = asyncio.run(main())\n"
    )


def code_gather(calls: int) -> str:
    return (
        "import asyncio\n"
        "async def main():\n"
        f"    return await asyncio.gather(*[tools['sleepy'].run(i=i) for i in range({calls})])\n"
        "result = len(asyncio.run(main()))\n"
    )


# --------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def incumbent(
    tools: dict[str, Any], threads: int
) -> AsyncIterator[tuple[benchlib.Execute, int]]:
    """(execute, executor pid) of the incumbent serving ``tools``, stopped on exit.

    ``execute`` runs one program with ``Codemode.execute`` on a pool of ``threads`` worker
    threads and returns its JSON result (an ``ERROR:`` reply raises ``AssertionError``).
    """
    import grpc
    from codemode import Codemode
    from codemode.config import ClientConfig
    from codemode.core.registry import ComponentRegistry
    from codemode.grpc.server import ToolService
    from codemode.protos import codemode_pb2_grpc

    api_key = secrets.token_hex(16)

    # The ToolService must be up first: the executor is configured with its address.
    registry = ComponentRegistry()
    for name, tool in tools.items():
        registry.register_tool(name, tool)
    tool_server = grpc.aio.server()
    codemode_pb2_grpc.add_ToolServiceServicer_to_server(ToolService(registry, api_key), tool_server)
    tool_port = tool_server.add_insecure_port("127.0.0.1:0")
    await tool_server.start()

    log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the executor
        prefix="baseline-executor-", suffix=".log", delete=False
    )
    env = dict(os.environ)
    env.update(
        CODEMODE_API_KEY=api_key,
        CODEMODE_MAIN_APP_TARGET=f"127.0.0.1:{tool_port}",
        CODEMODE_LOG_LEVEL="WARNING",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        SCRIPT,
        "--serve-executor",
        stdout=asyncio.subprocess.PIPE,
        stderr=log,
        env=env,
    )
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="exec")
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
        if not line.startswith(b"PORT "):
            raise RuntimeError(f"executor did not start (log: {log.name}): {line!r}")
        port = int(line.split()[1])

        codemode = Codemode.from_client_config(
            ClientConfig(executor_url=f"http://127.0.0.1:{port}", executor_api_key=api_key),
            registry=registry,
        )
        loop = asyncio.get_running_loop()

        async def execute(code: str) -> str:
            out = await loop.run_in_executor(pool, codemode.execute, code)
            if out.startswith("ERROR:"):
                raise AssertionError(out)
            return out

        yield execute, proc.pid
        codemode.close()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout=10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await tool_server.stop(None)
        log.close()
        benchlib.remove_file(log.name)


async def bench(smoke: bool) -> dict[str, Any]:
    sizes = benchlib.SMOKE if smoke else benchlib.FULL
    tools = {
        "echo": benchlib.Echo(),
        "aecho": benchlib.AsyncEcho(),
        "sleepy": benchlib.Sleepy(sizes["e_sleep_s"]),
    }
    workloads: dict[str, Any] = {}
    async with incumbent(tools, max(16, sizes["c_in_flight"])) as (execute, pid):
        # Warm up: metadata fetch, channel, page cache.
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
        idle, idle_pss = benchlib.tree_memory_bytes(pid)
        with benchlib.RssSampler(pid) as sampler, benchlib.CpuMeter(pid) as cpu:
            workloads["c_concurrent"] = await benchlib.concurrent(
                execute,
                benchlib.CODE_SUM,
                sum(range(1000)),
                sizes["c_n"],
                sizes["c_in_flight"],
            )
        workloads["c_concurrent"].update(cpu.per_execution_ms(sizes["c_n"]))
        workloads["d_rss"] = sampler.summary(idle, idle_pss)

        print("e. tools under asyncio.gather ...", flush=True)
        samples = await benchlib.sequential(
            execute, code_gather(sizes["e_calls"]), sizes["e_calls"], sizes["e_reps"]
        )
        workloads["e_gather"] = {
            "calls": sizes["e_calls"],
            "sleep_ms": sizes["e_sleep_s"] * 1000,
            "reps": sizes["e_reps"],
            "total_ms_p50": benchlib.summarize_ms(samples)["p50_ms"],
            "total_ms_max": benchlib.summarize_ms(samples)["max_ms"],
        }
    return workloads


async def programs(n: int, tool_calls: int, tool_reps: int) -> dict[str, Any]:
    """One incumbent round of ``bench/programs.py``: the pandas program ``n`` times in a row,
    then the sync tool's per-call cost (``tool_calls`` calls, ``tool_reps`` interleaved reps)."""
    async with incumbent({"echo": benchlib.Echo()}, 1) as (execute, _):
        # Warm up: metadata fetch, channel, page cache (pandas' files included).
        await benchlib.timed(execute, benchlib.CODE_PANDAS, benchlib.PANDAS_RESULT)
        await benchlib.timed(execute, benchlib.CODE_TRIVIAL, 4)
        await benchlib.timed(execute, code_sync_tool(2), 2)
        pandas_s = await benchlib.sequential(
            execute, benchlib.CODE_PANDAS, benchlib.PANDAS_RESULT, n
        )
        sync_tool = await benchlib.tool_loop(execute, code_sync_tool, tool_calls, tool_reps)
    return {"pandas_s": pandas_s, "sync_tool": sync_tool}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; checks it works")
    parser.add_argument("--serve-executor", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--programs",
        type=int,
        metavar="N",
        help="only bench/programs.py's round: the pandas program N times and the sync tool "
        "loop; prints one JSON object and writes no file",
    )
    parser.add_argument("--tool-calls", type=int, default=50, help="with --programs")
    parser.add_argument("--tool-reps", type=int, default=5, help="with --programs")
    args = parser.parse_args()

    version = _check_incumbent()
    if args.serve_executor:
        asyncio.run(_serve_executor())
        return
    if args.programs is not None:
        doc = asyncio.run(programs(args.programs, args.tool_calls, args.tool_reps))
        print(json.dumps({"impl": f"opencodemode {version}", **doc}))
        return

    started = time.perf_counter()
    workloads = asyncio.run(bench(args.smoke))
    impl = f"opencodemode {version}"
    path = benchlib.write_results("baseline", impl, workloads, args.smoke)
    benchlib.print_table(f"{impl} (baseline){' [smoke]' if args.smoke else ''}", workloads)
    print(f"wrote {path} in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
