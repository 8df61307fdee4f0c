"""Durable executions: the tool-call journal, replay, ``codemode.step`` and failover.

Replay is driven two ways: with a journal the test seeds (what an earlier attempt recorded),
and for real, by killing an executor under load with three on loopback (CI-sized here; the
full-size run is ``bench/failover.py``).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from codemode import Codemode, ComponentRegistry, tool
from codemode.config import ClientConfig
from codemode.core.errors import ExecutorConnectionError
from codemode.core.journal import (
    STEP_TOOL,
    JournalCorruptedError,
    JournalEntry,
    JournalMismatchError,
    ReplayDivergedError,
    SqliteJournalStore,
    binding_of,
    canonical_arguments,
)
from tests.integration.conftest import Servers

KEY = "durable-key-0123456789"
CALLS: collections.Counter[str] = collections.Counter()
#: Set once this many calls were made (the failover tests kill an executor then).
HALFWAY: dict[str, Any] = {"calls": 0, "reached": None}


@tool
async def bump(call_id: str) -> int:
    """Count one call of ``call_id``; return how many there were."""
    CALLS[call_id] += 1
    reached = HALFWAY["reached"]
    if reached is not None and sum(CALLS.values()) >= HALFWAY["calls"]:
        reached.set()
    await asyncio.sleep(0.05)
    return CALLS[call_id]


def registry() -> ComponentRegistry:
    tools = ComponentRegistry()
    tools.register_tool("bump", bump)
    return tools


THREE_CALLS = (
    "import asyncio\n"
    "n = config['n']\n"
    "a = tools.bump(call_id=f'{n}-0')\n"
    "b, c = await asyncio.gather(tools.bump.run_async(call_id=f'{n}-1'),\n"
    "                            tools.bump.run_async(call_id=f'{n}-2'))\n"
    "result = [a, b, c]\n"
)


def entry(seq: int, tool_name: str, args: list[Any], kwargs: dict[str, Any], value: Any) -> Any:
    return JournalEntry(
        seq, tool_name, canonical_arguments(args, kwargs), True, json.dumps(value).encode()
    )


# ------------------------------------------------------------------------------------------
# Replay from a journal


async def test_replay_answers_recorded_calls_without_calling_the_tools(
    make_config: Callable[..., ClientConfig], tmp_path: Path
) -> None:
    """The journal's calls are answered from it; only the call past its end runs the tool."""
    CALLS.clear()
    code = "result = [tools.bump(call_id='r-0'), tools.bump(call_id='r-1')]"
    async with Codemode.from_client_config(
        make_config(journal_path=tmp_path / "j.db"), registry()
    ) as codemode:
        store = codemode.client.journals
        store.open("replayed-1", binding_of(code, ["bump"]))
        store.append("replayed-1", entry(0, "bump", [], {"call_id": "r-0"}, 41))
        result = await codemode.client.execute_async(code, correlation_id="replayed-1")
    assert result.value == [41, 1]
    assert CALLS == {"r-1": 1}
    assert result.replayed_tool_calls == 1
    assert result.attempts == 1
    assert store.paused("replayed-1") is None
    assert store.open("replayed-1", binding_of(code, ["bump"])) == []  # discarded when done


async def test_a_call_that_does_not_match_the_journal_is_divergence(
    make_config: Callable[..., ClientConfig], tmp_path: Path
) -> None:
    """Another call where the journal has one: ReplayDivergedError naming it, no tool run."""
    CALLS.clear()
    code = "import random\nresult = tools.bump(call_id=f'x-{random.random()}')"
    async with Codemode.from_client_config(
        make_config(journal_path=tmp_path / "j.db"), registry()
    ) as codemode:
        store = codemode.client.journals
        store.open("diverged-1", binding_of(code, ["bump"]))
        store.append("diverged-1", entry(0, "bump", [], {"call_id": "x-0.5"}, 1))
        with pytest.raises(ReplayDivergedError) as info:
            await codemode.client.execute_async(code, correlation_id="diverged-1")
    assert info.value.seq == 0
    assert info.value.tool == "bump"
    assert "codemode.step" in str(info.value)
    assert "x-0.5" in str(info.value)
    assert not CALLS


async def test_a_step_is_answered_from_the_journal(
    make_config: Callable[..., ClientConfig], tmp_path: Path
) -> None:
    """``codemode.step(name, fn)``: the recorded value comes back, so the calls match again."""
    CALLS.clear()
    code = (
        "import random\n"
        "r = codemode.step('draw', random.random)\n"
        "result = [r, tools.bump(call_id=f'x-{r}')]\n"
    )
    async with Codemode.from_client_config(
        make_config(journal_path=tmp_path / "j.db"), registry()
    ) as codemode:
        fresh = await codemode.run_async(code)
        store = codemode.client.journals
        store.open("stepped-1", binding_of(code, ["bump"]))
        store.append("stepped-1", entry(0, STEP_TOOL, ["draw"], {}, 0.25))
        store.append("stepped-1", entry(1, "bump", [], {"call_id": "x-0.25"}, 7))
        replayed = await codemode.client.execute_async(code, correlation_id="stepped-1")
    assert fresh.success, fresh
    assert 0 <= fresh.value[0] < 1
    assert replayed.value == [0.25, 7]
    assert replayed.replayed_tool_calls == 2
    assert list(CALLS) == [f"x-{fresh.value[0]}"]


async def test_without_a_journal_a_step_is_its_value_and_nothing_is_kept(
    make_config: Callable[..., ClientConfig],
) -> None:
    """One executor and no journal file: nothing to replay on, so nothing is recorded, and
    ``codemode.step`` just returns what its function does."""
    async with Codemode.from_client_config(make_config(), registry()) as codemode:
        assert not codemode.client.journaling
        result = await codemode.run_async("result = codemode.step('n', lambda: 5) + 1")
    assert result.value == 6


async def test_a_journal_of_other_code_is_refused(
    make_config: Callable[..., ClientConfig], tmp_path: Path
) -> None:
    async with Codemode.from_client_config(
        make_config(journal_path=tmp_path / "j.db"), registry()
    ) as codemode:
        codemode.client.journals.open("other-1", binding_of("result = 1", ["bump"]))
        with pytest.raises(JournalMismatchError, match="another program"):
            await codemode.client.execute_async("result = 2", correlation_id="other-1")


def test_the_sqlite_journal_survives_a_restart_and_refuses_a_corrupted_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.db"
    first = SqliteJournalStore(path)
    first.open("e-1", "binding")
    first.append("e-1", entry(0, "bump", [], {"call_id": "a"}, 1))
    first.close()
    again = SqliteJournalStore(path)
    assert again.open("e-1", "binding") == [entry(0, "bump", [], {"call_id": "a"}, 1)]
    with pytest.raises(JournalMismatchError):
        again.open("e-1", "other")
    again.close()
    broken = tmp_path / "broken.db"
    broken.write_bytes(b"this is not an SQLite database" * 100)
    with pytest.raises(JournalCorruptedError, match=r"broken\.db"):
        SqliteJournalStore(broken)
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE entries")
    damaged = SqliteJournalStore(path)  # the schema is made again: the entries are gone
    assert damaged.open("e-1", "binding") == []


# ------------------------------------------------------------------------------------------
# Failover


async def run_many(codemode: Codemode, count: int, in_flight: int) -> list[Any]:
    """``count`` executions of THREE_CALLS, ``in_flight`` at a time; their results or errors."""
    gate = asyncio.Semaphore(in_flight)

    async def one(n: int) -> Any:
        async with gate:
            try:
                return await codemode.run_async(THREE_CALLS, config={"n": n})
            except Exception as exc:
                return exc

    return await asyncio.gather(*(one(n) for n in range(count)))


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
async def test_an_executor_dying_under_load_loses_nothing(servers: Servers, how: int) -> None:
    """Three executors, one killed (or stopped) halfway: every execution succeeds and every
    tool call id ran exactly once; re-run executions say how many calls were replayed."""
    CALLS.clear()
    fleet = [servers.start(api_key=KEY) for _ in range(3)]
    victim = fleet[1]
    config = ClientConfig(
        executor_url=",".join(s.url for s in fleet), executor_api_key=KEY, timeout=30
    )
    try:
        async with Codemode.from_client_config(config, registry()) as codemode:
            await codemode.run_async("result = 0")
            await asyncio.sleep(0.5)  # every address connected
            count = 60
            HALFWAY.update(calls=count * 3 // 2, reached=asyncio.Event())
            runs = asyncio.ensure_future(run_many(codemode, count, 12))
            await asyncio.wait_for(HALFWAY["reached"].wait(), 60)
            os.kill(victim.pid, how)
            outcomes = await runs
    finally:
        HALFWAY["reached"] = None
        for server in fleet:
            servers.stop(server)
    failed = [o for o in outcomes if isinstance(o, BaseException) or not o.success]
    assert not failed, failed[:3]
    assert len(CALLS) == count * 3
    assert set(CALLS.values()) == {1}, {k: v for k, v in CALLS.items() if v != 1}
    assert all(o.value == [1, 1, 1] for o in outcomes)
    moved = {o.correlation_id for o in outcomes if o.attempts > 1}
    if how == signal.SIGKILL:
        # Only executions the victim had started ran again elsewhere, and some did when it had
        # several in flight. (Its log is no exact account of what reached the client: a kill
        # can fall between a result's log line and its delivery, either way round.)
        records = victim.log_records()
        started = {r["correlation_id"] for r in records if r.get("msg") == "execution started"}
        ended = {r["correlation_id"] for r in records if r.get("msg") == "execution finished"}
        assert moved <= started
        assert moved or len(started - ended) < 2, (moved, started - ended)
    else:
        assert not moved  # a drain lets running executions finish


async def test_failover_never_keeps_the_old_behaviour(servers: Servers) -> None:
    """``failover="never"``: an execution whose executor dies raises, may_have_run=True."""
    fleet = [servers.start(api_key=KEY) for _ in range(2)]
    config = ClientConfig(
        executor_url=",".join(s.url for s in fleet),
        executor_api_key=KEY,
        failover="never",
        max_retries=0,
    )
    try:
        async with Codemode.from_client_config(config) as codemode:
            await codemode.run_async("result = 0")
            await asyncio.sleep(0.5)
            runs = [
                asyncio.ensure_future(codemode.run_async("import time\ntime.sleep(20)"))
                for _ in range(4)
            ]
            await asyncio.sleep(1.0)
            os.kill(fleet[0].pid, signal.SIGKILL)  # round robin put some of the four there
            outcomes = await asyncio.gather(*runs, return_exceptions=True)
    finally:
        for server in fleet:
            servers.stop(server)
    lost = [o for o in outcomes if isinstance(o, ExecutorConnectionError)]
    assert lost, outcomes
    assert all(o.may_have_run for o in lost)
