"""``codemode mcp``: the real process, driven by the MCP SDK's real client over stdio and HTTP.

Programs run on the test executor (``--executor-url``), except in the test of the embedded one.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import mcp.types as types
import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import McpError

from tests.helpers import ServerProcess, marked_program, wait_until

ROOT = Path(__file__).resolve().parents[2]
TOOLS = "tests.integration.mcp_app:registry"
PARALLEL = (
    "import asyncio\n"
    "a, b = await asyncio.gather(tools.stock.run_async(sku='X'), tools.stock.run_async(sku='Y'))\n"
    "print('counted', a + b)\n"
    "result = {'total': a + b, 'price': tools.price(sku='X')}\n"
)


def mcp_env(server: ServerProcess | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODEMODE_")}
    if server is not None:
        env["CODEMODE_EXECUTOR_URL"] = server.url
        env["CODEMODE_EXECUTOR_API_KEY"] = server.api_key
    env.update(extra)
    return env


def mcp_args(*args: str) -> list[str]:
    return ["-m", "codemode.cli", "mcp", *args]


@asynccontextmanager
async def stdio_session(
    server: ServerProcess | None, *args: str, **callbacks: Any
) -> AsyncIterator[ClientSession]:
    """A client session with a ``codemode mcp`` process over stdio."""
    params = StdioServerParameters(
        command=sys.executable, args=mcp_args(*args), env=mcp_env(server), cwd=str(ROOT)
    )
    async with (
        stdio_client(params) as (read, write),
        ClientSession(read, write, **callbacks) as session,
    ):
        await session.initialize()
        yield session


def text_of(answer: types.CallToolResult) -> str:
    assert len(answer.content) == 1
    block = answer.content[0]
    assert isinstance(block, types.TextContent)
    return block.text


async def test_lists_run_python_with_the_stubs(server: ServerProcess) -> None:
    """The tools, and run_python's description carrying the registered tools' stubs."""
    async with stdio_session(server, "--tools", TOOLS) as session:
        listed = {t.name: t for t in (await session.list_tools()).tools}
    assert set(listed) == {"run_python", "search_tools", "describe_tool", "reset_python"}
    description = listed["run_python"].description or ""
    assert "def stock(sku: str) -> int:" in description
    assert "def price(sku: str) -> float:" in description
    assert set(listed["run_python"].inputSchema["properties"]) == {"code", "timeout"}
    assert listed["run_python"].inputSchema["required"] == ["code"]


async def test_runs_a_program_calling_two_tools_in_parallel(server: ServerProcess) -> None:
    """The answer is the result text; what the program printed also arrived as it ran."""
    logged: list[str] = []
    progress: list[str | None] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logged.append(str(params.data))

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append(message)

    async with stdio_session(server, "--tools", TOOLS, logging_callback=on_log) as session:
        answer = await session.call_tool(
            "run_python", {"code": PARALLEL}, progress_callback=on_progress
        )
    assert not answer.isError
    assert text_of(answer) == 'result: {"total":7,"price":9.5}\nstdout:\ncounted 7'
    assert "counted 7\n" in logged
    assert "calling tools.stock" in progress
    assert "calling tools.price" in progress


async def test_an_error_is_the_traceback_with_is_error(server: ServerProcess) -> None:
    async with stdio_session(server) as session:
        answer = await session.call_tool("run_python", {"code": "x = 1\ny = x / 0\n"})
    assert answer.isError
    text = text_of(answer)
    assert text.startswith("error: ZeroDivisionError: division by zero")
    assert "y = x / 0" in text


async def test_a_timeout_ends_the_program(server: ServerProcess) -> None:
    async with stdio_session(server) as session:
        answer = await session.call_tool(
            "run_python", {"code": "import time\ntime.sleep(30)\n", "timeout": 0.5}
        )
        bad = await session.call_tool("run_python", {"code": "result = 1", "timeout": -1})
    assert answer.isError
    assert re.match(r"error: Timeout", text_of(answer)), text_of(answer)
    assert bad.isError
    assert "timeout" in text_of(bad)


async def test_state_survives_between_calls_until_reset(server: ServerProcess) -> None:
    async with stdio_session(server) as session:
        await session.call_tool("run_python", {"code": "import math\nx = 41"})
        kept = await session.call_tool("run_python", {"code": "result = math.floor(x + 1.5)"})
        await session.call_tool("reset_python", {})
        gone = await session.call_tool("run_python", {"code": "result = x"})
    assert text_of(kept) == "result: 42"
    assert gone.isError
    assert "NameError" in text_of(gone)


async def test_without_sessions_every_call_starts_fresh(server: ServerProcess) -> None:
    async with stdio_session(server, "--no-sessions") as session:
        names = {t.name for t in (await session.list_tools()).tools}
        await session.call_tool("run_python", {"code": "x = 41"})
        gone = await session.call_tool("run_python", {"code": "result = x"})
    assert "reset_python" not in names
    assert gone.isError
    assert "NameError" in text_of(gone)


async def test_search_and_describe(server: ServerProcess) -> None:
    async with stdio_session(server, "--tools", "tests.integration.mcp_app:tool_list") as session:
        found = await session.call_tool("search_tools", {"query": "price of a unit"})
        described = await session.call_tool("describe_tool", {"name": "stock"})
        unknown = await session.call_tool("describe_tool", {"name": "nope"})
    assert found.structuredContent is not None
    assert found.structuredContent["result"][0]["name"] == "price"
    assert "def stock(sku: str) -> int:" in text_of(described)
    assert unknown.isError
    assert "no tool named 'nope'" in text_of(unknown)


async def test_cancellation_kills_the_sandbox(server: ServerProcess) -> None:
    """A client's cancellation ends the program's processes; the server goes on serving."""
    async with stdio_session(server) as session:
        call = asyncio.create_task(
            session.call_tool("run_python", {"code": marked_program("mcp-cancel")})
        )
        assert await asyncio.to_thread(wait_until, lambda: server.marked_tree("mcp-cancel"), 20)
        request_id = session._request_id - 1  # the id the SDK gave the call above
        await session.send_notification(
            types.ClientNotification(
                types.CancelledNotification(
                    params=types.CancelledNotificationParams(requestId=request_id, reason="test")
                )
            )
        )
        assert await asyncio.to_thread(
            wait_until, lambda: not server.marked_tree("mcp-cancel"), 10
        ), "the cancelled program still runs"
        with pytest.raises(McpError, match="Request cancelled"):
            await call
        after = await session.call_tool("run_python", {"code": "result = 'still serving'"})
    assert text_of(after).startswith("note: the earlier Python state was lost")
    assert text_of(after).endswith('result: "still serving"')


async def test_embedded_executor_when_none_is_given() -> None:
    async with stdio_session(None) as session:
        answer = await session.call_tool("run_python", {"code": "result = 2 + 2"})
    assert text_of(answer) == "result: 4"


@pytest.fixture
def http_mcp(server: ServerProcess) -> Iterator[tuple[str, str]]:
    """``codemode mcp --transport streamable-http`` on a free port with a token: (url, token)."""
    token = "test-token-" + os.urandom(8).hex()
    proc = subprocess.Popen(
        [
            sys.executable,
            *mcp_args("--transport", "streamable-http", "--port", "0", "--tools", TOOLS),
        ],
        env=mcp_env(server, CODEMODE_MCP_TOKEN=token),
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    match = re.search(r"listening on (\S+)", line)
    assert match, f"codemode mcp did not start: {line}{proc.stderr.read() if proc.poll() else ''}"
    try:
        yield match.group(1), token
    finally:
        proc.terminate()
        assert proc.wait(15) is not None
        proc.stderr.close()


async def test_streamable_http_needs_the_token(http_mcp: tuple[str, str]) -> None:
    url, token = http_mcp
    async with httpx.AsyncClient() as client:
        refused = await client.post(url, json={}, headers={"Authorization": "Bearer wrong"})
    assert refused.status_code == 401
    async with (
        httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as http,
        streamable_http_client(url, http_client=http) as (read, write, _),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        answer = await session.call_tool("run_python", {"code": PARALLEL})
    assert text_of(answer) == 'result: {"total":7,"price":9.5}\nstdout:\ncounted 7'


def test_streamable_http_refuses_to_start_without_a_token() -> None:
    done = subprocess.run(
        [sys.executable, *mcp_args("--transport", "streamable-http", "--port", "0")],
        env=mcp_env(None),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "CODEMODE_MCP_TOKEN" in done.stderr
    assert "--insecure-no-auth" in done.stderr


@pytest.mark.parametrize(
    ("tools", "says"),
    [
        ("tests.integration.mcp_app", "give MODULE:OBJECT"),
        ("tests.integration.nope:registry", "cannot import tests.integration.nope"),
        ("tests.integration.mcp_app:nothing", "has no 'nothing'"),
        ("tests.integration.mcp_app:ROOT_NOT_HERE", "has no"),
        ("missing.json", "no such file"),
    ],
)
def test_bad_tools_option_is_a_clear_error(tools: str, says: str) -> None:
    done = subprocess.run(
        [sys.executable, *mcp_args("--tools", tools)],
        env=mcp_env(None),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2
    assert says in done.stderr, done.stderr


async def test_the_documented_client_config_runs(server: ServerProcess) -> None:
    """examples/mcp_server.md's ``mcpServers`` entry, started as a client would start it
    (with the test's tools in place of the document's ``myapp.tools``)."""
    text = (ROOT / "examples" / "mcp_server.md").read_text()
    block = re.search(r"```json\n(.*?)```", text, re.DOTALL)
    assert block is not None
    entry = json.loads(block.group(1))["mcpServers"]["codemode"]
    assert entry["command"] == "codemode"
    assert entry["args"] == ["mcp", "--tools", "myapp.tools:registry"]
    params = StdioServerParameters(
        command=str(Path(sys.executable).parent / entry["command"]),
        args=[TOOLS if a == "myapp.tools:registry" else a for a in entry["args"]],
        env=mcp_env(server),
        cwd=str(ROOT),
    )
    async with (
        stdio_client(params) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        answer = await session.call_tool("run_python", {"code": PARALLEL})
    assert text_of(answer) == 'result: {"total":7,"price":9.5}\nstdout:\ncounted 7'


async def test_an_unreachable_executor_is_an_error_for_the_model() -> None:
    async with stdio_session(None, "--executor-url", "http://127.0.0.1:9") as session:
        answer = await session.call_tool("run_python", {"code": "result = 1"})
    assert answer.isError
    assert text_of(answer).startswith("error: ExecutorConnectionError:"), text_of(answer)


async def test_tools_from_an_mcp_servers_file(server: ServerProcess, tmp_path: Path) -> None:
    """``--tools servers.json``: another MCP server's tools (the time server from PyPI), as
    tools the program calls, named ``{server}_{tool}``."""
    servers = {
        "mcpServers": {
            "clock": {
                "command": sys.executable,
                "args": ["-m", "mcp_server_time", "--local-timezone", "UTC"],
            }
        }
    }
    path = tmp_path / "servers.json"
    path.write_text(json.dumps(servers))
    code = (
        "import json\n"
        "now = tools.clock_get_current_time(timezone='UTC')\n"
        "now = json.loads(now) if isinstance(now, str) else now  # text or structured\n"
        "result = [now['timezone'], 'datetime' in now]\n"
    )
    async with stdio_session(server, "--tools", str(path)) as session:
        listed = {t.name: t for t in (await session.list_tools()).tools}
        answer = await session.call_tool("run_python", {"code": code})
    assert "def clock_get_current_time(" in (listed["run_python"].description or "")
    assert text_of(answer) == 'result: ["UTC",true]', text_of(answer)
