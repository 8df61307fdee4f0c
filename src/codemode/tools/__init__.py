"""Tools as the model sees them: ``@tool``, JSON Schemas, Python stubs, discovery, feedback."""

from codemode.tools.feedback import format_result, truncate
from codemode.tools.function import AsyncFunctionTool, BaseFunctionTool, FunctionTool, tool
from codemode.tools.spec import Param, ToolSpec, spec_for, spec_from_callable
from codemode.tools.stubs import PREAMBLE, describe_tools, render_stub, search_tools

__all__ = [
    "PREAMBLE",
    "AsyncFunctionTool",
    "BaseFunctionTool",
    "FunctionTool",
    "Param",
    "ToolSpec",
    "describe_tools",
    "format_result",
    "render_stub",
    "search_tools",
    "spec_for",
    "spec_from_callable",
    "tool",
    "truncate",
]
