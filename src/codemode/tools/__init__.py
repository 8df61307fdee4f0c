"""Tools as the model sees them: ``@tool``, JSON Schemas, Python stubs, discovery, feedback.

``from_mcp`` (an MCP server's tools as Codemode tools) is loaded on first use, from
:mod:`codemode.mcp.tools`: it needs ``pip install 'codemode[mcp]'``, the rest does not.
"""

from typing import TYPE_CHECKING, Any

from codemode.tools.feedback import format_result, truncate
from codemode.tools.function import AsyncFunctionTool, BaseFunctionTool, FunctionTool, tool
from codemode.tools.spec import Param, ToolSpec, spec_for, spec_from_callable
from codemode.tools.stubs import PREAMBLE, describe_tools, render_stub, search_tools

if TYPE_CHECKING:
    from codemode.mcp.tools import from_mcp

__all__ = [
    "PREAMBLE",
    "AsyncFunctionTool",
    "BaseFunctionTool",
    "FunctionTool",
    "Param",
    "ToolSpec",
    "describe_tools",
    "format_result",
    "from_mcp",
    "render_stub",
    "search_tools",
    "spec_for",
    "spec_from_callable",
    "tool",
    "truncate",
]


def __getattr__(name: str) -> Any:
    if name == "from_mcp":
        from codemode.mcp.tools import from_mcp

        return from_mcp
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
