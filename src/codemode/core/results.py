"""What an execution produces: the final :class:`ExecutionResult` and the streamed events."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

from codemode.core.errors import ExecutionError, ExecutionPausedError, ExecutorTimeoutError

if TYPE_CHECKING:
    from codemode.core.approvals import PausedExecution
from codemode.wire.names import ErrorType


@dataclass(frozen=True)
class ExecutionResult:
    """The outcome of one execution.

    ``result`` is the program's ``result`` JSON-encoded (``"4"`` for ``result = 2 + 2``), or
    None when it set none; ``value`` is the same decoded. On failure ``error_type`` names the
    error (the exception's class, or one of :class:`codemode.wire.names.ErrorType`: ``Timeout``,
    ``MemoryLimit``, ``OutputLimit`` …), ``error`` is its message and ``traceback`` has the
    user's own lines.
    """

    success: bool
    result: str | None = None
    error: str | None = None
    error_type: str | None = None
    traceback: str | None = None
    stdout: str = ""
    stderr: str = ""
    duration_ms: float = 0.0
    correlation_id: str = ""
    tool_calls: int = 0
    output_truncated: bool = False
    #: The files the program left in ``/output``, by name.
    files: dict[str, bytes] = field(default_factory=dict)
    #: In a session: whether its sandbox survived this execution (False after a limit hit).
    session_alive: bool = False
    #: Executors it ran on: more than 1 after a failover (see ``ClientConfig.failover``).
    attempts: int = 1
    #: Tool calls answered from the journal on a re-run, without calling the tool again.
    replayed_tool_calls: int = 0
    #: The tool budget that ran out ("max_calls", "max_result_bytes" …), or None.
    budget_exceeded: str | None = None
    #: Set when a call awaits approval (``error_type`` "Paused"); resume it by its id.
    paused: PausedExecution | None = None

    @cached_property
    def value(self) -> Any:
        """``result`` decoded from JSON (None when the program set no result)."""
        return None if self.result is None else json.loads(self.result)


@dataclass(frozen=True, slots=True)
class OutputEvent:
    """A chunk the program wrote to stdout or stderr, as it was written."""

    stream: Literal["stdout", "stderr"]
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallEvent:
    """The program called a tool; emitted before the tool runs."""

    call_id: str
    tool: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ToolResultEvent:
    """A tool call finished; ``error_type`` is set when the tool failed."""

    call_id: str
    tool: str
    ok: bool
    duration_ms: float
    error_type: str | None = None


@dataclass(frozen=True, slots=True)
class ResultEvent:
    """The last event of every execution."""

    result: ExecutionResult


ExecutionEvent = OutputEvent | ToolCallEvent | ToolResultEvent | ResultEvent


def unwrap(result: ExecutionResult) -> str | None:
    """The JSON result of a successful execution; raise the matching error otherwise."""
    if result.success:
        return result.result
    if result.paused is not None:
        raise ExecutionPausedError(result)
    if result.error_type == ErrorType.TIMEOUT:
        raise ExecutorTimeoutError(
            str(result.error), result=result, correlation_id=result.correlation_id
        )
    raise ExecutionError(result)
