"""``from_mcp`` without a server: its arguments, results as the program sees them, the import."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mcp import types

from codemode import ComponentRegistry
from codemode.mcp.tools import (
    MCPConfigError,
    MCPServerConfig,
    MCPTools,
    from_mcp,
    from_mcp_config,
    result_value,
)


def test_from_mcp_needs_exactly_one_server() -> None:
    """Neither or both of command/url/server is a ValueError saying so."""
    registry = ComponentRegistry()
    with pytest.raises(ValueError, match=r"exactly one of command=, url= or server=, and got none"):
        from_mcp(registry)
    with pytest.raises(ValueError, match=r"not command and url"):
        from_mcp(registry, command="x", url="http://h/mcp")
    with pytest.raises(ValueError, match=r"from_mcp: .*'headers' are for a 'url' server"):
        from_mcp(registry, command="x", headers={"A": "b"})
    with pytest.raises(ValueError, match=r"with server=, put args, env, cwd and headers"):
        from_mcp(registry, server=MCPServerConfig(command="x"), args=["-v"])
    tools = from_mcp(registry, command="python", args=["-m", "srv"], env={"K": "v"}, cwd="/tmp")
    assert isinstance(tools, MCPTools)
    assert tools.config == MCPServerConfig(
        command="python", args=["-m", "srv"], env={"K": "v"}, cwd="/tmp"
    )
    assert tools.names == []


def test_config_servers_whose_prefixes_clash() -> None:
    """Two servers whose names give the same tool prefix are refused before connecting."""
    config = {"a-b": {"command": "x"}, "a_b": {"command": "y"}}
    with pytest.raises(MCPConfigError, match=r"servers 'a-b' and 'a_b' would both prefix"):
        from_mcp_config(ComponentRegistry(), config)
    assert list(from_mcp_config(ComponentRegistry(), config, prefix_with_server_name=False).servers)


def text(value: str) -> types.TextContent:
    return types.TextContent(type="text", text=value)


@pytest.mark.parametrize(
    ("result", "unwrap", "expected"),
    [
        (types.CallToolResult(content=[text("{}")], structuredContent={"a": 1}), False, {"a": 1}),
        (types.CallToolResult(content=[], structuredContent={"result": [1, 2]}), True, [1, 2]),
        (types.CallToolResult(content=[], structuredContent={"result": 3}), False, {"result": 3}),
        (types.CallToolResult(content=[text("hello")]), False, "hello"),
        (types.CallToolResult(content=[text("a"), text("b")]), False, "a\nb"),
        (types.CallToolResult(content=[]), False, None),
        (
            types.CallToolResult(
                content=[
                    text("see"),
                    types.ImageContent(type="image", data="AAAA", mimeType="image/png"),
                ]
            ),
            False,
            ["see", {"type": "image", "data": "AAAA", "mimeType": "image/png"}],
        ),
    ],
)
def test_result_values(result: types.CallToolResult, unwrap: bool, expected: object) -> None:
    """Structured content first (unwrapped when marked), else text; other content as JSON."""
    assert result_value(result, unwrap=unwrap) == expected


def test_codemode_tools_does_not_need_mcp() -> None:
    """``import codemode.tools`` works without the SDK; ``from_mcp`` then names the extra."""
    code = (
        "import sys\n"
        "sys.modules['mcp'] = None  # as if not installed\n"
        "import codemode.tools\n"
        "try:\n"
        "    codemode.tools.from_mcp\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert (
        done.stdout.strip() == "codemode.mcp.tools needs the MCP SDK: pip install 'codemode[mcp]'"
    )


def test_from_mcp_is_exported_lazily() -> None:
    """``codemode.tools.from_mcp`` is the function of ``codemode.mcp.tools``."""
    import codemode.tools

    assert "from_mcp" in codemode.tools.__all__
    assert codemode.tools.from_mcp is from_mcp
    with pytest.raises(AttributeError, match=r"has no attribute 'nothing'"):
        codemode.tools.nothing  # noqa: B018
