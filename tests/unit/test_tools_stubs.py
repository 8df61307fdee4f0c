"""``describe_tools``: the exact text a model receives for a sample registry, pinned."""

from __future__ import annotations

import importlib
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from codemode import Codemode, RuntimeContext, tool
from codemode.config import ClientConfig
from tests.helpers import REPO_ROOT


class Order(BaseModel):
    """One order of the requesting customer."""

    id: str
    status: Literal["open", "shipped", "cancelled"]
    total_cents: int = Field(description="Amount in cents")


@tool
def list_orders(
    status: Literal["open", "shipped", "cancelled"] | None = None,
    limit: int = 20,
    *,
    context: RuntimeContext,
) -> list[Order]:
    """The requesting customer's orders, newest first.

    Args:
        status: Only orders in this status; all when omitted.
        limit: At most this many orders.
    """
    return []


@tool
async def refund(order_id: str, reason: str) -> dict[str, str]:
    """Refund an order in full.

    Args:
        order_id: The order's id, as listed by list_orders.
        reason: Shown to the customer.

    Returns:
        The refund's id and status.
    """
    return {}


class Weather:
    """Current weather for a city."""

    async def run_async(self, city: str) -> dict[str, float]:
        return {}


EXPECTED = '''\
# Your program calls the application's tools through `tools`; their stubs follow.
# - Call a tool like a function, with keyword arguments: `x = tools.name(arg=...)`.
# - In async code: `x = await tools.name.run_async(arg=...)`; top-level `await` works, and
#   `a, b = await asyncio.gather(tools.f.run_async(...), tools.g.run_async(...))` runs calls
#   in parallel.
# - Arguments and results are JSON: objects (the TypedDicts below) arrive as dicts.
# - A tool's error is raised in your program as an exception; catch it or let it end the run.
# - `tools.search("words")` finds tools by topic; `tools.describe("name")` prints one stub.
# - Set `result` to the JSON-serialisable value you want back; print() output is returned too.

class Order(TypedDict):
    """One order of the requesting customer."""
    id: str
    status: Literal['open', 'shipped', 'cancelled']
    total_cents: int  # Amount in cents

def list_orders(
    status: Literal['open', 'shipped', 'cancelled'] | None = None,
    limit: int = 20,
) -> list[Order]:
    """The requesting customer's orders, newest first.

    Args:
        status: Only orders in this status; all when omitted.
        limit: At most this many orders.
    """

def refund(order_id: str, reason: str) -> dict[str, str]:
    """Refund an order in full.

    Args:
        order_id: The order's id, as listed by list_orders.
        reason: Shown to the customer.
    Returns: The refund's id and status.
    """

def weather(city: str) -> dict[str, float]:
    """Current weather for a city."""
'''


def sample() -> Codemode:
    codemode = Codemode.from_client_config(
        ClientConfig(executor_url="http://127.0.0.1:1", executor_api_key="k")
    )
    codemode.registry.register_tool("weather", Weather())
    codemode.registry.register_tool("refund", refund)
    codemode.registry.register_tool("list_orders", list_orders)
    return codemode


def test_describe_tools_output_is_pinned() -> None:
    """The stubs of the sample registry are exactly the pinned text."""
    codemode = sample()
    try:
        assert codemode.describe_tools() == EXPECTED
    finally:
        codemode.close()


def test_describe_tools_is_deterministic_and_selectable() -> None:
    """Registration order does not matter; ``names`` and ``preamble=False`` narrow the text."""
    codemode = sample()
    try:
        only = codemode.describe_tools(["weather"], preamble=False)
        assert only == (
            'def weather(city: str) -> dict[str, float]:\n    """Current weather for a city."""\n'
        )
        assert codemode.describe_tools() == codemode.describe_tools()
    finally:
        codemode.close()


def test_readme_shows_the_stubs_of_the_example_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's "Using Codemode from an agent" block is what describe_tools gives today."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "examples"))
    shop_tools = importlib.import_module("shop_tools")
    codemode = Codemode.from_client_config(
        ClientConfig(executor_url="http://127.0.0.1:1", executor_api_key="k")
    )
    try:
        shop_tools.register(codemode.registry)
        readme = (REPO_ROOT / "README.md").read_text()
        section = readme[readme.index("## Using Codemode from an agent") :]
        assert "```python\n" + codemode.describe_tools() + "```" in section
    finally:
        codemode.close()
