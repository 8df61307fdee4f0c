"""The program's ``tools``: calls relayed to the application over the channel.

Standard library only, like the rest of the guest.
"""

from __future__ import annotations

import builtins
import itertools
import json
import os
import queue
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any, NoReturn

from .protocol import Channel, ProtocolError

#: Reserved tool names behind ``tools.search`` / ``tools.describe``, answered by the client.
SEARCH_TOOL = "_codemode_search"
DESCRIBE_TOOL = "_codemode_describe"
#: Reserved tool name behind ``codemode.step``, answered (and journaled) by the client.
STEP_TOOL = "_codemode_step"
_DISCOVERY = frozenset({SEARCH_TOOL, DESCRIBE_TOOL, STEP_TOOL})
JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)

# Builtin exception types a tool's error may be re-raised as inside the guest, so that
# ``except ValueError`` works around a tool call as it would around a local function.
_REMOTE_BUILTIN_ERRORS: dict[str, type[Exception]] = {
    name: obj
    for name, obj in vars(builtins).items()
    if isinstance(obj, type) and issubclass(obj, Exception)
}


class ToolError(Exception):
    """A tool failed in the application; ``error_type`` names the exception it raised there."""

    def __init__(self, tool: str, error_type: str, message: str) -> None:
        super().__init__(f"{tool}: {error_type}: {message}" if error_type else f"{tool}: {message}")
        self.tool = tool
        self.error_type = error_type


class ToolBudgetExceeded(ToolError):
    """A call past the execution's tool budget: the application did not make it."""


#: Errors of the application's making a program can catch by class (``codemode.X``).
_CODEMODE_ERRORS: dict[str, type[ToolError]] = {"ToolBudgetExceeded": ToolBudgetExceeded}


class _Waiter:
    """One outstanding call, answered from the reader thread."""

    __slots__ = ("done", "future", "header", "loop", "payload")

    def __init__(self, loop: Any = None, future: Any = None) -> None:
        self.done = threading.Event()
        self.header: dict[str, Any] = {}
        self.payload = b""
        self.loop = loop
        self.future = future


_WAIT, _READ, _NESTED, _LOOP = range(4)
#: How long a sync call waits for the reading event loop before the reader thread takes over.
_ESCALATE_AFTER_S = 0.2


class Relay:
    """Sends tool calls to the service and routes replies back to their callers.

    Sync calls block their thread; async calls await a future on their own loop. Replies are
    read by one reader at a time, which hands each to its caller, so calls from several
    threads or tasks may be in flight at once. Who reads, decided under the lock that also
    registers each call (so no reply is ever left unread):

    - while nobody reads, a sync call reads the channel itself until its reply has come;
    - while nobody reads, an async call makes its event loop the reader (``add_reader``)
      until that loop has no call in flight any more;
    - a sync call made on the thread of the reading loop (a sync tool call inside a
      coroutine), or while that loop is stopped with a call in flight, reads meanwhile, as the
      loop cannot; frames are read whole under a lock of their own, whoever reads;
    - a reader that stops while other calls wait starts the reader thread, which then reads
      for everyone until the end.

    So a program whose calls are all sync, or all async from one loop, has no thread hand-off
    per reply and no reader thread. Frames other than replies (a session's next start frame)
    are kept for :meth:`next_frame`, whoever read them.
    """

    def __init__(self, channel: Channel, tool_names: frozenset[str]) -> None:
        self._channel = channel
        self.tool_names = tool_names
        self._ids = itertools.count(1)
        self._pending: dict[str, _Waiter] = {}
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._reading_directly = False  # a sync caller is reading the channel itself
        self._loop_reader: Any = None  # the event loop reading the channel, if one does
        self._loop_calls = 0  # calls in flight from that loop
        self._closed: BaseException | None = None
        self._others: queue.SimpleQueue[tuple[dict[str, Any], bytes]] = queue.SimpleQueue()

    def _start_reader_locked(self) -> None:
        if self._reader is None:
            self._reader = threading.Thread(target=self._read_loop, daemon=True)
            self._reader.start()

    def _read_one(self, *, only_if_ready: bool = False, until: _Waiter | None = None) -> None:
        """Read one frame and hand a reply to its caller; exits if the service is gone.

        Frames are read whole under a lock of their own, whoever reads. ``only_if_ready``
        (the event loop's callback, and the reader thread once woken): return at once if
        another reader took the data between the wake-up and the lock, instead of blocking.
        ``until`` (a caller reading for its own reply): return if another reader has already
        handed that reply over.
        """
        try:
            with self._read_lock:
                if until is not None and until.done.is_set():
                    return
                if only_if_ready and not self._channel.readable():
                    return
                header, payload = self._channel.recv()
        except (EOFError, OSError, ProtocolError) as exc:
            # The service is gone: no answer will come, and nothing may run unattended.
            self._closed = exc
            os._exit(70)
        if header.get("t") != "reply":
            self._others.put((header, payload))
            return
        with self._lock:
            waiter = self._pending.pop(str(header.get("id")), None)
        if waiter is None:
            return
        waiter.header, waiter.payload = header, payload
        if waiter.future is not None:
            if waiter.loop is _running_loop():
                _resolve(waiter)  # read by its own loop
            else:
                waiter.loop.call_soon_threadsafe(_resolve, waiter)
        waiter.done.set()

    def next_frame(self) -> tuple[dict[str, Any], bytes]:
        """The next frame that is not a tool's reply (a session's next start frame)."""
        while True:
            try:
                return self._others.get_nowait()
            except queue.Empty:
                pass
            with self._lock:
                reading = self._reader is not None
            if reading:  # the reader thread reads everything now; it hands this on
                return self._others.get()
            self._read_one()

    def _read_loop(self) -> None:
        while True:
            self._channel.wait_readable()  # not holding the read lock while nothing comes
            self._read_one(only_if_ready=True)

    def _role_locked(self, loop: Any) -> int:
        """Who reads for a call just registered; ``loop`` is the async caller's, else None."""
        if self._loop_reader is not None and self._loop_reader.is_closed():
            self._loop_reader, self._loop_calls = None, 0  # closed with calls in flight
        if self._reader is not None:
            return _WAIT
        if loop is None:
            if not self._reading_directly and self._loop_reader is None:
                self._reading_directly = True
                return _READ
            if self._loop_reader is not None and (
                self._loop_reader is _running_loop() or not self._loop_reader.is_running()
            ):
                # The reading loop cannot read now: it is blocked in this very call, or it was
                # stopped with a call in flight (run_until_complete returned before it).
                return _NESTED
            return _WAIT
        if not self._reading_directly and self._loop_reader is None:
            self._loop_reader, self._loop_calls = loop, 1
            return _LOOP
        if self._loop_reader is loop:
            self._loop_calls += 1
        return _WAIT

    def _submit(
        self, tool: str, args: tuple[Any, ...], kwargs: dict[str, Any], waiter: _Waiter
    ) -> tuple[str, int]:
        """Register and send the call; (its id, who reads its reply)."""
        if tool not in self.tool_names:
            raise AttributeError(_unknown_tool_message(tool, self.tool_names))
        try:
            payload = JSON_ENCODER.encode({"args": list(args), "kwargs": kwargs}).encode()
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"arguments to tool {tool!r} must be JSON-serialisable: {exc}"
            ) from None
        call_id = str(next(self._ids))
        with self._lock:
            self._pending[call_id] = waiter
            role = self._role_locked(waiter.loop)
        self._channel.send({"t": "call", "id": call_id, "tool": tool}, payload)
        return call_id, role

    def call(self, tool: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        waiter = _Waiter()
        _, role = self._submit(tool, args, kwargs, waiter)
        if role == _WAIT:
            # Normally the reader hands the reply over at once. Should the reading loop be
            # blocked on something that waits for this very call (a thread joined inside a
            # coroutine), the reader thread takes over after a short wait.
            # (Any other reader hands over to the thread itself when it stops: one check.)
            if not waiter.done.wait(_ESCALATE_AFTER_S):
                with self._lock:
                    if self._loop_reader is not None:
                        self._start_reader_locked()
                waiter.done.wait()
        else:
            try:
                while not waiter.done.is_set():
                    self._read_one(until=waiter)
            finally:
                if role == _READ:
                    with self._lock:
                        self._reading_directly = False
                        if self._pending:  # others called meanwhile: a thread reads for them
                            self._start_reader_locked()
        return _outcome(tool, waiter.header, waiter.payload)

    async def call_async(self, tool: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        import asyncio

        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop=loop, future=loop.create_future())
        call_id, role = self._submit(tool, args, kwargs, waiter)
        if role == _LOOP:
            try:
                loop.add_reader(self._channel.fileno(), self._read_ready)
            except (NotImplementedError, RuntimeError):  # a loop without add_reader
                with self._lock:
                    self._loop_reader, self._loop_calls = None, 0
                    self._start_reader_locked()
        try:
            await waiter.future
        finally:
            self._call_ended(loop, call_id)
        return _outcome(tool, waiter.header, waiter.payload)

    def _read_ready(self) -> None:
        self._read_one(only_if_ready=True)

    def _call_ended(self, loop: Any, call_id: str) -> None:
        """On ``loop``, after one of its calls: stop reading there if it was the last one."""
        stop = False
        with self._lock:
            self._pending.pop(call_id, None)  # still there only if the call was cancelled
            if self._loop_reader is loop:
                self._loop_calls -= 1
                if self._loop_calls <= 0:
                    self._loop_reader, self._loop_calls, stop = None, 0, True
                    if self._pending:  # others wait: a thread reads for them now
                        self._start_reader_locked()
        if stop:
            loop.remove_reader(self._channel.fileno())


def _running_loop() -> Any:
    """This thread's running event loop, without importing asyncio for it."""
    asyncio = sys.modules.get("asyncio")
    return asyncio._get_running_loop() if asyncio is not None else None


def _resolve(waiter: _Waiter) -> None:
    if not waiter.future.done():
        waiter.future.set_result(None)


def _outcome(tool: str, header: Mapping[str, Any], payload: bytes) -> Any:
    if header.get("ok"):
        return json.loads(payload) if payload else None
    error_type = str(header.get("type") or "")
    message = str(header.get("message") or "")
    builtin = _REMOTE_BUILTIN_ERRORS.get(error_type)
    own = _CODEMODE_ERRORS.get(error_type, ToolError)
    try:
        error: Exception = (
            builtin(message) if builtin is not None else own(tool, error_type, message)
        )
    except TypeError:  # a builtin whose constructor wants more than a message
        error = ToolError(tool, error_type, message)
    raise error


def _unknown_tool_message(name: str, available: frozenset[str]) -> str:
    listed = ", ".join(sorted(available - _DISCOVERY)) or "(none)"
    return f"tool {name!r} is not available to this program; available tools: {listed}"


class Tool:
    """One tool as the program sees it: call it, or use ``run`` / ``run_async``."""

    __slots__ = ("_name", "_relay")

    def __init__(self, relay: Relay, name: str) -> None:
        self._relay = relay
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._relay.call(self._name, args, kwargs)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Call the tool and wait for its result."""
        return self._relay.call(self._name, args, kwargs)

    async def run_async(self, *args: Any, **kwargs: Any) -> Any:
        """Call the tool without blocking the loop; ``asyncio.gather`` runs calls in parallel."""
        return await self._relay.call_async(self._name, args, kwargs)

    def run_with_context(self, context: object = None, /, *args: Any, **kwargs: Any) -> Any:
        """Call a context-aware tool; the application supplies the context (``context`` unused)."""
        del context
        return self._relay.call(self._name, args, kwargs)

    def __repr__(self) -> str:
        return f"<tool {self._name}>"


class Tools:
    """The program's ``tools``: ``tools.name(...)`` or ``tools['name'].run(...)``.

    ``tools.search(query)`` and ``tools.describe(name)`` ask the application about its tools,
    unless the application has tools of those names, which then win.
    """

    __slots__ = ("_names", "_relay")
    _relay: Relay
    _names: frozenset[str]

    def __init__(self, relay: Relay) -> None:
        object.__setattr__(self, "_relay", relay)
        object.__setattr__(self, "_names", relay.tool_names - _DISCOVERY)

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("__") and name in self._names:
            return Tool(self._relay, name)
        if name == "search":
            return self._search
        if name == "describe":
            return self._describe
        raise AttributeError(_unknown_tool_message(name, self._relay.tool_names))

    def __getitem__(self, name: str) -> Tool:
        if name not in self._names:
            raise KeyError(_unknown_tool_message(name, self._relay.tool_names))
        return Tool(self._relay, name)

    def _discover(self, tool: str, args: tuple[Any, ...]) -> Any:
        if tool not in self._relay.tool_names:
            raise AttributeError("tool discovery is not available: this program has no tools")
        return self._relay.call(tool, args, {})

    def _search(self, query: str, limit: int = 10) -> list[dict[str, str]]:
        """Tools matching ``query``, best first: ``[{"name": ..., "summary": ...}, ...]``."""
        found: list[dict[str, str]] = self._discover(SEARCH_TOOL, (query, limit))
        return found

    def _describe(self, name: str | None = None) -> str:
        """The Python stub of tool ``name`` (of every tool when None), to read or print."""
        stub: str = self._discover(DESCRIBE_TOOL, (name,))
        return stub

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("tools is read-only")

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._names))

    def __dir__(self) -> list[str]:
        return sorted(self._names)

    def __repr__(self) -> str:
        return f"<tools: {', '.join(sorted(self._names))}>"


class Steps:
    """The program's ``codemode``: ``codemode.step(name, fn)`` records a value that changes
    between runs (``random``, ``time``), so that a re-run of the execution (after a failover,
    or an approval) gets the first run's value and calls the same tools again. It also holds
    the error classes a tool call may raise: ``codemode.ToolError``,
    ``codemode.ToolBudgetExceeded``."""

    __slots__ = ("_relay",)
    ToolError = ToolError
    ToolBudgetExceeded = ToolBudgetExceeded

    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    def step(self, name: str, fn: Any) -> Any:
        """``fn()``, or on a re-run the value it returned the first time (JSON values only)."""
        value = fn()
        if STEP_TOOL not in self._relay.tool_names:
            return value  # the application keeps no journal: nothing to record
        return self._relay.call(STEP_TOOL, (name, value), {})

    def __repr__(self) -> str:
        return "<codemode: step(name, fn)>"
