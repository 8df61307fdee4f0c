"""One execution as the caller asked for it: the public methods' arguments, in one object.

``Codemode`` and ``ExecutorClient`` keep their documented signatures; each builds one
:class:`Request` there and passes it down, so the internal steps take one argument.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from codemode.core.budget import Redaction, ToolBudget
from codemode.core.context import RuntimeContext, current_context


@dataclass(frozen=True, slots=True)
class Request:
    """The arguments of one execution, unchecked (``ExecutorClient`` checks and encodes them).

    As :meth:`codemode.core.executor_client.ExecutorClient.stream`: ``context`` None means
    the current task's context, ``execution_timeout`` None the client's ``timeout``,
    ``correlation_id`` None a fresh one.
    """

    code: str
    available_tools: Sequence[str] | None = None
    config: Mapping[str, Any] | None = None
    execution_timeout: float | None = None
    context: RuntimeContext | Mapping[str, Any] | None = None
    correlation_id: str | None = None
    limits: Mapping[str, float] | None = None
    files: Mapping[str, bytes] | None = None
    stream_output: bool = False
    budget: ToolBudget | None = None
    redact: Redaction | None = None
    #: The application's approval decisions by call position (a resumed execution).
    decisions: Mapping[int, bool] | None = None

    def in_caller_context(self) -> Request:
        """This request with the calling task's context filled in, before it runs elsewhere.

        A sync call may run on another thread's loop, which does not see this task's context.
        """
        if self.context is not None:
            return self
        return replace(self, context=current_context.get())
