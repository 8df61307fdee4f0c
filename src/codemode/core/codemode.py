"""``Codemode``: the facade an application holds — tools, context, and execution."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from codemode.config import ClientConfig
from codemode.core._lifecycle import Closing
from codemode.core._request import Request
from codemode.core.budget import Redaction, ToolBudget
from codemode.core.context import ContextScope, RuntimeContext
from codemode.core.executor_client import ExecutorClient, run_sync
from codemode.core.registry import ComponentRegistry
from codemode.core.results import ExecutionEvent, ExecutionResult, unwrap
from codemode.core.session import Session


class Codemode(Closing):
    """Runs model-written programs on an executor against this application's tools.

    Build it with :meth:`from_client_config`, :meth:`from_config` or :meth:`from_env`; register
    tools on :attr:`registry`; set per-request values with :meth:`with_context`; run programs
    with :meth:`execute_async` (or :meth:`execute` from sync code). Close it with
    :meth:`close` or a ``with`` / ``async with`` block.
    """

    def __init__(self, config: ClientConfig, registry: ComponentRegistry | None = None) -> None:
        self.config = config
        self.registry = registry if registry is not None else ComponentRegistry()
        self.client = ExecutorClient(config=config, registry=self.registry)

    @classmethod
    def from_client_config(
        cls, config: ClientConfig, registry: ComponentRegistry | None = None
    ) -> Self:
        """A Codemode using ``config``."""
        return cls(config, registry)

    @classmethod
    def from_config(cls, path: str | Path, registry: ComponentRegistry | None = None) -> Self:
        """A Codemode configured from a YAML file whose keys are :class:`ClientConfig` fields."""
        return cls(ClientConfig.from_yaml(path), registry)

    @classmethod
    def from_env(cls, registry: ComponentRegistry | None = None) -> Self:
        """A Codemode configured from ``CODEMODE_*`` environment variables."""
        return cls(ClientConfig.load(), registry)

    # Context -------------------------------------------------------------------------------

    def with_context(self, **variables: Any) -> ContextScope:
        """Set the current task's context to ``variables`` (JSON-serialisable).

        Programs see it as ``context``; tools with ``run_with_context`` receive it. It belongs
        to the calling task: concurrent requests never see each other's. Use the returned
        scope in a ``with`` block to restore the previous context afterwards.
        """
        return self.registry.set_context(RuntimeContext(variables=variables))

    # What the model sees ------------------------------------------------------------------

    def describe_tools(
        self,
        names: Sequence[str] | None = None,
        *,
        preamble: bool = True,
        packages: Iterable[str] | None = None,
    ) -> str:
        """The registered tools (or ``names``) as Python stubs, after a preamble on calling them.

        ``packages``: names of what the sandbox can import, for one line telling the model;
        the executor lists them in ``info_async()["packages"]``, e.g.
        ``packages=[p["name"] for p in (await codemode.client.info_async())["packages"]]``.
        Deterministic: put it in the model's prompt. See :mod:`codemode.tools.stubs`.
        """
        from codemode.tools.stubs import describe_tools

        return describe_tools(self.registry.tools(), names, preamble=preamble, packages=packages)

    def as_crewai_tool(self, **options: Any) -> Any:
        """This Codemode as a ``crewai.tools.BaseTool`` (needs ``pip install 'codemode[crewai]'``).

        Options as :func:`codemode.integrations.crewai.CodemodeTool`.
        """
        from codemode.integrations.crewai import CodemodeTool

        return CodemodeTool(codemode=self, **options)

    def as_langchain_tool(self, **options: Any) -> Any:
        """This Codemode as a ``langchain_core`` tool (``pip install 'codemode[langchain]'``).

        Options as :func:`codemode.integrations.langchain.codemode_tool`.
        """
        from codemode.integrations.langchain import codemode_tool

        return codemode_tool(self, **options)

    def as_pydantic_ai_toolset(self, **options: Any) -> Any:
        """This Codemode as a Pydantic AI toolset offering ``run_python``
        (``pip install 'codemode[pydantic-ai]'``).

        Options as :class:`codemode.integrations.pydantic_ai.CodemodeToolset`.
        """
        from codemode.integrations.pydantic_ai import CodemodeToolset

        return CodemodeToolset(self, **options)

    def as_smolagents_executor(self, **options: Any) -> Any:
        """This Codemode as a smolagents ``CodeAgent`` executor: the agent's steps run in one
        session, its tools here (``pip install 'codemode[smolagents]'``).

        Options as :class:`codemode.integrations.smolagents.CodemodeExecutor`.
        """
        from codemode.integrations.smolagents import CodemodeExecutor

        return CodemodeExecutor(self, **options)

    # Executing -------------------------------------------------------------------------------

    async def run_async(
        self,
        code: str,
        *,
        available_tools: Sequence[str] | None = None,
        config: Mapping[str, Any] | None = None,
        execution_timeout: float | None = None,
        context: RuntimeContext | Mapping[str, Any] | None = None,
        files: Mapping[str, bytes] | None = None,
        budget: ToolBudget | None = None,
        redact: Redaction | None = None,
    ) -> ExecutionResult:
        """Run ``code`` and return the full :class:`ExecutionResult`, failed or not.

        ``files`` (name to bytes) are placed read-only under ``/input`` before the program
        starts; what it leaves in ``/output`` comes back as ``ExecutionResult.files``.
        ``budget`` (a :class:`~codemode.core.budget.ToolBudget`) bounds its tool calls;
        ``redact`` (secret strings, or a callable of the text) is applied to its output and
        result before they leave the client.
        """
        request = Request(
            code,
            available_tools,
            config,
            execution_timeout,
            context,
            files=files,
            budget=budget,
            redact=redact,
        )
        return await self.client._execute(request)

    async def execute_async(
        self,
        code: str,
        *,
        available_tools: Sequence[str] | None = None,
        config: Mapping[str, Any] | None = None,
        execution_timeout: float | None = None,
        context: RuntimeContext | Mapping[str, Any] | None = None,
        files: Mapping[str, bytes] | None = None,
        budget: ToolBudget | None = None,
        redact: Redaction | None = None,
    ) -> str | None:
        """Run ``code`` and return its ``result`` JSON-encoded (``"4"``), or None if unset.

        ``files``, ``budget`` and ``redact`` as :meth:`run_async`. Raises
        :class:`ExecutionError` when the program fails (``.result`` has the details),
        :class:`ExecutorTimeoutError` when it runs out of time, and the connection and
        request errors of :mod:`codemode.core.errors`.
        """
        request = Request(
            code,
            available_tools,
            config,
            execution_timeout,
            context,
            files=files,
            budget=budget,
            redact=redact,
        )
        return unwrap(await self.client._execute(request))

    def execute(
        self,
        code: str,
        *,
        available_tools: Sequence[str] | None = None,
        config: Mapping[str, Any] | None = None,
        execution_timeout: float | None = None,
        context: RuntimeContext | Mapping[str, Any] | None = None,
        files: Mapping[str, bytes] | None = None,
        budget: ToolBudget | None = None,
        redact: Redaction | None = None,
    ) -> str | None:
        """Blocking :meth:`execute_async`, for scripts and sync code (not inside a running loop)."""
        request = Request(
            code,
            available_tools,
            config,
            execution_timeout,
            context,
            files=files,
            budget=budget,
            redact=redact,
        )
        return unwrap(run_sync(self.client._execute(request.in_caller_context())))

    def stream(
        self,
        code: str,
        *,
        available_tools: Sequence[str] | None = None,
        config: Mapping[str, Any] | None = None,
        execution_timeout: float | None = None,
        context: RuntimeContext | Mapping[str, Any] | None = None,
        files: Mapping[str, bytes] | None = None,
        budget: ToolBudget | None = None,
        redact: Redaction | None = None,
    ) -> AsyncIterator[ExecutionEvent]:
        """Run ``code``, yielding output, tool-call and result events as they happen."""
        return self.client._events(
            Request(
                code,
                available_tools,
                config,
                execution_timeout,
                context,
                files=files,
                stream_output=True,
                budget=budget,
                redact=redact,
            )
        )

    async def resume(
        self, execution_id: str, *, approve: bool, redact: Redaction | None = None
    ) -> ExecutionResult:
        """Run a paused execution again once its pending call is decided: approved, the call
        is made; refused, it raises ``PermissionError`` in the program. Its earlier calls are
        answered from the journal. See :meth:`ExecutorClient.resume`."""
        return await self.client.resume(execution_id, approve=approve, redact=redact)

    def session(
        self, *, ttl: float | None = None, limits: Mapping[str, float] | None = None
    ) -> Session:
        """A sandbox kept between executions, with this registry's tools: variables, imports
        and files survive from one execution to the next.

        ``async with codemode.session(ttl=600) as s: await s.execute_async(code)``; see
        :mod:`codemode.core.session`.
        """
        return self.client.session(ttl=ttl, limits=limits)

    async def health_check_async(self) -> bool:
        """Whether the executor answers its health check as serving."""
        return await self.client.health_check_async()

    def health_check(self) -> bool:
        """Blocking :meth:`health_check_async`."""
        return run_sync(self.client.health_check_async())

    # Lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the connection. Idempotent; callable from sync code and inside a loop."""
        self.client.close()

    async def close_async(self) -> None:
        """Release the connection, waiting for it to close. Idempotent."""
        await self.client.close_async()
