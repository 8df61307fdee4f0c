"""CrewAI: a real Agent, Task and Crew, driven by a scripted LLM, running code through Codemode."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

# Before crewai is imported: no telemetry, no tracing prompt, storage under a test name.
os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")
os.environ.setdefault("OTEL_SDK_DISABLED", "true")
os.environ.setdefault("CREWAI_TRACING_ENABLED", "false")
os.environ.setdefault("CREWAI_STORAGE_DIR", "codemode-tests")

from crewai import Agent, Crew, Task
from crewai.llms.base_llm import BaseLLM
from crewai.tools import BaseTool

from codemode import Codemode, RuntimeContext, tool
from codemode.config import ClientConfig

SEEN: list[tuple[str, str]] = []

PROGRAM = (
    "import asyncio\n"
    "order = tools.get_order(order_id='A1')\n"
    "rate = await tools.fx_rate.run_async(currency='EUR')\n"
    "result = {'order': order['id'], 'eur': round(order['total_usd'] * rate, 2)}\n"
)


@tool
def get_order(order_id: str, *, context: RuntimeContext) -> dict[str, Any]:
    """One order of the requesting customer."""
    SEEN.append(("get_order", context["customer"]))
    return {"id": order_id, "total_usd": 100.0}


@tool
async def fx_rate(currency: str, *, context: RuntimeContext) -> float:
    """USD to ``currency`` exchange rate."""
    SEEN.append(("fx_rate", context["customer"]))
    return 0.5


class ScriptedLLM(BaseLLM):
    """Writes PROGRAM as a codemode action, then answers with the result it observed."""

    def call(
        self,
        messages: Any,
        tools: Any = None,
        callbacks: Any = None,
        available_functions: Any = None,
        from_task: Any = None,
        from_agent: Any = None,
        response_model: Any = None,
        **kwargs: Any,
    ) -> str:
        text = (
            messages
            if isinstance(messages, str)
            else "\n".join(str(m.get("content", "")) for m in messages)
        )
        if "result: {" not in text:
            action = json.dumps({"code": PROGRAM})
            return f"Thought: one program does it.\nAction: codemode\nAction Input: {action}"
        observed = text[text.rindex("result: {") :].splitlines()[0]
        return f"Thought: I have it.\nFinal Answer: {observed}"

    async def acall(self, *args: Any, **kwargs: Any) -> str:
        return self.call(*args, **kwargs)

    def supports_function_calling(self) -> bool:
        return False


def make_crew(codemode_tool: BaseTool) -> Crew:
    llm = ScriptedLLM(model="scripted")
    agent = Agent(
        role="Order clerk",
        goal="Answer questions about orders",
        backstory="Writes Python against the shop's tools.",
        llm=llm,
        tools=[codemode_tool],
    )
    task = Task(
        description="What is order A1's total in EUR?",
        expected_output="The order id and its EUR total",
        agent=agent,
    )
    return Crew(agents=[agent], tasks=[task])


@pytest.fixture
def shop(make_config: Callable[..., ClientConfig]) -> Iterator[Codemode]:
    """A Codemode on the test executor with the two shop tools registered."""
    codemode = Codemode.from_client_config(make_config())
    codemode.registry.register_tool("get_order", get_order)
    codemode.registry.register_tool("fx_rate", fx_rate)
    SEEN.clear()
    yield codemode
    codemode.close()


EXPECTED = 'result: {"order":"A1","eur":50.0}'


def test_tool_describes_the_registered_tools(shop: Codemode) -> None:
    """The CrewAI tool is a BaseTool whose description carries the tools' stubs."""
    crew_tool = shop.as_crewai_tool()
    assert isinstance(crew_tool, BaseTool)
    assert crew_tool.name == "codemode"
    assert "def get_order(order_id: str) -> dict[str, Any]:" in crew_tool.description
    assert "def fx_rate(currency: str) -> float:" in crew_tool.description


def test_kickoff_runs_the_program_with_the_application_context(shop: Codemode) -> None:
    """Sync ``kickoff()``: both tools run with the caller's context; the output has the result."""
    with shop.with_context(customer="c-7"):
        output = make_crew(shop.as_crewai_tool()).kickoff()
    assert output.raw == EXPECTED
    assert sorted(SEEN) == [("fx_rate", "c-7"), ("get_order", "c-7")]


async def test_kickoff_async_runs_the_program_with_the_application_context(
    shop: Codemode,
) -> None:
    """``kickoff_async()`` inside a running loop: same tools, same context, same result."""
    with shop.with_context(customer="c-8"):
        output = await make_crew(shop.as_crewai_tool()).kickoff_async()
    assert output.raw == EXPECTED
    assert sorted(SEEN) == [("fx_rate", "c-8"), ("get_order", "c-8")]


async def test_akickoff_native_async(shop: Codemode) -> None:
    """CrewAI's native async ``akickoff()`` works too, with the caller's context."""
    with shop.with_context(customer="c-9"):
        output = await make_crew(shop.as_crewai_tool()).akickoff()
    assert output.raw == EXPECTED
    assert sorted(SEEN) == [("fx_rate", "c-9"), ("get_order", "c-9")]


async def test_arun_is_native_async(shop: Codemode) -> None:
    """The tool's ``arun`` awaits the execution on the caller's loop and returns the feedback."""
    with shop.with_context(customer="c-1"):
        text = await shop.as_crewai_tool().arun(code=PROGRAM)
    assert text == EXPECTED


async def test_failed_program_is_feedback_not_an_exception(shop: Codemode) -> None:
    """A program that fails gives the agent its error and traceback as the tool's answer."""
    text = await shop.as_crewai_tool().arun(code="tools.get_order()")
    assert text.startswith("error: TypeError: tools.get_order() missing required argument")


class TwoStepLLM(ScriptedLLM):
    """Runs a program that keeps a variable, then one that uses it, then answers."""

    def call(self, messages: Any, *args: Any, **kwargs: Any) -> str:
        text = (
            messages
            if isinstance(messages, str)
            else "\n".join(str(m.get("content", "")) for m in messages)
        )
        if "result: 100.0" not in text:
            code = "kept = tools.get_order(order_id='A1')['total_usd']\nresult = kept"
        elif "result: 200.0" not in text and "NameError" not in text:
            code = "result = kept * 2"
        else:
            last = "result: 200.0" if "result: 200.0" in text else "NameError"
            return f"Thought: done.\nFinal Answer: {last}"
        action = json.dumps({"code": code})
        return f"Thought: next step.\nAction: codemode\nAction Input: {action}"


def make_two_step_crew(codemode_tool: BaseTool) -> Crew:
    agent = Agent(
        role="Order clerk",
        goal="Answer questions about orders",
        backstory="Writes Python against the shop's tools, step by step.",
        llm=TwoStepLLM(model="scripted"),
        tools=[codemode_tool],
    )
    task = Task(description="Double order A1's total.", expected_output="A number", agent=agent)
    return Crew(agents=[agent], tasks=[task])


async def test_agent_steps_share_a_session(shop: Codemode) -> None:
    """With a session, the second program of the agent uses the first one's variable."""
    async with shop.session() as session:
        with shop.with_context(customer="c-9"):
            output = await make_two_step_crew(shop.as_crewai_tool(session=session)).kickoff_async()
    assert output.raw == "result: 200.0"
    assert SEEN == [("get_order", "c-9")]


async def test_without_a_session_the_variable_is_gone(shop: Codemode) -> None:
    """The control: without a session the second program fails with NameError."""
    with shop.with_context(customer="c-9"):
        output = await make_two_step_crew(shop.as_crewai_tool()).kickoff_async()
    assert output.raw == "NameError"
