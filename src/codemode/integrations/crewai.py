"""CrewAI adapter: a Codemode as one ``crewai.tools.BaseTool``.

The agent writes a program; the tool runs it on the executor against the application's tools
and gives the agent the result, or the error and traceback, with the program's output. The
tool's description carries the stubs of those tools. ``_run`` works from sync code and from
inside a running event loop; ``_arun`` is native async. Needs ``pip install 'codemode[crewai]'``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, PrivateAttr

from codemode.core.context import RuntimeContext
from codemode.core.executor_client import run_sync
from codemode.integrations._common import DEFAULT_NAME, CodeInput, Runner, tool_description
from codemode.tools.feedback import DEFAULT_MAX_OUTPUT_CHARS

if TYPE_CHECKING:
    # Typing only: the facade imports this module (in as_crewai_tool), not the other way round.
    from codemode.core.codemode import Codemode
    from codemode.core.session import Session

try:
    from crewai.tools import BaseTool
except ImportError as exc:  # the extra is not installed
    raise ImportError(
        "codemode.integrations.crewai needs CrewAI: pip install 'codemode[crewai]'"
    ) from exc

__all__ = ["CodemodeTool"]


class CodemodeTool(BaseTool):
    """Runs the agent's Python program with Codemode; see the module docstring.

    Build it with ``codemode.as_crewai_tool()`` or ``CodemodeTool(codemode=...)``. Options:
    ``available_tools`` (names the program may call; default all), ``context`` (a fixed
    context; default the caller's, see :class:`~codemode.integrations._common.Runner`),
    ``execution_timeout`` (seconds), ``max_output_chars`` (stdout/stderr kept for the agent),
    ``name`` and ``description`` (default: an introduction and the tools' stubs), ``session``
    (an open :class:`~codemode.core.session.Session`: the agent's steps share its state).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str = DEFAULT_NAME
    description: str = ""
    args_schema: type[BaseModel] = CodeInput

    _runner: Runner = PrivateAttr()

    def __init__(
        self,
        *,
        codemode: Codemode,
        available_tools: Sequence[str] | None = None,
        context: RuntimeContext | Mapping[str, Any] | None = None,
        execution_timeout: float | None = None,
        max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
        session: Session | None = None,
        **fields: Any,
    ) -> None:
        fields.setdefault("description", tool_description(codemode, available_tools))
        super().__init__(**fields)
        self._runner = Runner(
            codemode,
            available_tools=available_tools,
            context=context,
            execution_timeout=execution_timeout,
            max_output_chars=max_output_chars,
            session=session,
        )

    def _run(self, code: str) -> str:
        """Run ``code``; blocks this thread (from inside a loop, in a worker thread)."""
        # The context is read here, in the caller's thread: run_sync may switch threads.
        self._runner.check_sync_call()
        return run_sync(self._runner.run(code, self._runner.current_context()))

    async def _arun(self, code: str) -> str:
        """Run ``code`` without blocking the event loop."""
        return await self._runner.run(code, self._runner.current_context())
