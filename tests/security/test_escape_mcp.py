"""Escape attempts through ``codemode mcp``: the MCP front door over streamable HTTP.

``codemode mcp`` runs against the suite's executor, with a bearer token. These attacks knock
without the token (or with it in the wrong place, or through another host name), reach for
another MCP session's state, try to outlive their MCP session, reach the MCP port from inside
the sandbox, and send a program too large to run. The suite's ``contained`` fixture checks
afterwards that nothing of the attack runs, the host is unchanged and the executor still
serves; each test checks that ``codemode mcp`` does too.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import mcp.types as types
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from tests.helpers import REPO_ROOT, ServerProcess, marked_anywhere, marked_program, wait_until
from tests.security.conftest import Host
from tests.security.test_escape import program

pytestmark = pytest.mark.security

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "attacker", "version": "1"},
    },
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream"}


@dataclass
class McpServer:
    url: str
    token: str
    port: int


@pytest.fixture(scope="module")
def mcp_server(sec_server: ServerProcess, host: Host) -> Iterator[McpServer]:
    """``codemode mcp --transport streamable-http`` on the suite's executor, with a token."""
    token = secrets.token_urlsafe(24)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODEMODE_")}
    env |= {
        "CODEMODE_EXECUTOR_URL": sec_server.url,
        "CODEMODE_EXECUTOR_API_KEY": host.api_key,
        "CODEMODE_MCP_TOKEN": token,
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "codemode.cli",
            "mcp",
            "--transport",
            "streamable-http",
            "--port",
            "0",
        ],
        env=env,
        cwd=REPO_ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    found = re.search(r"listening on (http://127\.0\.0\.1:(\d+)/mcp)", line)
    assert found, f"codemode mcp did not start: {line}"
    try:
        yield McpServer(found.group(1), token, int(found.group(2)))
    finally:
        proc.terminate()
        proc.wait(15)
        proc.stderr.close()


@asynccontextmanager
async def mcp_session(server: McpServer) -> AsyncIterator[ClientSession]:
    async with (
        httpx.AsyncClient(headers={"Authorization": f"Bearer {server.token}"}) as http,
        streamable_http_client(server.url, http_client=http) as (read_stream, write_stream, _),
        ClientSession(read_stream, write_stream) as session,
    ):
        await session.initialize()
        yield session


def text_of(answer: types.CallToolResult) -> str:
    block = answer.content[0]
    assert isinstance(block, types.TextContent)
    return block.text


async def still_serves(server: McpServer) -> None:
    async with mcp_session(server) as session:
        answer = await session.call_tool("run_python", {"code": "result = 2 + 2"})
    assert text_of(answer) == "result: 4"


async def test_no_token_no_entry(mcp_server: McpServer) -> None:
    """Without the exact bearer token, or through another host name, nothing is served."""
    good = {"Authorization": f"Bearer {mcp_server.token}"}
    tries = {
        "none": ({}, mcp_server.url),
        "wrong": ({"Authorization": "Bearer " + secrets.token_urlsafe(24)}, mcp_server.url),
        "prefix": ({"Authorization": f"Bearer {mcp_server.token[:-1]}"}, mcp_server.url),
        "scheme": ({"Authorization": f"Basic {mcp_server.token}"}, mcp_server.url),
        "query": ({}, f"{mcp_server.url}?token={mcp_server.token}"),
        "rebinding": ({**good, "Host": "attacker.example:80"}, mcp_server.url),
    }
    async with httpx.AsyncClient() as client:
        statuses = {}
        for name, (headers, url) in tries.items():
            answer = await client.post(url, json=INITIALIZE, headers={**MCP_HEADERS, **headers})
            statuses[name] = answer.status_code
        allowed = await client.post(
            mcp_server.url, json=INITIALIZE, headers={**MCP_HEADERS, **good}
        )
    assert all(400 <= code < 500 for code in statuses.values()), statuses
    assert {statuses[k] for k in ("none", "wrong", "prefix", "scheme", "query")} == {401}
    assert allowed.status_code == 200
    await still_serves(mcp_server)


async def test_another_mcp_sessions_state(mcp_server: McpServer, host: Host) -> None:
    """From one MCP session, nothing of another's variables, files or processes is visible."""
    secret = f"mcp-secret-{secrets.token_hex(8)}"
    async with mcp_session(mcp_server) as victim, mcp_session(mcp_server) as attacker:
        planted = await victim.call_tool(
            "run_python",
            {
                "code": f"secret = {secret!r}\n"
                "open('/tmp/secret', 'w').write(secret)\n"
                "open('/output/secret', 'w').write(secret)\n"
                "result = 'planted'"
            },
        )
        assert text_of(planted) == 'result: "planted"'
        code = program(
            """
            import gc
            found = {"globals": [k for k in globals() if k == "secret"]}
            found["objects"] = [o for o in gc.get_objects() if isinstance(o, str)
                                and o.startswith("mcp-" + "secret-")]
            found["tmp"] = attempt(read, "/tmp/secret")
            found["output"] = attempt(read, "/output/secret")
            found["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
            result = found
            """
        )
        answer = await attacker.call_tool("run_python", {"code": code})
        kept = await victim.call_tool("run_python", {"code": "result = secret[:4]"})
    text = text_of(answer)
    assert not answer.isError, text
    assert secret not in text
    assert '"globals":[]' in text
    assert '"objects":[]' in text
    assert re.search(r'"tmp":\["err"', text), text
    assert re.search(r'"output":\["err"', text), text
    assert text_of(kept) == 'result: "mcp-"'
    await still_serves(mcp_server)


async def test_a_process_does_not_outlive_its_mcp_session(mcp_server: McpServer) -> None:
    """A child left running in the session's sandbox ends when the MCP client hangs up."""
    async with mcp_session(mcp_server) as session:
        await session.call_tool(
            "run_python", {"code": marked_program("mcp-outlive", then="result = 'left'")}
        )
        assert await asyncio.to_thread(wait_until, lambda: marked_anywhere(), 10), (
            "the child never started"
        )
    gone = await asyncio.to_thread(wait_until, lambda: not marked_anywhere(), 10)
    assert gone, f"still running after the MCP session ended: {marked_anywhere()}"
    await still_serves(mcp_server)


async def test_the_sandbox_cannot_reach_the_mcp_port(mcp_server: McpServer) -> None:
    """A program cannot call ``codemode mcp`` (and so its own tools) over loopback."""
    code = program(
        """
        import socket
        def connect(port):
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                return s.getpeername()
        result = attempt(connect, P["port"])
        """,
        port=mcp_server.port,
    )
    async with mcp_session(mcp_server) as session:
        answer = await session.call_tool("run_python", {"code": code})
    assert text_of(answer).startswith('result: ["err"'), text_of(answer)
    await still_serves(mcp_server)


async def test_a_program_too_large_is_refused(mcp_server: McpServer) -> None:
    """Over the HTTP body limit: 413 before anything is parsed; over the code limit: a clear
    error for the model. Nothing runs, and the server goes on serving."""
    over_body = "x = 1\n" * (1024 * 1024)  # 6 MiB
    over_code = "x = 1\n" * 200_000  # 1.2 million characters
    async with httpx.AsyncClient() as client:
        refused = await client.post(
            mcp_server.url,
            content=b'{"code": "' + over_body.encode() + b'"}',
            headers={**MCP_HEADERS, "Authorization": f"Bearer {mcp_server.token}"},
        )
    assert refused.status_code == 413
    async with mcp_session(mcp_server) as session:
        answer = await session.call_tool("run_python", {"code": over_code})
        after = await session.call_tool("run_python", {"code": "result = 'fine'"})
    assert answer.isError
    assert text_of(answer).startswith("error: InvalidRequestError: code is 1200000 characters")
    assert text_of(after) == 'result: "fine"'
