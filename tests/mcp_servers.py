"""A real MCP server for the tests, written with the SDK's FastMCP, and ways to start it.

``python -m tests.mcp_servers`` serves it over stdio (run from the repository's root);
``python -m tests.mcp_servers http --token T`` serves it over streamable HTTP on a free
loopback port, refusing requests without ``Authorization: Bearer T``, and prints
``listening on <url>`` once bound. Tests start it as a subprocess and do not import this
module: making a FastMCP server configures the logging of the process that makes it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from typing import Any, Literal

from mcp.server.fastmcp import FastMCP, Image
from pydantic import BaseModel, Field

#: A 1x1 transparent PNG.
PIXEL = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c63000100000500010d0a2db40000000049454e44ae426082"
)
READY = "listening on "

server = FastMCP("demo", log_level="WARNING")


class Point(BaseModel):
    """A point on the grid."""

    x: int = Field(description="Column, from 0.")
    y: int = 0


@server.tool()
def add(a: int, b: int = 2) -> int:
    """Add two integers.

    Args:
        a: The first addend.
        b: The second addend.
    """
    return a + b


@server.tool()
def move(point: Point, direction: Literal["up", "right"] = "right") -> Point:
    """Move a point one step."""
    if direction == "up":
        return Point(x=point.x, y=point.y + 1)
    return Point(x=point.x + 1, y=point.y)


@server.tool(name="word-count", structured_output=False)
def word_count(text: str) -> str:
    """Count the words of a text; answers in words."""
    return f"{len(text.split())} words"


@server.tool(structured_output=False)
def letters(word: str) -> list[str]:
    """The letters of a word, one text block each."""
    return list(word)


@server.tool(structured_output=False)
def badge(caption: str) -> list[Any]:
    """A caption and a tiny image."""
    return [caption, Image(data=PIXEL, format="png")]


@server.tool()
def fail(message: str) -> str:
    """Fail with ``message``."""
    raise ValueError(message)


@server.tool()
def crash() -> str:
    """End this server's process in the middle of the call."""
    print("crashing on purpose", file=sys.stderr, flush=True)
    os._exit(3)


@server.tool()
def secret() -> str:
    """The DEMO_TOKEN this server was started with (from its config's env)."""
    return os.environ.get("DEMO_TOKEN", "(unset)")


_waiting: list[asyncio.Future[None]] = []


@server.tool()
async def rendezvous(name: str, parties: int = 3) -> str:
    """Wait until ``parties`` calls are in flight at once, then answer ``name``.

    Calls made one after another never meet: each fails after 10 seconds.
    """
    arrived: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    _waiting.append(arrived)
    if len(_waiting) >= parties:
        for waiter in _waiting[:parties]:
            waiter.set_result(None)
        del _waiting[:parties]
    try:
        await asyncio.wait_for(arrived, 10)
    except TimeoutError:
        raise ValueError(f"{name}: only {len(_waiting)} of {parties} calls arrived") from None
    return name


class RequireBearer:
    """ASGI middleware: HTTP requests need ``Authorization: Bearer <token>``, else 401."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and dict(scope["headers"]).get(b"authorization") != (
            self.expected
        ):
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b"unauthorized"})
            return
        await self.app(scope, receive, send)


def serve_http(token: str) -> None:
    """Serve over streamable HTTP on a free loopback port until killed."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    app = RequireBearer(server.streamable_http_app(), token)
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    print(f"{READY}http://127.0.0.1:{port}/mcp", flush=True)
    asyncio.run(uvicorn.Server(config).serve(sockets=[sock]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("transport", nargs="?", choices=["stdio", "http"], default="stdio")
    parser.add_argument("--token", default="")
    options = parser.parse_args()
    if options.transport == "http":
        serve_http(options.token)
    else:
        server.run()


if __name__ == "__main__":
    main()
