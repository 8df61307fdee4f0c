"""An MCP server's tools as Codemode tools: the time server from PyPI, called by a program.

    pip install 'codemode[mcp]' mcp-server-time
    .venv/bin/python examples/mcp_tools.py

``from_mcp`` starts the server (``python -m mcp_server_time``) as a subprocess of this
application, lists its tools and registers them, their stubs drawn from the server's JSON
Schemas; the program calls two of them at once and one wrongly. Every call goes from the
sandbox to this application, and from here to the server over the one MCP session this
application keeps: the server, and whatever credentials it is given (``env=``, or
``headers=`` for a server reached with ``url=``), stay out of the sandbox.

Run it against a running executor with ``CODEMODE_EXECUTOR_URL`` and
``CODEMODE_EXECUTOR_API_KEY``, or as above: without ``CODEMODE_EXECUTOR_URL`` it starts one
in this process. It prints the stubs the model would read, the program's output and, last,
the result as JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys

from _executor import executor_config

from codemode import Codemode
from codemode.tools import format_result, from_mcp

# The server's "local" time zone is fixed so that the run prints the same thing anywhere.
TIME_SERVER = ["-m", "mcp_server_time", "--local-timezone", "UTC"]

# What a model writes after reading the stubs: two calls in parallel, one that fails.
PROGRAM = """\
import asyncio, json

now, tokyo = await asyncio.gather(
    tools.time_get_current_time.run_async(timezone="UTC"),
    tools.time_convert_time.run_async(
        source_timezone="UTC", time="12:00", target_timezone="Asia/Tokyo"
    ),
)
now, tokyo = json.loads(now), json.loads(tokyo)
print(f"It is {now['day_of_week']} in {now['timezone']}.")
try:
    tools.time_get_current_time(timezone="Mars/Olympus_Mons")
except Exception as exc:
    print(f"The server refused: {exc}")
result = {
    "noon_utc_in_tokyo": tokyo["target"]["datetime"][11:16],
    "difference": tokyo["time_difference"],
}
"""


async def main() -> None:
    async with (
        executor_config() as config,
        Codemode.from_client_config(config) as codemode,
        from_mcp(codemode.registry, command=sys.executable, args=TIME_SERVER, prefix="time_"),
    ):
        print(codemode.describe_tools(preamble=False))
        result = await codemode.run_async(PROGRAM)
    if not result.success:
        sys.exit(format_result(result))
    print(result.stdout, end="")
    print(json.dumps(result.value))


if __name__ == "__main__":
    asyncio.run(main())
