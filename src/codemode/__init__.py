"""Codemode: run LLM-written Python in a kernel sandbox against your application's tools."""

# First, before anything imports grpc: which I/O engine grpc runs on (see _grpc_io).
import codemode._grpc_io  # noqa: F401
from codemode._version import __version__
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
)
from codemode.core.results import OutputEvent, ResultEvent, ToolCallEvent, ToolResultEvent
from codemode.tools import tool

__all__ = [
    "ClientConfig",
    "Codemode",
    "ComponentAlreadyExistsError",
    "ComponentNotFoundError",
    "ComponentRegistry",
    "ExecutionError",
    "ExecutionResult",
    "ExecutorAuthenticationError",
    "ExecutorClient",
    "ExecutorClientError",
    "ExecutorConnectionError",
    "ExecutorOverloadedError",
    "ExecutorRequestError",
    "ExecutorTimeoutError",
    "InvalidRequestError",
    "OutputEvent",
    "ResultEvent",
    "RuntimeContext",
    "ToolCallEvent",
    "ToolResultEvent",
    "__version__",
    "tool",
]
