"""The application's tools, by name, and the current request's context."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from codemode.core._workers import WORKERS
from codemode.core.context import ContextScope, RuntimeContext, current_context

if TYPE_CHECKING:
    from codemode.core.approvals import ApprovalPolicy

__all__ = [
    "ComponentAlreadyExistsError",
    "ComponentNotFoundError",
    "ComponentRegistry",
    "RuntimeContext",
]


class ComponentNotFoundError(KeyError):
    """No component is registered under that name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "component not found"


class ComponentAlreadyExistsError(ValueError):
    """A component is already registered under that name; unregister it or pass overwrite=True."""


def _is_tool_async(tool: object) -> bool:
    """True when ``tool`` has a coroutine ``run_async`` (preferred over ``run`` when present)."""
    method = getattr(tool, "run_async", None)
    return method is not None and inspect.iscoroutinefunction(method)


def _check_tool(name: str, tool: object) -> None:
    if not name.isidentifier():
        raise ValueError(f"tool name {name!r} must be a Python identifier (tools.{name}(...))")
    if not any(callable(getattr(tool, m, None)) for m in ("run", "run_async", "run_with_context")):
        raise TypeError(
            f"tool {name!r} ({type(tool).__name__}) needs run, run_async or run_with_context"
        )
    if hasattr(tool, "run_async") and not _is_tool_async(tool):
        raise TypeError(f"tool {name!r}: run_async must be an async def method")


class ComponentRegistry:
    """Tools the programs may call, and the per-request :class:`RuntimeContext`.

    Registration is thread-safe. The context lives in a ``ContextVar``: it belongs to the task
    or thread that set it.
    """

    def __init__(self) -> None:
        self._tools: dict[str, Any] = {}
        self._lock = threading.Lock()
        #: Decides every tool call when set: ``(call, context) -> True | False | "pause"``
        #: (or an awaitable of it); see :mod:`codemode.core.approvals`.
        self.approval_policy: ApprovalPolicy | None = None

    def register_tool(self, name: str, tool: Any, *, overwrite: bool = False) -> None:
        """Make ``tool`` callable from programs as ``tools.<name>``.

        ``tool`` has ``run(**kwargs)``, ``async run_async(**kwargs)`` or
        ``run_with_context(context, **kwargs)``, or is a function (plain or ``@tool``-decorated;
        a plain one is wrapped with :func:`codemode.tools.tool`). Raises
        :class:`ComponentAlreadyExistsError` when the name is taken (unless ``overwrite``),
        ``ValueError``/``TypeError`` when the name or the tool is unusable.
        """
        # Imported here: codemode.tools builds on this package.
        from codemode.tools import spec_for
        from codemode.tools import tool as make_tool

        if inspect.isfunction(tool) or inspect.ismethod(tool):
            tool = make_tool(tool, name=name)
        _check_tool(name, tool)
        spec_for(tool)  # read the signature now, so a broken one fails at registration
        with self._lock:
            if name in self._tools and not overwrite:
                raise ComponentAlreadyExistsError(f"tool {name!r} is already registered")
            self._tools[name] = tool

    def get_tool(self, name: str) -> Any:
        """The tool registered as ``name``; raises :class:`ComponentNotFoundError`."""
        try:
            return self._tools[name]
        except KeyError:
            raise ComponentNotFoundError(
                f"tool {name!r} is not registered; registered tools: "
                + (", ".join(sorted(self._tools)) or "(none)")
            ) from None

    def unregister_tool(self, name: str) -> None:
        """Remove ``name``; raises :class:`ComponentNotFoundError` when it is not registered."""
        with self._lock:
            if self._tools.pop(name, None) is None:
                raise ComponentNotFoundError(f"tool {name!r} is not registered")

    def has_tool(self, name: str) -> bool:
        """Whether ``name`` is registered."""
        return name in self._tools

    def get_component_names(self) -> list[str]:
        """Names of the registered tools, sorted."""
        return sorted(self._tools)

    def tools(self) -> Mapping[str, Any]:
        """A snapshot of the registered tools by name."""
        return dict(self._tools)

    # Context -----------------------------------------------------------------------------

    def set_context(self, context: RuntimeContext | Mapping[str, Any]) -> ContextScope:
        """Make ``context`` the current task's; the returned scope can restore the old one."""
        if not isinstance(context, RuntimeContext):
            context = RuntimeContext(variables=context)
        return ContextScope(current_context.set(context))

    def get_context(self) -> RuntimeContext | None:
        """The current task's context, or None."""
        return current_context.get()

    def clear_context(self) -> None:
        """Forget the current task's context."""
        current_context.set(None)


async def call_tool(
    tool: Any,
    args: list[Any],
    kwargs: dict[str, Any],
    context: RuntimeContext,
    *,
    name: str | None = None,
) -> Any:
    """Run one tool call: ``run_with_context``, else ``run_async``, else ``run`` in a thread.

    The arguments are first validated against the tool's signature (``TypeError`` naming
    ``name`` and each bad argument); the return value comes back as plain JSON data.
    Sync methods never run on the event loop. ``context`` is always the application's own.
    """
    from codemode.tools.spec import spec_for  # imported here: codemode.tools builds on core

    spec = spec_for(tool)
    args, kwargs = spec.bind(name or type(tool).__name__, args, kwargs)
    with_context = getattr(tool, "run_with_context", None)
    if with_context is not None:
        if inspect.iscoroutinefunction(with_context):
            value = await with_context(context, *args, **kwargs)
        else:
            value = await WORKERS.run(with_context, context, *args, **kwargs)
    elif _is_tool_async(tool):
        value = await tool.run_async(*args, **kwargs)
    else:
        value = await WORKERS.run(tool.run, *args, **kwargs)
    return spec.dump_result(value)
