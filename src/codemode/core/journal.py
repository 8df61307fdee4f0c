"""The tool-call journal: what an execution's tools answered, so that running it again is exact.

Each tool call a program makes is recorded in call order: its sequence number, the tool, the
canonical JSON of its arguments, and its answer. Running the same code again with the journal
(*replay*) answers each call that matches the next entry from the journal, without calling the
tool, and calls tools only past its end; a call that does not match is *divergence*
(:class:`ReplayDivergedError`), and nothing more runs. That makes two things exact:

- failover: an execution whose executor died is re-run on another one, and no tool runs twice;
- approvals: a paused execution is re-run once the call is decided, up to that call.

A journal is bound to its program (a hash of the code and the declared tools): another
program's journal is refused. :class:`MemoryJournalStore` (the default) keeps journals in the
process; :class:`SqliteJournalStore` in a file, so that a restarted application can resume a
paused execution.
"""

from __future__ import annotations

import abc
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codemode.core.errors import ExecutorClientError

__all__ = [
    "STEP_TOOL",
    "JournalCorruptedError",
    "JournalEntry",
    "JournalMismatchError",
    "JournalStore",
    "MemoryJournalStore",
    "PausedRecord",
    "Recorder",
    "ReplayDivergedError",
    "SqliteJournalStore",
    "binding_of",
    "canonical_arguments",
]


class ReplayDivergedError(ExecutorClientError):
    """On replay, the program made a call that is not the journal's next one; no tool ran.

    ``seq`` is the call's position, ``tool`` and ``arguments`` what the program called,
    ``expected`` the journal's entry there. Programs diverge when they depend on values that
    change between runs (``random``, ``time``, ``uuid``): record those with
    ``codemode.step(name, fn)`` inside the program.
    """

    def __init__(
        self,
        message: str,
        *,
        seq: int,
        tool: str,
        arguments: str,
        expected: JournalEntry | None,
        correlation_id: str | None = None,
    ) -> None:
        super().__init__(message, correlation_id=correlation_id)
        self.seq = seq
        self.tool = tool
        self.arguments = arguments
        self.expected = expected


class JournalMismatchError(ExecutorClientError):
    """A journal recorded for another program (other code or other tools) was refused."""


class JournalCorruptedError(ExecutorClientError):
    """The journal store cannot be read (a damaged SQLite file); nothing was replayed."""


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One answered tool call: ``value_json`` when ``ok``, else the error's type and message."""

    seq: int
    tool: str
    arguments: str
    ok: bool
    value_json: bytes = b""
    error_type: str = ""
    error_message: str = ""


@dataclass(frozen=True, slots=True)
class PausedRecord:
    """A paused execution: what is needed to run it again, and the call waiting for a decision.

    ``request`` holds the execution's arguments as JSON (code, declared tools, config, context,
    timeout, limits); ``pending`` the call (seq, tool, arguments) awaiting approval.
    """

    execution_id: str
    binding: str
    request: dict[str, Any]
    pending: dict[str, Any]
    paused_at: float = field(default_factory=time.time)


def canonical_arguments(args: Sequence[Any], kwargs: dict[str, Any]) -> str:
    """A call's arguments as canonical JSON: sorted keys, no spaces, the same every run."""
    return json.dumps(
        {"args": list(args), "kwargs": kwargs},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        default=repr,
    )


def binding_of(code: str, tools: Sequence[str]) -> str:
    """What a journal is bound to: a hash of the code and the declared tools' names."""
    digest = hashlib.sha256(code.encode())
    digest.update(b"\0" + "\0".join(sorted(tools)).encode())
    return digest.hexdigest()


class JournalStore(abc.ABC):
    """Where journals (and paused executions) are kept. Implementations must be thread-safe:
    a sync call runs on a worker loop."""

    @abc.abstractmethod
    def open(self, execution_id: str, binding: str) -> list[JournalEntry]:
        """The journal of ``execution_id`` (created empty if new), in call order.

        Raises :class:`JournalMismatchError` when it was recorded under another binding.
        """

    @abc.abstractmethod
    def append(self, execution_id: str, entry: JournalEntry) -> None:
        """Record one answered call (its ``seq`` is unique within the execution)."""

    @abc.abstractmethod
    def discard(self, execution_id: str) -> None:
        """Forget the execution: its journal and any pause. Unknown ids are ignored."""

    @abc.abstractmethod
    def pause(self, record: PausedRecord) -> None:
        """Keep ``record`` until it is claimed by :meth:`claim` (replacing an earlier one)."""

    @abc.abstractmethod
    def claim(self, execution_id: str) -> PausedRecord | None:
        """Take the paused record, atomically: of two concurrent claims one gets it."""

    @abc.abstractmethod
    def paused(self, execution_id: str) -> PausedRecord | None:
        """The paused record, without claiming it."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the store holds open."""


class MemoryJournalStore(JournalStore):
    """Journals in this process; gone when it exits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._journals: dict[str, tuple[str, dict[int, JournalEntry]]] = {}
        self._paused: dict[str, PausedRecord] = {}

    def open(self, execution_id: str, binding: str) -> list[JournalEntry]:
        with self._lock:
            held = self._journals.setdefault(execution_id, (binding, {}))
            if held[0] != binding:
                raise JournalMismatchError(
                    f"the journal of execution {execution_id} was recorded for another program "
                    "(other code or other tools); run it as a new execution"
                )
            return [held[1][seq] for seq in sorted(held[1])]

    def append(self, execution_id: str, entry: JournalEntry) -> None:
        with self._lock:
            held = self._journals.get(execution_id)
            if held is not None:
                held[1][entry.seq] = entry

    def discard(self, execution_id: str) -> None:
        with self._lock:
            self._journals.pop(execution_id, None)
            self._paused.pop(execution_id, None)

    def pause(self, record: PausedRecord) -> None:
        with self._lock:
            self._paused[record.execution_id] = record

    def claim(self, execution_id: str) -> PausedRecord | None:
        with self._lock:
            return self._paused.pop(execution_id, None)

    def paused(self, execution_id: str) -> PausedRecord | None:
        with self._lock:
            return self._paused.get(execution_id)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS journals (
    execution_id TEXT PRIMARY KEY,
    binding TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
    execution_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    tool TEXT NOT NULL,
    arguments TEXT NOT NULL,
    ok INTEGER NOT NULL,
    value_json BLOB NOT NULL,
    error_type TEXT NOT NULL,
    error_message TEXT NOT NULL,
    PRIMARY KEY (execution_id, seq)
);
CREATE TABLE IF NOT EXISTS paused (
    execution_id TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
"""


class SqliteJournalStore(JournalStore):
    """Journals in an SQLite file (``ClientConfig.journal_path``), kept across restarts.

    Every write is its own transaction. A file that is not a readable journal raises
    :class:`JournalCorruptedError` naming it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise JournalCorruptedError(
                f"the journal file {self.path} cannot be used ({exc}); move it away to start a "
                "new one (its paused executions are then lost)"
            ) from None

    def _run(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.DatabaseError as exc:
                raise JournalCorruptedError(
                    f"the journal file {self.path} cannot be read ({exc}); move it away to "
                    "start a new one"
                ) from None

    def open(self, execution_id: str, binding: str) -> list[JournalEntry]:
        self._run(
            "INSERT OR IGNORE INTO journals (execution_id, binding) VALUES (?, ?)",
            (execution_id, binding),
        )
        found = self._run("SELECT binding FROM journals WHERE execution_id = ?", (execution_id,))
        if found and found[0][0] != binding:
            raise JournalMismatchError(
                f"the journal of execution {execution_id} was recorded for another program "
                "(other code or other tools); run it as a new execution"
            )
        rows = self._run(
            "SELECT seq, tool, arguments, ok, value_json, error_type, error_message "
            "FROM entries WHERE execution_id = ? ORDER BY seq",
            (execution_id,),
        )
        return [
            JournalEntry(seq, tool, arguments, bool(ok), bytes(value), error_type, message)
            for seq, tool, arguments, ok, value, error_type, message in rows
        ]

    def append(self, execution_id: str, entry: JournalEntry) -> None:
        self._run(
            "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                execution_id,
                entry.seq,
                entry.tool,
                entry.arguments,
                int(entry.ok),
                entry.value_json,
                entry.error_type,
                entry.error_message,
            ),
        )

    def discard(self, execution_id: str) -> None:
        for table in ("entries", "journals", "paused"):
            self._run(f"DELETE FROM {table} WHERE execution_id = ?", (execution_id,))  # noqa: S608

    def pause(self, record: PausedRecord) -> None:
        self._run(
            "INSERT OR REPLACE INTO paused (execution_id, record) VALUES (?, ?)",
            (record.execution_id, json.dumps(_record_fields(record))),
        )

    def claim(self, execution_id: str) -> PausedRecord | None:
        rows = self._run(
            "DELETE FROM paused WHERE execution_id = ? RETURNING record", (execution_id,)
        )
        return _record_from(rows[0][0]) if rows else None

    def paused(self, execution_id: str) -> PausedRecord | None:
        rows = self._run("SELECT record FROM paused WHERE execution_id = ?", (execution_id,))
        return _record_from(rows[0][0]) if rows else None

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _record_fields(record: PausedRecord) -> dict[str, Any]:
    return {
        "execution_id": record.execution_id,
        "binding": record.binding,
        "request": record.request,
        "pending": record.pending,
        "paused_at": record.paused_at,
    }


def _record_from(text: str) -> PausedRecord:
    try:
        fields = json.loads(text)
        return PausedRecord(**fields)
    except (ValueError, TypeError) as exc:
        raise JournalCorruptedError(f"a paused execution's record cannot be read: {exc}") from None


#: The reserved tool behind ``codemode.step(name, fn)`` in the program (the guest's name too).
STEP_TOOL = "_codemode_step"


class Recorder:
    """One execution's journal while it runs: replays what it holds, records what is new.

    Calls are numbered in the order the program makes them. :meth:`take` returns the
    journal's answer for a call it holds (or None for a call to make now, past its end);
    :meth:`record` keeps a new answer. :meth:`rewind` starts over for the next attempt.
    """

    def __init__(self, store: JournalStore, execution_id: str, binding: str) -> None:
        self.store = store
        self.execution_id = execution_id
        self.binding = binding
        self._lock = threading.Lock()
        self.replayed = 0
        self._load()

    def _load(self) -> None:
        self._entries = {e.seq: e for e in self.store.open(self.execution_id, self.binding)}
        self._next = 0

    def rewind(self) -> None:
        """Start the calls over: the next attempt replays everything recorded so far."""
        with self._lock:
            self._load()

    def take(self, tool: str, arguments: str) -> tuple[int, JournalEntry | None]:
        """Number this call; its recorded answer, or None when it is to be made now.

        Raises :class:`ReplayDivergedError` when the journal holds another call there.
        """
        with self._lock:
            seq = self._next
            self._next += 1
            entry = self._entries.get(seq)
            if entry is None:
                # Past the journal's end; or a call it never got the answer of (the application
                # stopped mid-call), which is made again.
                return seq, None
            if entry.tool != tool or entry.arguments != arguments:
                raise ReplayDivergedError(
                    f"replay diverged at tool call {seq + 1}: the program called "
                    f"tools.{tool}({_short(arguments)}) where the journal has "
                    f"tools.{entry.tool}({_short(entry.arguments)}); no tool ran. Values that "
                    "change between runs (random, time) must go through codemode.step()",
                    seq=seq,
                    tool=tool,
                    arguments=arguments,
                    expected=entry,
                    correlation_id=self.execution_id,
                )
            self.replayed += 1
            return seq, entry

    def record(self, entry: JournalEntry) -> None:
        """Keep a new answer (after the tool ran, before the program gets it)."""
        with self._lock:
            self._entries[entry.seq] = entry
        self.store.append(self.execution_id, entry)

    def discard(self) -> None:
        """The execution is over: forget its journal."""
        self.store.discard(self.execution_id)


def _short(arguments: str, limit: int = 120) -> str:
    try:
        decoded = json.loads(arguments)
        parts = [json.dumps(a) for a in decoded.get("args", [])]
        parts += [f"{k}={json.dumps(v)}" for k, v in decoded.get("kwargs", {}).items()]
        text = ", ".join(parts)
    except (ValueError, AttributeError):
        text = arguments
    return text if len(text) <= limit else text[: limit - 3] + "..."
