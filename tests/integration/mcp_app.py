"""The tools ``codemode mcp --tools tests.integration.mcp_app:registry`` serves in the tests."""

from __future__ import annotations

import asyncio

from codemode import ComponentRegistry, tool


@tool
async def stock(sku: str) -> int:
    """Units of ``sku`` in stock."""
    await asyncio.sleep(0.05)
    return {"X": 3, "Y": 4}.get(sku, 0)


@tool
def price(sku: str) -> float:
    """Unit price of ``sku``."""
    return {"X": 9.5, "Y": 2.0}.get(sku, 0.0)


registry = ComponentRegistry()
registry.register_tool("stock", stock)
registry.register_tool("price", price)

#: The same tools as a list, the other form ``--tools`` accepts.
tool_list = [stock, price]
