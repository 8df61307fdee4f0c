"""The SDK's core: the facade, the executor client, the registry and the context."""

from codemode.core.codemode import Codemode
from codemode.core.context import RuntimeContext
from codemode.core.errors import (
    ExecutionError,
    ExecutorAuthenticationError,
    ExecutorClientError,
    ExecutorConnectionError,
    ExecutorOverloadedError,
    ExecutorRequestError,
    ExecutorTimeoutError,
    InvalidRequestError,
    SessionClosedError,
    SessionExpiredError,
    SessionLostError,
)
from codemode.core.executor_client import ExecutorClient
from codemode.core.registry import (
    ComponentAlreadyExistsError,
    ComponentNotFoundError,
    ComponentRegistry,
)
from codemode.core.results import ExecutionResult
from codemode.core.retry import RetryPolicy
from codemode.core.session import Session

__all__ = [
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
    "RetryPolicy",
    "RuntimeContext",
    "Session",
    "SessionClosedError",
    "SessionExpiredError",
    "SessionLostError",
]
