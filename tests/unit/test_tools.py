"""``@tool``, schemas, argument validation, discovery answers and feedback for the model."""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from codemode import ComponentRegistry, ExecutionResult, RuntimeContext, tool
from codemode.core.journal import STEP_TOOL
from codemode.core.registry import call_tool
from codemode.executor.guest import tools as guest
from codemode.tools import AsyncFunctionTool, FunctionTool, format_result, spec_for, truncate
from codemode.tools.discovery import DESCRIBE_TOOL, SEARCH_TOOL, answer_discovery
from codemode.tools.docstrings import parse_docstring

CTX = RuntimeContext(variables={"user_id": "u-1"})


class Point(BaseModel):
    """A point on the plane."""

    x: float
    y: float


@tool
def distance(a: Point, b: Point, scale: float = 1.0) -> float:
    """Distance between two points.

    Args:
        a: First point.
        b: Second point.
        scale: Multiplier applied to the result.
    """
    return (((a.x - b.x) ** 2 + (a.y - b.y) ** 2) ** 0.5) * scale


@tool
async def whoami(greeting: str = "hi", *, context: RuntimeContext) -> str:
    """Greets the requesting user."""
    return f"{greeting} {context['user_id']}"


def test_sync_function_becomes_a_thread_tool() -> None:
    """A plain function gets ``run`` (no ``run_async``) and stays callable as itself."""
    assert isinstance(distance, FunctionTool)
    assert not hasattr(distance, "run_async")
    assert distance(Point(x=0, y=0), Point(x=3, y=4)) == 5.0
    assert distance.name == "distance"
    assert distance.description == "Distance between two points."


def test_coroutine_function_becomes_an_async_tool() -> None:
    """A coroutine function gets ``run_async`` and no blocking ``run``."""
    assert isinstance(whoami, AsyncFunctionTool)
    assert not hasattr(whoami, "run")


def test_input_schema_comes_from_signature_and_docstring() -> None:
    """Types, defaults and argument docs land in the JSON Schema; extra keys are refused."""
    schema = distance.input_schema()
    assert schema["required"] == ["a", "b"]
    assert schema["properties"]["scale"] == {
        "default": 1.0,
        "description": "Multiplier applied to the result.",
        "title": "Scale",
        "type": "number",
    }
    assert schema["additionalProperties"] is False
    assert "Point" in schema["$defs"]
    assert distance.output_schema() == {"type": "number"}


def test_context_parameter_is_hidden_and_filled() -> None:
    """A ``RuntimeContext`` parameter is not in the schema; the application's context fills it."""
    assert "context" not in whoami.input_schema()["properties"]


async def test_call_tool_passes_the_application_context() -> None:
    """``call_tool`` hands the application's context to a ``@tool`` that asks for it."""
    assert await call_tool(whoami, [], {"greeting": "hello"}, CTX, name="whoami") == "hello u-1"


async def test_call_tool_validates_and_converts_arguments() -> None:
    """JSON objects become the declared models and numeric strings numbers, before the call."""
    value = await call_tool(
        distance, [{"x": 0, "y": 0}], {"b": {"x": 6, "y": 8}, "scale": "0.5"}, CTX, name="distance"
    )
    assert value == 5.0


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ([], {"b": {"x": 1, "y": 1}}, "tools.distance() missing required argument: 'a'"),
        ([], {"a": {"x": 1}, "b": {"x": 1, "y": 1}}, "argument 'a.y': Field required"),
        ([1, 2, 3, 4], {}, "takes 3 positional arguments but 4 were given"),
        ([], {"a": {}, "b": {}, "colour": 1}, "unexpected keyword argument 'colour'"),
        ([], {"a": {"x": 0, "y": 0}, "b": {"x": 0, "y": 0}, "scale": "big"}, "argument 'scale'"),
    ],
)
async def test_call_tool_refuses_bad_arguments(
    args: list[Any], kwargs: dict[str, Any], message: str
) -> None:
    """A bad call raises ``TypeError`` naming the tool and the argument, before the tool runs."""
    with pytest.raises(TypeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        await call_tool(distance, args, kwargs, CTX, name="distance")


async def test_call_tool_returns_models_as_json_data() -> None:
    """A tool returning a pydantic model or dataclass gives the program plain dicts."""

    @dataclass
    class Box:
        size: int

    @tool
    def make(size: int) -> dict[str, Any]:
        """Makes things."""
        return {"point": Point(x=1, y=2), "box": Box(size)}

    assert await call_tool(make, [], {"size": 3}, CTX) == {
        "point": {"x": 1.0, "y": 2.0},
        "box": {"size": 3},
    }


async def test_class_tools_are_validated_from_their_method() -> None:
    """A class tool's ``run_async`` signature gives its schema and checks its arguments."""

    class Weather:
        """Current weather."""

        async def run_async(self, city: str, days: int = 1) -> dict[str, Any]:
            return {"city": city, "days": days}

    weather = Weather()
    assert spec_for(weather).input_schema()["required"] == ["city"]
    assert await call_tool(weather, [], {"city": "Oslo", "days": "2"}, CTX) == {
        "city": "Oslo",
        "days": 2,
    }
    with pytest.raises(TypeError, match=r"tools.weather\(\) missing required argument: 'city'"):
        await call_tool(weather, [], {}, CTX, name="weather")


async def test_class_tools_with_kwargs_pass_through() -> None:
    """A class tool taking ``**kwargs`` has no fixed schema and gets its arguments unchanged."""

    class Echo:
        def run(self, **kwargs: Any) -> Any:
            return kwargs

    assert spec_for(Echo()).permissive
    assert await call_tool(Echo(), [], {"anything": [1]}, CTX) == {"anything": [1]}


def test_tool_refuses_signatures_without_a_schema() -> None:
    """``*args`` and unresolvable annotations fail at decoration, with the tool's name."""
    with pytest.raises(TypeError, match=r"'spread'.*\*args"):

        @tool
        def spread(*values: int) -> int:
            return sum(values)

    with pytest.raises(TypeError, match="'broken': cannot resolve"):

        @tool
        def broken(x: NoSuchType) -> int:  # type: ignore[name-defined]  # noqa: F821
            return 0


def test_tool_options_override_name_and_description() -> None:
    """``@tool(name=..., description=...)`` replaces the function's name and docstring summary."""

    @tool(name="lookup", description="Finds a record by key.")
    def find(key: str) -> str:
        """Internal docstring."""
        return key

    assert find.name == "lookup"
    assert find.description == "Finds a record by key."


def test_registry_wraps_plain_functions() -> None:
    """``register_tool`` accepts a plain function and makes it a ``@tool``."""
    registry = ComponentRegistry()

    def ping(n: int) -> int:
        """Echo a number."""
        return n

    registry.register_tool("ping", ping)
    assert isinstance(registry.get_tool("ping"), FunctionTool)


def test_google_and_sphinx_docstrings_are_read() -> None:
    """Both common docstring styles give a summary and per-argument docs."""
    google = parse_docstring(
        """Fetch rows.

        Longer text.

        Args:
            table: The table
                to read.
            limit (int): At most this many.

        Returns:
            The rows.
        """
    )
    assert google.summary == "Fetch rows."
    assert google.description == "Longer text."
    assert google.params == {"table": "The table to read.", "limit": "At most this many."}
    assert google.returns == "The rows."
    sphinx = parse_docstring("Fetch rows.\n\n:param table: The table.\n:returns: The rows.\n")
    assert sphinx.params == {"table": "The table."}
    assert sphinx.returns == "The rows."


def test_search_ranks_name_then_summary() -> None:
    """``tools.search`` puts name matches first and returns name and summary."""
    tools = {"distance": distance, "whoami": whoami}
    found = answer_discovery(SEARCH_TOOL, ["distance between points"], {}, tools)
    assert found[0] == {"name": "distance", "summary": "Distance between two points."}
    assert answer_discovery(SEARCH_TOOL, ["user"], {"limit": 1}, tools) == [
        {"name": "whoami", "summary": "Greets the requesting user."}
    ]
    assert answer_discovery(SEARCH_TOOL, ["zebra"], {}, tools) == []


def test_describe_gives_one_stub_or_a_clear_error() -> None:
    """``tools.describe(name)`` is that tool's stub; an unknown name lists the known ones."""
    tools = {"distance": distance, "whoami": whoami}
    stub = answer_discovery(DESCRIBE_TOOL, ["whoami"], {}, tools)
    assert stub.startswith("def whoami(greeting: str = 'hi') -> str:")
    with pytest.raises(ValueError, match="available tools: distance, whoami"):
        answer_discovery(DESCRIBE_TOOL, ["nope"], {}, tools)
    with pytest.raises(TypeError, match="query string"):
        answer_discovery(SEARCH_TOOL, [], {}, tools)


def test_discovery_names_match_the_guest_runtime() -> None:
    """The client answers the reserved names the guest runtime sends."""
    assert (SEARCH_TOOL, DESCRIBE_TOOL) == (guest.SEARCH_TOOL, guest.DESCRIBE_TOOL)
    assert STEP_TOOL == guest.STEP_TOOL


def test_format_result_success_and_truncation() -> None:
    """Success shows the result and output; long output keeps head and tail with a marker."""
    result = ExecutionResult(success=True, result='{"a":1}', stdout="x" * 100 + "\n")
    text = format_result(result, max_output_chars=30)
    head = 'result: {"a":1}\nstdout:\n' + "x" * 20
    assert text.startswith(head + "\n[... 70 characters cut ...]")
    assert text.endswith("x" * 10)
    assert truncate("short", 30) == "short"


def test_format_result_failure_shows_type_message_traceback() -> None:
    """Failure shows the error type, message and the user's traceback, not ids or timings."""
    result = ExecutionResult(
        success=False,
        error="boom",
        error_type="ValueError",
        traceback=(
            'Traceback (most recent call last):\n  File "<codemode>", line 1\nValueError: boom\n'
        ),
        stderr="warn\n",
        correlation_id="cid-secret-ish",
        output_truncated=True,
    )
    text = format_result(result)
    assert text.splitlines()[0] == "error: ValueError: boom"
    assert '  File "<codemode>", line 1' in text
    assert "stderr:\nwarn" in text
    assert "output limit" in text
    assert "cid-secret-ish" not in text


@pytest.mark.parametrize(
    ("module", "framework", "extra"),
    [
        ("codemode.integrations.crewai", "crewai", "crewai"),
        ("codemode.integrations.langchain", "langchain_core", "langchain"),
    ],
)
def test_adapter_without_its_extra_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, module: str, framework: str, extra: str
) -> None:
    """An adapter whose framework is missing raises one ImportError naming the extra."""
    monkeypatch.setitem(sys.modules, framework, None)
    monkeypatch.delitem(sys.modules, module, raising=False)
    for name in [m for m in sys.modules if m.startswith(framework + ".")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match=rf"pip install 'codemode\[{extra}\]'"):
        importlib.import_module(module)
    monkeypatch.delitem(sys.modules, module, raising=False)


def test_literal_and_optional_types_render_for_the_model() -> None:
    """Stubs write Literal, unions and containers as a reader of Python expects."""

    @tool
    def pick(mode: Literal["a", "b"], tags: list[str] | None = None) -> dict[str, int]:
        """Pick."""
        return {}

    from codemode.tools import render_stub

    assert render_stub("pick", pick).splitlines()[0] == (
        "def pick(mode: Literal['a', 'b'], tags: list[str] | None = None) -> dict[str, int]:"
    )
