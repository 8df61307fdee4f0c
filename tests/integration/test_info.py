"""The Info RPC: what an executor enforces, behind its health status."""

from __future__ import annotations

import pytest

from codemode.core import ExecutorClient
from codemode.core.errors import ExecutorAuthenticationError
from tests.helpers import ServerProcess
from tests.integration.conftest import Servers


async def test_info_reports_the_sandbox_and_ceilings(server: ServerProcess) -> None:
    """A default server reports a kernel sandbox, no warnings, and its limits as numbers."""
    async with ExecutorClient(server.url, server.api_key) as client:
        info = await client.info_async()
    assert info["isolated"] is True
    assert info["isolation"] in {"forkserver", "bwrap"}
    assert info["warnings"] == []
    assert isinstance(info["limits"]["memory_bytes"], int)
    assert info["limits"]["memory_bytes"] > 0


async def test_info_warns_about_process_isolation(servers: Servers) -> None:
    """A server started with --isolation=process says, in its details, that nothing is sandboxed."""
    weak = servers.start(api_key="weak-isolation-key", isolation="process")
    try:
        async with ExecutorClient(weak.url, weak.api_key) as client:
            info = await client.info_async()
            assert await client.health_check_async()
    finally:
        servers.stop(weak)
    assert info["isolated"] is False
    assert info["isolation"] == "process"
    assert any("NO sandbox" in warning for warning in info["warnings"])


async def test_info_needs_the_key(server: ServerProcess) -> None:
    """Info is authenticated like Execute: a wrong key is refused."""
    async with ExecutorClient(server.url, "not-the-right-key") as client:
        with pytest.raises(ExecutorAuthenticationError):
            await client.info_async()
