"""Codemode: run LLM-written Python in a kernel sandbox against your application's tools.

The SDK's names are loaded on first use, so that the executor service, which imports
``codemode.executor``, does not load the SDK.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# First, before anything imports grpc: which I/O engine grpc runs on (see wire/grpc_io.py).
import codemode.wire.grpc_io  # noqa: F401
from codemode._version import __version__

if TYPE_CHECKING:
    from codemode.config import ClientConfig
    from codemode.core import (
        Codemode,
        ComponentAlreadyExistsError,
        ComponentNotFoundError,
        ComponentRegistry,
        ExecutionError,
        ExecutionResult,
        ExecutorAuthenticationError,
        ExecutorClient,
        ExecutorClientError,
        ExecutorConnectionError,
        ExecutorOverloadedError,
        ExecutorRequestError,
        ExecutorTimeoutError,
        InvalidRequestError,
        RuntimeContext,
        Session,
        SessionClosedError,
        SessionExpiredError,
        SessionLostError,
    )
    from codemode.core.approvals import ExecutionNotPausedError, PausedExecution
    from codemode.core.budget import ToolBudget
    from codemode.core.errors import ExecutionPausedError
    from codemode.core.journal import (
        JournalCorruptedError,
        JournalMismatchError,
        ReplayDivergedError,
    )
    from codemode.core.results import OutputEvent, ResultEvent, ToolCallEvent, ToolResultEvent
    from codemode.tools import tool

#: Each exported name and the module it lives in.
_EXPORTS = {
    "ClientConfig": "codemode.config",
    "Codemode": "codemode.core",
    "ComponentAlreadyExistsError": "codemode.core",
    "ComponentNotFoundError": "codemode.core",
    "ComponentRegistry": "codemode.core",
    "ExecutionError": "codemode.core",
    "ExecutionNotPausedError": "codemode.core.approvals",
    "ExecutionPausedError": "codemode.core.errors",
    "ExecutionResult": "codemode.core",
    "ExecutorAuthenticationError": "codemode.core",
    "ExecutorClient": "codemode.core",
    "ExecutorClientError": "codemode.core",
    "ExecutorConnectionError": "codemode.core",
    "ExecutorOverloadedError": "codemode.core",
    "ExecutorRequestError": "codemode.core",
    "ExecutorTimeoutError": "codemode.core",
    "InvalidRequestError": "codemode.core",
    "JournalCorruptedError": "codemode.core.journal",
    "JournalMismatchError": "codemode.core.journal",
    "OutputEvent": "codemode.core.results",
    "PausedExecution": "codemode.core.approvals",
    "ReplayDivergedError": "codemode.core.journal",
    "ResultEvent": "codemode.core.results",
    "RuntimeContext": "codemode.core",
    "Session": "codemode.core",
    "SessionClosedError": "codemode.core",
    "SessionExpiredError": "codemode.core",
    "SessionLostError": "codemode.core",
    "ToolBudget": "codemode.core.budget",
    "ToolCallEvent": "codemode.core.results",
    "ToolResultEvent": "codemode.core.results",
    "tool": "codemode.tools",
}

__all__ = [
    "ClientConfig",
    "Codemode",
    "ComponentAlreadyExistsError",
    "ComponentNotFoundError",
    "ComponentRegistry",
    "ExecutionError",
    "ExecutionNotPausedError",
    "ExecutionPausedError",
    "ExecutionResult",
    "ExecutorAuthenticationError",
    "ExecutorClient",
    "ExecutorClientError",
    "ExecutorConnectionError",
    "ExecutorOverloadedError",
    "ExecutorRequestError",
    "ExecutorTimeoutError",
    "InvalidRequestError",
    "JournalCorruptedError",
    "JournalMismatchError",
    "OutputEvent",
    "PausedExecution",
    "ReplayDivergedError",
    "ResultEvent",
    "RuntimeContext",
    "Session",
    "SessionClosedError",
    "SessionExpiredError",
    "SessionLostError",
    "ToolBudget",
    "ToolCallEvent",
    "ToolResultEvent",
    "__version__",
    "tool",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'codemode' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
