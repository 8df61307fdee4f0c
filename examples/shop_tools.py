"""The example shop's tools: what a model's program may call, scoped to the requesting customer.

Each tool reads the customer from the application's ``RuntimeContext`` (set per request with
``codemode.with_context``), never from the program, so a program cannot see another customer.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from codemode import ComponentRegistry, RuntimeContext, tool

Status = Literal["open", "shipped", "cancelled"]


class Order(BaseModel):
    """One order of the requesting customer."""

    id: str
    status: Status
    total_cents: int = Field(description="Amount in cents")


ORDERS: dict[str, list[Order]] = {
    "c-1": [
        Order(id="A1", status="open", total_cents=1250),
        Order(id="A2", status="shipped", total_cents=4999),
        Order(id="A3", status="open", total_cents=300),
    ],
    "c-2": [Order(id="B1", status="cancelled", total_cents=800)],
}


@tool
def list_orders(
    status: Status | None = None, limit: int = 20, *, context: RuntimeContext
) -> list[Order]:
    """The requesting customer's orders, newest first.

    Args:
        status: Only orders in this status; all when omitted.
        limit: At most this many orders.
    """
    orders = ORDERS.get(context["customer_id"], [])
    return [o for o in orders if status is None or o.status == status][:limit]


@tool
async def exchange_rate(currency: Literal["EUR", "GBP", "JPY"]) -> float:
    """How many units of ``currency`` one US dollar buys today.

    Args:
        currency: ISO 4217 code of the target currency.
    """
    return {"EUR": 0.92, "GBP": 0.79, "JPY": 151.0}[currency]


def register(registry: ComponentRegistry) -> None:
    """Register the shop's tools on ``registry``."""
    registry.register_tool("list_orders", list_orders)
    registry.register_tool("exchange_rate", exchange_rate)
