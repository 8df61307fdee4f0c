"""MCP servers' tools as Codemode tools, against real servers and a real executor.

Two servers: ``tests/mcp_servers.py`` (written with the SDK's FastMCP, over stdio and over
streamable HTTP behind a bearer token) and ``mcp_server_time`` from PyPI, pinned to UTC.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from codemode import Codemode, ComponentAlreadyExistsError, tool
from codemode.mcp.tools import (
    MCPConnectionError,
    MCPServerConfig,
    MCPToolError,
    from_mcp,
    from_mcp_config,
)
from tests.helpers import REPO_ROOT, announced_process, descendants, wait_until

DEMO = MCPServerConfig(command=sys.executable, args=["-m", "tests.mcp_servers"], cwd=str(REPO_ROOT))
TIME = MCPServerConfig(
    command=sys.executable, args=["-m", "mcp_server_time", "--local-timezone", "UTC"]
)
DEMO_TOOLS = ["add", "move", "word_count", "letters", "badge", "fail", "crash", "secret"]
READY = "listening on "
#: In the command line of the test's processes that only pretend to be MCP servers.
PRETENDER = "codemode-test-not-an-mcp-server"


def mcp_processes() -> list[str]:
    """Command lines of this test process's MCP server subprocesses still running."""
    return [
        p.cmdline
        for p in descendants(os.getpid())
        if any(mark in p.cmdline for mark in ("tests.mcp_servers", "mcp_server_time", PRETENDER))
    ]


def assert_no_mcp_processes(but: str = "") -> None:
    """Wait for the MCP server subprocesses (except those matching ``but``) to be gone."""

    def running() -> list[str]:
        return [c for c in mcp_processes() if not but or but not in c]

    wait_until(lambda: not running(), timeout=10)
    assert not running(), f"MCP servers still running: {running()}"


@pytest.fixture
def http_demo() -> Iterator[tuple[str, str, subprocess.Popen[str]]]:
    """The demo server over streamable HTTP in a subprocess: its URL, token and process."""
    token = secrets.token_urlsafe(16)
    argv = [sys.executable, "-m", "tests.mcp_servers", "http", "--token", token]
    with announced_process(argv, READY) as (url, proc):
        yield url, token, proc


async def test_tools_are_registered_with_stubs_and_removed_after(codemode: Codemode) -> None:
    """Every tool is registered under an identifier, with stubs from its schemas; leaving the
    block unregisters them and ends the server's process."""
    async with from_mcp(codemode.registry, server=DEMO) as demo:
        assert demo.names == [*DEMO_TOOLS, "rendezvous"]
        assert demo.tools["word_count"].mcp_name == "word-count"
        assert demo.server_info is not None
        assert demo.server_info.name == "demo"
        stubs = codemode.describe_tools(["add", "move", "word_count"], preamble=False)
        assert stubs == (
            "class Point(TypedDict):\n"
            '    """A point on the grid."""\n'
            "    x: int  # Column, from 0.\n"
            "    y: int\n"
            "\n"
            "def add(a: int, b: int = 2) -> int:\n"
            '    """Add two integers.\n'
            "\n"
            "    Args:\n"
            "        a: The first addend.\n"
            "        b: The second addend.\n"
            '    """\n'
            "\n"
            "def move(point: Point, direction: Literal['up', 'right'] = 'right') -> Point:\n"
            '    """Move a point one step."""\n'
            "\n"
            "def word_count(text: str) -> Any:\n"
            '    """Count the words of a text; answers in words."""\n'
        )
        async with from_mcp(codemode.registry, server=TIME) as clock:
            assert clock.names == ["get_current_time", "convert_time"]
            stub = codemode.describe_tools(["get_current_time"], preamble=False)
            assert stub.startswith(
                "def get_current_time(timezone: str) -> Any:\n"
                '    """Get current time in a specific timezone\n\n'
                "    Args:\n"
                "        timezone: IANA timezone name (e.g., 'America/New_York', 'Europe/London')."
                " Use 'UTC' as local timezone"
            )
        assert_no_mcp_processes(but="tests.mcp_servers")
    assert codemode.registry.get_component_names() == []
    assert_no_mcp_processes()


async def test_three_mcp_calls_under_gather(codemode: Codemode) -> None:
    """A program gets all three results of MCP calls made at once, from two servers; three
    calls that only answer when all three are in flight prove they run in parallel."""
    async with (
        from_mcp(codemode.registry, server=DEMO),
        from_mcp(codemode.registry, server=TIME, prefix="time_"),
    ):
        result = await codemode.run_async(
            "import asyncio, json\n"
            "now, tokyo, total = await asyncio.gather(\n"
            "    tools.time_get_current_time.run_async(timezone='UTC'),\n"
            "    tools.time_convert_time.run_async(\n"
            "        source_timezone='UTC', time='12:00', target_timezone='Asia/Tokyo'),\n"
            "    tools.add.run_async(a=2, b=3),\n"
            ")\n"
            "met = await asyncio.gather(*(tools.rendezvous.run_async(name=n) for n in 'abc'))\n"
            "tokyo = json.loads(tokyo)\n"
            "result = {'now': json.loads(now)['timezone'], 'total': total, 'met': met,\n"
            "          'tokyo': [tokyo['target']['datetime'][11:16], tokyo['time_difference']]}\n"
        )
    assert result.success, result
    assert result.value == {
        "now": "UTC",
        "total": 5,
        "met": ["a", "b", "c"],
        "tokyo": ["21:00", "+9.0h"],
    }


async def test_structured_and_text_results(codemode: Codemode) -> None:
    """Structured content is the Python value (FastMCP's wrapper unwrapped); text is a str,
    several text blocks joined; an image comes as its MCP JSON."""
    async with from_mcp(codemode.registry, server=DEMO):
        result = await codemode.run_async(
            "result = [tools.add(40, b=2), tools.move(point={'x': 1}, direction='up'),\n"
            "          tools.word_count(text='one two three'), tools.letters(word='abc'),\n"
            "          tools.badge(caption='hi')]\n"
        )
    assert result.success, result
    total, point, words, letters, badge = result.value
    assert (total, point, words, letters) == (42, {"x": 1, "y": 1}, "3 words", "a\nb\nc")
    assert badge[0] == "hi"
    assert badge[1]["type"] == "image"
    assert badge[1]["mimeType"] == "image/png"
    assert isinstance(badge[1]["data"], str)


async def test_errors_are_exceptions_the_program_catches(codemode: Codemode) -> None:
    """A tool's error, the time server's refusal and a bad argument each raise in the
    program with the server's (or the schema's) message."""
    async with (
        from_mcp(codemode.registry, server=DEMO),
        from_mcp(codemode.registry, server=TIME, prefix="time_"),
    ):
        result = await codemode.run_async(
            "caught = []\n"
            "for call in (lambda: tools.fail(message='no luck'),\n"
            "             lambda: tools.time_convert_time(source_timezone='UTC', time='12:00',\n"
            "                                             target_timezone='Mars/Olympus'),\n"
            "             lambda: tools.add(a='two')):\n"
            "    try:\n"
            "        call()\n"
            "    except Exception as exc:\n"
            "        kind = getattr(exc, 'error_type', '')\n"
            "        caught.append([type(exc).__name__, kind, str(exc)])\n"
            "result = caught\n"
        )
    assert result.success, result
    assert result.value == [
        ["ToolError", "MCPToolError", "fail: MCPToolError: Error executing tool fail: no luck"],
        [
            "ToolError",
            "MCPToolError",
            "time_convert_time: MCPToolError: Error processing mcp-server-time query: "
            "Invalid timezone: 'No time zone found with key Mars/Olympus'",
        ],
        ["TypeError", "", "tools.add(): argument 'a': 'two' is not of type 'integer'"],
    ]


async def test_server_killed_mid_call(codemode: Codemode) -> None:
    """A server whose process exits during a call gives the program a clear error at once,
    naming it and what to do; its later calls fail the same way, other tools still work."""
    async with (
        from_mcp(codemode.registry, server=DEMO),
        from_mcp(codemode.registry, server=TIME, prefix="time_"),
    ):
        started = time.monotonic()
        result = await codemode.run_async(
            "import json\n"
            "try:\n"
            "    tools.crash()\n"
            "except Exception as exc:\n"
            "    error = [getattr(exc, 'error_type', ''), str(exc)]\n"
            "now = json.loads(tools.time_get_current_time(timezone='UTC'))\n"
            "result = [error, now['timezone']]\n"
        )
        assert time.monotonic() - started < 10
        assert result.success, result
        (error_type, message), timezone = result.value
        assert error_type == "MCPConnectionError"
        assert message.startswith("crash: MCPConnectionError: MCP server 'demo' (")
        assert "went away during the call to 'crash'" in message
        assert "its stderr ended with: crashing on purpose" in message
        assert "connects to it again (a new `async with from_mcp(...)`)" in message
        assert timezone == "UTC"

        again = await codemode.run_async("tools.add(a=1)")
        assert again.error_type == "ToolError"
        assert "MCP server 'demo' (" in str(again.error)
        assert "is not connected" in str(again.error)
    assert codemode.registry.get_component_names() == []
    assert_no_mcp_processes()


async def test_subset_with_prefix(codemode: Codemode) -> None:
    """``tools=`` registers only the named tools (by MCP name or identifier), after ``prefix``;
    an unknown name or a taken one is a clear error that leaves nothing behind."""
    async with from_mcp(
        codemode.registry, server=DEMO, tools=["add", "word-count"], prefix="demo_"
    ) as demo:
        assert demo.names == ["demo_add", "demo_word_count"]
        assert codemode.registry.get_component_names() == ["demo_add", "demo_word_count"]
        result = await codemode.run_async(
            "result = [tools.demo_add(a=1), tools.demo_word_count(text='a b')]"
        )
        assert result.value == [3, "2 words"], result

    with pytest.raises(ValueError, match=r"has no tool 'nope'; it has: add, move, word-count"):
        async with from_mcp(codemode.registry, server=DEMO, tools=["add", "nope"]):
            pass

    @tool
    def add(a: int) -> int:
        """The application's own add."""
        return a

    codemode.registry.register_tool("add", add)
    try:
        with pytest.raises(ComponentAlreadyExistsError, match=r"give from_mcp a prefix="):
            async with from_mcp(codemode.registry, server=DEMO):
                pass
        assert codemode.registry.get_component_names() == ["add"]
    finally:
        codemode.registry.unregister_tool("add")
    assert_no_mcp_processes()


async def test_env_reaches_only_the_server_it_is_given_to(
    codemode: Codemode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server sees the ``env`` given for it, not the application's environment."""
    monkeypatch.setenv("DEMO_TOKEN", "the application's")
    async with (
        from_mcp(
            codemode.registry,
            command=sys.executable,
            args=["-m", "tests.mcp_servers"],
            cwd=REPO_ROOT,
            env={"DEMO_TOKEN": "the server's"},
            tools=["secret"],
            prefix="given_",
        ),
        from_mcp(codemode.registry, server=DEMO, tools=["secret"], prefix="plain_"),
    ):
        result = await codemode.run_async("result = [tools.given_secret(), tools.plain_secret()]")
    assert result.value == ["the server's", "(unset)"], result


async def test_config_file_connects_every_server(codemode: Codemode, tmp_path: Path) -> None:
    """An ``mcpServers`` file connects all its servers, tools named ``{server}_{tool}``."""
    path = tmp_path / "mcp.json"
    path.write_text(
        json.dumps(
            {
                "mcpServers": {
                    "demo": {
                        "command": sys.executable,
                        "args": ["-m", "tests.mcp_servers"],
                        "cwd": str(REPO_ROOT),
                        "env": {"DEMO_TOKEN": "from the config"},
                    },
                    "time": {"command": sys.executable, "args": TIME.args},
                    "off": {"command": "never-started", "disabled": True},
                }
            }
        )
    )
    async with from_mcp_config(codemode.registry, path) as servers:
        assert list(servers.servers) == ["demo", "time"]
        assert "demo_secret" in servers.names
        assert "time_get_current_time" in servers.names
        result = await codemode.run_async(
            "import json\n"
            "result = [tools.demo_secret(),\n"
            "          json.loads(tools.time_get_current_time(timezone='UTC'))['timezone']]\n"
        )
    assert result.value == ["from the config", "UTC"], result
    assert codemode.registry.get_component_names() == []
    assert_no_mcp_processes()


async def test_config_with_a_broken_server_closes_the_others(codemode: Codemode) -> None:
    """When one server of a config does not start, the error names it (with its stderr) and
    the servers that did start are closed again."""
    config = {
        "mcpServers": {
            "demo": {
                "command": sys.executable,
                "args": ["-m", "tests.mcp_servers"],
                "cwd": str(REPO_ROOT),
            },
            "broken": {
                "command": sys.executable,
                "args": ["-c", "import sys; sys.exit('broken on purpose')"],
            },
        }
    }
    with pytest.raises(MCPConnectionError) as caught:
        async with from_mcp_config(codemode.registry, config):
            pass
    message = str(caught.value)
    assert message.startswith("MCP server 'broken' (")
    assert "could not be started or reached" in message
    assert "its stderr ended with: broken on purpose" in message
    assert caught.value.server == "broken"
    assert codemode.registry.get_component_names() == []
    assert_no_mcp_processes()


async def test_a_command_that_does_not_exist(codemode: Codemode) -> None:
    """A missing command is a connection error that names it."""
    with pytest.raises(MCPConnectionError, match=r"no such command: /nonexistent/mcp-server"):
        async with from_mcp(codemode.registry, command="/nonexistent/mcp-server"):
            pass


async def test_streamable_http_with_a_bearer_token(
    codemode: Codemode, http_demo: tuple[str, str, subprocess.Popen[str]]
) -> None:
    """Over streamable HTTP the headers go with every request: the right token gets the tools,
    a wrong one a clear refusal; a server killed mid-call gives a clear error at once."""
    url, token, proc = http_demo
    with pytest.raises(MCPConnectionError, match=r"HTTP 401 Unauthorized \(check its headers"):
        async with from_mcp(codemode.registry, url=url, headers={"Authorization": "Bearer no"}):
            pass
    headers = {"Authorization": f"Bearer {token}"}
    async with from_mcp(codemode.registry, url=url, headers=headers, prefix="web_") as web:
        assert "web_add" in web.names
        result = await codemode.run_async(
            "import asyncio\n"
            "met = await asyncio.gather(*(tools.web_rendezvous.run_async(name=n) for n in 'xyz'))\n"
            "result = [tools.web_add(a=1, b=2), tools.web_move(point={'x': 0}), met]\n"
        )
        assert result.value == [3, {"x": 1, "y": 0}, ["x", "y", "z"]], result

        started = time.monotonic()
        crashed = await codemode.run_async("tools.web_crash()")
        assert time.monotonic() - started < 10
        assert proc.wait(timeout=10) == 3
        assert crashed.error_type == "ToolError"
        assert str(crashed.error).startswith("web_crash: MCPConnectionError: MCP server 'demo' (")
        assert "went away during the call to 'crash'" in str(crashed.error)


async def test_calls_from_another_event_loop_are_refused(codemode: Codemode) -> None:
    """A session lives on the loop that opened it: a call from another loop is a clear
    RuntimeError, not a hang."""
    async with from_mcp(codemode.registry, server=DEMO, tools=["add"]) as demo:
        add = demo.tools["add"]
        assert await add.run_async(a=1) == 3

        def elsewhere() -> object:
            return asyncio.run(add.run_async(a=1))

        with pytest.raises(RuntimeError, match=r"connected on another event loop"):
            await asyncio.wait_for(asyncio.to_thread(elsewhere), 10)


async def test_a_tool_error_in_the_application(codemode: Codemode) -> None:
    """Called by the application itself, a tool's error is an MCPToolError naming server and
    tool, with the server's text."""
    async with from_mcp(codemode.registry, server=DEMO, tools=["fail"]) as demo:
        with pytest.raises(MCPToolError) as caught:
            await demo.tools["fail"].run_async(message="oops")
    assert str(caught.value) == "Error executing tool fail: oops"
    assert (caught.value.server, caught.value.tool) == ("demo", "fail")


async def test_a_server_that_never_answers_is_given_up(codemode: Codemode) -> None:
    """A command that never speaks MCP fails after ``connect_timeout``, and is ended."""
    started = time.monotonic()
    with pytest.raises(MCPConnectionError, match=r"did not answer within 1s of starting"):
        async with from_mcp(
            codemode.registry,
            command=sys.executable,
            args=["-c", "import time; time.sleep(60)", PRETENDER],
            connect_timeout=1,
        ):
            pass
    assert time.monotonic() - started < 6
    assert_no_mcp_processes()


async def test_a_server_killed_between_calls(codemode: Codemode) -> None:
    """A server killed while idle fails its next call at once, with a clear error."""
    async with from_mcp(codemode.registry, server=DEMO, tools=["add"]) as demo:
        (server,) = [p for p in descendants(os.getpid()) if "tests.mcp_servers" in p.cmdline]
        os.kill(server.pid, signal.SIGKILL)
        assert wait_until(lambda: not server.alive(), timeout=10)
        with pytest.raises(MCPConnectionError) as caught:
            await asyncio.wait_for(demo.tools["add"].run_async(a=1), 10)
    assert str(caught.value).startswith("MCP server 'demo' (")
    assert "(it closed the connection (did its process exit?))" in str(caught.value)
