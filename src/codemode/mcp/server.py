"""Codemode as an MCP server: ``run_python`` over the application's tools, for any MCP client.

``codemode mcp`` serves three tools (four with sessions): ``run_python`` runs a program in the
sandbox, its description carrying the stubs of the registered tools; ``search_tools`` and
``describe_tool`` let a model find its way in a large registry; ``reset_python`` gives the
caller's MCP session a fresh sandbox. With sessions (the default) each MCP session keeps its
own Codemode session, so variables and imports survive between ``run_python`` calls.

While a program runs, what it prints reaches the client as log notifications (and as progress
when the client asked for it); the answer is :func:`~codemode.tools.feedback.format_result`'s
text, with ``isError`` set when the program failed. A client's cancellation cancels the
execution, which kills its sandbox. Over streamable HTTP every request needs the bearer token
unless the operator chose ``--insecure-no-auth``.
"""

from __future__ import annotations

import importlib
import secrets
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from codemode.core.errors import ExecutorClientError
from codemode.core.registry import ComponentRegistry
from codemode.core.results import ExecutionEvent, OutputEvent, ResultEvent, ToolCallEvent
from codemode.tools.feedback import DEFAULT_MAX_OUTPUT_CHARS, format_result
from codemode.tools.stubs import describe_tools, search_tools

try:
    import anyio
    from mcp.server.fastmcp import Context, FastMCP
    from mcp.types import CallToolResult, TextContent
except ImportError as exc:  # the extra is not installed
    raise ImportError("codemode mcp needs the MCP SDK: pip install 'codemode[mcp]'") from exc

if TYPE_CHECKING:
    from codemode.core.codemode import Codemode
    from codemode.core.session import Session

__all__ = [
    "RUN_PYTHON_INTRO",
    "PythonSession",
    "ToolsOptionError",
    "build_server",
    "load_tools_option",
    "serve_http",
    "serve_stdio",
]


#: Above this many tools the description of ``run_python`` lists names only, and the model
#: reads stubs through ``describe_tool``.
MAX_STUBS_IN_DESCRIPTION = 40

RUN_PYTHON_INTRO = """\
Run a Python program in a sandbox. The program calls the application's tools through \
`tools` (stubs below; `await tools.x.run_async(...)` with `asyncio.gather` runs calls in \
parallel) and returns its answer by setting `result`; you get back the result (or the error \
and traceback) and what it printed. Prefer one program that makes all the calls a step needs \
over one call per step.
"""

SESSION_NOTE = """\
Variables, imports and files in /output survive from one call to the next in this \
conversation; call reset_python for a fresh sandbox.
"""


class PythonSession:
    """The Codemode session of one MCP session: opened on first use, closed when that ends.

    A sandbox that was lost (a cancelled execution, a memory limit) is replaced by a fresh one
    on the next call, and that call's answer says so: the model must not believe its variables
    still exist.
    """

    def __init__(self, codemode: Codemode, ttl: float | None = None) -> None:
        self._codemode = codemode
        self._ttl = ttl
        self._session: Session | None = None

    async def get(self) -> tuple[Session, str | None]:
        """The open session, and a note when the earlier one had to be replaced."""
        session, note = self._session, None
        if session is not None and session.alive:
            return session, None
        if session is not None:
            note = "note: the earlier Python state was lost; this program ran in a fresh sandbox"
            await session.close_async()
        self._session = session = self._codemode.session(ttl=self._ttl)
        await session.open_async()
        return session, note

    async def close(self) -> None:
        """End the sandbox; the next :meth:`get` opens a fresh one."""
        session, self._session = self._session, None
        if session is not None:
            with anyio.CancelScope(shield=True):  # also while the server is being cancelled
                await session.close_async()


class ToolsOptionError(ValueError):
    """``--tools`` names nothing usable: a missing module or object, or one of no known kind."""


def load_tools_option(spec: str) -> tuple[ComponentRegistry, Path | Mapping[str, Any] | None]:
    """What ``--tools`` names: a registry, and an MCP config (``mcpServers``) to connect, if any.

    ``spec`` is a JSON file of MCP servers, or ``MODULE:OBJECT`` naming a
    :class:`ComponentRegistry`, a list of ``@tool`` functions, a mapping of name to tool, or a
    mapping holding ``mcpServers``. The module is imported with the working directory on
    ``sys.path``, as ``python -m`` would.
    """
    if spec.endswith(".json") or (":" not in spec and Path(spec).is_file()):
        path = Path(spec)
        if not path.is_file():
            raise ToolsOptionError(f"--tools {spec}: no such file")
        return ComponentRegistry(), path
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ToolsOptionError(
            f"--tools {spec!r}: give MODULE:OBJECT (e.g. myapp.tools:registry) or a .json file "
            "of MCP servers"
        )
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ToolsOptionError(f"--tools {spec}: cannot import {module_name}: {exc}") from exc
    try:
        target = getattr(module, attr)
    except AttributeError:
        raise ToolsOptionError(f"--tools {spec}: {module_name} has no {attr!r}") from None
    if isinstance(target, ComponentRegistry):
        return target, None
    registry = ComponentRegistry()
    if isinstance(target, Mapping):
        if "mcpServers" in target:
            return registry, target
        for name, tool in target.items():
            registry.register_tool(str(name), tool)
        return registry, None
    if isinstance(target, list | tuple):
        for tool in target:
            name = getattr(tool, "name", None) or getattr(tool, "__name__", None)
            if not isinstance(name, str):
                raise ToolsOptionError(f"--tools {spec}: {tool!r} has no name; use a mapping")
            registry.register_tool(name, tool)
        return registry, None
    raise ToolsOptionError(
        f"--tools {spec}: {type(target).__name__} is not a ComponentRegistry, a list of tools, "
        "a mapping of name to tool or an mcpServers mapping"
    )


def run_python_description(codemode: Codemode, *, sessions: bool) -> str:
    """``run_python``'s description: what it does, then the tools' stubs (or their names)."""
    names = codemode.registry.get_component_names()
    text = RUN_PYTHON_INTRO + (SESSION_NOTE if sessions else "")
    if len(names) <= MAX_STUBS_IN_DESCRIPTION:
        return text + "\n" + codemode.describe_tools()
    return (
        text
        + f"\n{len(names)} tools are available as tools.NAME: {', '.join(sorted(names))}.\n"
        + "Use search_tools to find the ones a task needs and describe_tool for their stubs.\n"
    )


def build_server(
    codemode: Codemode,
    *,
    sessions: bool = True,
    session_ttl: float | None = None,
    max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
    host: str = "127.0.0.1",
) -> FastMCP:
    """A FastMCP server offering ``run_python`` over ``codemode``'s registry.

    ``host`` is where an HTTP transport will listen (FastMCP guards loopback hosts against DNS
    rebinding). With ``sessions``, each MCP session gets a :class:`PythonSession`, closed when
    the MCP session ends (the server runs once per MCP session; its lifespan is that run).
    """

    @asynccontextmanager
    async def per_mcp_session(_: FastMCP) -> AsyncIterator[PythonSession | None]:
        python = PythonSession(codemode, session_ttl) if sessions else None
        try:
            yield python
        finally:
            if python is not None:
                await python.close()

    server: FastMCP = FastMCP(
        "codemode",
        instructions="Run Python programs that call the application's tools: run_python.",
        host=host,
        log_level="WARNING",
        lifespan=per_mcp_session,
    )

    async def run_python(
        code: Annotated[str, Field(description="Python source; call tools.NAME(...), set result")],
        ctx: Context,  # type: ignore[type-arg]
        timeout: Annotated[
            float | None, Field(gt=0, description="seconds the program may run")
        ] = None,
    ) -> CallToolResult:
        note = None
        python: PythonSession | None = ctx.request_context.lifespan_context
        try:
            if python is None:
                events = codemode.stream(code, execution_timeout=timeout)
            else:
                session, note = await python.get()
                events = session.stream(code, execution_timeout=timeout)
        except ExecutorClientError as exc:  # the executor refused or cannot be reached
            return _text(f"error: {type(exc).__name__}: {exc}", error=True)
        text, failed = await _relay_events(events, ctx, max_output_chars)
        if note:
            text = f"{note}\n{text}"
        return CallToolResult(content=[TextContent(type="text", text=text)], isError=failed)

    server.add_tool(
        run_python,
        name="run_python",
        description=run_python_description(codemode, sessions=sessions),
    )

    def search_tools_tool(
        query: Annotated[str, Field(description="words describing what the program needs")],
        limit: Annotated[int, Field(ge=1, le=50)] = 10,
    ) -> list[dict[str, str]]:
        return search_tools(codemode.registry.tools(), query, limit)

    server.add_tool(
        search_tools_tool,
        name="search_tools",
        description="Find the application's tools whose names and docs match the query; "
        "returns names and one-line summaries, best first.",
    )

    def describe_tool(
        name: Annotated[str, Field(description="a tool's name, as search_tools returns it")],
    ) -> CallToolResult:
        if not codemode.registry.has_tool(name):
            known = ", ".join(sorted(codemode.registry.get_component_names())[:20])
            return _text(f"no tool named {name!r}; tools include: {known}", error=True)
        return _text(describe_tools(codemode.registry.tools(), [name], preamble=False))

    server.add_tool(
        describe_tool,
        name="describe_tool",
        description="The Python stub of one tool: its signature, types and docs.",
    )

    if sessions:

        async def reset_python(ctx: Context) -> str:  # type: ignore[type-arg]
            python: PythonSession = ctx.request_context.lifespan_context
            await python.close()
            return "the next run_python starts in a fresh sandbox"

        server.add_tool(
            reset_python,
            name="reset_python",
            description="Forget this conversation's Python state: variables, imports, files.",
        )
    return server


def _text(text: str, *, error: bool = False) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=text)], isError=error)


async def _relay_events(
    events: AsyncIterator[ExecutionEvent],
    ctx: Context,  # type: ignore[type-arg]
    max_output_chars: int,
) -> tuple[str, bool]:
    """Forward output and tool calls as notifications; return the answer's text and failure."""
    steps = 0
    try:
        async for event in events:
            if isinstance(event, OutputEvent):
                steps += 1
                await ctx.log("info", event.text, logger_name=event.stream)
                await ctx.report_progress(steps, message=event.text[:200])
            elif isinstance(event, ToolCallEvent):
                steps += 1
                await ctx.report_progress(steps, message=f"calling tools.{event.tool}")
            elif isinstance(event, ResultEvent):
                result = event.result
                return format_result(result, max_output_chars=max_output_chars), not result.success
    except ExecutorClientError as exc:  # refused, unreachable, or the session was lost
        return f"error: {type(exc).__name__}: {exc}", True
    return "error: the executor ended the execution without a result", True


async def serve_stdio(server: FastMCP) -> None:
    """Serve over this process's stdin and stdout until the client closes them."""
    await server.run_stdio_async()


class BearerAuth:
    """ASGI middleware: every request needs ``Authorization: Bearer <token>``, else 401."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                await _unauthorized(send)
                return
        await self.app(scope, receive, send)


async def _unauthorized(send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    body = (
        b'{"error":"missing or wrong bearer token: send Authorization: Bearer $CODEMODE_MCP_TOKEN"}'
    )
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"www-authenticate", b"Bearer"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def serve_http(
    server: FastMCP,
    *,
    host: str,
    port: int,
    token: str | None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve streamable HTTP at ``http://host:port/mcp`` until cancelled.

    ``token`` None serves without authentication (the operator's explicit choice). ``on_ready``
    receives the URL once the socket listens (``port`` 0 picks a free one).
    """
    import uvicorn

    app: Any = server.streamable_http_app()
    if token is not None:
        app = BearerAuth(app, token)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    bound = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    uv = uvicorn.Server(config)
    where = f"[{host}]" if family == socket.AF_INET6 else host
    if on_ready is not None:
        on_ready(f"http://{where}:{bound}/mcp")
    try:
        await uv.serve(sockets=[sock])
    finally:
        sock.close()
