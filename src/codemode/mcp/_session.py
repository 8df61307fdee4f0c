"""One MCP server's client session, held open by a task of its own.

The SDK's transports are anyio task groups, which must be left in the task that entered
them: :class:`Connection` enters and leaves them in its own task, whichever tasks the calls
come from and whoever closes it. Each call is raced against that task (and, over HTTP,
against a probe started when a response stream breaks), so that a server that goes away
fails the calls in flight at once instead of leaving them waiting. A stdio server's stderr is
logged and its last lines go into error messages.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio
import httpx
from mcp import ClientSession, types
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import McpError

from codemode._version import __version__
from codemode.mcp._config import MCPServerConfig
from codemode.mcp._errors import MCPConnectionError, MCPToolError

__all__ = ["CLOSE_TIMEOUT_S", "CONNECT_TIMEOUT_S", "Connection"]

logger = logging.getLogger("codemode.mcp")

#: How long a server may take to start and list its tools, seconds.
CONNECT_TIMEOUT_S = 30.0
#: How long closing a session may take before its task is cancelled, seconds. The SDK gives a
#: stdio server 2 s to exit once its stdin is closed, then terminates it (2 s more at most).
CLOSE_TIMEOUT_S = 10.0
#: The SDK's own HTTP timeouts: 30 s to connect or write, 5 minutes to read a response stream.
HTTP_TIMEOUT = httpx.Timeout(30.0, read=300.0)
_CLOSED = "it closed the connection (did its process exit?)"
#: The SDK's code for "the server does not know this session" (an HTTP 404).
_SESSION_TERMINATED = 32600
_PROBE_TIMEOUT_S = 5.0  # for an answer from an HTTP server whose response stream broke
_STDERR_LINES = 20  # lines of a stdio server's stderr kept for error messages
_STDERR_SHOWN = 300  # characters of them shown in one


class _StderrTail(asyncio.Protocol):
    """A stdio server's stderr: each line logged, the last lines kept for error messages."""

    def __init__(self, label: str) -> None:
        read_fd, write_fd = os.pipe()
        self.writer = os.fdopen(write_fd, "w", encoding="utf-8")  # the server's end
        self._reader = os.fdopen(read_fd, "rb", buffering=0)
        self._transport: asyncio.BaseTransport | None = None
        self.label = label
        self._partial = b""
        self.lines: deque[str] = deque(maxlen=_STDERR_LINES)

    async def start(self) -> None:
        """Read the pipe on the running loop from now on."""
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.connect_read_pipe(lambda: self, self._reader)

    def data_received(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self._line(line)

    def eof_received(self) -> bool | None:
        if self._partial:
            self._line(self._partial)
            self._partial = b""
        return None

    def _line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip()
        if text:
            self.lines.append(text)
            logger.info("MCP server %s: %s", self.label, text)

    def tail(self) -> str:
        """The last lines, for an error message ('' when the server wrote nothing)."""
        text = " | ".join(" ".join(line.split()) for line in list(self.lines)[-3:])
        return text if len(text) <= _STDERR_SHOWN else "..." + text[-_STDERR_SHOWN + 3 :]

    def close(self) -> None:
        """Close both ends of the pipe."""
        self.writer.close()
        if self._transport is not None:
            self._transport.close()
        else:
            self._reader.close()


class Connection:
    """One server's MCP client session, kept open by a task of its own until :meth:`close`."""

    def __init__(self, config: MCPServerConfig, name: str | None) -> None:
        self.config = config
        self.name = name or ""
        self.session: ClientSession | None = None
        self.server_info: types.Implementation | None = None
        self.failure: str | None = None  # why the session ended, once it has
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._stderr: _StderrTail | None = None
        self._lost: asyncio.Future[None] | None = None  # done once an HTTP server is gone
        self._probe: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None

    @property
    def title(self) -> str:
        """``MCP server 'name' (command or URL)``, for messages."""
        where = self.config.describe()
        return f"MCP server {self.name!r} ({where})" if self.name else f"MCP server {where!r}"

    async def open(self, timeout: float) -> list[types.Tool]:
        """Start the session's task, wait until the server has listed its tools, return them.

        Raises :class:`MCPConnectionError` when the server cannot be started or reached, or
        does not answer within ``timeout`` seconds.
        """
        self._loop = asyncio.get_running_loop()
        self._lost = self._loop.create_future()
        ready: asyncio.Future[list[types.Tool]] = self._loop.create_future()
        ready.add_done_callback(_retrieve)
        self._task = asyncio.create_task(self._serve(ready), name=self.title)
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(ready)
        except TimeoutError:
            await self.close()
            raise MCPConnectionError(
                f"{self.title} did not answer within {timeout:g}s of starting"
                + self._stderr_note(),
                server=self.name,
            ) from None
        except BaseException:
            await self.close()
            raise

    async def _serve(self, ready: asyncio.Future[list[types.Tool]]) -> None:
        try:
            async with AsyncExitStack() as stack:
                read, write = await self._transport(stack)
                info = types.Implementation(name="codemode", version=__version__)
                session = await stack.enter_async_context(
                    ClientSession(read, write, client_info=info)
                )
                initialized = await session.initialize()
                self.server_info = initialized.serverInfo
                self.name = self.name or initialized.serverInfo.name
                if self._stderr is not None:
                    self._stderr.label = self.name
                tools = await _list_tools(session)
                self.session = session
                ready.set_result(tools)
                await self._stop.wait()
        except asyncio.CancelledError:
            self.failure = self.failure or "its session was cancelled"
            ready.cancel()
            raise
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            reason = _reason(exc)
            self.failure = self.failure or reason
            if not ready.done():
                ready.set_exception(
                    MCPConnectionError(
                        f"{self.title} could not be started or reached: {reason}"
                        + self._stderr_note(),
                        server=self.name,
                    )
                )
            else:
                logger.warning("%s: the session ended: %s", self.title, reason)
        finally:
            self.session = None
            self.failure = self.failure or "the application closed it"

    async def _transport(self, stack: AsyncExitStack) -> tuple[Any, Any]:
        """Open the stdio or HTTP transport on ``stack``; its (read, write) streams."""
        config = self.config
        if config.url is not None:
            client = httpx.AsyncClient(
                headers=config.headers or {},
                timeout=HTTP_TIMEOUT,
                event_hooks={"response": [self._watch_response]},
            )
            self._http = await stack.enter_async_context(client)
            read, write, _ = await stack.enter_async_context(
                streamable_http_client(config.url, http_client=client)
            )
            return read, write
        self._stderr = _StderrTail(self.name or config.describe())
        stack.callback(self._stderr.close)  # last out: after the process has ended
        await self._stderr.start()
        params = StdioServerParameters(
            command=str(config.command), args=config.args, env=config.env, cwd=config.cwd
        )
        read, write = await stack.enter_async_context(
            stdio_client(params, errlog=self._stderr.writer)
        )
        self._stderr.writer.close()  # the server holds its own copy: EOF when it exits
        return read, write

    async def call(self, tool: str, arguments: dict[str, Any]) -> types.CallToolResult:
        """Call ``tool`` on the server; raises :class:`MCPToolError` for a protocol error,
        :class:`MCPConnectionError` when the server is gone or goes away meanwhile."""
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError(
                f"{self.title} is connected on another event loop: call its tools from the loop "
                "that entered from_mcp(...), e.g. with Codemode.run_async there"
            )
        session, task, lost = self.session, self._task, self._lost
        if session is None or task is None or lost is None or self.failure is not None:
            raise self._gone(tool, during=False)
        request = asyncio.ensure_future(session.call_tool(tool, arguments))
        request.add_done_callback(_retrieve)
        try:
            await asyncio.wait((request, task, lost), return_when=asyncio.FIRST_COMPLETED)
        finally:
            request.cancel()  # nothing when it is done; when this call is cancelled, stop it
        if not request.done() or request.cancelled():
            raise self._gone(tool, during=True)
        try:
            return request.result()
        except McpError as exc:
            if exc.error.code == types.CONNECTION_CLOSED:
                self.failure = self.failure or _CLOSED
                raise self._gone(tool, during=True) from None
            if exc.error.code == _SESSION_TERMINATED:
                self.failure = self.failure or "it no longer knows this session (restarted?)"
                raise self._gone(tool, during=True) from None
            raise MCPToolError(
                f"{self.title} refused the call to {tool!r}: {exc.error.message}",
                server=self.name,
                tool=tool,
                code=exc.error.code,
            ) from None
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream):
            self.failure = self.failure or _CLOSED
            raise self._gone(tool, during=False) from None
        except RuntimeError as exc:  # the SDK found the result not matching its outputSchema
            raise MCPToolError(str(exc), server=self.name, tool=tool) from None

    async def _watch_response(self, response: httpx.Response) -> None:
        """httpx response hook: report a broken response stream of a call (a POST)."""
        if response.request.method == "POST" and isinstance(response.stream, httpx.AsyncByteStream):
            response.stream = _WatchedStream(response.stream, self._stream_broke)

    def _stream_broke(self, exc: httpx.TransportError) -> None:
        # The SDK drops a call whose response stream breaks (unless the server can resume
        # it): if the server has gone, fail every call now instead of letting them wait.
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._check_answers(exc))

    async def _check_answers(self, exc: httpx.TransportError) -> None:
        # Any HTTP answer (a 405 for HEAD, a 401 …) means the server lives: the broken call
        # then ends with the relay's tool timeout. A mere TCP connect would not do: a dying
        # process's listening socket may complete one.
        if self._http is None:
            return
        try:
            await self._http.head(str(self.config.url), timeout=_PROBE_TIMEOUT_S)
            return
        except httpx.TransportError:
            pass
        self.failure = self.failure or (
            f"a response stream broke ({type(exc).__name__}) and it no longer answers"
        )
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def _gone(self, tool: str, *, during: bool) -> MCPConnectionError:
        when = f"went away during the call to {tool!r}" if during else "is not connected"
        reason = self.failure or _CLOSED
        return MCPConnectionError(
            f"{self.title} {when} ({reason}){self._stderr_note()}. Its tools fail until the "
            "application connects to it again (a new `async with from_mcp(...)`)",
            server=self.name,
            tool=tool,
        )

    def _stderr_note(self) -> str:
        tail = self._stderr.tail() if self._stderr is not None else ""
        return f"; its stderr ended with: {tail}" if tail else ""

    async def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """End the session and, for a stdio server, its process. Idempotent."""
        task = self._task
        if task is None:
            return
        self._stop.set()
        if self._probe is not None:
            self._probe.cancel()
        if self.session is None:
            task.cancel()  # still starting: nothing to close politely
        _, pending = await asyncio.wait({task}, timeout=timeout)
        if pending:
            logger.warning("%s did not close within %gs; cancelling it", self.title, timeout)
            task.cancel()
            await asyncio.wait({task}, timeout=timeout)


class _WatchedStream(httpx.AsyncByteStream):
    """A response body that reports a transport error (a broken connection) before raising it."""

    def __init__(
        self, stream: httpx.AsyncByteStream, on_break: Callable[[httpx.TransportError], None]
    ) -> None:
        self._stream = stream
        self._on_break = on_break

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                yield chunk
        except httpx.TransportError as exc:
            self._on_break(exc)
            raise

    async def aclose(self) -> None:
        await self._stream.aclose()


async def _list_tools(session: ClientSession) -> list[types.Tool]:
    tools: list[types.Tool] = []
    cursor: str | None = None
    while True:
        params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
        page = await session.list_tools(params=params)
        tools += page.tools
        cursor = page.nextCursor
        if not cursor:
            return tools


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen: whoever awaited it has had it, or was cancelled."""
    if not future.cancelled():
        future.exception()


def _reason(exc: BaseException) -> str:
    """One line saying why a session failed, from an error or an (anyio) exception group."""
    while isinstance(exc, BaseExceptionGroup):
        leaves = [e for e in exc.exceptions if not isinstance(e, asyncio.CancelledError)]
        if not leaves:
            return "its session was cancelled"
        exc = leaves[0]
    if isinstance(exc, McpError) and exc.error.code == types.CONNECTION_CLOSED:
        return _CLOSED
    if isinstance(exc, anyio.BrokenResourceError | anyio.ClosedResourceError | anyio.EndOfStream):
        return _CLOSED  # a write to a stdio server that has exited
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        hint = " (check its headers, e.g. Authorization)" if status in (401, 403) else ""
        return f"HTTP {status} {exc.response.reason_phrase}{hint}"
    if isinstance(exc, FileNotFoundError):
        return f"no such command: {exc.filename or exc}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
