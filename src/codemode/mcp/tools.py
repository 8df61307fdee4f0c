"""MCP servers' tools as Codemode tools: :func:`from_mcp` for one server, :func:`from_mcp_config`
for every server of an ``mcpServers`` file.

::

    async with from_mcp(codemode.registry, command=sys.executable, args=["-m", "mcp_server_time"]):
        result = await codemode.run_async("result = tools.get_current_time(timezone='UTC')")

The application keeps one MCP client session per server (:mod:`codemode.mcp._session`), so
the server's credentials (its ``env``, its ``headers``) stay in the application; a program's
call is relayed to the application as for any tool, and from there to the server.

What a call returns: the tool's ``structuredContent`` when it sends one (FastMCP's
``{"result": x}`` wrapper unwrapped to ``x``); else its text, one ``str`` (several text blocks
joined by newlines; ``None`` for no content at all); content with images, audio or resources is
a list, ``str`` for each text block and the MCP JSON of the others (``{"type": "image",
"mimeType": ..., "data": <base64>}`` …).

Errors (a program sees the class name and the message)::

    MCPError                       an MCP tool call failed
    ├── MCPToolError               the server answered with an error: the tool's own
    │                              (``isError``) or the protocol's (unknown tool …)
    └── MCPConnectionError         no answer: the server could not be started or reached,
                                   or it went away; its tools fail until it is reconnected
    MCPConfigError (ValueError)    a server's settings are unusable: names server and field
    TypeError                      arguments that do not fit the tool's inputSchema
    ComponentAlreadyExistsError    a tool's name is already taken in the registry
    RuntimeError                   a call from another event loop than the session's

Needs ``pip install 'codemode[mcp]'``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

try:
    from mcp import types
except ImportError as exc:  # the extra is not installed
    raise ImportError("codemode.mcp.tools needs the MCP SDK: pip install 'codemode[mcp]'") from exc

from codemode.mcp._config import MCPConfigError, MCPServerConfig, load_mcp_config, parse_server
from codemode.mcp._errors import MCPConnectionError, MCPError, MCPToolError
from codemode.mcp._schema import ModelNames, SchemaSpec, python_name, spec_from_schemas
from codemode.mcp._session import CONNECT_TIMEOUT_S, Connection

if TYPE_CHECKING:
    # Typing only: the registry imports codemode.tools, which exports from_mcp from here.
    from codemode.core.registry import ComponentRegistry

__all__ = [
    "MCPConfigError",
    "MCPConnectionError",
    "MCPError",
    "MCPServerConfig",
    "MCPServers",
    "MCPTool",
    "MCPToolError",
    "MCPTools",
    "from_mcp",
    "from_mcp_config",
    "load_mcp_config",
    "result_value",
]


class MCPTool:
    """One tool of an MCP server as a Codemode tool: ``run_async`` calls it on the server.

    ``name`` is its name in the registry, ``mcp_name`` the server's; ``spec`` (read from its
    schemas) checks the program's arguments and draws its stub.
    """

    def __init__(self, connection: Connection, name: str, mcp_name: str, spec: SchemaSpec):
        self._connection = connection
        self.name = name
        self.mcp_name = mcp_name
        self.spec = spec

    @property
    def description(self) -> str:
        """The one-line summary the model sees."""
        return self.spec.doc.summary

    def input_schema(self) -> dict[str, Any]:
        """The server's JSON Schema of the arguments."""
        return self.spec.input_schema()

    def output_schema(self) -> dict[str, Any] | None:
        """The server's JSON Schema of the result, or None."""
        return self.spec.output_schema()

    async def run_async(self, **arguments: Any) -> Any:
        """Call the tool with arguments by Python name (the registry has checked them).

        Returns the result as described in :mod:`codemode.mcp.tools`; raises
        :class:`MCPToolError` with the tool's text when it reports an error, and
        :class:`MCPConnectionError` when the server is gone.
        """
        connection = self._connection
        result = await connection.call(self.mcp_name, self.spec.wire_arguments(arguments))
        if result.isError:
            raise MCPToolError(
                _text(result.content) or f"{self.mcp_name} failed and said nothing more",
                server=connection.name,
                tool=self.mcp_name,
            )
        return result_value(result, unwrap=self.spec.unwrap_result)

    def __repr__(self) -> str:
        return f"<MCP tool {self.name} ({self._connection.title}: {self.mcp_name})>"


def result_value(result: types.CallToolResult, *, unwrap: bool = False) -> Any:
    """A successful call's value for the program (see :mod:`codemode.mcp.tools`).

    ``unwrap``: the output schema is FastMCP's ``{"result": x}`` wrapper; return ``x``.
    """
    if result.structuredContent is not None:
        value = result.structuredContent
        if unwrap and isinstance(value, dict) and set(value) == {"result"}:
            return value["result"]
        return value
    blocks = result.content
    if all(isinstance(block, types.TextContent) for block in blocks):
        return _text(blocks) if blocks else None
    return [
        block.text
        if isinstance(block, types.TextContent)
        else block.model_dump(mode="json", by_alias=True, exclude_none=True)
        for block in blocks
    ]


def _text(blocks: Sequence[types.ContentBlock]) -> str:
    return "\n".join(block.text for block in blocks if isinstance(block, types.TextContent))


class MCPTools:
    """The tools of one MCP server, registered while an ``async with`` block runs.

    Entering connects (starting the server for a ``command``), lists its tools and registers
    them (or those named in ``tools``) as ``prefix`` + the tool's name, made a Python
    identifier (``get-time`` → ``get_time``); leaving unregisters them and closes the
    session. ``names`` are the registered names, ``tools`` the tools by registered name.
    """

    def __init__(
        self,
        registry: ComponentRegistry,
        server: MCPServerConfig,
        *,
        tools: Iterable[str] | None = None,
        prefix: str = "",
        name: str | None = None,
        connect_timeout: float = CONNECT_TIMEOUT_S,
    ) -> None:
        self.registry = registry
        self.config = server
        self.prefix = prefix
        self.connect_timeout = connect_timeout
        self._wanted = [tools] if isinstance(tools, str) else None if tools is None else list(tools)
        self._name = name
        self._connection: Connection | None = None
        self.tools: dict[str, MCPTool] = {}

    @property
    def names(self) -> list[str]:
        """The registered names, in the server's order."""
        return list(self.tools)

    @property
    def server_info(self) -> types.Implementation | None:
        """The server's name and version from its ``initialize`` answer, once connected."""
        return self._connection.server_info if self._connection is not None else None

    async def __aenter__(self) -> Self:
        if self._connection is not None:
            raise RuntimeError("this MCPTools is already connected; make a new one")
        connection = Connection(self.config, self._name)
        listed = await connection.open(self.connect_timeout)
        try:
            self._register(connection, listed)
        except BaseException:
            self._unregister()
            await connection.close()
            raise
        self._connection = connection
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._unregister()
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    def _register(self, connection: Connection, listed: list[types.Tool]) -> None:
        chosen = listed if self._wanted is None else _select(connection, listed, self._wanted)
        planned: dict[str, types.Tool] = {}
        for tool in chosen:
            name = python_name(self.prefix + tool.name)
            if name in planned:
                raise ValueError(
                    f"{connection.title}: its tools {planned[name].name!r} and {tool.name!r} "
                    f"would both be registered as {name!r}; choose one with tools="
                )
            planned[name] = tool
        models = ModelNames()
        for name, tool in planned.items():
            title = tool.title or (tool.annotations.title if tool.annotations else None)
            spec = spec_from_schemas(
                tool.name,
                tool.inputSchema,
                tool.outputSchema,
                tool.description,
                title=title,
                models=models,
            )
            mcp_tool = MCPTool(connection, name, tool.name, spec)
            try:
                self.registry.register_tool(name, mcp_tool)
            except ValueError as exc:  # ComponentAlreadyExistsError: the name is taken
                raise type(exc)(
                    f"{connection.title}: cannot register its tool {tool.name!r} as {name!r}: "
                    f"{exc}; give from_mcp a prefix= (or choose tools=)"
                ) from None
            self.tools[name] = mcp_tool

    def _unregister(self) -> None:
        registered = self.registry.tools()
        for name, tool in self.tools.items():
            if registered.get(name) is tool:  # not a tool registered over it since
                self.registry.unregister_tool(name)
        self.tools = {}

    def __repr__(self) -> str:
        state = f"{len(self.tools)} tools" if self._connection is not None else "not connected"
        return f"<MCPTools {self.config.describe()!r}: {state}>"


def _select(
    connection: Connection, listed: list[types.Tool], wanted: Sequence[str]
) -> list[types.Tool]:
    """The listed tools named in ``wanted`` (by the server's name or its Python form)."""
    chosen: list[types.Tool] = []
    for want in wanted:
        match = next((t for t in listed if want in (t.name, python_name(t.name))), None)
        if match is None:
            available = ", ".join(t.name for t in listed) or "(none)"
            raise ValueError(f"{connection.title} has no tool {want!r}; it has: {available}")
        if match not in chosen:
            chosen.append(match)
    return chosen


def from_mcp(
    registry: ComponentRegistry,
    *,
    command: str | None = None,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    url: str | None = None,
    headers: Mapping[str, str] | None = None,
    tools: Iterable[str] | None = None,
    prefix: str = "",
    server: MCPServerConfig | None = None,
    name: str | None = None,
    connect_timeout: float = CONNECT_TIMEOUT_S,
) -> MCPTools:
    """An MCP server's tools as Codemode tools in ``registry``, for an ``async with`` block.

    Give exactly one of ``command`` (with ``args``, ``env``, ``cwd``: a server started as a
    subprocess, over stdio), ``url`` (with ``headers``: a running server, over streamable
    HTTP) or ``server`` (an :class:`MCPServerConfig`). ``env`` is added to a small safe
    environment (``PATH``, ``HOME`` …), not to the application's. ``tools``: register only
    these (server names); ``prefix`` goes before each name. ``name`` labels the server in
    messages (default: the name it reports). ``connect_timeout``: seconds to start and list
    its tools.

    Raises ``ValueError`` (:class:`MCPConfigError` for the server's settings) for wrong
    arguments; on entering,
    :class:`MCPConnectionError` when the server cannot be started or reached,
    ``ValueError`` for a tool in ``tools`` it does not have, and
    ``ComponentAlreadyExistsError`` when a name is taken.
    """
    chosen = (("command", command), ("url", url), ("server", server))
    given = [key for key, value in chosen if value is not None]
    if len(given) != 1:
        raise ValueError(
            "from_mcp needs exactly one of command=, url= or server=, "
            + (f"not {' and '.join(given)}" if given else "and got none")
        )
    if server is None:
        settings = {
            "command": command,
            "args": list(args),
            "env": dict(env) if env is not None else None,
            "cwd": os.fspath(cwd) if cwd is not None else None,
            "url": url,
            "headers": dict(headers) if headers is not None else None,
        }
        server = parse_server(settings, where="from_mcp")
    elif args or env is not None or cwd is not None or headers is not None:
        raise ValueError("from_mcp: with server=, put args, env, cwd and headers in the config")
    return MCPTools(
        registry, server, tools=tools, prefix=prefix, name=name, connect_timeout=connect_timeout
    )


class MCPServers:
    """Every server of a configuration, connected at once for an ``async with`` block.

    ``servers`` are the :class:`MCPTools` by server name; ``names`` every registered name.
    If one server fails to start, the others are closed and its error is raised.
    """

    def __init__(self, servers: Mapping[str, MCPTools]) -> None:
        self.servers = dict(servers)

    @property
    def names(self) -> list[str]:
        """Every registered tool name, server by server."""
        return [name for tools in self.servers.values() for name in tools.names]

    async def __aenter__(self) -> Self:
        try:
            outcomes = await asyncio.gather(
                *(tools.__aenter__() for tools in self.servers.values()), return_exceptions=True
            )
        except BaseException:  # cancelled: the ones already connected must not stay so
            await self._close_all()
            raise
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if failed:
            await self._close_all()
            first = failed[0]
            if len(failed) > 1:
                first.add_note(f"{len(failed) - 1} more of the configured servers failed too")
            raise first
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close_all()

    async def _close_all(self) -> None:
        await asyncio.gather(
            *(tools.__aexit__(None, None, None) for tools in self.servers.values())
        )


def from_mcp_config(
    registry: ComponentRegistry,
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    prefix_with_server_name: bool = True,
    connect_timeout: float = CONNECT_TIMEOUT_S,
) -> MCPServers:
    """Every server of an ``mcpServers`` configuration (a path or the parsed mapping, see
    :func:`load_mcp_config`), for an ``async with`` block that connects them all at once.

    Tools are named ``{server}_{tool}`` (both made identifiers), or just ``{tool}`` without
    ``prefix_with_server_name``. Raises :class:`MCPConfigError` now for a bad configuration;
    on entering, the first server's error when one fails to start (the others are closed).
    """
    configs = load_mcp_config(source)
    prefixes: dict[str, str] = {}
    servers: dict[str, MCPTools] = {}
    for server_name, config in configs.items():
        prefix = python_name(server_name) + "_" if prefix_with_server_name else ""
        if prefix and prefix in prefixes:
            raise MCPConfigError(
                f"MCP config: servers {prefixes[prefix]!r} and {server_name!r} would both "
                f"prefix their tools with {prefix!r}; rename one",
                server=server_name,
            )
        prefixes[prefix] = server_name
        servers[server_name] = MCPTools(
            registry, config, prefix=prefix, name=server_name, connect_timeout=connect_timeout
        )
    return MCPServers(servers)
