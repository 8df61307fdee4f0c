"""``run_execution`` driven in the test process, with real guests: one execution, no gRPC.

Most tests use the plain-process backend (a child process running the real guest; fast); the
fork-server tests run the same relay through a kernel sandbox, whose guests come ready from
``acquire``. ``call_tool`` and ``on_output`` are coroutines of the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from codemode.config import LimitsConfig
from codemode.executor.guest.outcomes import ErrorType
from codemode.executor.run.execution import run_execution
from codemode.executor.run.outcome import (
    ExecutionRequest,
    RunOutcome,
    Stream,
    ToolReply,
    describe_exit,
)
from codemode.executor.sandbox import GuestExit, SandboxBackend
from codemode.executor.sandbox.forkserver import ForkServerBackend
from codemode.executor.sandbox.host import DEFAULT_UID_BASE
from codemode.executor.sandbox.process import ProcessBackend
from tests.helpers import ProcRef, marked_program, marked_tree, wait_gone, wait_until
from tests.unit.sandbox_harness import processes_of

#: A uid range of this module's own, apart from the other sandbox tests' backends.
UID_BASE = DEFAULT_UID_BASE + 500_000
LIMITS = LimitsConfig(memory_bytes=256 << 20, max_processes=32, tmpfs_bytes=8 << 20)

needs_sandbox = pytest.mark.skipif(
    shutil.which("bwrap") is None or os.geteuid() != 0,
    reason="the fork-server backend needs bubblewrap and root",
)


def request(
    code: str,
    *,
    tools: tuple[str, ...] = (),
    timeout: float = 10.0,
    limits: LimitsConfig = LIMITS,
    **fields: Any,
) -> ExecutionRequest:
    return ExecutionRequest(code=code, tools=tools, timeout=timeout, limits=limits, **fields)


async def no_tools(tool: str, arguments: bytes) -> ToolReply:
    raise AssertionError(f"call_tool was called for {tool!r}")


class Output:
    """An ``on_output`` sink that keeps every chunk with its stream name."""

    def __init__(self) -> None:
        self.chunks: list[tuple[Stream, bytes]] = []
        self._line = asyncio.Event()

    async def __call__(self, stream: Stream, data: bytes) -> None:
        self.chunks.append((stream, data))
        if stream == "stdout" and b"\n" in data:
            self._line.set()

    def of(self, stream: Stream) -> bytes:
        return b"".join(data for which, data in self.chunks if which == stream)

    async def first_line(self, timeout: float = 10.0) -> str:
        """The first stdout line, once it has been streamed."""
        async with asyncio.timeout(timeout):
            await self._line.wait()
        return self.of("stdout").split(b"\n", 1)[0].decode()


@pytest.fixture(scope="module")
def process_backend() -> ProcessBackend:
    return ProcessBackend()


async def started_tree(tag: str) -> list[ProcRef]:
    """The guest (a child of this process) and its marked child, once the child runs."""
    root = os.getpid()
    tree: list[ProcRef] = await asyncio.to_thread(wait_until, lambda: marked_tree(root, tag), 10)
    assert len(tree) == 2, f"the marked program did not start as the guest's child: {tree}"
    return tree


# ------------------------------------------------------------------------------------------
# The plain-process backend


async def test_result_comes_back_as_json(process_backend: ProcessBackend) -> None:
    """A program's ``result`` comes back JSON-encoded, with its stdout and no error."""
    out = await run_execution(
        process_backend, request("print('hi')\nresult = {'n': 2 + 2}"), no_tools
    )
    assert out.success, out
    assert json.loads(out.result_json) == {"n": 4}
    assert out.stdout == b"hi\n"
    assert out.stderr == b""
    assert (out.error_type, out.error_message, out.traceback) == ("", "", "")
    assert out.tool_calls == 0
    assert not out.output_truncated
    assert out.duration_ms > 0


async def test_config_and_context_reach_the_program(process_backend: ProcessBackend) -> None:
    """The request's ``config`` and ``context`` are the program's globals of those names."""
    out = await run_execution(
        process_backend,
        request(
            "result = [config['region'], context['user']]",
            config={"region": "eu"},
            context={"user": "ada"},
        ),
        no_tools,
    )
    assert out.success, out
    assert json.loads(out.result_json) == ["eu", "ada"]


async def test_program_exception_reports_type_message_and_user_traceback(
    process_backend: ProcessBackend,
) -> None:
    """An uncaught exception is the outcome: its class, message and the user's lines only."""
    code = "x = 1\ndef f():\n    raise ValueError('bad input')\n\nf()\n"
    out = await run_execution(process_backend, request(code), no_tools)
    assert not out.success
    assert out.error_type == "ValueError"
    assert out.error_message == "bad input"
    assert 'File "<codemode>", line 5, in <module>' in out.traceback
    assert 'File "<codemode>", line 3, in f' in out.traceback
    assert out.traceback.endswith("ValueError: bad input\n")
    assert "runtime.py" not in out.traceback  # the guest's own frames are not shown
    assert out.result_json == b""


async def test_tool_call_is_answered_by_call_tool(process_backend: ProcessBackend) -> None:
    """A declared tool's call reaches ``call_tool`` with its arguments; the reply is its value."""
    received: list[tuple[str, Any]] = []

    async def call_tool(tool: str, arguments: bytes) -> ToolReply:
        received.append((tool, json.loads(arguments)))
        args = json.loads(arguments)
        return ToolReply(
            ok=True, value_json=json.dumps(args["args"][0] + args["kwargs"]["b"]).encode()
        )

    out = await run_execution(
        process_backend, request("result = tools.add(2, b=3)", tools=("add",)), call_tool
    )
    assert out.success, out
    assert received == [("add", {"args": [2], "kwargs": {"b": 3}})]
    assert json.loads(out.result_json) == 5
    assert out.tool_calls == 1


async def test_tool_error_reply_is_raised_in_the_program(process_backend: ProcessBackend) -> None:
    """A ``ToolReply.error`` of a builtin type is raised as that type inside the program."""

    async def call_tool(tool: str, arguments: bytes) -> ToolReply:
        return ToolReply.error("ValueError", "no such user")

    code = "try:\n    tools.lookup('x')\nexcept ValueError as exc:\n    result = str(exc)\n"
    out = await run_execution(process_backend, request(code, tools=("lookup",)), call_tool)
    assert out.success, out
    assert json.loads(out.result_json) == "no such user"


async def test_undeclared_tool_is_refused_without_asking_the_application(
    process_backend: ProcessBackend,
) -> None:
    """A call frame for a tool the request did not declare is answered "not available" by the
    relay, and ``call_tool`` never hears of it."""
    # The program widens its own relay's list, so the guest sends the forged call frame.
    code = (
        "relay = tools._relay\n"
        "relay.tool_names = relay.tool_names | {'secret'}\n"
        "try:\n"
        "    relay.call('secret', (), {})\n"
        "except AttributeError as exc:\n"
        "    result = str(exc)\n"
    )
    out = await run_execution(process_backend, request(code, tools=("add",)), no_tools)
    assert out.success, out
    # The relay's wording; the guest's own refusal would also list the available tools.
    assert json.loads(out.result_json) == "tool 'secret' is not available to this program"
    assert out.tool_calls == 1


async def test_on_output_receives_chunks_with_their_stream(
    process_backend: ProcessBackend,
) -> None:
    """``on_output`` gets stdout and stderr as they are written, each chunk named by stream."""
    output = Output()
    code = "import sys\nprint('to out')\nprint('to err', file=sys.stderr)\nresult = 1\n"
    out = await run_execution(process_backend, request(code), no_tools, output)
    assert out.success, out
    assert {which for which, _ in output.chunks} == {"stdout", "stderr"}
    assert output.of("stdout") == b"to out\n"
    assert output.of("stderr") == b"to err\n"
    assert (out.stdout, out.stderr) == (b"to out\n", b"to err\n")


async def test_output_over_the_limit_is_cut_at_the_limit(process_backend: ProcessBackend) -> None:
    """Output past ``max_output_bytes`` ends the run as OutputLimit, kept (and streamed) up to
    the limit, even when the program then finishes."""
    output = Output()
    limits = LIMITS.model_copy(update={"max_output_bytes": 1024})
    out = await run_execution(
        process_backend, request("print('x' * 5000)\nresult = 1", limits=limits), no_tools, output
    )
    assert not out.success
    assert out.error_type == ErrorType.OUTPUT_LIMIT
    assert "1024 bytes" in out.error_message
    assert out.stdout == b"x" * 1024
    assert out.output_truncated
    assert output.of("stdout") == b"x" * 1024


async def test_guest_exiting_without_an_outcome_is_crashed(
    process_backend: ProcessBackend,
) -> None:
    """A guest that exits before reporting is Crashed, with its exit code in the message."""
    out = await run_execution(process_backend, request("import os\nos._exit(3)"), no_tools)
    assert out.error_type == ErrorType.CRASHED
    assert "code 3" in out.error_message


async def test_live_guest_closing_its_channel_is_not_a_cpu_limit(
    process_backend: ProcessBackend,
) -> None:
    """A program that shuts its channel and lives on did not use up its CPU time."""
    code = (
        "import socket, time\n"
        "tools._relay._channel._sock.shutdown(socket.SHUT_RDWR)\n"
        "time.sleep(5)\n"
    )
    out = await run_execution(process_backend, request(code), no_tools)
    assert not out.success
    assert out.duration_ms < 2000
    assert out.error_type != ErrorType.CPU_LIMIT, out.error_message


async def test_timeout_ends_the_run_and_kills_the_guest(process_backend: ProcessBackend) -> None:
    """A program past its wall-clock timeout is Timeout, and its process tree is killed."""
    tag = f"run-timeout-{uuid.uuid4().hex[:8]}"
    task = asyncio.create_task(
        run_execution(process_backend, request(marked_program(tag), timeout=1.0), no_tools)
    )
    tree = await started_tree(tag)
    out = await task
    assert out.error_type == ErrorType.TIMEOUT
    assert "1 s time limit" in out.error_message
    assert 1000 <= out.duration_ms < 5000
    assert await asyncio.to_thread(wait_gone, tree) == []


async def test_cancelling_the_run_kills_the_guest(process_backend: ProcessBackend) -> None:
    """Cancelling ``run_execution`` kills the guest and everything it started."""
    tag = f"run-cancel-{uuid.uuid4().hex[:8]}"
    task = asyncio.create_task(
        run_execution(process_backend, request(marked_program(tag)), no_tools)
    )
    tree = await started_tree(tag)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(wait_gone, tree) == []


async def test_cancelling_during_a_tool_call_cancels_the_call(
    process_backend: ProcessBackend,
) -> None:
    """Cancelled while the application answers a tool call: the guest dies, the call is
    cancelled."""
    tag = f"run-cancel-call-{uuid.uuid4().hex[:8]}"
    called = asyncio.Event()
    cancelled = asyncio.Event()

    async def call_tool(tool: str, arguments: bytes) -> ToolReply:
        called.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return ToolReply(ok=True, value_json=b"null")

    code = marked_program(tag, then="tools.slow()")
    task = asyncio.create_task(
        run_execution(process_backend, request(code, tools=("slow",)), call_tool)
    )
    tree = await started_tree(tag)
    async with asyncio.timeout(10):
        await called.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(wait_gone, tree) == []
    try:
        async with asyncio.timeout(1):
            await cancelled.wait()
    finally:
        # Do not leave the orphaned call running into the other tests.
        orphans = [t for t in asyncio.all_tasks() if _runs(t, "GuestRelay._answer")]
        for orphan in orphans:
            orphan.cancel()
        await asyncio.gather(*orphans, return_exceptions=True)


def _runs(task: asyncio.Task[Any], qualname: str) -> bool:
    return getattr(task.get_coro(), "__qualname__", "") == qualname


# ------------------------------------------------------------------------------------------
# How a guest's exit is described


@pytest.mark.parametrize(
    ("exit", "error_type", "words"),
    [
        (GuestExit(None, signal.SIGKILL, memory_exceeded=True), ErrorType.MEMORY_LIMIT, "memory"),
        (GuestExit(None, signal.SIGKILL, pids_exceeded=True), ErrorType.PROCESS_LIMIT, "32"),
        (GuestExit(None, signal.SIGXCPU), ErrorType.CPU_LIMIT, "30 s of CPU"),
        (GuestExit(None, signal.SIGKILL), ErrorType.CPU_LIMIT, "30 s of CPU"),
        (GuestExit(None, signal.SIGSEGV), ErrorType.CRASHED, "SIGSEGV"),
        (GuestExit(7), ErrorType.CRASHED, "exited with code 7"),
        (GuestExit(0), ErrorType.CRASHED, "exited with code 0"),
    ],
    ids=["memory", "pids", "sigxcpu", "sigkill", "sigsegv", "exit-7", "exit-0"],
)
def test_describe_exit_names_the_limit_or_the_crash(
    exit: GuestExit, error_type: ErrorType, words: str
) -> None:
    """Each way a guest can end unreported maps to one error type; the cgroup's verdict wins."""
    hit = describe_exit(exit, LimitsConfig(cpu_seconds=30, max_processes=32))
    assert hit.error_type is error_type
    assert words in str(hit)


# ------------------------------------------------------------------------------------------
# The fork-server backend: guests come ready from acquire()


@pytest.fixture(scope="module")
async def forkserver() -> AsyncIterator[ForkServerBackend]:
    b = ForkServerBackend(LIMITS, uid_base=UID_BASE, pool_size=2)
    await b.start()
    yield b
    await b.close()
    assert not [p for u in range(UID_BASE, UID_BASE + 64) for p in processes_of(u)]


async def start_marked(
    backend: SandboxBackend, tag: str, **fields: Any
) -> tuple[asyncio.Task[RunOutcome], int]:
    """A running execution of a marked program that first prints its uid; (task, uid)."""
    output = Output()
    code = "import os\nprint(os.getuid())\n" + marked_program(tag)
    task = asyncio.create_task(run_execution(backend, request(code, **fields), no_tools, output))
    uid = int(await output.first_line())
    # The guest and its marked child, both as the execution's own uid.
    found = await asyncio.to_thread(wait_until, lambda: len(processes_of(uid)) >= 2, 10)
    assert found, processes_of(uid)
    return task, uid


@needs_sandbox
async def test_forkserver_run_relays_a_tool_call(forkserver: ForkServerBackend) -> None:
    """Through a sandboxed guest from ``acquire``: the tool call, the result and the output."""
    received: list[Any] = []

    async def call_tool(tool: str, arguments: bytes) -> ToolReply:
        received.append(json.loads(arguments))
        return ToolReply(ok=True, value_json=b'"pong"')

    code = "import os\nprint('uid', os.getuid())\nresult = tools.ping(n=1)"
    out = await run_execution(forkserver, request(code, tools=("ping",)), call_tool)
    assert out.success, out
    assert json.loads(out.result_json) == "pong"
    assert received == [{"args": [], "kwargs": {"n": 1}}]
    uid = int(out.stdout.split()[1])
    assert UID_BASE <= uid < UID_BASE + forkserver.uid_count


@needs_sandbox
async def test_forkserver_timeout_leaves_no_process_of_the_guest(
    forkserver: ForkServerBackend,
) -> None:
    """A sandboxed program past its timeout is Timeout; nothing runs as its uid afterwards."""
    task, uid = await start_marked(forkserver, f"fs-timeout-{uuid.uuid4().hex[:8]}", timeout=1.0)
    out = await task
    assert out.error_type == ErrorType.TIMEOUT
    assert await asyncio.to_thread(wait_until, lambda: not processes_of(uid), 5)


@needs_sandbox
async def test_forkserver_cancelled_run_leaves_no_process_of_the_guest(
    forkserver: ForkServerBackend,
) -> None:
    """Cancelling a sandboxed run kills its guest: nothing runs as its uid afterwards."""
    task, uid = await start_marked(forkserver, f"fs-cancel-{uuid.uuid4().hex[:8]}")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(wait_until, lambda: not processes_of(uid), 5)
