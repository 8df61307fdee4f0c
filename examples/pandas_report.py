"""A report made with pandas in the sandbox: a tool returns rows, the program aggregates them.

    CODEMODE_SANDBOX_VENV=/srv/sandbox-venv CODEMODE_PRELOAD_MODULES=pandas \\
        .venv/bin/python examples/pandas_report.py

The program imports pandas, so the executor needs a sandbox venv that holds it, made with the
sandbox's Python (``codemode doctor --sandbox-venv DIR`` checks it), and pandas preloaded so
that no program pays its import (about half a second)::

    python3.11 -m venv /srv/sandbox-venv
    /srv/sandbox-venv/bin/pip install pandas
    CODEMODE_API_KEY=secret codemode serve --sandbox-venv /srv/sandbox-venv --preload pandas

Then run the example against that executor with ``CODEMODE_EXECUTOR_URL=http://127.0.0.1:8001``
and ``CODEMODE_EXECUTOR_API_KEY=secret``, or as above: without ``CODEMODE_EXECUTOR_URL`` it
starts one in this process, configured by ``CODEMODE_SANDBOX_VENV`` and
``CODEMODE_PRELOAD_MODULES``. It prints the program's output, the CSV the program left in
``/output``, and, last, the result as JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import TypedDict

from _executor import executor_config

from codemode import Codemode, tool
from codemode.tools import format_result


class Order(TypedDict):
    """One order line."""

    region: str
    product: str
    quantity: int
    unit_price: float


ORDERS: list[Order] = [
    {"region": "EU", "product": "kettle", "quantity": 3, "unit_price": 24.5},
    {"region": "EU", "product": "toaster", "quantity": 1, "unit_price": 39.0},
    {"region": "US", "product": "kettle", "quantity": 5, "unit_price": 22.0},
    {"region": "US", "product": "blender", "quantity": 2, "unit_price": 89.9},
    {"region": "APAC", "product": "toaster", "quantity": 4, "unit_price": 35.0},
]


@tool
def list_orders(region: str | None = None) -> list[Order]:
    """This month's order lines, one row each.

    Args:
        region: Only this region's orders; all when omitted.
    """
    return [o for o in ORDERS if region is None or o["region"] == region]


# What a model writes after reading the stubs: rows in, a DataFrame, one aggregate out.
PROGRAM = """\
import pandas as pd

orders = pd.DataFrame(tools.list_orders())
orders["revenue"] = orders.quantity * orders.unit_price
by_region = orders.groupby("region").revenue.sum().sort_values(ascending=False)
print(by_region.to_string())
by_region.to_csv("/output/revenue_by_region.csv")
result = {region: round(float(revenue), 2) for region, revenue in by_region.items()}
"""


async def main() -> None:
    async with executor_config() as config, Codemode.from_client_config(config) as codemode:
        codemode.registry.register_tool("list_orders", list_orders)
        result = await codemode.run_async(PROGRAM)
    if not result.success:
        sys.exit(f"{format_result(result)}\n(pandas missing? see this file's docstring)")
    print(result.stdout, end="")
    print(result.files["revenue_by_region.csv"].decode(), end="")
    print(json.dumps(result.value))


if __name__ == "__main__":
    asyncio.run(main())
