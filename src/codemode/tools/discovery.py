"""Answers the program's ``tools.search(...)`` and ``tools.describe(...)`` from the registry.

The guest sends them as calls to two reserved tool names, declared in the start frame beside
the application's tools, so they travel, and are counted, like any other tool call; the client
answers them from the tools this execution may call, never from the whole registry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from codemode.tools.stubs import describe_tools, search_tools

__all__ = ["DESCRIBE_TOOL", "DISCOVERY_TOOLS", "SEARCH_TOOL", "answer_discovery"]

#: Reserved names, the same as the guest runtime's (a test pins them together).
SEARCH_TOOL = "_codemode_search"
DESCRIBE_TOOL = "_codemode_describe"
DISCOVERY_TOOLS = (DESCRIBE_TOOL, SEARCH_TOOL)

_MAX_LIMIT = 50


def answer_discovery(
    name: str, args: Sequence[Any], kwargs: Mapping[str, Any], tools: Mapping[str, Any]
) -> Any:
    """The answer to one discovery call over ``tools`` (name → tool).

    ``search(query, limit=10)`` returns ranked ``{"name", "summary"}`` dicts;
    ``describe(name=None)`` returns the stub of ``name`` (all stubs when None). Raises
    ``TypeError`` for bad arguments and ``ValueError`` for an unknown tool name.
    """
    if name == SEARCH_TOOL:
        query, limit = _arguments("search", args, kwargs, ("query", "limit"), (None, 10))
        if not isinstance(query, str):
            raise TypeError("tools.search() needs a query string, e.g. tools.search('weather')")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise TypeError("tools.search() limit must be a positive integer")
        return search_tools(tools, query, min(limit, _MAX_LIMIT))
    if name == DESCRIBE_TOOL:
        (wanted,) = _arguments("describe", args, kwargs, ("name",), (None,))
        if wanted is None:
            return describe_tools(tools, preamble=False)
        if not isinstance(wanted, str):
            raise TypeError("tools.describe() takes a tool name, e.g. tools.describe('weather')")
        if wanted not in tools:
            listed = ", ".join(sorted(tools)) or "(none)"
            raise ValueError(f"no tool named {wanted!r}; available tools: {listed}")
        return describe_tools(tools, [wanted], preamble=False)
    raise ValueError(f"{name!r} is not a discovery call")


def _arguments(
    label: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    names: tuple[str, ...],
    defaults: tuple[Any, ...],
) -> list[Any]:
    if len(args) > len(names):
        raise TypeError(f"tools.{label}() takes at most {len(names)} arguments")
    values = dict(zip(names, defaults, strict=True))
    values.update(zip(names, args, strict=False))
    for key, value in kwargs.items():
        if key not in values:
            raise TypeError(f"tools.{label}() got an unexpected keyword argument {key!r}")
        values[key] = value
    return [values[n] for n in names]
