"""MCP both ways: :mod:`codemode.mcp.tools` turns MCP servers' tools into Codemode tools, and
:mod:`codemode.mcp.server` serves Codemode itself as an MCP server.

Both need the MCP SDK: ``pip install 'codemode[mcp]'``.
"""
