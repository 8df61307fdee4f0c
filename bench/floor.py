"""The floor under Codemode's numbers: what the transport and the hand-offs cost by themselves.

    .venv/bin/python bench/floor.py [--smoke]

Each piece an execution or a tool call cannot avoid, measured alone on this machine, with no
Codemode code in the way:

- ``grpc_pingpong``: one message each way on an open grpc.aio bidirectional stream between two
  processes (what relaying a tool call from the executor to the application and back costs);
- ``grpc_call``: open a bidirectional stream, one message each way, close (the gRPC part of
  one execution), with the CPU it costs each side;

  both with gRPC's I/O on the poller, as Codemode runs it (``codemode.wire.grpc_io``), and again
  (``*_default``) with grpcio's own default, EventEngine threads, for the comparison;
- ``to_thread``: ``asyncio.to_thread`` of a function that returns at once, and
  ``sync_workers`` the same through the client's own threads (how it runs a sync tool: never
  on the event loop; ``codemode.core._workers``);
- ``unix_pingpong``: one byte each way over a Unix socket pair between two processes (the
  executor-to-guest hop, twice per tool call).

Prints a table and writes ``bench/results/floor.json`` (``floor.smoke.json`` with ``--smoke``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib

from codemode.core._workers import SyncWorkers
from codemode.wire.grpc_io import POLLER_IO

#: ``GRPC_EXPERIMENTS`` of both processes for each engine; set before they import grpc.
ENGINES = {"": POLLER_IO, "_default": ""}

_METHOD = "/floor.Echo/Stream"


def _same(data: bytes) -> bytes:
    return data


async def _echo(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for message in requests:
        yield message


async def _serve() -> None:
    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(
        _echo, request_deserializer=_same, response_serializer=_same
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("floor.Echo", {"Stream": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


async def _grpc(port: int, server_pid: int, messages: int, calls: int, reps: int) -> dict[str, Any]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stream = channel.stream_stream(_METHOD, request_serializer=_same, response_deserializer=_same)
    await channel.channel_ready()
    pingpong, call_open = [], []
    call_cpu: list[dict[str, float]] = []
    for _ in range(reps):
        call = stream()
        await call.write(b"x")
        await call.read()  # the stream is open and warm
        start = time.perf_counter()
        for _ in range(messages):
            await call.write(b"x" * 32)
            await call.read()
        pingpong.append((time.perf_counter() - start) / messages)
        await call.done_writing()
        await call.code()
        samples = []
        cpu = benchlib.CpuMeter(server_pid)
        with cpu:
            for _ in range(calls):
                start = time.perf_counter()
                call = stream()
                await call.write(b"x" * 32)
                await call.read()
                await call.done_writing()
                await call.code()
                samples.append(time.perf_counter() - start)
        call_open.append(statistics.median(samples))
        call_cpu.append(cpu.per_execution_ms(calls))
    await channel.close()
    return {
        "grpc_pingpong_us": round(statistics.median(pingpong) * 1e6, 1),
        "grpc_call_us": round(statistics.median(call_open) * 1e6, 1),
        # CPU of one such call on each side (ms -> us), from /proc over the calls.
        "grpc_call_client_cpu_us": round(
            statistics.median(c["client_cpu_ms"] for c in call_cpu) * 1000, 1
        ),
        "grpc_call_server_cpu_us": round(
            statistics.median(c["executor_cpu_ms"] for c in call_cpu) * 1000, 1
        ),
    }


async def _hand_off(n: int, reps: int, to_thread: Callable[..., Awaitable[None]]) -> float:
    def nothing() -> None:
        return None

    per = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(n):
            await to_thread(nothing)
        per.append((time.perf_counter() - start) / n)
    return round(statistics.median(per) * 1e6, 1)


def _unix_pingpong(n: int, reps: int) -> float:
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the echo side
        ours.close()
        while data := theirs.recv(64):
            theirs.sendall(data)
        os._exit(0)
    theirs.close()
    per = []
    try:
        for _ in range(reps):
            start = time.perf_counter()
            for _ in range(n):
                ours.sendall(b"x")
                ours.recv(64)
            per.append((time.perf_counter() - start) / n)
    finally:
        ours.close()
        os.waitpid(pid, 0)
    return round(statistics.median(per) * 1e6, 1)


def _sizes(smoke: bool) -> tuple[int, int, int]:
    return (20, 10, 1) if smoke else (2000, 300, 5)


def _grpc_with(experiments: str, smoke: bool) -> dict[str, Any]:
    """The gRPC figures, server and client each in a process of its own with this engine."""
    env = dict(os.environ, GRPC_EXPERIMENTS=experiments)
    server = subprocess.Popen(  # the server side in its own process, as the executor is
        [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert server.stdout is not None
        port = server.stdout.readline().strip()
        smoke_flag = ["--smoke"] if smoke else []
        client = subprocess.run(
            [sys.executable, __file__, "--client", port, str(server.pid), *smoke_flag],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
    finally:
        server.kill()
        server.wait()
    figures: dict[str, Any] = json.loads(client.stdout)
    return figures


def measure(smoke: bool) -> dict[str, Any]:
    messages, _, reps = _sizes(smoke)
    out: dict[str, Any] = {}
    for suffix, experiments in ENGINES.items():
        for key, value in _grpc_with(experiments, smoke).items():
            out[key.replace("_us", f"{suffix}_us")] = value
    out["to_thread_us"] = asyncio.run(_hand_off(messages, reps, asyncio.to_thread))
    out["sync_workers_us"] = asyncio.run(_hand_off(messages, reps, SyncWorkers().run))
    out["unix_pingpong_us"] = _unix_pingpong(messages, reps)
    # What a tool round trip cannot go below with this design: one gRPC message each way,
    # two executor-guest hops, and for a sync tool one hand-off to a worker thread and back.
    out["tool_call_floor_async_us"] = round(out["grpc_pingpong_us"] + out["unix_pingpong_us"], 1)
    out["tool_call_floor_sync_us"] = round(
        out["tool_call_floor_async_us"] + out["sync_workers_us"], 1
    )
    return out


_ROWS = [
    ("grpc_pingpong_us", "grpc.aio, one message each way on an open stream"),
    ("grpc_call_us", "grpc.aio, open a stream + one message each way + close"),
    ("grpc_call_client_cpu_us", "  CPU of that call in the client"),
    ("grpc_call_server_cpu_us", "  CPU of that call in the server"),
    ("grpc_pingpong_default_us", "the same message, grpcio's default I/O (EventEngine)"),
    ("grpc_call_default_us", "the same call, grpcio's default I/O"),
    ("grpc_call_client_cpu_default_us", "  CPU of that call in the client"),
    ("grpc_call_server_cpu_default_us", "  CPU of that call in the server"),
    ("to_thread_us", "asyncio.to_thread round trip"),
    ("sync_workers_us", "the client's own worker threads, round trip (a sync tool's hand-off)"),
    ("unix_pingpong_us", "Unix socket pair, one byte each way between two processes"),
    ("tool_call_floor_async_us", "floor of a tool round trip, async tool"),
    ("tool_call_floor_sync_us", "floor of a tool round trip, sync tool"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks it runs")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve())
        return
    if args.client:
        port, server_pid = args.client
        print(json.dumps(asyncio.run(_grpc(port, server_pid, *_sizes(args.smoke)))))
        return
    results = measure(args.smoke)
    width = max(len(label) for _, label in _ROWS)
    for key, label in _ROWS:
        print(f"{label:<{width}}  {results[key]:>9.1f} us")
    path = benchlib.write_results("floor", "transport floor", results, args.smoke)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
