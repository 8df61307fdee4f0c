"""Sessions: one sandbox kept between executions, against real ``codemode serve`` processes.

The shared ``server`` runs the usual tests; the ones about the service's own session settings
(idle timeout, ``max_sessions``) and about losing the executor start servers of their own.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from codemode import (
    Codemode,
    ExecutorOverloadedError,
    Session,
    SessionClosedError,
    SessionExpiredError,
    SessionLostError,
)
from codemode.config import ClientConfig
from tests.helpers import ServerProcess, marked_program, wait_gone, wait_until
from tests.integration.conftest import Servers

SANDBOXED = os.environ.get("CODEMODE_TEST_ISOLATION", "auto") != "process"


def _config(server: ServerProcess, **overrides: object) -> ClientConfig:
    values: dict[str, object] = {"executor_url": server.url, "executor_api_key": server.api_key}
    values.update(overrides)
    return ClientConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
async def tooled(make_config: Callable[..., ClientConfig]) -> AsyncIterator[Codemode]:
    """A Codemode with one tool that records its calls."""
    async with Codemode.from_client_config(make_config()) as codemode:
        calls: list[int] = []

        def add(a: int, b: int) -> int:
            calls.append(a + b)
            return a + b

        codemode.registry.register_tool("add", add)
        codemode.calls = calls  # type: ignore[attr-defined]
        yield codemode


async def test_state_survives_between_executions(tooled: Codemode) -> None:
    """Variables, imports, functions and tool results carry over; ``result`` does not."""
    async with tooled.session(ttl=60) as s:
        assert s.session_id
        assert s.ttl == 60
        assert await s.execute_async("import json\nx = tools.add(a=1, b=2)\nresult = x") == "3"
        assert await s.execute_async("def double(v):\n    return 2 * v\nx = double(x)") is None
        assert await s.execute_async("x += 1\nresult = json.dumps({'x': x})") == '"{\\"x\\": 7}"'
        assert await s.execute_async("result = [x, tools.add(a=x, b=1)]") == "[7,8]"
    assert tooled.calls == [3, 8]  # type: ignore[attr-defined]


@pytest.mark.skipif(not SANDBOXED, reason="process isolation has no /input, /output or /tmp")
async def test_files_survive_and_inputs_accumulate(tooled: Codemode) -> None:
    """Files in /tmp, /output and /input stay; a new input of the same name replaces the old."""
    async with tooled.session() as s:
        first = await s.run_async(
            "open('/tmp/note', 'w').write('kept')\n"
            "open('/output/a.txt', 'w').write(open('/input/in.txt').read())\n",
            files={"in.txt": b"one"},
        )
        assert first.success, first.error
        assert first.session_alive
        assert first.files == {"a.txt": b"one"}
        second = await s.run_async(
            "import os\n"
            "result = [open('/tmp/note').read(), open('/input/in.txt').read(),\n"
            "          sorted(os.listdir('/input'))]\n",
            files={"in.txt": b"two", "more.txt": b"x"},
        )
        assert second.value == ["kept", "two", ["in.txt", "more.txt"]]
        assert second.files == {"a.txt": b"one"}  # /output is kept too


async def test_sessions_are_isolated_from_each_other(tooled: Codemode) -> None:
    """Two sessions open at once share nothing: not variables, not files, not processes."""
    async with tooled.session() as one, tooled.session() as two:
        await one.execute_async("secret = 'one'\nimport os\nmine = os.getpid()")
        assert await two.execute_async("result = 'secret' in globals()") == "false"
        if SANDBOXED:
            await one.execute_async("open('/tmp/only-one', 'w').write('x')")
            assert (
                await two.execute_async("import os\nresult = os.path.exists('/tmp/only-one')")
                == "false"
            )


async def test_reset_gives_a_fresh_sandbox(tooled: Codemode) -> None:
    """After reset() the variables are gone and the session works on."""
    async with tooled.session() as s:
        await s.execute_async("x = 41")
        first_id = s.session_id
        await s.reset()
        assert s.session_id != first_id
        assert await s.execute_async("result = 'x' in globals()") == "false"
        assert await s.execute_async("x = 1\nresult = x + 1") == "2"


async def test_program_error_keeps_the_session(tooled: Codemode) -> None:
    """An exception in the program fails that execution only; the state stays."""
    async with tooled.session() as s:
        await s.execute_async("x = 5")
        failed = await s.run_async("x = 6\nraise ValueError('nope')")
        assert failed.error_type == "ValueError"
        assert failed.session_alive
        assert await s.execute_async("result = x") == "6"


async def test_timeout_ends_the_session_and_says_so(tooled: Codemode) -> None:
    """A limit hit kills the sandbox: the result says so, later calls raise, reset() recovers."""
    async with tooled.session() as s:
        await s.execute_async("x = 1")
        timed_out = await s.run_async("import time\ntime.sleep(30)", execution_timeout=0.5)
        assert timed_out.error_type == "Timeout"
        assert timed_out.session_alive is False
        assert not s.alive
        with pytest.raises(SessionLostError, match="Timeout"):
            await s.execute_async("result = x")
        await s.reset()
        assert await s.execute_async("result = 'x' in globals()") == "false"


async def test_closed_session_refuses_and_its_processes_are_gone(
    tooled: Codemode, server: ServerProcess
) -> None:
    """close() kills the sandbox with everything it started; using it then raises."""
    s = await tooled.client.open_session()
    await s.execute_async(marked_program("session-close", then="result = 1"))
    tree = await asyncio.to_thread(wait_until, lambda: server.marked_tree("session-close"), 5.0)
    assert tree, "the session's marked process was not seen running"
    await s.close_async()
    assert not await asyncio.to_thread(wait_gone, tree, 5.0)
    with pytest.raises(SessionClosedError):
        await s.execute_async("result = 1")
    with pytest.raises(SessionClosedError):
        await s.reset()


async def test_ttl_passed_raises_expired(tooled: Codemode) -> None:
    """A session used after its TTL raises SessionExpiredError, without running anything."""
    async with tooled.session(ttl=0.5) as s:
        await s.execute_async("x = 1")
        await asyncio.sleep(0.7)
        with pytest.raises(SessionExpiredError, match="TTL"):
            await s.execute_async("result = x")


async def test_cancelled_execution_ends_the_session(tooled: Codemode) -> None:
    """Cancelling a session's execution kills its sandbox; the session says it is lost."""
    async with tooled.session() as s:
        task = asyncio.create_task(s.execute_async("import time\ntime.sleep(30)"))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(SessionLostError, match="cancelled"):
            await s.execute_async("result = 1")


def _session_server(servers: Servers, tmp_path: Path, **settings: object) -> ServerProcess:
    config = tmp_path / "executor.yaml"
    config.write_text("".join(f"{k}: {v}\n" for k, v in settings.items()))
    return servers.start(api_key=secrets.token_urlsafe(16), extra_args=["--config", str(config)])


async def test_idle_timeout_and_max_sessions(servers: Servers, tmp_path: Path) -> None:
    """The executor ends an idle session, and refuses sessions beyond max_sessions."""
    server = _session_server(servers, tmp_path, session_idle_timeout=1, max_sessions=2)
    config = _config(server, max_retries=0)
    async with Codemode.from_client_config(config) as codemode:
        one = await codemode.client.open_session()
        two = await codemode.client.open_session()
        with pytest.raises(ExecutorOverloadedError, match="max_sessions"):
            await codemode.client.open_session()
        info = await codemode.client.info_async()
        assert (info["max_sessions"], info["open_sessions"]) == (2, 2)
        await two.close_async()
        three = await asyncio.wait_for(_open_when_free(codemode), 5.0)
        await asyncio.sleep(1.5)  # longer than the idle timeout
        with pytest.raises(SessionExpiredError, match="without an execution"):
            await one.execute_async("result = 1")
        await three.close_async()
    servers.stop(server)


async def _open_when_free(codemode: Codemode) -> Session:
    """Open a session as soon as the executor has counted a closed one out."""
    while True:
        try:
            return await codemode.client.open_session()
        except ExecutorOverloadedError:
            await asyncio.sleep(0.05)


async def test_executor_killed_loses_the_session(servers: Servers) -> None:
    """A session whose executor dies fails with SessionLostError, never silently re-created."""
    server = servers.start(api_key=secrets.token_urlsafe(16))
    async with Codemode.from_client_config(_config(server, max_retries=0)) as codemode:
        s = await codemode.client.open_session()
        await s.execute_async("x = 1")
        os.kill(server.pid, signal.SIGKILL)
        server.proc.wait(10)
        with pytest.raises(SessionLostError) as caught:
            await s.execute_async("result = x")
        assert caught.value.cause is not None
        assert not s.alive
    assert not await asyncio.to_thread(wait_gone, server.seen, 10.0)


async def test_shutdown_ends_idle_sessions_at_once(servers: Servers) -> None:
    """SIGTERM does not wait for an idle session's TTL; the session is then lost."""
    server = servers.start(api_key=secrets.token_urlsafe(16))
    async with Codemode.from_client_config(_config(server, max_retries=0)) as codemode:
        s = await codemode.client.open_session(ttl=600)
        await s.execute_async("x = 1")
        loop = asyncio.get_running_loop()
        started = loop.time()
        code = await asyncio.to_thread(servers.stop, server)
        assert code == 0
        assert loop.time() - started < 5.0
        with pytest.raises(SessionLostError):
            await s.execute_async("result = x")


async def test_bad_session_arguments(tooled: Codemode) -> None:
    """A non-positive TTL and an unknown limit are refused before anything is opened."""
    with pytest.raises(ValueError, match="ttl"):
        tooled.session(ttl=0)
    from codemode import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="unknown limit"):
        await tooled.client.open_session(limits={"no_such_limit": 1})
    s = tooled.session()
    with pytest.raises(SessionClosedError, match="not open"):
        await s.execute_async("result = 1")


async def test_output_between_executions_does_not_stop_the_next_ones(tooled: Codemode) -> None:
    """A thread that floods stdout after its execution ended cannot mute the next execution."""
    async with tooled.session(limits={"max_output_bytes": 65536}) as s:
        await s.execute_async(
            "import sys, threading, time\n"
            "def flood():\n"
            "    time.sleep(0.2)\n"
            "    sys.stdout.write('x' * 70000)\n"
            "    sys.stdout.flush()\n"
            "threading.Thread(target=flood).start()\n"
        )
        await asyncio.sleep(0.6)
        later = await s.run_async("print('hello')\nresult = 1")
        assert later.success, later.error
        assert later.session_alive
        assert "hello" in later.stdout
