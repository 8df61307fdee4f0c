"""``examples/mcp_tools.py``, started by its one documented command, end to end."""

from __future__ import annotations

import json

from tests.integration.test_examples import _run_example


def test_mcp_tools_example() -> None:
    """The example registers the time server's tools, prints their stubs, and its program's
    parallel calls, caught error and result come back."""
    stdout = _run_example("mcp_tools.py")
    assert "def time_get_current_time(timezone: str) -> Any:" in stdout
    assert "def time_convert_time(source_timezone: str, time: str, target_timezone: str)" in stdout
    assert "in UTC.\n" in stdout
    assert (
        "The server refused: time_get_current_time: MCPToolError: Error processing "
        "mcp-server-time query: Invalid timezone:"
    ) in stdout
    assert json.loads(stdout.strip().splitlines()[-1]) == {
        "noon_utc_in_tokyo": "21:00",
        "difference": "+9.0h",
    }
