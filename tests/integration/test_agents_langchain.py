"""LangChain: the Codemode tool inside a LangGraph ReAct agent driven by a fake chat model."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import BaseTool
from langgraph.prebuilt import create_react_agent

from codemode import Codemode, RuntimeContext, tool
from codemode.config import ClientConfig

SEEN: list[tuple[str, str]] = []
PROGRAM = (
    "import asyncio\n"
    "a, b = await asyncio.gather(tools.stock.run_async(sku='X'), tools.stock.run_async(sku='Y'))\n"
    "result = {'total': a + b, 'price': tools.price(sku='X')}\n"
)


@tool
async def stock(sku: str, *, context: RuntimeContext) -> int:
    """Units of ``sku`` in the requesting warehouse."""
    SEEN.append(("stock", context["warehouse"]))
    return {"X": 3, "Y": 4}[sku]


@tool
def price(sku: str, *, context: RuntimeContext) -> float:
    """Unit price of ``sku``."""
    SEEN.append(("price", context["warehouse"]))
    return 9.5


class ToolCallingFakeModel(GenericFakeChatModel):
    """GenericFakeChatModel that accepts ``bind_tools``, as create_react_agent requires."""

    def bind_tools(self, tools: Any, **kwargs: Any) -> ToolCallingFakeModel:
        return self


def scripted_model() -> ToolCallingFakeModel:
    call = {"name": "codemode", "args": {"code": PROGRAM}, "id": "call-1"}
    return ToolCallingFakeModel(
        messages=iter([AIMessage(content="", tool_calls=[call]), AIMessage(content="done")])
    )


@pytest.fixture
def warehouse(make_config: Callable[..., ClientConfig]) -> Iterator[Codemode]:
    """A Codemode on the test executor with the warehouse tools registered."""
    codemode = Codemode.from_client_config(make_config())
    codemode.registry.register_tool("stock", stock)
    codemode.registry.register_tool("price", price)
    SEEN.clear()
    yield codemode
    codemode.close()


EXPECTED = 'result: {"total":7,"price":9.5}'


def tool_answer(messages: list[Any]) -> str:
    answers = [m for m in messages if isinstance(m, ToolMessage)]
    assert len(answers) == 1
    return str(answers[0].content)


def test_tool_is_a_langchain_tool_with_stubs(warehouse: Codemode) -> None:
    """``as_langchain_tool()`` is a langchain_core tool taking ``code``, with the stubs."""
    lc_tool = warehouse.as_langchain_tool()
    assert isinstance(lc_tool, BaseTool)
    assert lc_tool.name == "codemode"
    assert list(lc_tool.args) == ["code"]
    assert "def stock(sku: str) -> int:" in lc_tool.description


def test_sync_agent_invoke(warehouse: Codemode) -> None:
    """``agent.invoke`` runs the program through the tool's sync path, with the caller's context."""
    agent = create_react_agent(scripted_model(), [warehouse.as_langchain_tool()])
    with warehouse.with_context(warehouse="north"):
        out = agent.invoke({"messages": [("user", "How many X and Y?")]})
    assert tool_answer(out["messages"]) == EXPECTED
    assert out["messages"][-1].content == "done"
    assert sorted(SEEN) == [("price", "north"), ("stock", "north"), ("stock", "north")]


async def test_async_agent_ainvoke(warehouse: Codemode) -> None:
    """``agent.ainvoke`` awaits the tool natively on the loop, with the caller's context."""
    agent = create_react_agent(scripted_model(), [warehouse.as_langchain_tool()])
    with warehouse.with_context(warehouse="south"):
        out = await agent.ainvoke({"messages": [("user", "How many X and Y?")]})
    assert tool_answer(out["messages"]) == EXPECTED
    assert sorted(SEEN) == [("price", "south"), ("stock", "south"), ("stock", "south")]


async def test_direct_invoke_inside_a_running_loop(warehouse: Codemode) -> None:
    """Sync ``invoke`` also works when called from inside a running event loop."""
    lc_tool = warehouse.as_langchain_tool(context={"warehouse": "fixed"})
    assert lc_tool.invoke({"code": PROGRAM}) == EXPECTED
    assert await lc_tool.ainvoke({"code": "result = 1"}) == "result: 1"
    assert ("price", "fixed") in SEEN


STEPS = (
    "total = tools.stock(sku='X') + tools.stock(sku='Y')\nresult = total",
    "result = total * 2",
)


def two_step_model() -> ToolCallingFakeModel:
    """Two programs, the second using what the first left in the sandbox."""
    calls = [
        AIMessage(content="", tool_calls=[{"name": "codemode", "args": {"code": c}, "id": i}])
        for i, c in (("call-1", STEPS[0]), ("call-2", STEPS[1]))
    ]
    return ToolCallingFakeModel(messages=iter([*calls, AIMessage(content="done")]))


def tool_answers(messages: list[Any]) -> list[str]:
    return [str(m.content) for m in messages if isinstance(m, ToolMessage)]


async def test_agent_steps_share_a_session(warehouse: Codemode) -> None:
    """With a session, the agent's second program sees the first one's variables."""
    async with warehouse.session() as session:
        agent = create_react_agent(two_step_model(), [warehouse.as_langchain_tool(session=session)])
        with warehouse.with_context(warehouse="east"):
            out = await agent.ainvoke({"messages": [("user", "Total, doubled?")]})
        assert tool_answers(out["messages"]) == ["result: 7", "result: 14"]
        # The sync path, from a framework thread, runs on the session's loop too.
        sync_agent = create_react_agent(
            two_step_model(), [warehouse.as_langchain_tool(session=session)]
        )
        with warehouse.with_context(warehouse="east"):
            out = await asyncio.to_thread(sync_agent.invoke, {"messages": [("user", "Again?")]})
        assert tool_answers(out["messages"]) == ["result: 7", "result: 14"]


async def test_without_a_session_the_second_step_fails(warehouse: Codemode) -> None:
    """The control: without a session the second program has no ``total``."""
    agent = create_react_agent(two_step_model(), [warehouse.as_langchain_tool()])
    with warehouse.with_context(warehouse="east"):
        out = await agent.ainvoke({"messages": [("user", "Total, doubled?")]})
    first, second = tool_answers(out["messages"])
    assert first == "result: 7"
    assert "NameError" in second


async def test_blocking_call_on_the_sessions_own_loop_is_refused(warehouse: Codemode) -> None:
    """A sync invoke from the thread running the session's loop would deadlock: it raises."""
    async with warehouse.session() as session:
        lc_tool = warehouse.as_langchain_tool(session=session)
        with pytest.raises(RuntimeError, match="async API"):
            lc_tool.invoke({"code": "result = 1"})
        assert await lc_tool.ainvoke({"code": "result = 1"}) == "result: 1"
