"""smolagents: a real ``CodeAgent`` whose steps run in a Codemode session, with a scripted model."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from smolagents import CodeAgent, tool
from smolagents.memory import ActionStep
from smolagents.models import ChatMessage, MessageRole, Model
from smolagents.utils import AgentExecutionError

from codemode import Codemode, SessionClosedError
from codemode.config import ClientConfig
from codemode.core.executor_client import run_sync
from codemode.integrations.smolagents import CodemodeExecutor, CodeStepError, codemode_agent

#: Every tool call, as the application saw it: the tools run here, not in the sandbox.
CALLS: list[tuple[str, Any]] = []


@tool
def get_weather(city: str) -> dict:  # type: ignore[type-arg]  # smolagents reads the bare type
    """Current weather in a city.

    Args:
        city: The city's name.
    """
    CALLS.append(("get_weather", city))
    return {"city": city, "temp_c": 21}


@tool
def to_fahrenheit(celsius: float) -> float:
    """Convert a temperature from Celsius to Fahrenheit.

    Args:
        celsius: Degrees Celsius.
    """
    CALLS.append(("to_fahrenheit", celsius))
    return celsius * 9 / 5 + 32


class ScriptedModel(Model):  # type: ignore[misc]  # smolagents ships no types
    """Answers each call with the next scripted reply and keeps the messages it was given."""

    def __init__(self, replies: list[str]) -> None:
        super().__init__(model_id="scripted")
        self.replies = list(replies)
        self.seen: list[str] = []

    def generate(self, messages: list[Any], **kwargs: Any) -> ChatMessage:
        self.seen.append("\n".join(_text(m) for m in messages))
        return ChatMessage(role=MessageRole.ASSISTANT, content=self.replies.pop(0))


def _text(message: Any) -> str:
    content = message.content if hasattr(message, "content") else message["content"]
    if isinstance(content, list):
        return "\n".join(str(part.get("text", "")) for part in content)
    return str(content or "")


def step(code: str) -> str:
    return f"Thought: next.\n<code>\n{code}\n</code>"


STEPS = [
    # 1: one tool; what it prints and its last expression go to the model.
    'weather = get_weather(city="Paris")\nprint("temp is", weather["temp_c"])\nweather["temp_c"]',
    # 2: a program error (a wrong key): an error step, and the agent carries on.
    'print("converting")\nf = to_fahrenheit(celsius=weather["temp"])',
    # 3: the other tool, on the first one's output kept in the session since step 1.
    'f = to_fahrenheit(celsius=weather["temp_c"])\nprint(f"{f:.1f}{unit}")',
    # 4: the final answer, from variables of steps 1 and 3 and one the application sent.
    "final_answer(f\"{weather['city']}: {f:.1f}{unit}\")",
]


@pytest.fixture
def app(make_config: Callable[..., ClientConfig]) -> Iterator[Codemode]:
    """A Codemode on the test executor; the tool-call log starts empty."""
    codemode = Codemode.from_client_config(make_config())
    CALLS.clear()
    yield codemode
    codemode.close()


def open_sessions(codemode: Codemode) -> int:
    count: int = run_sync(codemode.client.info_async())["open_sessions"]
    return count


def test_code_agent_runs_its_steps_in_one_session(app: Codemode) -> None:
    """Four steps share one sandbox; tools run here; errors, logs and answer reach smolagents."""
    model = ScriptedModel([step(code) for code in STEPS])
    agent = codemode_agent(app, tools=[get_weather, to_fahrenheit], model=model, max_steps=6)
    executor = agent.python_executor
    assert isinstance(executor, CodemodeExecutor)

    answer = agent.run("Weather in Paris, in Fahrenheit?", additional_args={"unit": "F"})

    assert answer == "Paris: 69.8F"
    assert CALLS == [("get_weather", "Paris"), ("to_fahrenheit", 21.0)]
    steps = [s for s in agent.memory.steps if isinstance(s, ActionStep)]
    assert len(steps) == 4
    assert [s.error is not None for s in steps] == [False, True, False, False]
    assert steps[0].observations.startswith("Execution logs:\ntemp is 21\n")
    assert steps[0].action_output == 21
    assert isinstance(steps[1].error, AgentExecutionError)
    assert "KeyError: 'temp'" in str(steps[1].error)
    assert "converting" in str(steps[1].error)  # its printed lines come with the error
    assert "69.8F" in steps[2].observations
    assert steps[3].is_final_answer
    assert steps[3].action_output == "Paris: 69.8F"
    # The model saw the first step's logs and output, then the second step's traceback.
    assert "temp is 21" in model.seen[1]
    assert "Last output from code snippet:\n21" in model.seen[1]
    assert "KeyError" in model.seen[2]
    assert 'weather["temp"]' in model.seen[2]

    session = executor.session
    assert session is not None
    assert session.alive
    before = open_sessions(app)
    agent.cleanup()
    assert session.closed
    assert executor.session is None
    with pytest.raises(SessionClosedError):
        executor("1")
    deadline = time.monotonic() + 10
    while open_sessions(app) >= before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_sessions(app) < before


def test_code_agent_accepts_the_executor_directly(app: Codemode) -> None:
    """``CodeAgent(executor=codemode.as_smolagents_executor())`` works too, and ``with`` closes
    the session."""
    model = ScriptedModel([step('final_answer(get_weather("Oslo")["temp_c"] * 2)')])
    executor = app.as_smolagents_executor()
    with CodeAgent(tools=[get_weather], model=model, executor=executor) as agent:
        assert isinstance(executor, CodemodeExecutor)
        assert agent.run("Twice Oslo's temperature?") == 42
        session = executor.session
    assert CALLS == [("get_weather", "Oslo")]
    assert session is not None
    assert session.closed


@pytest.fixture
def executor(app: Codemode) -> Iterator[CodemodeExecutor]:
    """An executor with the two tools and the final-answer tool, cleaned up after the test."""
    from smolagents.default_tools import FinalAnswerTool

    instance = CodemodeExecutor(app, execution_timeout=10)
    instance.send_tools(
        {
            "get_weather": get_weather,
            "to_fahrenheit": to_fahrenheit,
            "final_answer": FinalAnswerTool(),
        }
    )
    yield instance
    instance.cleanup()


def test_step_output_follows_the_last_expression(executor: CodemodeExecutor) -> None:
    """The output is the last expression's value, None after a statement, a repr when not JSON."""
    assert executor("x = 2\nx * 3").output == 6
    assert executor("y = x").output is None
    assert executor("if x:\n    z = 1\n{1, 2}").output == "{1, 2}"
    assert executor("a = 1; a + x").output == 3
    out = executor("print('hi')\nresult = 5")
    assert (out.output, out.logs, out.is_final_answer) == (None, "hi\n", False)
    assert executor("result + 1").output == 6  # the program's own `result` is kept
    assert executor("to_fahrenheit(100)").output == 212.0  # positional arguments work too
    final = executor("final_answer({'ok': True})\nprint('never')")
    assert (final.output, final.is_final_answer, final.logs) == ({"ok": True}, True, "")


def test_tool_errors_reach_the_program_as_exceptions(executor: CodemodeExecutor) -> None:
    """A bad argument is a TypeError in the sandbox; an uncaught one fails the step."""
    caught = executor(
        "try:\n    get_weather(town='x')\nexcept TypeError as e:\n    msg = str(e)\nmsg"
    )
    assert "unexpected keyword argument 'town'" in caught.output
    with pytest.raises(CodeStepError) as info:
        executor("to_fahrenheit(celsius='hot')")
    assert info.value.error_type == "TypeError"
    assert "celsius" in str(info.value)
    assert "Traceback" in str(info.value)
    assert CALLS == []


def test_a_step_that_ends_the_sandbox_is_followed_by_a_fresh_one(app: Codemode) -> None:
    """A step past its time kills the sandbox; the next step runs in a new one, tools resent."""
    executor = CodemodeExecutor(app, execution_timeout=1.5)
    try:
        executor.send_tools({"get_weather": get_weather})
        executor.send_variables({"unit": "C"})
        executor("kept = 1")
        with pytest.raises(CodeStepError, match="fresh one") as info:
            executor("import time\ntime.sleep(30)")
        assert info.value.error_type == "Timeout"
        with pytest.raises(CodeStepError, match="NameError"):
            executor("kept")
        assert executor("get_weather(city='Rome')['temp_c'], unit").output == [21, "C"]
    finally:
        executor.cleanup()


def test_bad_input_is_refused_with_clear_errors(app: Codemode) -> None:
    """Non-JSON variables, reserved names, non-tools and wrong arguments raise typed errors."""
    with pytest.raises(TypeError, match="codemode must be a Codemode"):
        CodemodeExecutor("not a codemode")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="execution_timeout"):
        CodemodeExecutor(app, execution_timeout=0)
    executor = CodemodeExecutor(app)
    try:
        with pytest.raises(TypeError, match=r"variable 'when'.*JSON-serialisable"):
            executor.send_variables({"when": object()})
        with pytest.raises(ValueError, match="reserved"):
            executor.send_variables({"tools": 1})
        with pytest.raises(TypeError, match="not a smolagents Tool"):
            executor.send_tools({"thing": object()})
        with pytest.raises(TypeError, match="code must be a str"):
            executor(b"1")  # type: ignore[arg-type]
        agent = CodeAgent(tools=[], model=ScriptedModel([]), executor=executor)
        with pytest.raises(TypeError, match="variable 'blob'"):
            agent.run("task", additional_args={"blob": object()})
    finally:
        executor.cleanup()
    assert executor.session is None


async def test_blocking_from_inside_a_running_loop_works(app: Codemode) -> None:
    """smolagents is sync; run from a thread of an async application, a step still completes."""
    executor = CodemodeExecutor(app)
    try:
        executor.send_tools({"get_weather": get_weather})
        out = await asyncio.to_thread(executor, "get_weather(city='Lima')['city']")
        assert out.output == "Lima"
        assert executor("get_weather(city='Kyiv')['city']").output == "Kyiv"  # on the loop too
    finally:
        executor.cleanup()


def test_missing_smolagents_names_the_extra() -> None:
    """Without smolagents the adapter's import fails with one message naming the extra."""
    program = (
        "import sys\n"
        "sys.modules['smolagents'] = None\n"
        "try:\n"
        "    import codemode.integrations.smolagents\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'codemode[smolagents]'" in out.stdout


def test_application_tools_stay_in_the_application_registry(app: Codemode) -> None:
    """The agent's tools go to the executor's own registry; the app's tools are callable too."""
    from codemode import tool as codemode_tool

    @codemode_tool
    def stock(sku: str) -> int:
        """Units of ``sku`` in stock."""
        CALLS.append(("stock", sku))
        return 7

    app.registry.register_tool("stock", stock)
    executor = CodemodeExecutor(app)
    try:
        executor.send_tools({"get_weather": get_weather})
        assert executor("tools.stock(sku='A') + get_weather(city='Rome')['temp_c']").output == 28
    finally:
        executor.cleanup()
    assert app.registry.get_component_names() == ["stock"]
    assert executor.registry.get_component_names() == ["get_weather", "stock"]
    assert CALLS == [("stock", "A"), ("get_weather", "Rome")]
