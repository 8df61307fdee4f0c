"""Where MCP servers are: one server's settings, and the common ``mcpServers`` JSON file.

The file is the one Claude Desktop, Cursor and others read::

    {"mcpServers": {
        "time": {"command": "python", "args": ["-m", "mcp_server_time"], "env": {"TZ": "UTC"}},
        "remote": {"url": "https://mcp.example.com/mcp", "headers": {"Authorization": "Bearer …"}}
    }}

A file holding only the inner mapping (server name to settings) is read too, and so is VS
Code's ``{"servers": {…}}``. Keys other clients use (``type``, ``disabled``, ``autoApprove`` …)
are accepted; a server with ``"disabled": true`` is left out. No MCP import here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = ["MCPConfigError", "MCPServerConfig", "load_mcp_config", "parse_server"]


class MCPConfigError(ValueError):
    """An MCP server configuration is unusable; the message names the server and the field.

    ``server`` and ``field`` are None when the problem is the file as a whole.
    """

    def __init__(self, message: str, *, server: str | None = None, field: str | None = None):
        super().__init__(message)
        self.server = server
        self.field = field


class MCPServerConfig(BaseModel):
    """How to reach one MCP server: a ``command`` to start (stdio), or the ``url`` of a
    running one (streamable HTTP).

    ``env`` is added to a small safe environment (``PATH``, ``HOME`` …), not to the
    application's: the server sees only the secrets given to it here. ``headers`` (an
    ``Authorization`` header, say) go with every HTTP request to ``url``.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    command: str | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] | None = None
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] | None = None
    #: Other clients' transport names; checked against command/url, not needed.
    type: Literal["stdio", "http", "streamable-http", "streamableHttp", "sse"] | None = None
    disabled: bool = False

    @model_validator(mode="after")
    def _one_transport(self) -> Self:
        if self.command is None and self.url is None:
            raise ValueError("needs 'command' (a server to start) or 'url' (a running server)")
        if self.command is not None and self.url is not None:
            raise ValueError("has both 'command' and 'url'; give one")
        if self.type == "sse":
            raise ValueError(
                "type 'sse' (the old HTTP+SSE transport) is not supported; "
                "give the url of the server's streamable HTTP endpoint"
            )
        if self.command is not None:
            if not self.command.strip():
                raise ValueError("'command' is empty")
            if self.headers:
                raise ValueError("'headers' are for a 'url' server, not a 'command'")
            if self.type not in (None, "stdio"):
                raise ValueError(f"type {self.type!r} needs a 'url', not a 'command'")
        if self.url is not None:
            if not self.url.startswith(("http://", "https://")):
                raise ValueError(f"'url' must start with http:// or https://, not {self.url!r}")
            if self.args or self.env is not None or self.cwd is not None:
                raise ValueError("'args', 'env' and 'cwd' are for a 'command' server, not a 'url'")
            if self.type == "stdio":
                raise ValueError("type 'stdio' needs a 'command', not a 'url'")
        return self

    def describe(self) -> str:
        """The command line or the URL, for messages (no env, no headers: they hold secrets)."""
        if self.url is not None:
            return self.url
        return " ".join([str(self.command), *self.args])


def load_mcp_config(
    source: str | os.PathLike[str] | Mapping[str, Any],
) -> dict[str, MCPServerConfig]:
    """The servers of an ``mcpServers`` configuration, by name, in the file's order.

    ``source`` is a path to the JSON file or the already-parsed mapping. Raises
    :class:`MCPConfigError` when the file cannot be read or parsed, or when a server's
    settings are wrong (the message names the server and the field).
    """
    if isinstance(source, Mapping):
        where, data = "MCP config", source
    else:
        path = Path(source)
        where = f"MCP config {path}"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise MCPConfigError(f"{where}: cannot read it: {exc.strerror or exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MCPConfigError(
                f"{where}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
            ) from None
    if not isinstance(data, Mapping):
        raise MCPConfigError(f"{where}: must be a JSON object with an 'mcpServers' object")
    servers = _servers_of(data)
    if not isinstance(servers, Mapping):
        raise MCPConfigError(f"{where}: 'mcpServers' must be an object of server name to settings")
    found: dict[str, MCPServerConfig] = {}
    for name, settings in servers.items():
        if not isinstance(name, str) or not name.strip():
            raise MCPConfigError(f"{where}: a server has an empty name", server=str(name))
        if not isinstance(settings, Mapping):
            raise MCPConfigError(
                f"{where}: server {name!r}: its settings must be an object, "
                f"not {type(settings).__name__}",
                server=name,
            )
        config = parse_server(settings, where=where, server=name)
        if not config.disabled:
            found[name] = config
    return found


def _servers_of(data: Mapping[str, Any]) -> Any:
    if "mcpServers" in data:
        return data["mcpServers"]
    vscode = data.get("servers")
    if isinstance(vscode, Mapping) and not ({"command", "url"} & set(vscode)):
        return vscode
    return data  # the inner mapping alone


def parse_server(
    settings: Mapping[str, Any], *, where: str, server: str | None = None
) -> MCPServerConfig:
    """``settings`` as an :class:`MCPServerConfig`; :class:`MCPConfigError` when they are
    wrong, its message starting with ``where`` and the server's name."""
    try:
        return MCPServerConfig.model_validate(settings)
    except ValidationError as exc:
        raise _config_error(where, server, exc) from None


def _config_error(where: str, server: str | None, exc: ValidationError) -> MCPConfigError:
    problems = []
    first_field: str | None = None
    for error in exc.errors(include_url=False):
        loc = [str(part) for part in error["loc"]]
        message = str(error["msg"]).removeprefix("Value error, ")
        if loc:
            first_field = first_field or loc[0]
            problems.append(f"field {'.'.join(loc)!r}: {message}")
        else:
            problems.append(message)
    named = f"{where}: server {server!r}: " if server is not None else f"{where}: "
    return MCPConfigError(named + "; ".join(problems), server=server, field=first_field)
