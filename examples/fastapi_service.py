"""A FastAPI service whose users send Python that runs against the shop's tools, per customer.

    .venv/bin/python examples/fastapi_service.py            # serves on 127.0.0.1:8000

    curl -s 127.0.0.1:8000/tools                             # the stubs a model would get
    curl -s 127.0.0.1:8000/run -H 'x-customer-id: c-1' -H 'content-type: application/json' \
         -d '{"code": "result = len(tools.list_orders(status=\"open\"))"}'

The executor is ``CODEMODE_EXECUTOR_URL`` (with ``CODEMODE_EXECUTOR_API_KEY``) when set, else
one started in this process. Each request sets its own context (the seed's pattern): requests
running at once never see each other's customer.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from _executor import executor_config
from fastapi import FastAPI, Header, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel
from shop_tools import register

from codemode import Codemode
from codemode.tools import format_result


class RunRequest(BaseModel):
    code: str


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with executor_config() as config, Codemode.from_client_config(config) as codemode:
        register(codemode.registry)
        app.state.codemode = codemode
        yield


app = FastAPI(lifespan=lifespan)


@app.get("/tools", response_class=PlainTextResponse)
async def tools(request: Request) -> str:
    """The tools as Python stubs, as a model's prompt would carry them."""
    codemode: Codemode = request.app.state.codemode
    return codemode.describe_tools()


@app.post("/run")
async def run(body: RunRequest, request: Request, x_customer_id: str = Header()) -> dict[str, Any]:
    """Run the posted program for the customer named in the ``x-customer-id`` header."""
    codemode: Codemode = request.app.state.codemode
    codemode.with_context(customer_id=x_customer_id)  # this request's task only
    result = await codemode.run_async(body.code)
    return {
        "success": result.success,
        "result": result.value if result.success else None,
        "error_type": result.error_type,
        "for_the_model": format_result(result),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    args = parser.parse_args()
    # Bind first so that the real port (also for --port 0) is known and printed.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    host, port = sock.getsockname()[:2]
    # Listening now, so a client that connects while the app still starts up waits in the
    # backlog instead of being refused.
    sock.listen(128)
    print(f"fastapi_service: listening on http://{host}:{port}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    asyncio.run(server.serve(sockets=[sock]))


if __name__ == "__main__":
    main()
