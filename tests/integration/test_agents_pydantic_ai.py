"""Pydantic AI: ``run_python`` in a real ``Agent`` driven by ``FunctionModel``, on a real executor.

The model is scripted; everything else is real: the agent's tool machinery, the executor, the
sandbox, and the agent's own tools, which the program calls and which run in this process.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic_ai import Agent, FunctionToolset, RunContext, Tool
from pydantic_ai.exceptions import ModelRetry
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.models.test import TestModel
from pydantic_ai.toolsets import ExternalToolset

from codemode import Codemode, ComponentAlreadyExistsError, ExecutorConnectionError
from codemode.config import ClientConfig
from codemode.integrations.pydantic_ai import (
    CodemodeToolset,
    register_agent_tools,
)

SEEN: list[tuple[str, str]] = []


@dataclass
class Deps:
    """What the agent's run carries: the warehouse the request is for."""

    warehouse: str


async def stock(ctx: RunContext[Deps], sku: str) -> int:
    """Units of ``sku`` in the run's warehouse.

    Args:
        sku: The product code.
    """
    SEEN.append(("stock", ctx.deps.warehouse))
    return {"X": 3, "Y": 4}[sku]


def price(sku: str) -> float:
    """Unit price of ``sku``."""
    SEEN.append(("price", sku))
    return 9.5


PROGRAM = (
    "import asyncio\n"
    "a, b = await asyncio.gather(tools.stock.run_async(sku='X'), tools.price.run_async(sku='Y'))\n"
    "print('fetched')\n"
    "result = {'units': a, 'price': b, 'user': context['user']}\n"
)
EXPECTED = 'result: {"units":3,"price":9.5,"user":"u-1"}\nstdout:\nfetched'


def returns(messages: list[ModelMessage]) -> list[str]:
    """The text of every tool return the model was sent, in order."""
    return [
        str(part.content)
        for message in messages
        if isinstance(message, ModelRequest)
        for part in message.parts
        if isinstance(part, ToolReturnPart)
    ]


def scripted(*programs: str) -> FunctionModel:
    """A model that runs ``programs`` one per step, then answers with the last tool return."""

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        step = sum(isinstance(m, ModelResponse) for m in messages)
        if step < len(programs):
            return ModelResponse(
                parts=[
                    ToolCallPart("run_python", {"code": programs[step]}, tool_call_id=f"c{step}")
                ]
            )
        return ModelResponse(parts=[TextPart(f"answer: {returns(messages)[-1]}")])

    return FunctionModel(respond)


@pytest.fixture
def thread_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop for this thread, closed afterwards: ``run_sync`` uses the thread's loop
    (making one if there is none) and leaves it open. Request it before ``warehouse``, so
    that the Codemode closes its connection on this loop before the loop closes."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    asyncio.set_event_loop(None)
    loop.close()


def run_sync_on_own_loop(agent: Agent[Deps, str], prompt: str, deps: Deps) -> Any:
    """``agent.run_sync`` in this (worker) thread, on a loop closed afterwards."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return agent.run_sync(prompt, deps=deps)
    finally:
        asyncio.set_event_loop(None)
        loop.close()


@pytest.fixture
def warehouse(make_config: Callable[..., ClientConfig]) -> Iterator[Codemode]:
    """A Codemode on the test executor; the agent's tools are registered by each toolset."""
    codemode = Codemode.from_client_config(make_config())
    SEEN.clear()
    yield codemode
    codemode.close()


def agent_for(toolset: CodemodeToolset, model: FunctionModel | TestModel) -> Agent[Deps, str]:
    return Agent(model, deps_type=Deps, toolsets=[toolset])


async def test_the_model_sees_one_tool_carrying_the_stubs(warehouse: Codemode) -> None:
    """The model is offered only ``run_python(code)``, described with the agent tools' stubs."""
    offered: list[Any] = []

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        offered.extend(info.function_tools)
        return ModelResponse(parts=[TextPart("ok")])

    toolset = warehouse.as_pydantic_ai_toolset(
        tools=[stock, Tool(price, description="Price of one.")]
    )
    await agent_for(toolset, FunctionModel(respond)).run("hi", deps=Deps("north"))
    [definition] = offered
    assert definition.name == "run_python"
    assert definition.parameters_json_schema["required"] == ["code"]
    assert list(definition.parameters_json_schema["properties"]) == ["code"]
    # The RunContext parameter is the application's, not the program's: not in the stub.
    assert "def stock(sku: str) -> int:" in definition.description
    assert "The product code." in definition.description
    assert "def price(sku: str) -> float:" in definition.description
    assert "Price of one." in definition.description
    assert warehouse.registry.get_component_names() == ["price", "stock"]


async def test_agent_program_gathers_two_agent_tools(warehouse: Codemode) -> None:
    """The program awaits two of the agent's tools at once; they run here, and the model
    gets the result and the program's output, then answers with them."""
    agent = agent_for(CodemodeToolset(warehouse, tools=[stock, price]), scripted(PROGRAM))
    with warehouse.with_context(user="u-1"):
        run = await agent.run("How many X, and the price of Y?", deps=Deps("north"))
    assert returns(run.all_messages()) == [EXPECTED]
    assert run.output == f"answer: {EXPECTED}"
    assert sorted(SEEN) == [("price", "Y"), ("stock", "north")]


async def test_failed_program_is_text_for_the_model_and_the_agent_goes_on(
    warehouse: Codemode,
) -> None:
    """A program that raises gives the model its error and traceback; the next step runs."""
    failing = "def f(sku):\n    return tools.stock(sku=sku) / 0\n\nresult = f('X')\n"
    agent = agent_for(
        CodemodeToolset(warehouse, tools=[stock]),
        scripted(failing, "result = tools.stock(sku='Y')"),
    )
    with warehouse.with_context(user="u-1"):
        run = await agent.run("Try", deps=Deps("south"))
    first, second = returns(run.all_messages())
    assert first.startswith("error: ZeroDivisionError: division by zero")
    assert "Traceback" in first
    assert "line 2, in f" in first
    assert second == "result: 4"
    assert run.output == "answer: result: 4"
    assert SEEN == [("stock", "south"), ("stock", "south")]


async def test_a_tool_error_reaches_the_program_as_an_exception(warehouse: Codemode) -> None:
    """An agent tool raising (an unknown sku) is raised in the program, which can catch it."""
    program = "try:\n    tools.stock(sku='nope')\nexcept KeyError as exc:\n    result = 'caught'\n"
    agent = agent_for(CodemodeToolset(warehouse, tools=[stock]), scripted(program))
    run = await agent.run("Try", deps=Deps("west"))
    assert returns(run.all_messages()) == ['result: "caught"']


async def test_session_steps_share_variables(warehouse: Codemode) -> None:
    """With a session, the second ``run_python`` sees what the first one defined."""
    steps = (
        "total = tools.stock(sku='X') + tools.stock(sku='Y')\nresult = total",
        "result = total * 2",
    )
    async with warehouse.session() as session:
        toolset = CodemodeToolset(warehouse, tools=[stock], session=session)
        run = await agent_for(toolset, scripted(*steps)).run("Total, doubled?", deps=Deps("east"))
    assert returns(run.all_messages()) == ["result: 7", "result: 14"]
    assert run.output == "answer: result: 14"


async def test_without_a_session_the_second_step_fails(warehouse: Codemode) -> None:
    """The control: without a session the second program has no ``total``."""
    steps = ("total = 7\nresult = total", "result = total * 2")
    run = await agent_for(CodemodeToolset(warehouse), scripted(*steps)).run("x", deps=Deps("e"))
    first, second = returns(run.all_messages())
    assert first == "result: 7"
    assert "NameError" in second


async def test_sync_run_in_a_thread_uses_the_session_on_its_loop(warehouse: Codemode) -> None:
    """``run_sync`` from another thread runs on the session's loop, and its RunContext still
    reaches the agent's tools."""
    steps = ("n = tools.stock(sku='X')\nresult = n", "result = n + tools.stock(sku='Y')")
    async with warehouse.session() as session:
        agent = agent_for(
            CodemodeToolset(warehouse, tools=[stock], session=session), scripted(*steps)
        )
        run = await asyncio.to_thread(run_sync_on_own_loop, agent, "Total?", Deps("far"))
    assert returns(run.all_messages()) == ["result: 3", "result: 7"]
    assert SEEN == [("stock", "far"), ("stock", "far")]


async def slow() -> str:
    """Takes its time."""
    await asyncio.sleep(5)
    return "late"


def known_sku(ctx: RunContext[Deps], sku: str) -> None:
    if sku not in ("X", "Y"):
        raise ModelRetry(f"unknown sku {sku!r} in {ctx.deps.warehouse}")


async def test_tool_options_apply_inside_programs(warehouse: Codemode) -> None:
    """A Tool's ``args_validator`` and ``timeout`` hold when a program calls it, and
    FunctionToolsets in the list stand for their tools."""
    program = (
        "out = []\n"
        "for call in (lambda: tools.price(sku='Z'), tools.slow):\n"
        "    try:\n"
        "        call()\n"
        "    except Exception as exc:\n"
        "        out.append(f'{type(exc).__name__}: {exc}')\n"
        "result = out + [tools.price(sku='X')]\n"
    )
    tools = [
        Tool(price, args_validator=known_sku),
        FunctionToolset([Tool(slow, timeout=0.2)]),
    ]
    run = await agent_for(CodemodeToolset(warehouse, tools=tools), scripted(program)).run(
        "x", deps=Deps("north")
    )
    [answer] = returns(run.all_messages())
    assert answer.startswith("result: [")
    refused, timed_out, fine = json.loads(answer.removeprefix("result: "))
    assert refused == "ToolError: price: ModelRetry: unknown sku 'Z' in north"
    assert timed_out.startswith("TimeoutError: tool 'slow'")
    assert fine == 9.5
    assert SEEN == [("price", "X")]


def test_sync_run(thread_loop: asyncio.AbstractEventLoop, warehouse: Codemode) -> None:
    """``agent.run_sync`` works from plain sync code, with a FunctionToolset's tools."""
    toolset = FunctionToolset([stock, price])
    agent = agent_for(
        CodemodeToolset(warehouse, tools=toolset, context={"user": "u-1"}), scripted(PROGRAM)
    )
    run = agent.run_sync("How many?", deps=Deps("sync"))
    assert run.output == f"answer: {EXPECTED}"
    assert sorted(SEEN) == [("price", "Y"), ("stock", "sync")]


async def test_test_model_calls_run_python(warehouse: Codemode) -> None:
    """Pydantic AI's TestModel, which calls every tool with generated arguments, gets an answer."""
    agent = agent_for(CodemodeToolset(warehouse), TestModel(call_tools=["run_python"]))
    run = await agent.run("Go", deps=Deps("t"))
    [answer] = returns(run.all_messages())
    # TestModel's code is whatever string it makes up: whatever it does, text comes back.
    assert answer.startswith(("result: ", "error: "))
    assert "run_python" in run.output


async def test_bad_arguments_from_the_model_are_sent_back_for_a_retry(warehouse: Codemode) -> None:
    """A call without ``code`` never reaches the executor: the model is asked to retry."""

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        step = sum(isinstance(m, ModelResponse) for m in messages)
        args = [{"source": "result = 1"}, {"code": "result = 1"}]
        if step < 2:
            return ModelResponse(
                parts=[ToolCallPart("run_python", args[step], tool_call_id=f"c{step}")]
            )
        return ModelResponse(parts=[TextPart("done")])

    run = await agent_for(CodemodeToolset(warehouse), FunctionModel(respond)).run(
        "x", deps=Deps("r")
    )
    retried, ran = returns(run.all_messages())
    assert "code" in retried
    assert "source" in retried
    assert ran == "result: 1"


async def test_run_context_tool_outside_run_python_fails_in_the_program(
    warehouse: Codemode,
) -> None:
    """A RunContext tool called by a program that no agent started raises a clear error there."""
    CodemodeToolset(warehouse, tools=[stock])
    result = await warehouse.run_async("result = tools.stock(sku='X')")
    assert not result.success
    assert result.error_type == "RuntimeError"
    assert "RunContext" in (result.error or "")
    assert SEEN == []


async def test_unreachable_executor_raises_from_the_run() -> None:
    """An executor that does not answer is the application's problem: the run raises."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = ClientConfig(
        executor_url=f"http://127.0.0.1:{port}",
        executor_api_key="some-key-123",
        connect_timeout=0.5,
        max_retries=0,
    )
    async with Codemode.from_client_config(config) as codemode:
        agent = agent_for(CodemodeToolset(codemode), scripted("result = 1"))
        with pytest.raises(ExecutorConnectionError):
            await agent.run("x", deps=Deps("n"))


def needs_approval(sku: str) -> str:
    """Delete ``sku``."""
    return sku


def star_args(*skus: str) -> int:
    """Count."""
    return len(skus)


@pytest.mark.parametrize(
    ("tools", "error", "message"),
    [
        ([42], TypeError, "got int"),
        (stock, TypeError, "put it in a list"),
        ([ExternalToolset([])], TypeError, "known only during a run"),
        ([Tool(needs_approval, requires_approval=True)], ValueError, "requires approval"),
        ([star_args], TypeError, r"\*args"),
        ([Tool(price, name="not-an-identifier")], ValueError, "identifier"),
    ],
)
def test_unusable_tools_are_refused(
    warehouse: Codemode, tools: Any, error: type[Exception], message: str
) -> None:
    """Each kind of tool that cannot be called from a program is refused with a typed error."""
    with pytest.raises(error, match=message):
        CodemodeToolset(warehouse, tools=tools)
    assert not warehouse.registry.has_tool("needs_approval")


def test_name_taken_by_another_tool_is_refused_and_the_same_one_is_not(warehouse: Codemode) -> None:
    """Registering the same function twice is fine; a different one under a taken name is not."""
    CodemodeToolset(warehouse, tools=[price])
    CodemodeToolset(warehouse, tools=[price])  # a toolset per request: the same tool again

    def other(sku: str) -> float:
        return 1.0

    with pytest.raises(ComponentAlreadyExistsError, match="price"):
        CodemodeToolset(warehouse, tools=[stock, Tool(other, name="price")])
    # Nothing of a refused list is registered, not even the tools before the clash.
    assert warehouse.registry.get_component_names() == ["price"]
    with pytest.raises(ComponentAlreadyExistsError, match="twice"):
        register_agent_tools(warehouse, [Tool(other, name="twice"), Tool(price, name="twice")])


def test_import_error_names_the_extra() -> None:
    """Without Pydantic AI, importing the adapter says which extra to install."""
    code = (
        "import sys\n"
        "sys.modules['pydantic_ai'] = None\n"
        "try:\n"
        "    import codemode.integrations.pydantic_ai\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'codemode[pydantic-ai]'" in out.stdout
