"""Tool budgets and redaction, per execution, against a real executor."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import pytest

from codemode import Codemode, ComponentRegistry, InvalidRequestError, OutputEvent, ToolBudget, tool
from codemode.config import ClientConfig

SECRET = "sk-live-0123456789abcdef"
MADE: list[str] = []


@tool
def lookup(key: str) -> str:
    """The value stored under ``key``."""
    MADE.append(key)
    return {"token": SECRET}.get(key, "x" * 1000)


@tool
async def slow(seconds: float) -> str:
    """Sleeps."""
    MADE.append("slow")
    await asyncio.sleep(seconds)
    return "done"


@pytest.fixture
async def app(make_config: Callable[..., ClientConfig]) -> AsyncIterator[Codemode]:
    registry = ComponentRegistry()
    registry.register_tool("lookup", lookup)
    registry.register_tool("slow", slow)
    MADE.clear()
    async with Codemode.from_client_config(make_config(), registry) as codemode:
        yield codemode


CATCH = (
    "got = []\n"
    "for i in range({n}):\n"
    "    try:\n"
    "        got.append(len({call}))\n"
    "    except codemode.ToolBudgetExceeded as e:\n"
    "        got.append(str(e))\n"
    "result = got\n"
)


async def test_a_call_past_max_calls_is_not_made(app: Codemode) -> None:
    code = CATCH.format(n=4, call="tools.lookup(key=f'k{i}')")
    result = await app.run_async(code, budget=ToolBudget(max_calls=2))
    assert result.value[:2] == [1000, 1000]
    assert all("ToolBudgetExceeded" in v and "max_calls" in v for v in result.value[2:])
    assert MADE == ["k0", "k1"]
    assert result.budget_exceeded == "max_calls"


async def test_per_tool_and_result_bytes_budgets(app: Codemode) -> None:
    per_tool = await app.run_async(
        "a = tools.lookup(key='a')\n"
        "try:\n    tools.lookup(key='b')\nexcept codemode.ToolBudgetExceeded:\n    pass\n"
        "result = tools.slow(seconds=0)",
        budget=ToolBudget(max_calls_per_tool={"lookup": 1}),
    )
    assert per_tool.value == "done"
    assert per_tool.budget_exceeded == "max_calls_per_tool"
    MADE.clear()
    by_bytes = await app.run_async(
        CATCH.format(n=3, call="tools.lookup(key='big')"),
        budget=ToolBudget(max_result_bytes=1500),
    )
    assert by_bytes.value[0] == 1000
    assert "max_result_bytes" in by_bytes.value[1]
    assert by_bytes.budget_exceeded == "max_result_bytes"


async def test_tool_time_budget_bounds_the_calls(app: Codemode) -> None:
    result = await app.run_async(
        CATCH.format(n=3, call="tools.slow(seconds=0.3)"),
        budget=ToolBudget(max_tool_seconds=0.5),
    )
    assert result.value[0] == 4
    assert "max_tool_seconds" in result.value[1]
    assert "max_tool_seconds" in result.value[2]
    assert MADE == ["slow", "slow"]  # the third was not made
    assert result.budget_exceeded == "max_tool_seconds"


async def test_an_uncaught_budget_error_fails_the_program_typed(app: Codemode) -> None:
    result = await app.run_async(
        "tools.lookup(key='a')\ntools.lookup(key='b')", budget=ToolBudget(max_calls=1)
    )
    assert not result.success
    assert result.error_type == "ToolBudgetExceeded"


def test_a_bad_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="max_calls"):
        ToolBudget(max_calls=-1)


async def test_redaction_covers_output_result_errors_and_logs(
    app: Codemode, caplog: pytest.LogCaptureFixture
) -> None:
    """The secret a tool returned leaves the client nowhere: not in streamed output (also
    split across two writes), the result, the error and traceback, or the client's logs."""
    code = (
        "import sys\n"
        "t = tools.lookup(key='token')\n"
        "print('token is', t)\n"
        "sys.stdout.write(t[:10]); sys.stdout.flush(); sys.stdout.write(t[10:] + '\\n')\n"
        "result = {'t': t}\n"
    )
    events = [e async for e in app.stream(code, redact=[SECRET])]
    text = "".join(e.text for e in events if isinstance(e, OutputEvent))
    final = events[-1].result  # type: ignore[attr-defined]
    assert SECRET not in text
    assert text == "token is [redacted]\n[redacted]\n"
    assert final.value == {"t": "[redacted]"}
    assert SECRET not in final.stdout
    failed = await app.run_async(
        "raise ValueError('leaked ' + tools.lookup(key='token'))", redact=[SECRET]
    )
    assert SECRET not in (failed.error or "") + (failed.traceback or "")
    assert "[redacted]" in (failed.error or "")

    class Leaky:
        def run(self) -> None:
            raise RuntimeError(f"upstream said {SECRET}")

    app.registry.register_tool("leaky", Leaky())
    with caplog.at_level(logging.INFO, logger="codemode.client"):
        await app.run_async("try:\n    tools.leaky()\nexcept Exception:\n    pass", redact=[SECRET])
    assert "upstream said [redacted]" in caplog.text
    assert SECRET not in caplog.text


async def test_redaction_by_callable_and_bad_input(app: Codemode) -> None:
    result = await app.run_async(
        "result = tools.lookup(key='token')", redact=lambda s: s.replace("sk-live-", "sk-****-")
    )
    assert result.value == "sk-****-0123456789abcdef"
    with pytest.raises(InvalidRequestError, match="redact"):
        await app.run_async("result = 1", redact=[1, 2])  # type: ignore[list-item]
