"""What the model's program sees through a real executor: @tool, validation, discovery."""

from __future__ import annotations

from codemode import Codemode, RuntimeContext, tool
from codemode.tools import format_result

CALLS: list[tuple[str, object]] = []


@tool
def lookup(key: str, *, context: RuntimeContext) -> dict[str, str]:
    """Look up a key in the requesting tenant's store.

    Args:
        key: The key to read.
    """
    CALLS.append(("lookup", context["tenant"]))
    return {"key": key, "tenant": context["tenant"]}


@tool
async def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def register(codemode: Codemode) -> None:
    codemode.registry.register_tool("lookup", lookup, overwrite=True)
    codemode.registry.register_tool("add", add, overwrite=True)


async def test_decorated_tools_run_with_the_application_context(codemode: Codemode) -> None:
    """Sync and async ``@tool`` functions run, in parallel too, with the caller's context."""
    register(codemode)
    CALLS.clear()
    with codemode.with_context(tenant="acme"):
        result = await codemode.run_async(
            "import asyncio\n"
            "row = tools.lookup(key='k1')\n"
            "s, t = await asyncio.gather(\n"
            "    tools.add.run_async(a=1, b=2), tools.add.run_async(3, 4)\n"
            ")\n"
            "result = [row, s, t]"
        )
    assert result.success, result
    assert result.value == [{"key": "k1", "tenant": "acme"}, 3, 7]
    assert CALLS == [("lookup", "acme")]


async def test_bad_argument_is_a_clear_exception_in_the_program(codemode: Codemode) -> None:
    """A wrong argument type is refused before the tool runs, as a TypeError the program sees."""
    register(codemode)
    result = await codemode.run_async(
        "try:\n    tools.add(a='one', b=2)\nexcept TypeError as exc:\n    result = str(exc)\n"
    )
    assert result.success, result
    assert result.value.startswith("tools.add(): argument 'a': Input should be a valid integer")


async def test_uncaught_bad_argument_is_shaped_for_the_model(codemode: Codemode) -> None:
    """The feedback for a failed program names the error and the user's line, nothing internal."""
    register(codemode)
    result = await codemode.run_async("x = 1\nprint('before')\ntools.add(a=1)\n")
    text = format_result(result)
    assert text.startswith("error: TypeError: tools.add() missing required argument: 'b'")
    assert 'File "<codemode>", line 3' in text
    assert "/guest/" not in text
    assert "stdout:\nbefore" in text


async def test_search_and_describe_from_inside_the_sandbox(codemode: Codemode) -> None:
    """``tools.search`` and ``tools.describe`` answer from the registry and count as tool calls."""
    register(codemode)
    result = await codemode.run_async(
        "found = tools.search('add integers')\n"
        "stub = tools.describe('add')\n"
        "result = {'found': found, 'stub': stub, 'listed': sorted(tools)}"
    )
    assert result.success, result
    assert result.value["found"][0] == {"name": "add", "summary": "Add two integers."}
    assert result.value["stub"] == 'def add(a: int, b: int) -> int:\n    """Add two integers."""\n'
    assert result.value["listed"] == ["add", "lookup"]
    assert result.tool_calls == 2


async def test_discovery_sees_only_the_available_tools(codemode: Codemode) -> None:
    """With ``available_tools``, search and describe know nothing of the other tools."""
    register(codemode)
    result = await codemode.run_async(
        "try:\n"
        "    tools.describe('lookup')\n"
        "except ValueError as exc:\n"
        "    result = [tools.search('lookup'), str(exc)]\n",
        available_tools=["add"],
    )
    assert result.success, result
    assert result.value == [[], "no tool named 'lookup'; available tools: add"]
