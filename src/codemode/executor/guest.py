"""The guest runtime: the small program that runs inside the sandbox around the user's code.

It speaks to the executor service over one inherited stream socket (the *channel*) with length
-prefixed frames, never through stdout: a frame is ``>II`` (header length, payload length), a JSON
header, then raw payload bytes (JSON values or the source code). stdout and stderr are plain
pipes that the service reads and streams; nothing printed can forge a frame.

Service to guest: ``start`` (code, tool names, config, context, limits), ``reply`` (a tool's
answer). Guest to service: ``call`` (a tool call), ``done`` (the outcome).

The module is standard-library only and is started as a script (``python -I -S guest.py FD``) or
imported by a fork server, which calls :func:`serve_one`. Its names are for the service; the
program sees only ``tools``, ``context``, ``config`` and sets ``result``.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import errno
import itertools
import json
import linecache
import os
import resource
import select
import socket
import struct
import sys
import threading
import traceback
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NoReturn

FRAME_HEADER = struct.Struct(">II")
#: Filename under which the user's code is compiled; tracebacks keep only these frames.
USER_FILENAME = "<codemode>"
#: Longest a guest waits, after sending its outcome, for the service to kill it, ms.
LINGER_MS = 5000
#: Largest header a peer may send; payloads are bounded by the limits in the start frame.
MAX_HEADER_BYTES = 1 << 20
#: A deep traceback keeps this many outermost and innermost frames.
TRACEBACK_HEAD, TRACEBACK_TAIL = 10, 20
_CO_COROUTINE = 0x80  # inspect.CO_COROUTINE, without importing inspect
#: Reserved tool names behind ``tools.search`` / ``tools.describe``, answered by the client.
SEARCH_TOOL = "_codemode_search"
DESCRIBE_TOOL = "_codemode_describe"
_DISCOVERY = frozenset({SEARCH_TOOL, DESCRIBE_TOOL})

#: The signal module's C half: setting a handler through ``signal.signal`` converts to and
#: from enums in Python, ~45 copy-on-write page faults (~130 us) the first time in a guest.
C_SIGNAL: Any = __import__("_signal")
_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)

# Limits the guest applies to itself before the user's code runs (name -> rlimit).
_RLIMITS = {
    "cpu_seconds": resource.RLIMIT_CPU,
    "memory_bytes": resource.RLIMIT_AS,
    "max_processes": resource.RLIMIT_NPROC,
    "max_file_bytes": resource.RLIMIT_FSIZE,
    "max_open_files": resource.RLIMIT_NOFILE,
}

# Builtin exception types a tool's error may be re-raised as inside the guest, so that
# ``except ValueError`` works around a tool call as it would around a local function.
_REMOTE_BUILTIN_ERRORS: dict[str, type[Exception]] = {
    name: obj
    for name, obj in vars(builtins).items()
    if isinstance(obj, type) and issubclass(obj, Exception)
}


class ProtocolError(Exception):
    """The peer sent something that is not a frame of this protocol."""


class ToolError(Exception):
    """A tool failed in the application; ``error_type`` names the exception it raised there."""

    def __init__(self, tool: str, error_type: str, message: str) -> None:
        super().__init__(f"{tool}: {error_type}: {message}" if error_type else f"{tool}: {message}")
        self.tool = tool
        self.error_type = error_type


# --------------------------------------------------------------------------------------------
# Framing (also imported by the service)


def encode_frame(header: Mapping[str, Any], payload: bytes = b"") -> bytes:
    """Serialise one frame."""
    head = json.dumps(header, separators=(",", ":")).encode()
    return FRAME_HEADER.pack(len(head), len(payload)) + head + payload


def parse_header(raw: bytes) -> dict[str, Any]:
    """Decode a frame header, raising :class:`ProtocolError` when it is not a JSON object."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"frame header is not JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("t"), str):
        raise ProtocolError("frame header must be a JSON object with a string 't'")
    return header


class Channel:
    """Blocking, thread-safe frame I/O on the inherited socket."""

    def __init__(self, fd: int, max_payload: int, prefix: bytes = b"") -> None:
        self._sock = socket.socket(fileno=fd)
        self._send_lock = threading.Lock()
        self.max_payload = max_payload
        self._prefix = prefix  # bytes already read off the socket by whoever passed it on

    def send(self, header: Mapping[str, Any], payload: bytes = b"") -> None:
        data = encode_frame(header, payload)
        with self._send_lock:
            self._sock.sendall(data)

    def _read_exactly(self, n: int) -> bytes:
        buf = bytearray(self._prefix[:n])
        self._prefix = self._prefix[n:]
        while len(buf) < n:
            chunk = self._sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise EOFError("channel closed")
            buf += chunk
        return bytes(buf)

    def fileno(self) -> int:
        return self._sock.fileno()

    def readable(self) -> bool:
        """Whether a read would not block now (data, or the peer gone)."""
        if self._prefix:
            return True
        return bool(select.select([self._sock], [], [], 0)[0])

    def wait_readable(self) -> None:
        """Block until a read would not block."""
        if not self._prefix:
            select.select([self._sock], [], [])

    def wait_closed(self) -> None:
        """Sleep until the service closes its end (it kills this process first, normally).

        Called right after the outcome is sent: exiting here instead would tear the address
        space down on the CPU the kernel just chose for the service it woke (a Unix socket
        write is a "sync" wake-up, which puts the reader on the writer's CPU), and the service
        would wait for that. Only hang-up wakes the poll: replies still in flight do not.
        """
        poller = select.poll()
        poller.register(self._sock, select.POLLRDHUP)
        with contextlib.suppress(InterruptedError, OSError):
            poller.poll(LINGER_MS)  # bounded, should the service fail to kill or close

    def recv(self) -> tuple[dict[str, Any], bytes]:
        head_len, payload_len = FRAME_HEADER.unpack(self._read_exactly(FRAME_HEADER.size))
        if head_len > MAX_HEADER_BYTES or payload_len > self.max_payload:
            raise ProtocolError("frame larger than allowed")
        header = parse_header(self._read_exactly(head_len))
        return header, self._read_exactly(payload_len)


# --------------------------------------------------------------------------------------------
# Tool calls


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
    per reply and no reader thread.
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
            payload = _JSON_ENCODER.encode({"args": list(args), "kwargs": kwargs}).encode()
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
    try:
        error: Exception = (
            builtin(message) if builtin is not None else ToolError(tool, error_type, message)
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


def _freeze(value: Any) -> Any:
    """A read-only view of decoded JSON: mappings become proxies, lists become tuples."""
    if isinstance(value, dict):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


# --------------------------------------------------------------------------------------------
# Running the program


def apply_limits(limits: Mapping[str, Any]) -> None:
    """Lower this process's rlimits (soft and hard) before untrusted code runs."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for key, which in _RLIMITS.items():
        value = int(limits.get(key) or 0)
        if value <= 0:
            continue
        soft, hard = value, value
        if which == resource.RLIMIT_CPU:
            hard = value + 1  # SIGXCPU first, SIGKILL a second later
        current_hard = resource.getrlimit(which)[1]
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(which, (soft, hard))
    # A write past RLIMIT_FSIZE then fails with EFBIG instead of killing the process.
    C_SIGNAL.signal(C_SIGNAL.SIGXFSZ, C_SIGNAL.SIG_IGN)


def _bounded_frames(tb: types.TracebackType | None) -> tuple[list[tuple[Any, int]], int]:
    """The traceback's (frame, line) pairs, keeping the first and last few of a deep one.

    A runaway recursion leaves up to a million frames: formatting all of them would cost the
    program its CPU limit and the model a wall of identical lines.
    """
    pairs = [(t.tb_frame, t.tb_lineno) for t in _walk_tb(tb)]
    if len(pairs) <= TRACEBACK_HEAD + TRACEBACK_TAIL:
        return pairs, 0
    return pairs[:TRACEBACK_HEAD] + pairs[-TRACEBACK_TAIL:], len(
        pairs
    ) - TRACEBACK_HEAD - TRACEBACK_TAIL


def _walk_tb(tb: types.TracebackType | None) -> Iterator[types.TracebackType]:
    while tb is not None:
        yield tb
        tb = tb.tb_next


def user_traceback(exc: BaseException) -> str:
    """Format ``exc`` keeping only frames of the user's code (and what they called)."""
    pairs, cut = _bounded_frames(exc.__traceback__)
    frames = traceback.StackSummary.extract(iter(pairs), lookup_lines=True)
    first_user = next((i for i, f in enumerate(frames) if f.filename == USER_FILENAME), None)
    # The runtime's own frames (tool forwarders, the relay) are not the user's business.
    kept = (
        [f for f in frames[first_user:] if f.filename != __file__] if first_user is not None else []
    )
    lines = ["Traceback (most recent call last):\n"] if kept else []
    formatted = traceback.format_list(kept)
    if cut:
        at = max(0, min(len(formatted), TRACEBACK_HEAD - (first_user or 0)))
        formatted.insert(at, f"  [... {cut} frames omitted ...]\n")
    lines += formatted
    lines += traceback.format_exception_only(type(exc), exc)
    return "".join(lines)


def limit_error_type(exc: BaseException) -> str | None:
    """The limit an uncaught exception reports, judged by its type and errno, or None.

    In the sandbox a refused fork surfaces as ``BlockingIOError`` (EAGAIN) and a refused thread
    as the ``RuntimeError`` that ``threading`` raises from ``Thread.start``; a refused mapping
    as ``OSError`` ENOMEM.
    """
    if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM):
        return "MemoryLimit"
    if isinstance(exc, BlockingIOError) and exc.errno == errno.EAGAIN:
        return "ProcessLimit"
    if type(exc) is RuntimeError and exc.__traceback__ is not None:
        last = list(_walk_tb(exc.__traceback__))[-1].tb_frame.f_code
        if last.co_name == "start" and last.co_filename.endswith("threading.py"):
            return "ProcessLimit"
    return None


def _error_frame(exc: BaseException) -> dict[str, Any]:
    error_type = "ToolError" if isinstance(exc, ToolError) else type(exc).__name__
    error_type = limit_error_type(exc) or error_type
    return {
        "t": "done",
        "ok": False,
        "type": error_type,
        "message": str(exc) if not isinstance(exc, SyntaxError) else exc.msg,
        "traceback": user_traceback(exc),
        "line": getattr(exc, "lineno", None) if isinstance(exc, SyntaxError) else None,
    }


def run_program(
    code: str,
    namespace: dict[str, Any],
    *,
    on_compiled: Callable[[], None] | None = None,
) -> Any:
    """Compile and run ``code`` in ``namespace``, awaiting it when it uses top-level ``await``."""
    linecache.cache[USER_FILENAME] = (len(code), None, code.splitlines(True), USER_FILENAME)
    compiled = compile(code, USER_FILENAME, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    if on_compiled is not None:
        on_compiled()
    if compiled.co_flags & _CO_COROUTINE:
        # The program awaits at top level: only then is asyncio imported.
        import asyncio

        coro = eval(compiled, namespace)  # noqa: S307 - a coroutine of the program, not an expression
        return asyncio.run(coro)
    exec(compiled, namespace)  # noqa: S102 - running the program is this module's purpose
    return None


def _encode_result(namespace: Mapping[str, Any], max_bytes: int) -> tuple[dict[str, Any], bytes]:
    if "result" not in namespace:
        return {"t": "done", "ok": True}, b""
    value = namespace["result"]
    try:
        payload = _JSON_ENCODER.encode(value).encode()
    except (TypeError, ValueError) as exc:
        return {
            "t": "done",
            "ok": False,
            "type": "ResultNotSerializable",
            "message": f"result must be JSON-serialisable, got {type(value).__name__}: {exc}",
            "traceback": "",
        }, b""
    if max_bytes and len(payload) > max_bytes:
        return {
            "t": "done",
            "ok": False,
            "type": "ResultTooLarge",
            "message": f"result is {len(payload)} bytes encoded; the limit is {max_bytes}",
            "traceback": "",
        }, b""
    return {"t": "done", "ok": True}, payload


def _namespace(header: Mapping[str, Any], channel: Channel | None) -> dict[str, Any]:
    """The program's globals: ``tools``, ``context`` and ``config`` of its start frame."""
    relay = Relay(channel, frozenset(header.get("tools") or ()))  # type: ignore[arg-type]
    return {
        "__name__": "__main__",
        "__builtins__": builtins,
        "tools": Tools(relay),
        "context": _freeze(header.get("context") or {}),
        "config": _freeze(header.get("config") or {}),
    }


def _run(code: str, namespace: dict[str, Any], max_result: int) -> tuple[dict[str, Any], bytes]:
    """Run the program; the done frame (header, payload) that reports its outcome."""
    try:
        run_program(code, namespace)
    except SystemExit as exc:
        # sys.exit() ends the program normally; a non-zero code is an error.
        if exc.code not in (None, 0):
            return _error_frame(exc), b""
        return _encode_result(namespace, max_result)
    except BaseException as exc:
        return _error_frame(exc), b""
    return _encode_result(namespace, max_result)


#: The start frame :func:`warm_up` parses: like the ones that follow.
_WARM_UP_HEADER = {"t": "start", "tools": ["t"], "config": {"k": 1}, "context": {"k": [1]}}


def warm_up() -> None:
    """Take a request's first-run costs before the guest reports ready.

    A guest is forked from the fork server's zygote: the first run of each code path writes
    to pages shared copy-on-write with the zygote (reference counts, caches, the allocator's
    arenas). This parses a start frame, builds a program's namespace and encodes a result,
    as a request does, while the guest waits in the pool: a request then takes ~100 fewer
    page faults. Compiling and running a dummy program as well would save ~40 more, but cost
    more CPU than they save (measured: 3-9% fewer executions/s at 16 in flight). Nothing of
    it stays: the namespace is thrown away.
    """
    frame = encode_frame(_WARM_UP_HEADER, b"result = 1")
    head_len, _ = FRAME_HEADER.unpack_from(frame)
    header = parse_header(frame[FRAME_HEADER.size : FRAME_HEADER.size + head_len])
    namespace = _namespace(header, None)
    namespace["result"] = {"n": 1, "s": "x"}
    encode_frame(*_encode_result(namespace, 0))


def prime(rounds: int = 64) -> None:
    """Run a request's pure-Python path in the zygote until CPython has specialised it.

    CPython 3.11 quickens a function after a few calls and then specialises its instructions,
    writing to the code object each time until it settles. In a forked guest every such write
    copies a page it shares with the zygote; made here first, they are made once, for all
    guests. Measured (sequential ``2 + 2``, page faults of the zygote and its guests per
    execution): ~600 without, ~560 with. Only fixed dummy requests run here; the program cache
    entry they leave is removed.
    """
    for _ in range(rounds):
        warm_up()
        encode_frame(*_run("result = sum(range(10))", _namespace(_WARM_UP_HEADER, None), 0))
    linecache.cache.pop(USER_FILENAME, None)


def serve_one(channel_fd: int, prefix: bytes = b"") -> int:
    """Run one execution on ``channel_fd``: read the start frame, run, report, return.

    ``prefix``: the first bytes of the channel, when the caller has already read them.
    """
    # The start frame carries the code; its size is bounded by the service before sending.
    channel = Channel(channel_fd, max_payload=64 << 20, prefix=prefix)
    header, payload = channel.recv()
    if header["t"] != "start":
        raise ProtocolError("first frame must be start")
    limits: dict[str, Any] = header.get("limits") or {}
    max_result = int(limits.get("max_result_bytes") or 0)
    channel.max_payload = max_result or (64 << 20)
    namespace = _namespace(header, channel)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    apply_limits(limits)
    done = _run(payload.decode("utf-8"), namespace, max_result)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    channel.send(*done)
    channel.wait_closed()
    return 0


def receive_fds(control_fd: int) -> int:
    """Wait on ``control_fd`` for (channel, stdout, stderr) from the service; return the channel.

    A pre-started guest gets its descriptors this way (one ``SCM_RIGHTS`` message); stdout and
    stderr become fds 1 and 2.
    """
    with socket.socket(fileno=control_fd) as control:
        _, fds, _, _ = socket.recv_fds(control, 16, 3)
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise EOFError("the service sent no descriptors")
    channel, out, err = fds
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.close(out)
    os.close(err)
    return channel


def main(argv: list[str]) -> NoReturn:
    """Entry point as a script: ``guest.py CHANNEL_FD`` or ``guest.py --fds-from CONTROL_FD``."""
    try:
        serve_one(receive_fds(int(argv[2])) if argv[1] == "--fds-from" else int(argv[1]))
    except (EOFError, ProtocolError, OSError):
        os._exit(70)
    # Skip interpreter teardown: threads may still wait on the channel, and the service
    # kills the process tree when the outcome has arrived anyway.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
