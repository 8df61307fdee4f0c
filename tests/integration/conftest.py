"""Integration fixtures: real ``codemode serve`` subprocesses and clients connected to them.

``server`` listens on an ephemeral port with a random key; ``seed_server`` listens where the
seed document's snippets expect it (127.0.0.1:8001, key ``your-api-key``). Isolation comes from
``CODEMODE_TEST_ISOLATION`` (default ``auto``, the bwrap sandbox). Every server is stopped at the
end (SIGTERM, then SIGKILL), and the session fails if any process it started is still running.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from codemode import Codemode
from codemode.config import ClientConfig
from tests.helpers import ServerProcess, ServerStartError, start_server, wait_gone

SEED_HOST, SEED_PORT, SEED_KEY = "127.0.0.1", 8001, "your-api-key"
#: How long to wait for port 8001 when another test session holds it, seconds.
SEED_PORT_WAIT_S = 90.0


class Servers:
    """Starts servers for the session and makes sure none outlives it."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: list[ServerProcess] = []

    def start(self, *, wait_for_port: float = 0.0, **kwargs: Any) -> ServerProcess:
        """Start a server; retry for up to ``wait_for_port`` s while its fixed port is taken."""
        deadline = time.monotonic() + wait_for_port
        while True:
            try:
                server = start_server(log_dir=self.log_dir, **kwargs)
            except ServerStartError as exc:
                if "Address already in use" in str(exc) and time.monotonic() < deadline:
                    time.sleep(1.0)
                    continue
                pytest.fail(str(exc), pytrace=False)
            self.running.append(server)
            return server

    def stop(self, server: ServerProcess, timeout: float = 15.0) -> int:
        code = server.stop(timeout)
        leftover = wait_gone(server.seen)
        assert not leftover, f"processes of the stopped server still run: {leftover}"
        return code

    def stop_all(self) -> None:
        leftover = []
        for server in self.running:
            server.stop()
            leftover += wait_gone(server.seen)
            assert server.proc.poll() is not None, f"server {server.pid} did not exit"
        assert not leftover, f"processes started by the test servers still run: {leftover}"


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """The session's server starter; stops every server it started and checks nothing is left."""
    pool = Servers(tmp_path_factory.mktemp("serve-logs"))
    yield pool
    pool.stop_all()


@pytest.fixture(scope="session")
def server(servers: Servers) -> ServerProcess:
    """An executor on an ephemeral loopback port with a random key."""
    return servers.start(api_key=secrets.token_urlsafe(24))


@pytest.fixture(scope="session")
def seed_server(servers: Servers) -> ServerProcess:
    """An executor where the seed document expects one: localhost:8001, key "your-api-key".

    The port is fixed by the document, so a concurrent test session may hold it: wait for it.
    """
    return servers.start(
        api_key=SEED_KEY, host=SEED_HOST, port=SEED_PORT, wait_for_port=SEED_PORT_WAIT_S
    )


@pytest.fixture
def make_config(server: ServerProcess) -> Callable[..., ClientConfig]:
    """Build a ClientConfig for ``server``; keyword arguments override fields."""

    def make(**overrides: Any) -> ClientConfig:
        values: dict[str, Any] = {"executor_url": server.url, "executor_api_key": server.api_key}
        values.update(overrides)
        return ClientConfig(**values)

    return make


@pytest.fixture
async def codemode(make_config: Callable[..., ClientConfig]) -> AsyncIterator[Codemode]:
    """A Codemode connected to ``server``, closed after the test."""
    async with Codemode.from_client_config(make_config()) as instance:
        yield instance
