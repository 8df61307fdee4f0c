"""``@tool``: a plain function or coroutine function as a registered tool.

The decorated object is still callable as the function it wraps; it also has the methods the
registry dispatches to (``run`` or ``run_async``, and ``run_with_context``) and a
:class:`~codemode.tools.spec.ToolSpec` read from its signature and docstring, which gives its
JSON Schema, validates the program's arguments before the function runs, and renders its stub.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, Generic, ParamSpec, TypeVar, overload

from codemode.core.context import RuntimeContext
from codemode.tools.spec import ToolSpec, spec_from_callable

__all__ = ["AsyncFunctionTool", "BaseFunctionTool", "FunctionTool", "tool"]

P = ParamSpec("P")
R = TypeVar("R")


class BaseFunctionTool(Generic[P, R]):
    """What sync and async function tools share: the function, its name and its spec."""

    def __init__(
        self,
        func: Callable[P, R],
        spec: ToolSpec,
        name: str,
        description: str | None,
        requires_approval: bool = False,
    ) -> None:
        self.func = func
        self.name = name
        #: Calls wait for the application's approval (see :mod:`codemode.core.approvals`).
        self.requires_approval = requires_approval
        self.spec = spec if description is None else _with_description(spec, description)
        functools.update_wrapper(self, func)

    @property
    def description(self) -> str:
        """The one-line summary the model sees."""
        return self.spec.doc.summary

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.func(*args, **kwargs)

    def input_schema(self) -> dict[str, Any]:
        """JSON Schema of the arguments."""
        return self.spec.input_schema()

    def output_schema(self) -> dict[str, Any] | None:
        """JSON Schema of the return value, or None when it is not annotated."""
        return self.spec.output_schema()

    def __repr__(self) -> str:
        return f"<tool {self.name}>"


class FunctionTool(BaseFunctionTool[P, R]):
    """A sync function as a tool: the registry calls it in a worker thread, never on the loop."""

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function with already-validated arguments (the registry validates them)."""
        return self.func(*args, **kwargs)

    def run_with_context(self, context: RuntimeContext, /, *args: Any, **kwargs: Any) -> Any:
        """Call the function, passing ``context`` to its ``RuntimeContext`` parameter if any."""
        if self.spec.context_param is not None:
            kwargs[self.spec.context_param] = context
        return self.func(*args, **kwargs)


class AsyncFunctionTool(BaseFunctionTool[P, Awaitable[R]]):
    """A coroutine function as a tool: ``run_async`` is awaited on the application's loop."""

    async def run_async(self, *args: Any, **kwargs: Any) -> Any:
        """Await the function with already-validated arguments."""
        return await self.func(*args, **kwargs)

    async def run_with_context(self, context: RuntimeContext, /, *args: Any, **kwargs: Any) -> Any:
        """Await the function, passing ``context`` to its ``RuntimeContext`` parameter if any."""
        if self.spec.context_param is not None:
            kwargs[self.spec.context_param] = context
        return await self.func(*args, **kwargs)


def _with_description(spec: ToolSpec, description: str) -> ToolSpec:
    summary, _, rest = description.strip().partition("\n")
    return replace(spec, doc=replace(spec.doc, summary=summary.strip(), description=rest.strip()))


# A coroutine function also matches ``Callable[P, R]``; the first overload wins for it.
@overload
def tool(  # type: ignore[overload-overlap]
    func: Callable[P, Awaitable[R]],
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    requires_approval: bool = False,
) -> AsyncFunctionTool[P, R]: ...
@overload
def tool(
    func: Callable[P, R],
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    requires_approval: bool = False,
) -> FunctionTool[P, R]: ...
@overload
def tool(
    *, name: str | None = None, description: str | None = None, requires_approval: bool = False
) -> Callable[[Callable[P, R]], BaseFunctionTool[P, R]]: ...


def tool(
    func: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    requires_approval: bool = False,
) -> Any:
    """Make ``func`` a tool: ``@tool`` or ``@tool(name=..., description=...)``.

    Its parameters must be named and annotated with JSON-compatible types (pydantic models,
    TypedDicts, ``Literal``, ``list[...]`` … all work); the docstring's first line is the
    summary the model sees and its ``Args:`` section documents each argument. A parameter
    annotated ``RuntimeContext`` receives the application's context and is hidden from the
    program. Raises ``TypeError`` at decoration when the signature cannot be described.

    Register the result with ``registry.register_tool(tool.name, tool)``; it stays callable
    as the plain function. With ``requires_approval``, a program's call of it waits for the
    application's decision (:mod:`codemode.core.approvals`).
    """

    def wrap(f: Callable[..., Any]) -> BaseFunctionTool[Any, Any]:
        if not callable(f):
            raise TypeError(f"@tool needs a function, not {type(f).__name__}")
        tool_name = name or str(getattr(f, "__name__", ""))
        if not tool_name.isidentifier():
            raise ValueError(f"tool name {tool_name!r} must be a Python identifier; pass name=")
        spec = spec_from_callable(f, name=tool_name)
        if inspect.iscoroutinefunction(f):
            return AsyncFunctionTool(f, spec, tool_name, description, requires_approval)
        return FunctionTool(f, spec, tool_name, description, requires_approval)

    return wrap if func is None else wrap(func)
