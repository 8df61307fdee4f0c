"""Approvals: a call that needs the application's decision pauses the execution; resume()
re-runs it with replay, across a restart of the application with the SQLite journal."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from codemode import (
    Codemode,
    ComponentRegistry,
    ExecutionNotPausedError,
    ExecutionPausedError,
    tool,
)
from codemode.config import ClientConfig
from codemode.core.approvals import PendingCall
from codemode.core.context import RuntimeContext

CALLS: collections.Counter[str] = collections.Counter()


@tool
def balance(account: str) -> int:
    """The balance of ``account``, in cents."""
    CALLS[f"balance:{account}"] += 1
    return 10_000


@tool(requires_approval=True)
def transfer(account: str, cents: int) -> str:
    """Move ``cents`` out of ``account``."""
    CALLS[f"transfer:{account}:{cents}"] += 1
    return f"sent {cents}"


PROGRAM = (
    "b = tools.balance(account='acme')\n"
    "try:\n"
    "    sent = tools.transfer(account='acme', cents=b // 2)\n"
    "except PermissionError as e:\n"
    "    sent = 'refused: ' + str(e)\n"
    "result = [b, sent]\n"
)


def app(config: ClientConfig) -> Codemode:
    registry = ComponentRegistry()
    registry.register_tool("balance", balance)
    registry.register_tool("transfer", transfer)
    return Codemode.from_client_config(config, registry)


@pytest.fixture(autouse=True)
def _fresh_counts() -> None:
    CALLS.clear()


async def test_a_call_needing_approval_pauses_and_resumes_approved(
    make_config: Callable[..., ClientConfig],
) -> None:
    async with app(make_config()) as codemode:
        paused = await codemode.run_async(PROGRAM)
        assert not paused.success
        assert paused.error_type == "Paused"
        assert paused.paused is not None
        call = paused.paused.call
        assert (call.tool, call.kwargs) == ("transfer", {"account": "acme", "cents": 5000})
        assert [e.tool for e in paused.paused.journal] == ["balance"]
        assert CALLS == {"balance:acme": 1}  # the transfer was not made
        done = await codemode.resume(paused.correlation_id, approve=True)
    assert done.success, done
    assert done.value == [10_000, "sent 5000"]
    assert done.replayed_tool_calls == 1
    assert CALLS == {"balance:acme": 1, "transfer:acme:5000": 1}


async def test_a_refused_call_raises_permission_error_in_the_program(
    make_config: Callable[..., ClientConfig],
) -> None:
    async with app(make_config()) as codemode:
        paused = await codemode.run_async(PROGRAM)
        done = await codemode.resume(paused.correlation_id, approve=False)
    assert done.value[0] == 10_000
    assert done.value[1].startswith("refused: the application refused tools.transfer(")
    assert "transfer:acme:5000" not in CALLS


async def test_execute_async_raises_a_typed_pause(
    make_config: Callable[..., ClientConfig],
) -> None:
    async with app(make_config()) as codemode:
        with pytest.raises(ExecutionPausedError) as info:
            await codemode.execute_async(PROGRAM)
        assert info.value.result.paused is not None
        assert await codemode.resume(info.value.result.correlation_id, approve=False)


async def test_resume_after_a_restart_with_the_sqlite_journal(
    make_config: Callable[..., ClientConfig], tmp_path: Path
) -> None:
    """The application stops while paused; a new one, same journal file, resumes it."""
    journal = tmp_path / "journal.db"
    async with app(make_config(journal_path=journal)) as first:
        paused = await first.run_async(PROGRAM, context={"user": "ann"})
    async with app(make_config(journal_path=journal)) as second:
        done = await second.resume(paused.correlation_id, approve=True)
        with pytest.raises(ExecutionNotPausedError):
            await second.resume(paused.correlation_id, approve=True)
    assert done.value == [10_000, "sent 5000"]
    assert CALLS == {"balance:acme": 1, "transfer:acme:5000": 1}


async def test_two_resumes_at_once_only_one_proceeds(
    make_config: Callable[..., ClientConfig],
) -> None:
    async with app(make_config()) as codemode:
        paused = await codemode.run_async(PROGRAM)
        outcomes = await asyncio.gather(
            codemode.resume(paused.correlation_id, approve=True),
            codemode.resume(paused.correlation_id, approve=True),
            return_exceptions=True,
        )
    refused = [o for o in outcomes if isinstance(o, ExecutionNotPausedError)]
    done = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(refused) == 1
    assert len(done) == 1
    assert CALLS["transfer:acme:5000"] == 1


async def test_unknown_and_expired_ids_are_refused(
    make_config: Callable[..., ClientConfig],
) -> None:
    async with app(make_config()) as codemode:
        with pytest.raises(ExecutionNotPausedError, match="unknown"):
            await codemode.resume("no-such-execution", approve=True)
    async with app(make_config(paused_ttl=0.05)) as codemode:
        paused = await codemode.run_async(PROGRAM)
        await asyncio.sleep(0.2)
        with pytest.raises(ExecutionNotPausedError, match="expired"):
            await codemode.resume(paused.correlation_id, approve=True)
    assert "transfer:acme:5000" not in CALLS


async def test_a_policy_decides_at_once_or_pauses(
    make_config: Callable[..., ClientConfig],
) -> None:
    """An async registry-wide policy: small transfers pass, big ones are refused, the
    middle ones pause; ordinary tools pass through it too."""
    seen: list[tuple[str, Any]] = []

    async def policy(call: PendingCall, context: RuntimeContext) -> bool | str:
        seen.append((call.tool, context.get("user")))
        if call.tool != "transfer":
            return True
        cents = call.kwargs["cents"]
        return True if cents < 100 else False if cents > 9000 else "pause"

    async with app(make_config()) as codemode:
        codemode.registry.approval_policy = policy
        code = (
            "out = []\n"
            "for cents in (50, 9500):\n"
            "    try:\n"
            "        out.append(tools.transfer(account='a', cents=cents))\n"
            "    except PermissionError:\n"
            "        out.append('refused')\n"
            "result = out\n"
        )
        direct = await codemode.run_async(code, context={"user": "bob"})
        paused = await codemode.run_async(PROGRAM, context={"user": "bob"})
    assert direct.value == ["sent 50", "refused"]
    assert paused.error_type == "Paused"
    assert ("balance", "bob") in seen
    assert CALLS == {"transfer:a:50": 1, "balance:acme": 1}


async def test_a_program_looping_on_a_paused_tool_stops_after_max_pauses(
    make_config: Callable[..., ClientConfig],
) -> None:
    code = "n = 0\nwhile True:\n    tools.transfer(account='loop', cents=1)\n    n += 1\n"
    async with app(make_config(max_pauses=2)) as codemode:
        outcome = await codemode.run_async(code)
        for _ in range(2):
            assert outcome.error_type == "Paused"
            outcome = await codemode.resume(outcome.correlation_id, approve=True)
    assert not outcome.success
    assert outcome.error_type == "PermissionError"
    assert "max_pauses" in (outcome.error or "")
    assert CALLS == {"transfer:loop:1": 2}


async def test_adapters_tell_the_agent_about_the_pause(
    make_config: Callable[..., ClientConfig],
) -> None:
    async with app(make_config()) as codemode:
        langchain = await codemode.as_langchain_tool().ainvoke({"code": PROGRAM})
        crewai = await codemode.as_crewai_tool()._arun(code=PROGRAM)
    for text in (langchain, crewai):
        assert text.startswith("paused: tools.transfer(account='acme', cents=5000) needs the ")
        assert "Do not retry" in text
