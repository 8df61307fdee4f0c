"""The errors of MCP tool calls (the tree is drawn in :mod:`codemode.mcp.tools`)."""

from __future__ import annotations

__all__ = ["MCPConnectionError", "MCPError", "MCPToolError"]


class MCPError(Exception):
    """An MCP server's tool call failed; ``server`` and ``tool`` say which."""

    def __init__(self, message: str, *, server: str = "", tool: str = "") -> None:
        super().__init__(message)
        self.server = server
        self.tool = tool


class MCPToolError(MCPError):
    """The server answered the call with an error: the tool's own (``isError``, message is
    the tool's text) or the protocol's (an unknown tool, bad parameters: ``code`` is set)."""

    def __init__(
        self, message: str, *, server: str = "", tool: str = "", code: int | None = None
    ) -> None:
        super().__init__(message, server=server, tool=tool)
        self.code = code


class MCPConnectionError(MCPError):
    """No answer: the server could not be started or reached, or it went away (a call in
    flight then gets this). Its tools fail until the application connects to it again."""
