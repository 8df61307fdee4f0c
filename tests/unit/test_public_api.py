"""The public surface: exported names, and everything the seed document imports and calls."""

from __future__ import annotations

import inspect

import codemode
import codemode.config
import codemode.core
import codemode.core.executor_client


def test_codemode_exports() -> None:
    """`codemode.__all__` is exactly the curated list, and each name resolves."""
    assert sorted(codemode.__all__) == [
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
    for name in codemode.__all__:
        assert getattr(codemode, name) is not None


def test_core_exports() -> None:
    """`codemode.core.__all__` is exactly the curated list, and each name resolves."""
    assert sorted(codemode.core.__all__) == [
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
    for name in codemode.core.__all__:
        assert getattr(codemode.core, name) is not None


def test_config_exports() -> None:
    """`codemode.config` exports the two settings classes, the limits and the error."""
    assert sorted(codemode.config.__all__) == [
        "ClientConfig",
        "ConfigError",
        "ExecutorConfig",
        "LimitsConfig",
    ]


def test_seed_imports_are_the_same_objects() -> None:
    """The import paths the seed uses give the same classes as the top-level package."""
    from codemode import Codemode
    from codemode.config import ClientConfig
    from codemode.core import ExecutorClient
    from codemode.core.executor_client import (
        ExecutorClientError,
        ExecutorConnectionError,
        ExecutorTimeoutError,
    )

    assert Codemode is codemode.Codemode
    assert ClientConfig is codemode.ClientConfig
    assert ExecutorClient is codemode.ExecutorClient
    assert ExecutorClientError is codemode.ExecutorClientError
    assert ExecutorConnectionError is codemode.ExecutorConnectionError
    assert ExecutorTimeoutError is codemode.ExecutorTimeoutError


def params(func: object) -> list[str]:
    return list(inspect.signature(func).parameters)  # type: ignore[arg-type]


def test_seed_call_signatures() -> None:
    """The constructors and methods the seed calls accept the arguments it passes."""
    client = codemode.ExecutorClient
    assert params(client.__init__)[:4] == ["self", "executor_url", "api_key", "timeout"]
    assert params(client.execute_async)[:6] == [
        "self",
        "code",
        "available_tools",
        "config",
        "execution_timeout",
        "context",
    ]
    assert list(codemode.ClientConfig.model_fields)[:2] == ["executor_url", "executor_api_key"]
    facade = codemode.Codemode
    for name in (
        "from_client_config",
        "from_config",
        "execute_async",
        "execute",
        "with_context",
        "close",
        "close_async",
        "as_crewai_tool",
        "__aenter__",
        "__aexit__",
        "__enter__",
        "__exit__",
    ):
        assert callable(getattr(facade, name)), name
    assert inspect.iscoroutinefunction(facade.execute_async)
    assert not inspect.iscoroutinefunction(facade.execute)
    assert not inspect.iscoroutinefunction(facade.with_context)
    assert inspect.iscoroutinefunction(client.close_async)


def test_version_is_a_string() -> None:
    """The package has a version string."""
    assert isinstance(codemode.__version__, str)
    assert codemode.__version__
