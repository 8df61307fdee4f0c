"""Where the examples find an executor: ``CODEMODE_EXECUTOR_URL`` if set, else one started here.

A real deployment runs ``codemode serve`` as its own service; starting one in-process only
keeps each example down to one command.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from codemode.config import ClientConfig, ExecutorConfig


@asynccontextmanager
async def executor_config() -> AsyncIterator[ClientConfig]:
    """A ClientConfig for a running executor, started for the duration when none is named."""
    if os.environ.get("CODEMODE_EXECUTOR_URL"):
        yield ClientConfig.load()  # CODEMODE_EXECUTOR_URL and CODEMODE_EXECUTOR_API_KEY
        return
    from codemode.executor.sandbox.factory import IsolationUnavailable, make_backend
    from codemode.executor.service.server import start_server

    key = secrets.token_urlsafe(24)
    server_config = ExecutorConfig.load(host="127.0.0.1", port=0, api_key=key)
    try:
        backend = make_backend(server_config)
    except IsolationUnavailable as exc:
        print(f"example: no sandbox here, using a plain process: {exc}", file=sys.stderr)
        # The same settings (sandbox venv, preloads), without the sandbox.
        backend = make_backend(server_config.model_copy(update={"isolation": "process"}))
    running = await start_server(server_config, backend)
    try:
        yield ClientConfig.load(
            executor_url=f"http://127.0.0.1:{running.port}", executor_api_key=key
        )
    finally:
        await running.stop(0)
