"""What the framework adapters share: the tool's input, its description, and one run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from codemode.core.context import RuntimeContext
from codemode.tools.feedback import DEFAULT_MAX_OUTPUT_CHARS, format_result

if TYPE_CHECKING:
    from codemode.core.codemode import Codemode
    from codemode.core.session import Session

DEFAULT_NAME = "codemode"

INTRODUCTION = """\
Run a Python program in a sandbox. The program calls the application's tools through \
`tools` (stubs below) and returns its answer by setting `result`; you get back the result \
(or the error and traceback) and what it printed. Prefer one program that makes all the \
calls a step needs over one call per step.
"""


class CodeInput(BaseModel):
    """The one argument a model passes: the program."""

    code: str = Field(
        description="Python source to run. Call tools as tools.name(...); set `result`."
    )


def tool_description(codemode: Codemode, available_tools: Sequence[str] | None) -> str:
    """The adapter's description: what the tool does, then the stubs of the tools it can call."""
    return INTRODUCTION + "\n" + codemode.describe_tools(available_tools)


class Runner:
    """Runs one program for an adapter and shapes the outcome for the model.

    The context is, in order: the fixed ``context`` given to the adapter, the calling task's
    (``Codemode.with_context``), or the one current when the adapter was made — frameworks
    that run tools in threads of their own do not always carry context variables over.

    With a ``session`` (an open :class:`~codemode.core.session.Session`), every program runs
    in it, so an agent's steps share variables and files; it runs on the session's own event
    loop, whichever thread or loop the framework calls from.
    """

    def __init__(
        self,
        codemode: Codemode,
        *,
        available_tools: Sequence[str] | None = None,
        context: RuntimeContext | Mapping[str, Any] | None = None,
        execution_timeout: float | None = None,
        max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
        session: Session | None = None,
    ) -> None:
        self.codemode = codemode
        self.session = session
        self.available_tools = list(available_tools) if available_tools is not None else None
        if context is not None and not isinstance(context, RuntimeContext):
            context = RuntimeContext(variables=context)
        self.context = context
        self.creation_context = codemode.registry.get_context()
        self.execution_timeout = execution_timeout
        self.max_output_chars = max_output_chars

    def current_context(self) -> RuntimeContext | None:
        """The context for a run starting now, in the calling thread or task."""
        if self.context is not None:
            return self.context
        return self.codemode.registry.get_context() or self.creation_context

    async def run(self, code: str, context: RuntimeContext | None) -> str:
        """Run ``code`` and return the text the model sees (see :mod:`codemode.tools.feedback`).

        A failed program is text for the model; the executor being unreachable or refusing
        the request raises, for the application to handle.
        """
        if self.session is None:
            result = await self.codemode.run_async(
                code,
                available_tools=self.available_tools,
                execution_timeout=self.execution_timeout,
                context=context,
            )
        else:
            result = await self.session.run_on_its_loop(
                code,
                available_tools=self.available_tools,
                execution_timeout=self.execution_timeout,
                context=context,
            )
        return format_result(result, max_output_chars=self.max_output_chars)

    def check_sync_call(self) -> None:
        """Refuse a blocking call from the thread whose loop the session needs (a deadlock)."""
        if self.session is not None:
            self.session.check_not_blocking()
