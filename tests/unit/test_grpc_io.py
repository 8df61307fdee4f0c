"""``codemode.wire.grpc_io``: grpc's I/O engine chosen at ``import codemode``, unless the
process chose.

Each case runs in a fresh interpreter: the choice is made once, when grpc is first imported.
Which engine carried an RPC is read from grpc's own trace: the EventEngine endpoint
(``posix_endpoint.cc``) logs each write under ``GRPC_TRACE=event_engine_endpoint``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_RPC = """
import asyncio, json, os, sys
{first}
import grpc, grpc.aio
from codemode.wire import grpc_io

async def rpc():
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{{port}}") as channel:
        try:
            await channel.unary_unary("/no.Such/Method")(b"")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() is grpc.StatusCode.UNIMPLEMENTED
    await server.stop(0)

asyncio.run(rpc())
print(json.dumps({{"applied": grpc_io.APPLIED, "env": os.environ.get("GRPC_EXPERIMENTS")}}))
"""


def _run(first: str, **env: str) -> tuple[dict[str, object], bool]:
    """(what the process printed, whether an EventEngine endpoint carried its RPC)."""
    environ = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    environ.update(GRPC_TRACE="event_engine_endpoint", GRPC_VERBOSITY="debug", **env)
    proc = subprocess.run(
        [sys.executable, "-c", _RPC.format(first=first)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout), "posix_endpoint.cc" in proc.stderr


@pytest.mark.timeout(90)
def test_import_codemode_puts_grpc_io_on_the_poller_and_leaves_no_variable() -> None:
    """``import codemode`` first: no EventEngine endpoint, and children inherit no variable."""
    printed, event_engine = _run("import codemode")
    assert printed == {"applied": True, "env": None}
    assert not event_engine


@pytest.mark.timeout(90)
def test_grpc_experiments_set_by_the_process_win() -> None:
    """``GRPC_EXPERIMENTS=`` (empty) keeps grpc's defaults: EventEngine carries the RPC."""
    printed, event_engine = _run("import codemode", GRPC_EXPERIMENTS="")
    assert printed == {"applied": False, "env": ""}
    assert event_engine


@pytest.mark.timeout(90)
def test_grpc_imported_before_codemode_is_left_alone() -> None:
    """Too late to choose once grpc is imported: nothing is changed."""
    printed, event_engine = _run("import grpc\nimport codemode")
    assert printed == {"applied": False, "env": None}
    assert event_engine
