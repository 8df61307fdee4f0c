"""Per-request context: a :class:`RuntimeContext` held in a ``ContextVar``.

Each asyncio task (and each thread) sees the context that was set in it or inherited when it
was created, so concurrent requests never see each other's values.
"""

from __future__ import annotations

import contextvars
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from codemode.core._lifecycle import Closing


@dataclass(frozen=True)
class RuntimeContext:
    """Values the application attaches to one request (user id, tenant, auth …).

    ``variables`` must be JSON-serialisable: they are sent to the program as its read-only
    ``context``, and tools with ``run_with_context`` receive this object itself.
    ``correlation_id`` is filled in for the tool calls of an execution.
    """

    variables: Mapping[str, Any] = field(default_factory=dict)
    correlation_id: str | None = None

    def __post_init__(self) -> None:
        try:
            json.dumps(dict(self.variables))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"context variables must be JSON-serialisable: {exc}") from None
        object.__setattr__(self, "variables", MappingProxyType(dict(self.variables)))

    def get(self, key: str, default: Any = None) -> Any:
        """The variable ``key``, or ``default``."""
        return self.variables.get(key, default)

    def __getitem__(self, key: str) -> Any:
        return self.variables[key]

    def __contains__(self, key: object) -> bool:
        return key in self.variables

    def __iter__(self) -> Iterator[str]:
        return iter(self.variables)

    def with_correlation_id(self, correlation_id: str) -> RuntimeContext:
        """A copy carrying ``correlation_id``."""
        return replace(self, correlation_id=correlation_id)

    def to_json(self) -> bytes:
        """The variables as JSON bytes, as sent on the wire."""
        return json.dumps(dict(self.variables), separators=(",", ":")).encode()


current_context: contextvars.ContextVar[RuntimeContext | None] = contextvars.ContextVar(
    "codemode_context", default=None
)


#: The correlation id of the execution whose tool call is running, for tools without context.
current_correlation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "codemode_correlation_id", default=None
)


class ContextScope(Closing):
    """Returned by ``with_context``: the context is already set; ``with`` restores the old one."""

    def __init__(self, token: contextvars.Token[RuntimeContext | None]) -> None:
        self._token: contextvars.Token[RuntimeContext | None] | None = token

    def reset(self) -> None:
        """Restore the context that was current before. Idempotent."""
        if self._token is not None:
            current_context.reset(self._token)
            self._token = None

    close = reset
