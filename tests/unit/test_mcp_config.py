"""The ``mcpServers`` configuration: the forms read, and the errors for wrong ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from codemode.mcp.tools import MCPConfigError, MCPServerConfig, load_mcp_config

CLAUDE_DESKTOP = {
    "mcpServers": {
        "time": {
            "command": "python",
            "args": ["-m", "mcp_server_time"],
            "env": {"TZ": "UTC"},
        },
        "remote": {
            "url": "https://mcp.example.com/mcp",
            "headers": {"Authorization": "Bearer t0ken"},
        },
    }
}


def test_claude_desktop_file(tmp_path: Path) -> None:
    """The common file gives each server's settings by name, in the file's order."""
    path = tmp_path / "claude_desktop_config.json"
    path.write_text(json.dumps(CLAUDE_DESKTOP))
    servers = load_mcp_config(path)
    assert list(servers) == ["time", "remote"]
    assert servers["time"] == MCPServerConfig(
        command="python", args=["-m", "mcp_server_time"], env={"TZ": "UTC"}
    )
    assert servers["remote"].url == "https://mcp.example.com/mcp"
    assert servers["remote"].headers == {"Authorization": "Bearer t0ken"}
    assert servers["time"].describe() == "python -m mcp_server_time"
    assert "t0ken" not in servers["remote"].describe()


@pytest.mark.parametrize(
    "data",
    [
        CLAUDE_DESKTOP["mcpServers"],  # the inner mapping alone
        {"servers": CLAUDE_DESKTOP["mcpServers"], "inputs": []},  # VS Code's form
    ],
)
def test_other_forms(data: dict[str, Any]) -> None:
    """The inner mapping alone, and VS Code's ``servers``, are read the same way."""
    assert list(load_mcp_config(data)) == ["time", "remote"]


def test_other_clients_keys_are_accepted() -> None:
    """``type``, ``autoApprove`` … are accepted; a disabled server is left out."""
    servers = load_mcp_config(
        {
            "mcpServers": {
                "a": {"type": "stdio", "command": "a", "autoApprove": ["x"]},
                "b": {"type": "http", "url": "http://127.0.0.1:1/mcp"},
                "c": {"command": "c", "disabled": True},
            }
        }
    )
    assert list(servers) == ["a", "b"]


@pytest.mark.parametrize(
    ("servers", "message", "field"),
    [
        ({"x": {}}, "server 'x': needs 'command' (a server to start) or 'url'", None),
        ({"x": {"command": "a", "url": "http://h/"}}, "server 'x': has both 'command'", None),
        ({"x": {"command": "a", "args": "-m x"}}, "server 'x': field 'args': Input should", "args"),
        ({"x": {"command": "a", "env": {"N": 1}}}, "server 'x': field 'env.N': Input", "env"),
        ({"x": {"url": "ftp://h/"}}, "'url' must start with http:// or https://", None),
        (
            {"x": {"url": "http://h/", "env": {}}},
            "'args', 'env' and 'cwd' are for a 'command'",
            None,
        ),
        ({"x": {"command": "a", "headers": {"A": "b"}}}, "'headers' are for a 'url' server", None),
        ({"x": {"url": "http://h/sse", "type": "sse"}}, "type 'sse' (the old HTTP+SSE", None),
        ({"x": ["python"]}, "server 'x': its settings must be an object, not list", None),
    ],
)
def test_bad_server_settings_name_the_server_and_field(
    servers: dict[str, Any], message: str, field: str | None
) -> None:
    """Each mistake is an MCPConfigError (a ValueError) naming the server and the field."""
    with pytest.raises(MCPConfigError) as caught:
        load_mcp_config({"mcpServers": servers})
    assert message in str(caught.value)
    assert str(caught.value).startswith("MCP config: server 'x': ")
    assert isinstance(caught.value, ValueError)
    assert caught.value.server == "x"
    assert caught.value.field == field


def test_bad_files(tmp_path: Path) -> None:
    """A missing file, bad JSON and the wrong shape are errors that name the file."""
    missing = tmp_path / "missing.json"
    with pytest.raises(MCPConfigError, match=r"missing\.json: cannot read it"):
        load_mcp_config(missing)
    broken = tmp_path / "broken.json"
    broken.write_text('{"mcpServers": {"a": }')
    with pytest.raises(MCPConfigError, match=r"broken\.json: not valid JSON: .* \(line 1, col"):
        load_mcp_config(broken)
    listed = tmp_path / "list.json"
    listed.write_text("[]")
    with pytest.raises(MCPConfigError, match=r"list\.json: must be a JSON object"):
        load_mcp_config(listed)
    with pytest.raises(MCPConfigError, match=r"'mcpServers' must be an object of server name"):
        load_mcp_config({"mcpServers": ["time"]})
