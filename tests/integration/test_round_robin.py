"""Several executors behind one executor_url: gRPC's round_robin spreads executions over them."""

from __future__ import annotations

import asyncio

from codemode import Codemode
from codemode.config import ClientConfig
from tests.helpers import ServerProcess, wait_until
from tests.integration.conftest import Servers

KEY = "round-robin-key-0123"


async def test_a_list_of_executors_shares_the_work(servers: Servers) -> None:
    """With two addresses in executor_url, executions land on both executors."""
    first = servers.start(api_key=KEY)
    second = servers.start(api_key=KEY)
    try:
        config = ClientConfig(executor_url=f"{first.url},{second.url}", executor_api_key=KEY)
        async with Codemode.from_client_config(config) as codemode:
            # The channel is ready once one address is; give the other a moment to connect.
            await codemode.run_async("result = 0")
            await asyncio.sleep(0.5)
            results = [await codemode.run_async(f"result = {i}") for i in range(12)]
        assert [r.value for r in results] == list(range(12))
        ids = {r.correlation_id for r in results}

        def served_by(server: ServerProcess) -> set[str]:
            records = server.log_records()
            return {r["correlation_id"] for r in records if r.get("msg") == "execution finished"}

        def both() -> list[set[str]]:
            return [served_by(s) & ids for s in (first, second)]

        # An executor logs "execution finished" just after the client has its result.
        await asyncio.to_thread(wait_until, lambda: set.union(*both()) == ids, 5)
        served = both()
        assert served[0], "the first executor ran nothing"
        assert served[1], "the second executor ran nothing"
        assert served[0] | served[1] == ids
    finally:
        servers.stop(first)
        servers.stop(second)
