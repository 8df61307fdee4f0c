"""Pydantic AI adapter: a toolset whose one tool, ``run_python``, runs the model's program.

The program calls the application's tools through ``tools``; the tool's description carries
their stubs. Tools given as ``tools=`` (plain functions, ``Tool`` objects or a
``FunctionToolset``, as an agent takes them) are registered on the Codemode's registry, so a
program calls ``tools.name(...)`` and the real function runs here, in the application. A tool
whose first parameter is a ``RunContext`` receives the one of the ``run_python`` call whose
program called it (its ``deps``, ``usage`` …). Needs ``pip install 'codemode[pydantic-ai]'``.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from codemode.core.context import RuntimeContext
from codemode.core.registry import ComponentAlreadyExistsError
from codemode.integrations._common import CodeInput, Runner, tool_description
from codemode.tools.feedback import DEFAULT_MAX_OUTPUT_CHARS
from codemode.tools.spec import ToolSpec, spec_from_callable

if TYPE_CHECKING:
    # Typing only: the adapter wraps a Codemode; the core never imports this module.
    from codemode.core.codemode import Codemode
    from codemode.core.session import Session

try:
    from pydantic_ai import RunContext, Tool
    from pydantic_ai.tools import ToolDefinition
    from pydantic_ai.toolsets import AbstractToolset, FunctionToolset, ToolsetTool
    from pydantic_core import SchemaValidator, core_schema
except ImportError as exc:  # the extra is not installed
    raise ImportError(
        "codemode.integrations.pydantic_ai needs Pydantic AI: pip install 'codemode[pydantic-ai]'"
    ) from exc

__all__ = ["CodemodeToolset", "register_agent_tools"]

#: The name the model calls the tool by, unless ``name=`` says otherwise.
DEFAULT_TOOL_NAME = "run_python"

#: What a tool given as ``tools=`` may be: a function, a ``Tool``, or a whole ``FunctionToolset``.
AgentTools = Iterable[Any] | FunctionToolset[Any]

# The RunContext of the run_python call in progress. The program's tool calls run in tasks
# (or threads) started from that call, so they inherit it, also on a session's own loop.
_run_context: contextvars.ContextVar[RunContext[Any] | None] = contextvars.ContextVar(
    "codemode_pydantic_ai_run_context", default=None
)

# The model's arguments: exactly one string, ``code``.
_ARGS_VALIDATOR = SchemaValidator(
    core_schema.typed_dict_schema(
        {"code": core_schema.typed_dict_field(core_schema.str_schema())},
        extra_behavior="forbid",
    )
)


def _code_schema() -> dict[str, Any]:
    schema = CodeInput.model_json_schema()
    schema.pop("title", None)
    schema["additionalProperties"] = False
    return schema


class CodemodeToolset(AbstractToolset[Any]):
    """A Pydantic AI toolset offering ``run_python(code)``; see the module docstring.

    Give it to an agent as ``Agent(model, toolsets=[CodemodeToolset(codemode, tools=[...])])``.
    Options as :func:`codemode.integrations.langchain.codemode_tool`: ``available_tools``
    (names the program may call; default all registered), ``context`` (a fixed context;
    default the caller's), ``execution_timeout`` (seconds), ``max_output_chars``, ``session``
    (an open session: every program of the agent runs in it, sharing state), ``name`` and
    ``description`` (default: an introduction and the stubs of the tools registered by then;
    it is fixed here, like the other adapters'). ``tools`` are registered on
    ``codemode.registry`` now (see :func:`register_agent_tools` for what is refused). A failed
    program is text for the model; an unreachable or refusing executor raises from the run.
    """

    def __init__(
        self,
        codemode: Codemode,
        *,
        tools: AgentTools = (),
        name: str = DEFAULT_TOOL_NAME,
        description: str | None = None,
        available_tools: Sequence[str] | None = None,
        context: RuntimeContext | Mapping[str, Any] | None = None,
        execution_timeout: float | None = None,
        max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
        session: Session | None = None,
        id: str | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, not {name!r}")
        register_agent_tools(codemode, tools)
        self.codemode = codemode
        self.name = name
        self.description = description or tool_description(codemode, available_tools)
        self._id = id
        self._runner = Runner(
            codemode,
            available_tools=available_tools,
            context=context,
            execution_timeout=execution_timeout,
            max_output_chars=max_output_chars,
            session=session,
        )

    @property
    def id(self) -> str | None:
        return self._id

    async def get_tools(self, ctx: RunContext[Any]) -> dict[str, ToolsetTool[Any]]:
        definition = ToolDefinition(
            name=self.name,
            description=self.description,
            parameters_json_schema=_code_schema(),
        )
        return {
            self.name: ToolsetTool(
                toolset=self,
                tool_def=definition,
                max_retries=ctx.max_retries,
                args_validator=_ARGS_VALIDATOR,
            )
        }

    async def call_tool(
        self, name: str, tool_args: dict[str, Any], ctx: RunContext[Any], tool: ToolsetTool[Any]
    ) -> str:
        """Run the program; the outcome as text (see :mod:`codemode.tools.feedback`)."""
        token = _run_context.set(ctx)
        try:
            return await self._runner.run(tool_args["code"], self._runner.current_context())
        finally:
            _run_context.reset(token)


# The agent's tools, callable from programs ---------------------------------------------------


def register_agent_tools(codemode: Codemode, tools: AgentTools) -> list[str]:
    """Register Pydantic AI tools on ``codemode.registry``; return their names.

    ``tools`` is a list of plain functions (sync or async, with or without a leading
    ``RunContext``), ``Tool`` objects and ``FunctionToolset``s (all their tools), or one
    ``FunctionToolset``. Each stub is read from the function's signature and docstring (a
    ``Tool``'s explicit ``description`` replaces the docstring's). Registering the same
    function under the same name again is a no-op; a tool's ``prepare`` is not applied
    (programs see every tool). Raises, before registering any: ``TypeError`` for anything
    else or a signature with no schema (``*args``, ``Tool.from_schema``), ``ValueError`` for
    a name that is not an identifier or a tool that ``requires_approval`` (a program cannot
    stop for a human), :class:`ComponentAlreadyExistsError` for a name taken by another tool.
    """
    if isinstance(tools, FunctionToolset):
        items = list(tools.tools.values())
    elif isinstance(tools, AbstractToolset):
        raise TypeError(_NOT_A_FUNCTION_TOOLSET.format(type(tools).__name__))
    elif isinstance(tools, Tool) or callable(tools):
        raise TypeError(
            "tools= takes a list of functions or Tool objects, or one FunctionToolset; "
            f"got a single {type(tools).__name__}: put it in a list"
        )
    else:
        items = []
        for item in tools:  # a FunctionToolset in the list stands for its tools
            items += item.tools.values() if isinstance(item, FunctionToolset) else [item]
    registry = codemode.registry
    new: dict[str, _AgentTool] = {}
    names: list[str] = []
    for agent_tool in (_AgentTool(_as_tool(item)) for item in items):
        name = agent_tool.name
        names.append(name)
        if not name.isidentifier():
            raise ValueError(f"tool name {name!r} must be a Python identifier; rename the Tool")
        held = new.get(name) or (registry.get_tool(name) if registry.has_tool(name) else None)
        if held is None:
            new[name] = agent_tool
        elif not (isinstance(held, _AgentTool) and held.tool.function is agent_tool.tool.function):
            raise ComponentAlreadyExistsError(f"tool {name!r} is already registered")
    for name, agent_tool in new.items():
        registry.register_tool(name, agent_tool)
    return names


_NOT_A_FUNCTION_TOOLSET = (
    "tools= takes functions, Tool objects and FunctionToolsets; a {} cannot be registered: "
    "its tools are known only during a run"
)


def _as_tool(item: Any) -> Tool[Any]:
    if isinstance(item, Tool):
        return item
    if isinstance(item, AbstractToolset):
        raise TypeError(_NOT_A_FUNCTION_TOOLSET.format(type(item).__name__))
    if inspect.isfunction(item) or inspect.ismethod(item):
        return Tool(item)
    raise TypeError(
        "tools= takes functions, Tool objects or a FunctionToolset; "
        f"got {type(item).__name__}: {item!r}"
    )


class _AgentTool:
    """A Pydantic AI ``Tool`` as a Codemode tool: the registry validates the program's
    arguments against :attr:`spec` and awaits :meth:`run_async`.

    A sync function runs in a worker thread, never on the loop. A ``RunContext`` parameter
    gets the run's (see the module docstring); the tool's ``args_validator`` and ``timeout``
    apply as they would in the agent.
    """

    def __init__(self, tool: Tool[Any]) -> None:
        if tool.requires_approval:
            raise ValueError(
                f"tool {tool.name!r} requires approval, which a program cannot wait for; "
                "leave it to the agent"
            )
        self.tool = tool
        self.name = tool.name
        self.spec = _spec_of(tool)

    async def run_async(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function with arguments the registry has already validated."""
        tool = self.tool
        # getattr: not every release the extra allows has these on Tool.
        validator = getattr(tool, "args_validator", None)
        timeout: float | None = getattr(tool, "timeout", None)
        ctx: RunContext[Any] | None = None
        if tool.takes_ctx or validator is not None:
            ctx = _current_run(self.name)
            if validator is not None:
                checked = validator(ctx, *args, **kwargs)
                if inspect.isawaitable(checked):
                    await checked
        call_args = (ctx, *args) if tool.takes_ctx else args
        timer = asyncio.timeout(timeout)
        try:
            async with timer:
                if tool.function_schema.is_async:
                    return await tool.function(*call_args, **kwargs)
                return await asyncio.to_thread(tool.function, *call_args, **kwargs)
        except TimeoutError:
            if not timer.expired():  # the tool's own TimeoutError, not its time limit
                raise
            raise TimeoutError(f"tool {self.name!r} took longer than {timeout:g} s") from None

    def __repr__(self) -> str:
        return f"<pydantic_ai tool {self.name}>"


def _spec_of(tool: Tool[Any]) -> ToolSpec:
    spec = spec_from_callable(tool.function, skip_first=tool.takes_ctx, name=tool.name)
    explicit = tool.description
    if explicit is None or explicit == tool.function_schema.description:
        return spec
    summary, _, rest = explicit.strip().partition("\n")
    return replace(spec, doc=replace(spec.doc, summary=summary.strip(), description=rest.strip()))


def _current_run(name: str) -> RunContext[Any]:
    ctx = _run_context.get()
    if ctx is None:
        raise RuntimeError(
            f"tool {name!r} takes a Pydantic AI RunContext, which only a program run by "
            "CodemodeToolset's run_python has"
        )
    return ctx
