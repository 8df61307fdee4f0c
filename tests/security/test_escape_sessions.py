"""Escape attempts through sessions: a sandbox kept between executions.

A session keeps its guest, and so its processes, files and memory, from one execution to the
next. These attacks try to reach another session's state, to outlive the session's end, and to
grow past the session's limits one execution at a time. The suite's ``contained`` fixture
checks afterwards that nothing of the attack runs any more, the host is unchanged and the
service still serves.
"""

from __future__ import annotations

import asyncio
import secrets

import pytest

from codemode import SessionLostError
from tests.helpers import marked_anywhere, marked_program, wait_gone, wait_until
from tests.security.conftest import APP_CONTEXT, App, Host
from tests.security.test_escape import MEMORY, no_leak, program, report

pytestmark = pytest.mark.security


async def test_another_sessions_variables_files_and_processes(app: App, host: Host) -> None:
    """From one session, nothing of another open session is visible or reachable."""
    secret = f"session-secret-{secrets.token_hex(8)}"
    async with app.codemode.session() as victim, app.codemode.session() as attacker:
        await victim.execute_async(
            f"secret = {secret!r}\n"
            f"open('/tmp/secret', 'w').write(secret)\n"
            f"open('/output/secret', 'w').write(secret)\n"
            "import subprocess, sys\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "result = child.pid\n",
            context=APP_CONTEXT,
        )
        code = program(
            """
            import gc
            found = {"globals": [k for k in globals() if k == "secret"]}
            found["objects"] = [o for o in gc.get_objects() if isinstance(o, str)
                                and o.startswith("session-" + "secret-")]
            found["tmp"] = attempt(read, "/tmp/secret")
            found["output"] = attempt(read, "/output/secret")
            found["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
            found["environ"] = {p: attempt(read, f"/proc/{p}/environ") for p in found["pids"]}
            found["signal"] = attempt(os.kill, P["victim_pid"], 0)
            result = found
            """,
            victim_pid=int(await victim.execute_async("result = child.pid") or 0),
        )
        outcome = await attacker.run_async(code, context=APP_CONTEXT)
        seen = report(outcome)
        no_leak(outcome, host, secret)
        assert seen["globals"] == []
        assert seen["objects"] == []
        assert seen["tmp"][0] == "err"
        assert seen["output"][0] == "err"
        assert len(seen["pids"]) <= 3, f"the attacker sees processes not its own: {seen['pids']}"
        assert seen["signal"][0] == "err"  # no process of that pid in its namespace
        # The victim is untouched by all of it.
        assert await victim.execute_async("result = [secret, child.poll()]") == (
            f'["{secret}",null]'
        )


async def test_no_process_outlives_its_session(app: App) -> None:
    """A daemon started in a session (new session id, SIGTERM and SIGHUP ignored, double fork)
    is gone once the session is closed."""
    tag = f"daemon-{secrets.token_hex(4)}"
    spawn = marked_program(
        tag,
        then=(
            "import os, signal\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "    signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
            "    if os.fork() == 0:\n"
            "        subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', "
            f"'{tag}-grandchild'])\n"
            "        time.sleep(60)\n"
            "    os._exit(0)\n"
            "result = 'started'"
        ),
    )
    session = await app.codemode.client.open_session()
    assert await session.execute_async(spawn, context=APP_CONTEXT) == '"started"'
    running = await asyncio.to_thread(
        wait_until, lambda: [p for p in marked_anywhere() if tag in p.cmdline], 5.0
    )
    assert running, "the marked daemon was not seen running"
    await session.close_async()
    left = await asyncio.to_thread(wait_gone, running, 5.0)
    assert not left, f"processes outlived their session: {[p.describe() for p in left]}"


async def test_memory_grown_across_executions_is_bounded(app: App) -> None:
    """Memory kept from execution to execution counts against the session's one limit."""
    async with app.codemode.session() as session:
        step = MEMORY // 4
        outcome = None
        for _ in range(8):
            outcome = await session.run_async(
                f"kept = globals().setdefault('kept', [])\nkept.append(bytearray({step}))\n"
                "result = len(kept)",
                context=APP_CONTEXT,
            )
            if not outcome.success:
                break
        assert outcome is not None
        assert not outcome.success, "the session grew past its limit"
        assert outcome.error_type in ("MemoryLimit", "MemoryError"), outcome
        if outcome.error_type == "MemoryLimit":
            assert outcome.session_alive is False
            with pytest.raises(SessionLostError):
                await session.execute_async("result = 1")
