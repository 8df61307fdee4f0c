"""Per-execution limits on what a program may take from the application, and redaction.

:class:`ToolBudget` bounds the tool calls of one execution: how many (in all, and per tool),
how many bytes of results, how much time in tools. A call past a budget is not made: the
program gets a ``ToolBudgetExceeded`` error instead, and the result says which budget ran
out. :class:`Redactor` replaces the values the application marks secret with ``[redacted]``
in everything that leaves the client: streamed output, the result, its output and errors,
and the client's own log lines about tool failures.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from codemode.core.results import ExecutionResult, OutputEvent

__all__ = ["BUDGET_ERROR", "REDACTED", "BudgetMeter", "Redactor", "ToolBudget"]

#: The error type a program gets for a call past its budget.
BUDGET_ERROR = "ToolBudgetExceeded"
REDACTED = "[redacted]"


@dataclass(frozen=True)
class ToolBudget:
    """Limits on one execution's tool calls; None (or a missing tool) means no limit.

    ``max_calls``: calls in all; ``max_calls_per_tool``: calls of each named tool;
    ``max_result_bytes``: bytes of JSON results returned to the program in all;
    ``max_tool_seconds``: wall time spent in tools in all (calls in parallel count each).
    """

    max_calls: int | None = None
    max_calls_per_tool: Mapping[str, int] = field(default_factory=dict)
    max_result_bytes: int | None = None
    max_tool_seconds: float | None = None

    def __post_init__(self) -> None:
        for name, value in (
            ("max_calls", self.max_calls),
            ("max_result_bytes", self.max_result_bytes),
            ("max_tool_seconds", self.max_tool_seconds),
            *((f"max_calls_per_tool[{k!r}]", v) for k, v in self.max_calls_per_tool.items()),
        ):
            if value is not None and (isinstance(value, bool) or value < 0):
                raise ValueError(f"ToolBudget.{name} must be a number >= 0, not {value!r}")


class BudgetMeter:
    """One execution's spending against its :class:`ToolBudget`."""

    def __init__(self, budget: ToolBudget) -> None:
        self.budget = budget
        self.calls = 0
        self.per_tool: Counter[str] = Counter()
        self.result_bytes = 0
        self.tool_seconds = 0.0
        #: The first budget that ran out, for the result ("max_calls" …), or None.
        self.exceeded: str | None = None

    def admit(self, tool: str) -> str | None:
        """Count a call of ``tool``; the reason it may not be made, or None."""
        budget = self.budget
        self.calls += 1
        self.per_tool[tool] += 1
        if budget.max_calls is not None and self.calls > budget.max_calls:
            return self._over("max_calls", f"this execution may make {budget.max_calls} calls")
        limit = budget.max_calls_per_tool.get(tool)
        if limit is not None and self.per_tool[tool] > limit:
            return self._over(
                "max_calls_per_tool", f"this execution may call tools.{tool} {limit} times"
            )
        if budget.max_tool_seconds is not None and self.tool_seconds >= budget.max_tool_seconds:
            return self._over(
                "max_tool_seconds",
                f"this execution's {budget.max_tool_seconds:g}s of tool time are used up",
            )
        return None

    def replayed(self, tool: str, result_bytes: int) -> None:
        """Count a call answered from the journal as the first run counted it; its answer is
        the journal's either way, and it took no tool time."""
        self.admit(tool)
        self.spent(time.perf_counter(), result_bytes)

    def time_left(self) -> float | None:
        """Seconds of tool time left, or None without a time budget."""
        if self.budget.max_tool_seconds is None:
            return None
        return max(0.0, self.budget.max_tool_seconds - self.tool_seconds)

    def spent(self, started: float, result_bytes: int) -> str | None:
        """Account one finished call; the reason its result may not be returned, or None."""
        self.tool_seconds += time.perf_counter() - started
        self.result_bytes += result_bytes
        limit = self.budget.max_result_bytes
        if limit is not None and self.result_bytes > limit:
            return self._over(
                "max_result_bytes", f"this execution may receive {limit} bytes of tool results"
            )
        return None

    def timed_out(self) -> str:
        return self._over(
            "max_tool_seconds",
            f"this execution's {self.budget.max_tool_seconds:g}s of tool time ran out",
        )

    def _over(self, which: str, why: str) -> str:
        if self.exceeded is None:
            self.exceeded = which
        return f"{why} ({which}); the call was not made"


Redaction = Sequence[str] | Callable[[str], str]


class Redactor:
    """Replaces secrets in text: given strings (longest first), or by a callable of the text.

    Streamed output is redacted chunk by chunk; with strings, the tail of each chunk that
    could begin a secret is held back until the next chunk (or the result), so a secret split
    between two writes is still caught.
    """

    def __init__(self, redact: Redaction) -> None:
        if callable(redact):
            self._call: Callable[[str], str] | None = redact
            self._pattern: re.Pattern[str] | None = None
            self._hold = 0
        else:
            values = sorted({v for v in redact if isinstance(v, str) and v}, key=len, reverse=True)
            if len(values) != len([v for v in redact if v]):
                raise TypeError("redact= takes strings (the secret values) or a callable")
            self._call = None
            self._pattern = re.compile("|".join(map(re.escape, values))) if values else None
            self._hold = max((len(v) for v in values), default=1) - 1
        self._held: dict[str, str] = {"stdout": "", "stderr": ""}

    def text(self, text: str) -> str:
        """``text`` with the secrets replaced."""
        if self._call is not None:
            return self._call(text)
        if self._pattern is None:
            return text
        return self._pattern.sub(REDACTED, text)

    def chunk(self, event: OutputEvent) -> OutputEvent | None:
        """A streamed chunk, redacted; None while all of it is held back."""
        from codemode.core.results import OutputEvent

        if self._call is not None or self._pattern is None:
            return OutputEvent(event.stream, self.text(event.text))
        text = self.text(self._held[event.stream] + event.text)
        cut = max(0, len(text) - self._hold)
        self._held[event.stream] = text[cut:]
        return OutputEvent(event.stream, text[:cut]) if cut else None

    def flush(self) -> list[OutputEvent]:
        """What is still held back, redacted: the end of the output."""
        from codemode.core.results import OutputEvent

        held, self._held = self._held, {"stdout": "", "stderr": ""}
        return [OutputEvent(s, self.text(t)) for s, t in held.items() if t]  # type: ignore[arg-type]

    def result(self, result: ExecutionResult) -> ExecutionResult:
        """``result`` with every text field redacted (its JSON result stays valid JSON)."""

        def opt(value: str | None) -> str | None:
            return None if value is None else self.text(value)

        return replace(
            result,
            result=opt(result.result),
            error=opt(result.error),
            traceback=opt(result.traceback),
            stdout=self.text(result.stdout),
            stderr=self.text(result.stderr),
        )
