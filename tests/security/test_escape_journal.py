"""Escape attempts through the journal, approvals and budgets: what the client decides for the
application, a program tries to get around.

A program cannot see the journal, the approval gate or the budget meter: they live in the
application. These attacks try to make a call the application did not allow (a pause flooded
with parallel calls, forged frames through the guest's relay), to spend past a budget with
calls in parallel, to poison a replay through ``codemode.step``, and to smuggle SQL into the
SQLite journal. The suite's ``contained`` fixture checks afterwards that nothing of the attack
runs, the host is unchanged and the service still serves.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from codemode import Codemode, ToolBudget, tool
from codemode.config import ClientConfig
from codemode.core.journal import binding_of
from tests.helpers import ServerProcess
from tests.security.conftest import APP_CONTEXT, App

pytestmark = pytest.mark.security

MADE: collections.Counter[str] = collections.Counter()


@tool(requires_approval=True)
def wire_money(to: str, cents: int) -> str:
    """Send money: every call needs the application's approval."""
    MADE[f"wire:{to}:{cents}"] += 1
    return "sent"


@tool
def note(text: str) -> str:
    """Keep a note."""
    MADE[f"note:{text}"] += 1
    return text


@pytest.fixture(autouse=True)
def _tools(app: App) -> None:
    MADE.clear()
    app.codemode.registry.register_tool("wire_money", wire_money, overwrite=True)
    app.codemode.registry.register_tool("note", note, overwrite=True)


async def test_a_flood_of_calls_needing_approval_makes_none(app: App) -> None:
    """Fifty parallel calls of a tool needing approval, and the same through forged frames of
    the guest's own relay: the execution pauses at the first, and none is made."""
    code = (
        "import asyncio\n"
        "relay = codemode._relay\n"
        "calls = [tools.wire_money.run_async(to='mallory', cents=i) for i in range(50)]\n"
        "await asyncio.gather(*calls, return_exceptions=True)\n"
        "relay.call('wire_money', (), {'to': 'mallory', 'cents': 1})\n"
        "result = 'done'\n"
    )
    outcome = await app.codemode.run_async(
        code, available_tools=["wire_money"], context=APP_CONTEXT
    )
    assert outcome.error_type == "Paused", outcome
    assert not MADE, MADE
    refused = await app.codemode.resume(outcome.correlation_id, approve=False)
    assert refused.error_type == "Paused"  # the next call pauses again: none went through
    assert not MADE


async def test_parallel_calls_cannot_spend_past_the_budget(app: App) -> None:
    code = (
        "import asyncio\n"
        "got = await asyncio.gather(*[tools.note.run_async(text=str(i)) for i in range(100)],\n"
        "                           return_exceptions=True)\n"
        "result = sum(1 for g in got if not isinstance(g, Exception))\n"
    )
    outcome = await app.codemode.run_async(
        code, available_tools=["note"], budget=ToolBudget(max_calls=5), context=APP_CONTEXT
    )
    assert outcome.value == 5
    assert sum(MADE.values()) == 5
    assert outcome.budget_exceeded == "max_calls"


async def test_a_step_cannot_answer_for_a_tool(
    app: App, sec_server: ServerProcess, tmp_path: Path
) -> None:
    """``codemode.step`` records the program's own value under its own name: a forged step
    named like a tool, or a journal entry's position taken by a step, never stands in for the
    application's tool on replay."""
    code = (
        "codemode._relay.call('_codemode_step', ('note', 'forged'), {})\n"
        "result = tools.note(text='real')\n"
    )
    config = ClientConfig(
        executor_url=sec_server.url,
        executor_api_key=sec_server.api_key,
        journal_path=tmp_path / "journal.db",
    )
    async with Codemode.from_client_config(config, app.codemode.registry) as codemode:
        outcome = await codemode.run_async(code, available_tools=["note"], context=APP_CONTEXT)
    assert outcome.value == "real"
    assert MADE == {"note:real": 1}


async def test_sql_in_arguments_is_data_in_the_sqlite_journal(
    app: App, sec_server: ServerProcess, tmp_path: Path
) -> None:
    """Arguments built to break out of an SQL string are stored and replayed as data."""
    url, key = sec_server.url, sec_server.api_key
    journal = tmp_path / "journal.db"
    nasty = "x'); DROP TABLE entries; --\0\u202e"
    code = f"result = [tools.note(text={nasty!r}), tools.wire_money(to='a', cents=1)]"
    config = ClientConfig(executor_url=url, executor_api_key=key, journal_path=journal)
    async with Codemode.from_client_config(config, app.codemode.registry) as codemode:
        paused = await codemode.run_async(code, context=APP_CONTEXT)
        assert paused.error_type == "Paused"
        stored = codemode.client.journals.open(
            paused.correlation_id, binding_of(code, sorted(app.codemode.registry.tools()))
        )
        assert [e.tool for e in stored] == ["note"]
        done = await codemode.resume(paused.correlation_id, approve=True)
    assert done.value == [nasty, "sent"]
    assert {f"note:{nasty}": 1, "wire:a:1": 1} == MADE
