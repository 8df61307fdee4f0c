"""LangChain adapter: a Codemode as one ``langchain_core`` tool, for LangGraph agents and chains.

``invoke`` runs the model's program from sync code (also inside a running loop, in a worker
thread); ``ainvoke`` is native async. The tool's description carries the stubs of the
application's tools. Needs ``pip install 'codemode[langchain]'``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from codemode.core.context import RuntimeContext
from codemode.core.executor_client import run_sync
from codemode.integrations._common import DEFAULT_NAME, CodeInput, Runner, tool_description
from codemode.tools.feedback import DEFAULT_MAX_OUTPUT_CHARS

if TYPE_CHECKING:
    # Typing only: the facade imports this module (in as_langchain_tool), not the other way round.
    from codemode.core.codemode import Codemode
    from codemode.core.session import Session

try:
    from langchain_core.tools import StructuredTool
except ImportError as exc:  # the extra is not installed
    raise ImportError(
        "codemode.integrations.langchain needs LangChain: pip install 'codemode[langchain]'"
    ) from exc

__all__ = ["codemode_tool"]


def codemode_tool(
    codemode: Codemode,
    *,
    name: str = DEFAULT_NAME,
    description: str | None = None,
    available_tools: Sequence[str] | None = None,
    context: RuntimeContext | Mapping[str, Any] | None = None,
    execution_timeout: float | None = None,
    max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
    session: Session | None = None,
) -> StructuredTool:
    """A ``StructuredTool`` taking ``code`` and returning the outcome as text for the model.

    Options as :class:`codemode.integrations.crewai.CodemodeTool`: ``available_tools``,
    ``context`` (default: the caller's), ``execution_timeout``, ``max_output_chars``,
    ``session`` (an open session: every program of the agent runs in it, sharing state).
    """
    runner = Runner(
        codemode,
        available_tools=available_tools,
        context=context,
        execution_timeout=execution_timeout,
        max_output_chars=max_output_chars,
        session=session,
    )

    def run(code: str) -> str:
        runner.check_sync_call()
        return run_sync(runner.run(code, runner.current_context()))

    async def arun(code: str) -> str:
        return await runner.run(code, runner.current_context())

    return StructuredTool.from_function(
        func=run,
        coroutine=arun,
        name=name,
        description=description or tool_description(codemode, available_tools),
        args_schema=CodeInput,
    )
