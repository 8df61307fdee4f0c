"""Approvals: a tool call the application must allow before it is made.

A tool declared ``@tool(requires_approval=True)`` (or any tool, when the registry has an
``approval_policy``) is checked when the program calls it. The policy may decide at once
(``True``: make the call; ``False``: the program gets ``PermissionError``) or answer
``"pause"``, as a tool needing approval without a policy does: the execution then *pauses*.
Its sandbox is released, its journal kept, and the caller gets a result whose ``paused`` is a
:class:`PausedExecution`. ``codemode.resume(execution_id, approve=...)`` runs the program
again with replay: the calls before the pause are answered from the journal, and the paused
one is made (approved) or refused with ``PermissionError`` inside the program.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from codemode.core.context import RuntimeContext
from codemode.core.errors import ExecutorClientError
from codemode.core.journal import JournalEntry

__all__ = [
    "PAUSED",
    "ApprovalGate",
    "ApprovalPolicy",
    "ExecutionNotPausedError",
    "PausedExecution",
    "PendingCall",
]

#: The ``error_type`` of a paused execution's result.
PAUSED = "Paused"

Decision = bool | Literal["pause"]
ApprovalPolicy = Callable[["PendingCall", RuntimeContext], Decision | Awaitable[Decision]]


@dataclass(frozen=True, slots=True)
class PendingCall:
    """A tool call waiting for the application's decision: its position, tool and arguments."""

    seq: int
    tool: str
    args: list[Any]
    kwargs: dict[str, Any]

    def describe(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        text = ", ".join(parts)
        return f"tools.{self.tool}({text if len(text) <= 200 else text[:197] + '...'})"


@dataclass(frozen=True, slots=True)
class PausedExecution:
    """An execution stopped at a call that needs approval; resume it by ``execution_id``."""

    execution_id: str
    call: PendingCall
    #: The calls answered before the pause, which a resume replays.
    journal: tuple[JournalEntry, ...] = ()


class ExecutionNotPausedError(ExecutorClientError):
    """No paused execution has this id: unknown, already resumed (or being resumed), expired."""


class PauseSignal(Exception):
    """Raised through the exchange when a call pauses the execution; never reaches callers."""

    def __init__(self, call: PendingCall) -> None:
        super().__init__(call.describe())
        self.call = call


class ApprovalGate:
    """Decides the calls of one execution that need approval.

    ``decisions`` are the application's answers from earlier resumes, by call position.
    ``max_pauses``: an execution that asked this many times is refused further ones (a
    program that loops on a paused tool would otherwise pause for ever).
    """

    def __init__(
        self,
        policy: ApprovalPolicy | None,
        needs_approval: frozenset[str],
        decisions: Mapping[int, bool],
        max_pauses: int,
    ) -> None:
        self.policy = policy
        self.needs_approval = needs_approval
        self.decisions = dict(decisions)
        self.max_pauses = max_pauses

    def applies(self, tool: str) -> bool:
        return self.policy is not None or tool in self.needs_approval

    async def decide(self, call: PendingCall, context: RuntimeContext) -> Decision | str:
        """True, False, ``"pause"``, or the reason of a refusal (text)."""
        if call.seq in self.decisions:
            return self.decisions[call.seq]
        decision: Any = "pause"
        if self.policy is not None:
            decision = self.policy(call, context)
            if inspect.isawaitable(decision):
                decision = await decision
            if decision is not True and decision is not False and decision != "pause":
                return f"the approval policy answered {decision!r}, not True, False or 'pause'"
        if decision == "pause" and len(self.decisions) >= self.max_pauses:
            return (
                f"this execution already waited for {self.max_pauses} approvals; "
                "no more pauses (ClientConfig.max_pauses)"
            )
        result: Decision = decision
        return result


def tool_needs_approval(tool: Any) -> bool:
    """Whether ``tool`` was declared ``requires_approval=True``."""
    return bool(getattr(tool, "requires_approval", False))
