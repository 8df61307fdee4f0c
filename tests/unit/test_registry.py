"""ComponentRegistry, RuntimeContext and tool dispatch (no server)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from codemode import Codemode
from codemode.config import ClientConfig
from codemode.core import (
    ComponentAlreadyExistsError,
    ComponentNotFoundError,
    ComponentRegistry,
    RuntimeContext,
)
from codemode.core.registry import _is_tool_async, call_tool


class SyncTool:
    def run(self, x: int = 0) -> dict[str, Any]:
        return {"x": x, "thread": threading.get_ident()}


class AsyncTool:
    async def run_async(self, x: int = 0) -> dict[str, Any]:
        return {"x": x, "thread": threading.get_ident()}

    def run(self, x: int = 0) -> dict[str, Any]:
        raise AssertionError("run() used although run_async() exists")


class ContextTool:
    def run_with_context(self, context: RuntimeContext, x: int = 0) -> list[Any]:
        return [context.get("user"), context.correlation_id, x]

    def run(self, x: int = 0) -> None:
        raise AssertionError("run() used although run_with_context() exists")


def test_register_get_and_list() -> None:
    """Registered tools can be fetched, tested for and listed sorted."""
    registry = ComponentRegistry()
    tool_b, tool_a = SyncTool(), AsyncTool()
    registry.register_tool("beta", tool_b)
    registry.register_tool("alpha", tool_a)
    assert registry.get_tool("beta") is tool_b
    assert registry.has_tool("alpha")
    assert not registry.has_tool("gamma")
    assert registry.get_component_names() == ["alpha", "beta"]
    assert dict(registry.tools()) == {"alpha": tool_a, "beta": tool_b}


def test_duplicate_name_is_refused_unless_overwrite() -> None:
    """Registering a taken name raises ComponentAlreadyExistsError; overwrite=True replaces it."""
    registry = ComponentRegistry()
    registry.register_tool("t", SyncTool())
    with pytest.raises(ComponentAlreadyExistsError, match="'t' is already registered"):
        registry.register_tool("t", SyncTool())
    replacement = SyncTool()
    registry.register_tool("t", replacement, overwrite=True)
    assert registry.get_tool("t") is replacement


def test_unknown_tool_lists_registered_ones() -> None:
    """get_tool of an unknown name raises ComponentNotFoundError (a KeyError) naming what exists."""
    registry = ComponentRegistry()
    registry.register_tool("weather", SyncTool())
    with pytest.raises(KeyError) as info:
        registry.get_tool("database")
    assert isinstance(info.value, ComponentNotFoundError)
    assert str(info.value) == "tool 'database' is not registered; registered tools: weather"


def test_unregister() -> None:
    """unregister_tool removes a tool, and raises ComponentNotFoundError for an unknown one."""
    registry = ComponentRegistry()
    registry.register_tool("t", SyncTool())
    registry.unregister_tool("t")
    assert not registry.has_tool("t")
    with pytest.raises(ComponentNotFoundError):
        registry.unregister_tool("t")


@pytest.mark.parametrize(
    ("name", "tool", "error", "message"),
    [
        ("not-an-identifier", SyncTool(), ValueError, "must be a Python identifier"),
        ("nothing", object(), TypeError, "needs .*run, run_async or run_with_context"),
        ("fake_async", type("T", (), {"run_async": lambda self: 1})(), TypeError, "async def"),
    ],
    ids=["name", "no-method", "sync-run_async"],
)
def test_unusable_tools_are_refused(
    name: str, tool: object, error: type[Exception], message: str
) -> None:
    """A bad name or a tool without a usable method is refused at registration, with the reason."""
    with pytest.raises(error, match=message):
        ComponentRegistry().register_tool(name, tool)


def test_is_tool_async() -> None:
    """_is_tool_async is true only for a coroutine run_async."""
    assert _is_tool_async(AsyncTool())
    assert not _is_tool_async(SyncTool())
    assert not _is_tool_async(ContextTool())


async def test_sync_run_goes_to_a_worker_thread() -> None:
    """A tool's sync run() is called off the event loop's thread."""
    value = await call_tool(SyncTool(), [3], {}, RuntimeContext())
    assert value["x"] == 3
    assert value["thread"] != threading.get_ident()


async def test_run_async_is_awaited_on_the_loop() -> None:
    """A tool with run_async() is awaited on the loop's own thread, never run()."""
    value = await call_tool(AsyncTool(), [], {"x": 4}, RuntimeContext())
    assert value == {"x": 4, "thread": threading.get_ident()}


async def test_run_with_context_receives_the_context() -> None:
    """run_with_context() is preferred and gets the request's context and correlation id."""
    context = RuntimeContext(variables={"user": "u1"}).with_correlation_id("cid-9")
    assert await call_tool(ContextTool(), [], {"x": 5}, context) == ["u1", "cid-9", 5]


def test_runtime_context_is_json_and_read_only() -> None:
    """RuntimeContext refuses non-JSON values and cannot be changed once made."""
    with pytest.raises(TypeError, match="JSON-serialisable"):
        RuntimeContext(variables={"when": object()})
    context = RuntimeContext(variables={"user": "u1", "n": 2})
    with pytest.raises(TypeError):
        context.variables["user"] = "u2"  # type: ignore[index]
    assert context.to_json() == b'{"user":"u1","n":2}'
    assert context["n"] == 2
    assert "user" in context
    assert context.get("missing", "d") == "d"


def test_context_scope_restores_the_previous_context() -> None:
    """A context set in a `with` block is replaced by the previous one at its end."""
    registry = ComponentRegistry()
    registry.set_context({"user": "outer"})
    with registry.set_context({"user": "inner"}):
        assert registry.get_context()["user"] == "inner"  # type: ignore[index]
    assert registry.get_context()["user"] == "outer"  # type: ignore[index]
    registry.clear_context()
    assert registry.get_context() is None


async def test_concurrent_tasks_see_their_own_context() -> None:
    """Contexts set in concurrent tasks never leak into each other."""
    codemode = Codemode.from_client_config(ClientConfig())
    both_set = asyncio.Barrier(2)

    async def request(user: str) -> Any:
        codemode.with_context(user=user)
        await both_set.wait()
        return codemode.registry.get_context()["user"]  # type: ignore[index]

    try:
        assert await asyncio.gather(request("alice"), request("bob")) == ["alice", "bob"]
        assert codemode.registry.get_context() is None
    finally:
        codemode.close()


def test_threads_see_their_own_context() -> None:
    """Contexts set in concurrent threads never leak into each other."""
    registry = ComponentRegistry()
    barrier = threading.Barrier(2, timeout=5)
    seen: dict[str, Any] = {}

    def worker(user: str) -> None:
        registry.set_context({"user": user})
        barrier.wait()
        seen[user] = registry.get_context()["user"]  # type: ignore[index]

    threads = [threading.Thread(target=worker, args=(u,)) for u in ("alice", "bob")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {"alice": "alice", "bob": "bob"}
