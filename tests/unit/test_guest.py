"""The guest runtime (src/codemode/executor/guest/) driven as the service drives it.

Each test starts the guest folder in a subprocess with one end of a socketpair, speaks the framed
protocol on the other end (``>II`` lengths, a JSON header, a payload), answers tool calls, and
reads the outcome; stdout and stderr are plain pipes.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from codemode.executor.sandbox.process import guest_argv

HEADER = struct.Struct(">II")


def frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return HEADER.pack(len(head), len(payload)) + head + payload


def read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("guest closed the channel")
        data += chunk
    return data


def read_frame(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    head_len, payload_len = HEADER.unpack(read_exactly(sock, HEADER.size))
    return json.loads(read_exactly(sock, head_len)), read_exactly(sock, payload_len)


@dataclass
class Run:
    """What one guest run produced."""

    done: dict[str, Any]
    payload: bytes
    calls: list[dict[str, Any]] = field(default_factory=list)
    stdout: str = ""
    stderr: str = ""
    returncode: int | None = None

    @property
    def value(self) -> Any:
        return json.loads(self.payload) if self.payload else None


def start_guest(output: int) -> tuple[socket.socket, subprocess.Popen[bytes]]:
    """A guest on a fresh channel, its output to ``output``; returns the service's end and it."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen(
        guest_argv(child.fileno()),
        pass_fds=(child.fileno(),),
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=output,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        start_new_session=True,
    )
    child.close()
    return parent, proc


def run_guest(
    code: str,
    *,
    tools: tuple[str, ...] = (),
    answer: Callable[[list[dict[str, Any]]], list[tuple[dict[str, Any], bytes]]] | None = None,
    batch: int = 1,
    context: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
) -> Run:
    """Run ``code`` in a fresh guest; tool calls are answered ``batch`` at a time by ``answer``."""
    parent, proc = start_guest(subprocess.PIPE)
    parent.settimeout(20)
    try:
        start = {
            "t": "start",
            "tools": list(tools),
            "config": config or {},
            "context": context or {},
            "limits": limits or {"max_result_bytes": 1 << 20},
        }
        parent.sendall(frame(start, code.encode()))
        calls: list[dict[str, Any]] = []
        waiting: list[dict[str, Any]] = []
        while True:
            header, payload = read_frame(parent)
            if header["t"] == "done":
                break
            assert header["t"] == "call", header
            call = {**header, "arguments": json.loads(payload)}
            calls.append(call)
            waiting.append(call)
            if len(waiting) == batch:
                assert answer is not None, f"unexpected tool call {call}"
                for reply, value in answer(waiting):
                    parent.sendall(frame(reply, value))
                waiting = []
        parent.close()  # the guest waits for this after its outcome, as for the service's kill
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        parent.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return Run(header, payload, calls, stdout.decode(), stderr.decode(), proc.returncode)


@pytest.mark.parametrize(
    ("code", "payload"),
    [
        ("result = 2 + 2", b"4"),
        (
            "result = {'a': [1, 2.5, None, True], 'b': 'é'}",
            '{"a":[1,2.5,null,true],"b":"é"}'.encode(),
        ),
        ("x = 1", b""),
        ("result = None", b"null"),
    ],
    ids=["int", "nested", "no-result", "none"],
)
def test_result_encoding(code: str, payload: bytes) -> None:
    """`result` comes back as compact JSON (an int stays an int); no result is an empty payload."""
    run = run_guest(code)
    assert run.done == {"t": "done", "ok": True}
    assert run.payload == payload


@pytest.mark.parametrize(
    ("code", "error_type", "words"),
    [
        ("result = {1, 2}", "ResultNotSerializable", "set"),
        ("result = float('nan')", "ResultNotSerializable", "float"),
        ("result = 'x' * 5000", "ResultTooLarge", "limit is 1024"),
    ],
    ids=["set", "nan", "too-large"],
)
def test_result_that_cannot_be_sent(code: str, error_type: str, words: str) -> None:
    """A result that is not JSON, or too large, is a failed outcome naming why."""
    run = run_guest(code, limits={"max_result_bytes": 1024})
    assert run.done["ok"] is False
    assert run.done["type"] == error_type
    assert words in run.done["message"]


def test_top_level_await() -> None:
    """A program may await at top level."""
    run = run_guest("import asyncio\nawait asyncio.sleep(0.01)\nresult = 'awaited'")
    assert run.done["ok"], run.done
    assert run.value == "awaited"


def test_traceback_has_only_user_lines() -> None:
    """A failing program's traceback shows the user's lines and none of the runtime's."""
    run = run_guest("x = 1\ndef f():\n    raise ValueError('boom')\nf()\n")
    done = run.done
    assert (done["ok"], done["type"], done["message"]) == (False, "ValueError", "boom")
    assert done["traceback"].splitlines() == [
        "Traceback (most recent call last):",
        '  File "<codemode>", line 4, in <module>',
        "    f()",
        '  File "<codemode>", line 3, in f',
        "    raise ValueError('boom')",
        "ValueError: boom",
    ]


def test_syntax_error_reports_the_line() -> None:
    """A syntax error is reported with its type, message and the user's line number."""
    run = run_guest("a = 1\nb = (\n")
    assert run.done["type"] == "SyntaxError"
    assert run.done["line"] == 2
    assert 'File "<codemode>", line 2' in run.done["traceback"]
    assert "/guest/" not in run.done["traceback"]


def reply_ok(value: Any) -> Callable[[list[dict[str, Any]]], list[tuple[dict[str, Any], bytes]]]:
    def answer(calls: list[dict[str, Any]]) -> list[tuple[dict[str, Any], bytes]]:
        return [
            ({"t": "reply", "id": c["id"], "ok": True}, json.dumps(value).encode()) for c in calls
        ]

    return answer


def test_tool_call_round_trip() -> None:
    """`tools.name(...)` sends a call frame with its arguments and returns the decoded reply."""
    run = run_guest(
        "result = tools.weather('Paris', units='metric')", tools=("weather",), answer=reply_ok(21)
    )
    assert run.value == 21
    assert len(run.calls) == 1
    assert run.calls[0]["tool"] == "weather"
    assert run.calls[0]["arguments"] == {"args": ["Paris"], "kwargs": {"units": "metric"}}


def test_parallel_async_tool_calls_get_their_own_answers() -> None:
    """Calls gathered with run_async are in flight together and each gets its own answer."""

    def answer_in_reverse(calls: list[dict[str, Any]]) -> list[tuple[dict[str, Any], bytes]]:
        replies = [
            (
                {"t": "reply", "id": c["id"], "ok": True},
                json.dumps(c["arguments"]["args"][0] * 10).encode(),
            )
            for c in calls
        ]
        return replies[::-1]

    run = run_guest(
        "import asyncio\n"
        "result = await asyncio.gather(tools['f'].run_async(1), tools['f'].run_async(2))",
        tools=("f",),
        answer=answer_in_reverse,
        batch=2,
    )
    assert run.done["ok"], run.done
    assert run.value == [10, 20]


#: How a program may call tools, as (program, calls answered together, expected result). The
#: harness answers each batch in reverse order; see Relay in guest/tools.py for who reads replies.
RELAY_CASES: dict[str, tuple[str, int, Any]] = {
    # The caller reads each reply itself: no thread starts.
    "sequential sync calls": (
        "import threading\n"
        "values = [tools.f(i) for i in range(5)]\n"
        "result = [values, threading.active_count()]",
        1,
        [[0, 10, 20, 30, 40], 1],
    ),
    # One thread reads while the other's call is in flight.
    "sync calls from two threads": (
        "import threading\n"
        "barrier = threading.Barrier(2)\n"
        "out = {}\n"
        "def work(n):\n"
        "    barrier.wait()\n"
        "    out[n] = tools.f(n)\n"
        "threads = [threading.Thread(target=work, args=(n,)) for n in (1, 2)]\n"
        "[t.start() for t in threads]\n"
        "[t.join() for t in threads]\n"
        "result = [out[1], out[2]]",
        2,
        [10, 20],
    ),
    "sync, gathered async, then sync": (
        "import asyncio\n"
        "a = tools.f(1)\n"
        "b = await asyncio.gather(tools['f'].run_async(2), tools['f'].run_async(3))\n"
        "c = tools.f(4)\n"
        "result = [a, b, c]",
        1,
        [10, [20, 30], 40],
    ),
    # The program's event loop reads the replies: no thread starts.
    "gathered async calls": (
        "import asyncio, threading\n"
        "values = await asyncio.gather(*(tools['f'].run_async(i) for i in range(4)))\n"
        "more = await asyncio.gather(*(tools['f'].run_async(i) for i in range(5, 9)))\n"
        "result = [values, more, threading.active_count()]",
        4,
        [[0, 10, 20, 30], [50, 60, 70, 80], 1],
    ),
    # A sync call on the thread of the reading loop reads for the loop meanwhile.
    "sync call inside a coroutine while its loop reads": (
        "import asyncio\n"
        "async def main():\n"
        "    pending = asyncio.ensure_future(tools['f'].run_async(1))\n"
        "    await asyncio.sleep(0)\n"
        "    now = tools.f(2)\n"
        "    return [await pending, now]\n"
        "result = await main()",
        2,
        [10, 20],
    ),
    # The reading loop is blocked joining a thread whose sync call waits for a reply: the
    # reader thread takes over (the loop alone would never read it).
    "thread joined inside a coroutine while its loop reads": (
        "import asyncio, threading\n"
        "async def main():\n"
        "    pending = asyncio.ensure_future(tools['f'].run_async(1))\n"
        "    await asyncio.sleep(0)\n"
        "    out = []\n"
        "    t = threading.Thread(target=lambda: out.append(tools.f(2)))\n"
        "    t.start()\n"
        "    t.join()\n"
        "    return [await pending, out[0]]\n"
        "result = await main()",
        2,
        [10, 20],
    ),
    # A loop stopped with a call in flight cannot read: a sync call reads meanwhile.
    "sync call while a stopped loop has a call in flight": (
        "import asyncio\n"
        "loop = asyncio.new_event_loop()\n"
        "task = loop.create_task(tools['f'].run_async(1))\n"
        "loop.run_until_complete(asyncio.sleep(0.01))\n"
        "b = tools.f(2)\n"
        "a = loop.run_until_complete(task)\n"
        "result = [a, b]",
        2,
        [10, 20],
    ),
    # Everything at once: four threads of sync calls, gathered coroutines that each make an
    # async call and then a sync one on the loop's thread.
    "threads and coroutines calling at once": (
        "import asyncio, threading\n"
        "out = {}\n"
        "def work(k):\n"
        "    out[k] = [tools.f(k * 100 + i) for i in range(10)]\n"
        "async def both(i):\n"
        "    return await tools['f'].run_async(i) + tools.f(i + 1000)\n"
        "threads = [threading.Thread(target=work, args=(k,)) for k in range(1, 5)]\n"
        "[t.start() for t in threads]\n"
        "got = await asyncio.gather(*(both(i) for i in range(10)))\n"
        "await asyncio.to_thread(lambda: [t.join() for t in threads])\n"
        "result = [got, [out[k] for k in range(1, 5)]]",
        1,
        [
            [i * 10 + (i + 1000) * 10 for i in range(10)],
            [[(k * 100 + i) * 10 for i in range(10)] for k in range(1, 5)],
        ],
    ),
    # The loop stops reading when its call is given up on; the late reply is dropped.
    "cancelled async call, then a sync one": (
        "import asyncio\n"
        "try:\n"
        "    await asyncio.wait_for(tools['f'].run_async(1), 0.05)\n"
        "    first = 'answered'\n"
        "except TimeoutError:\n"
        "    first = 'timed out'\n"
        "result = [first, tools.f(2)]",
        2,
        ["timed out", 20],
    ),
}


@pytest.mark.parametrize(
    ("code", "batch", "expected"), list(RELAY_CASES.values()), ids=list(RELAY_CASES)
)
def test_every_reply_reaches_its_caller(code: str, batch: int, expected: Any) -> None:
    """However a program calls its tools, each reply (x10 here) reaches the call it answers."""

    def times_ten_in_reverse(calls: list[dict[str, Any]]) -> list[tuple[dict[str, Any], bytes]]:
        replies = [
            ({"t": "reply", "id": c["id"], "ok": True}, c["arguments"]["args"][0] * 10)
            for c in calls
        ]
        return [(head, json.dumps(value).encode()) for head, value in replies[::-1]]

    run = run_guest(code, tools=("f",), answer=times_ten_in_reverse, batch=batch)
    assert run.done["ok"], run.done
    assert run.value == expected


def test_tool_error_is_raised_as_the_builtin_type() -> None:
    """A tool's ValueError reply is raised as ValueError in the program, with its message."""

    def fail(calls: list[dict[str, Any]]) -> list[tuple[dict[str, Any], bytes]]:
        head = {"t": "reply", "id": calls[0]["id"], "ok": False, "type": "ValueError"}
        return [({**head, "message": "bad city"}, b"")]

    run = run_guest(
        "try:\n    tools.weather('Atlantis')\nexcept ValueError as e:\n    result = str(e)",
        tools=("weather",),
        answer=fail,
    )
    assert run.value == "bad city"


def test_unknown_tool_lists_available_tools() -> None:
    """An undeclared tool raises AttributeError listing the declared ones, and sends no call."""
    run = run_guest(
        "try:\n    tools.nope()\nexcept AttributeError as e:\n    result = str(e)",
        tools=("b", "a"),
    )
    assert run.calls == []
    assert run.value == "tool 'nope' is not available to this program; available tools: a, b"


def test_output_goes_to_the_pipes_not_the_channel() -> None:
    """print() reaches stdout; text that looks like a frame cannot forge the result."""
    forged = frame({"t": "done", "ok": True}, b'"forged"').decode("latin-1")
    run = run_guest(f"import sys\nprint({forged!r})\nprint('err', file=sys.stderr)\nresult = 1")
    assert run.value == 1
    assert "forged" in run.stdout
    assert run.stderr == "err\n"


def test_context_and_config_are_read_only() -> None:
    """The program reads `context` and `config` but cannot change them."""
    run = run_guest(
        "out = [context['user'], config['depth'], list(config['tags'])]\n"
        "try:\n    context['user'] = 'mallory'\nexcept TypeError:\n    out.append('read-only')\n"
        "result = out",
        context={"user": "alice"},
        config={"depth": 2, "tags": ["a", "b"]},
    )
    assert run.value == ["alice", 2, ["a", "b"], "read-only"]


@pytest.mark.parametrize(
    ("code", "ok"),
    [("import sys; result = 1; sys.exit(0)", True), ("import sys; sys.exit(3)", False)],
)
def test_sys_exit(code: str, ok: bool) -> None:
    """sys.exit(0) ends the program normally; a non-zero code is a failed outcome."""
    run = run_guest(code)
    assert run.done["ok"] is ok
    if not ok:
        assert run.done["type"] == "SystemExit"


def test_limits_are_applied_before_the_program_runs() -> None:
    """rlimits from the start frame are in force when the program starts."""
    run = run_guest(
        "import resource\nresult = resource.getrlimit(resource.RLIMIT_NOFILE)",
        limits={"max_open_files": 40, "max_result_bytes": 4096},
    )
    assert run.value == [40, 40]


def test_guest_exits_when_the_service_goes_away() -> None:
    """A guest whose channel closes before the start frame exits with status 70."""
    parent, proc = start_guest(subprocess.DEVNULL)
    parent.close()
    assert proc.wait(timeout=20) == 70


def test_guest_reports_then_waits_for_the_channel_to_close() -> None:
    """After its outcome the guest waits until the service closes the channel (or kills it).

    Exiting at once would tear its address space down on the CPU where the kernel has just
    placed the service it woke; the service kills it (or closes the channel) instead.
    """
    parent, proc = start_guest(subprocess.DEVNULL)
    try:
        parent.settimeout(20)
        start = {"t": "start", "tools": [], "limits": {"max_result_bytes": 4096}}
        parent.sendall(frame(start, b"result = 2 + 2"))
        header, payload = read_frame(parent)
        assert (header["t"], header["ok"], payload) == ("done", True, b"4")
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=0.3)
    finally:
        parent.close()
    assert proc.wait(timeout=20) == 0


def test_warm_up_leaves_nothing_for_the_program() -> None:
    """The fork server's warm-up leaves no line-cache entry; a program's globals are fresh."""
    import linecache

    from codemode.executor.guest import runtime as guest

    linecache.cache.pop(guest.USER_FILENAME, None)
    guest.warm_up()
    assert guest.USER_FILENAME not in linecache.cache
    run = run_guest("result = sorted(k for k in globals() if not k.startswith('__'))")
    assert run.value == ["codemode", "config", "context", "tools"]


def test_guest_exits_by_itself_if_the_channel_stays_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """Should the service neither kill the guest nor close the channel, it leaves on its own."""
    from codemode.executor.guest import protocol

    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    monkeypatch.setattr(protocol, "LINGER_MS", 50)
    try:
        channel = protocol.Channel(child.detach(), 1 << 20)
        started = time.monotonic()
        channel.wait_closed()
        assert time.monotonic() - started < 5
        channel._sock.close()
    finally:
        parent.close()
