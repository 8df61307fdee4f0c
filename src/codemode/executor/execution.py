"""One execution on the service side: start a guest, relay its tool calls, collect its outcome.

This module knows nothing of gRPC: the servicer gives it a ``call_tool`` coroutine (which asks
the application over the stream) and an ``on_output`` callback, and gets back the final
``ExecutionResult``. Whatever happens — success, failure, a hit limit, cancellation — the
guest's whole process tree is killed and every descriptor closed before this returns.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from codemode.config import LimitsConfig
from codemode.executor.guest import (
    FRAME_HEADER,
    MAX_HEADER_BYTES,
    ProtocolError,
    encode_frame,
    parse_header,
)
from codemode.executor.sandbox import GuestExit, GuestFds, GuestProcess, SandboxBackend
from codemode.wire import codemode_pb2 as pb

logger = logging.getLogger("codemode.executor")

#: ``call_tool(tool, arguments_json) -> (ok, value_json, error_type, error_message)``
ToolCaller = Callable[[str, bytes], Awaitable[tuple[bool, bytes, str, str]]]
#: ``on_output(stream, data)``; ``stream`` is ``pb.Output.STDOUT`` or ``pb.Output.STDERR``.
OutputSink = Callable[[int, bytes], Awaitable[None]]

#: Calls one program may have waiting at once; more are refused inside the guest.
MAX_PENDING_TOOL_CALLS = 256
#: Largest tool-call argument payload a guest may send, bytes.
MAX_ARGUMENT_BYTES = 16 * 1024 * 1024


class LimitHit(Exception):
    """The execution crossed a limit; ``error_type`` is what the client sees."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


@dataclass(slots=True)
class _Outcome:
    header: dict[str, Any] | None = None
    payload: bytes = b""


class _Output:
    """One output pipe, read on the loop as data arrives; both pipes share one byte budget.

    Reading is synchronous (``add_reader`` + ``os.read``), so :meth:`flush` can take what the
    pipe holds at the moment the outcome arrives without waiting for the guest to die.
    Chunks for streaming go to ``queue``; the limit is reported once through ``on_limit``.
    """

    def __init__(
        self,
        fd: int,
        which: int,
        budget: list[int],
        on_limit: Callable[[], None],
        queue: asyncio.Queue[tuple[int, bytes]] | None,
    ) -> None:
        self.fd = fd
        self.which = which
        self.chunks: list[bytes] = []
        self.truncated = False
        self._budget = budget
        self._on_limit = on_limit
        self._queue = queue
        self._loop = asyncio.get_running_loop()
        self._open = True
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, self.read_available)

    def read_available(self) -> None:
        """Take what the pipe holds now; stop reading at EOF or at the limit."""
        while self._open:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._stop()
                return
            room = self._budget[0]
            if len(chunk) > room:
                chunk, self.truncated = chunk[:room], True
            self._budget[0] -= len(chunk)
            if chunk:
                self.chunks.append(chunk)
                if self._queue is not None:
                    self._queue.put_nowait((self.which, chunk))
            if self.truncated:
                self._stop()
                self._on_limit()
                return

    def _stop(self) -> None:
        if self._open:
            self._open = False
            self._loop.remove_reader(self.fd)

    def close(self) -> None:
        self._stop()
        os.close(self.fd)

    def data(self) -> bytes:
        return b"".join(self.chunks)


async def _forward(queue: asyncio.Queue[tuple[int, bytes]], sink: OutputSink) -> None:
    """Stream output chunks in the order they were read."""
    while True:
        which, chunk = await queue.get()
        try:
            await sink(which, chunk)
        finally:
            queue.task_done()


#: Guests whose outcome is known, killed and being reaped off the request path.
_REAPING: set[asyncio.Task[Any]] = set()


def _reap_later(guest: GuestProcess, waiting: asyncio.Task[Any] | None) -> None:
    """Wait for a killed guest in the background so its outcome need not wait for its exit.

    ``waiting``: a task already waiting for it (the execution's), taken over if still running.
    """
    if waiting is None or waiting.done():
        waiting = asyncio.get_running_loop().create_task(guest.wait())
    _REAPING.add(waiting)
    waiting.add_done_callback(_REAPING.discard)


async def wait_reaped() -> None:
    """Wait until every guest killed by finished executions has been reaped (for shutdown)."""
    if _REAPING:
        await asyncio.wait(set(_REAPING))


async def _read_frame(
    reader: asyncio.StreamReader, max_payload: int
) -> tuple[dict[str, Any], bytes]:
    head_len, payload_len = FRAME_HEADER.unpack(await reader.readexactly(FRAME_HEADER.size))
    if head_len > MAX_HEADER_BYTES:
        raise ProtocolError(f"frame header of {head_len} bytes")
    if payload_len > max_payload:
        raise LimitHit(
            "ResultTooLarge", f"the program sent {payload_len} bytes; the limit is {max_payload}"
        )
    header = parse_header(await reader.readexactly(head_len))
    return header, await reader.readexactly(payload_len)


def describe_exit(exit: GuestExit, limits: LimitsConfig) -> LimitHit:
    """Why a guest ended without reporting an outcome."""
    if exit.memory_exceeded:
        return LimitHit(
            "MemoryLimit", f"the program exceeded its memory limit of {limits.memory_bytes} bytes"
        )
    if exit.pids_exceeded:
        return LimitHit(
            "ProcessLimit", f"the program exceeded its limit of {limits.max_processes} processes"
        )
    if exit.signal == signal.SIGXCPU or exit.signal == signal.SIGKILL:
        # RLIMIT_CPU sends SIGXCPU, then SIGKILL one second later; the cgroup OOM killer is
        # reported through memory_exceeded above.
        return LimitHit("CpuLimit", f"the program used its {limits.cpu_seconds:g} s of CPU time")
    if exit.signal is not None:
        name = signal.Signals(exit.signal).name
        return LimitHit("Crashed", f"the program's process was killed by {name}")
    return LimitHit(
        "Crashed", f"the program's process exited with code {exit.returncode} before finishing"
    )


class _GuestRelay:
    """Reads the guest's frames until its outcome, answering each tool call in its own task.

    Calls to tools the request did not declare are answered "not available" here: a forged
    call frame never reaches the application.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        declared: frozenset[str],
        call_tool: ToolCaller,
        limits: LimitsConfig,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._declared = declared
        self._call_tool = call_tool
        self._limits = limits
        self._pending: set[asyncio.Task[None]] = set()
        self._write_lock = asyncio.Lock()
        self.tool_calls = 0

    async def run(self) -> _Outcome:
        """Relay until the done frame; raises LimitHit or ProtocolError on a misbehaving guest."""
        max_result = self._limits.max_result_bytes
        max_payload = max(max_result, MAX_ARGUMENT_BYTES)
        while True:
            head, payload = await _read_frame(self._reader, max_payload)
            if head["t"] == "done":
                if len(payload) > max_result:
                    raise LimitHit(
                        "ResultTooLarge", f"result is {len(payload)} bytes; limit {max_result}"
                    )
                return _Outcome(head, payload)
            if head["t"] != "call":
                raise ProtocolError(f"unexpected frame {head['t']!r} from the program")
            self.tool_calls += 1
            if len(self._pending) >= MAX_PENDING_TOOL_CALLS:
                raise LimitHit(
                    "ToolCallLimit",
                    f"more than {MAX_PENDING_TOOL_CALLS} tool calls waiting at once",
                )
            task = asyncio.create_task(
                self._answer(str(head.get("id")), str(head.get("tool")), payload)
            )
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    def cancel_calls(self) -> None:
        """Stop waiting for tool calls still in flight."""
        for task in self._pending:
            task.cancel()

    async def _answer(self, call_id: str, tool: str, arguments: bytes) -> None:
        if tool not in self._declared:
            reply: tuple[bool, bytes, str, str] = (
                False,
                b"",
                "AttributeError",
                f"tool {tool!r} is not available to this program",
            )
        else:
            reply = await self._call_tool(tool, arguments)
        ok, value, error_type, message = reply
        head = {"t": "reply", "id": call_id, "ok": ok}
        if not ok:
            head.update(type=error_type, message=message)
        async with self._write_lock:
            self._writer.write(encode_frame(head, value if ok else b""))
            await self._writer.drain()


async def run_execution(
    *,
    backend: SandboxBackend,
    code: str,
    tools: Sequence[str],
    config: Any,
    context: Any,
    timeout: float,
    limits: LimitsConfig,
    call_tool: ToolCaller,
    on_output: OutputSink | None,
    correlation_id: str,
) -> pb.ExecutionResult:
    """Run ``code`` in a fresh guest and return its outcome. Cancelling this kills the guest."""
    started = time.perf_counter()
    # A backend that sets guests up ahead hands over one already connected; else the channel
    # and the output pipes are made here and passed to a guest it starts.
    ready = await backend.acquire()
    guest: GuestProcess | None = None
    if ready is not None:
        guest, parent_sock, out_r, err_r = ready.process, ready.channel, ready.stdout, ready.stderr
    else:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
    tasks: list[asyncio.Task[Any]] = []
    exit_task: asyncio.Task[Any] | None = None
    writer: asyncio.StreamWriter | None = None
    outputs: list[_Output] = []
    try:
        if guest is None:
            try:
                guest = await backend.spawn(GuestFds(child_sock.fileno(), out_w, err_w))
            finally:
                child_sock.close()
                os.close(out_w)
                os.close(err_w)
        chan_reader, writer = await asyncio.open_unix_connection(sock=parent_sock, limit=1 << 20)

        limit_hit: asyncio.Future[LimitHit] = asyncio.get_running_loop().create_future()

        def hit(error: LimitHit) -> None:
            if not limit_hit.done():
                limit_hit.set_result(error)

        def output_limit() -> None:
            hit(
                LimitHit(
                    "OutputLimit",
                    f"the program wrote more than {limits.max_output_bytes} bytes of output",
                )
            )

        queue: asyncio.Queue[tuple[int, bytes]] | None = None
        if on_output is not None:
            queue = asyncio.Queue()
            tasks.append(asyncio.create_task(_forward(queue, on_output)))
        budget = [limits.max_output_bytes]
        for fd, which in ((out_r, pb.Output.STDOUT), (err_r, pb.Output.STDERR)):
            outputs.append(_Output(fd, which, budget, output_limit, queue))
        out_r = err_r = -1  # owned by the outputs now

        header = {
            "t": "start",
            "tools": list(tools),
            "config": config,
            "context": context,
            "limits": limits.model_dump(),
        }
        relay = _GuestRelay(chan_reader, writer, frozenset(tools), call_tool, limits)
        relay_task = asyncio.create_task(relay.run())
        exit_task = asyncio.create_task(guest.wait())
        tasks.append(relay_task)
        # The start frame goes last: the loop has nothing left to do once it has woken the
        # guest, which the kernel may have placed on this very CPU.
        writer.write(encode_frame(header, code.encode()))
        try:
            await writer.drain()
            async with asyncio.timeout(timeout):
                waiting: list[asyncio.Future[Any]] = [relay_task, exit_task, limit_hit]
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if relay_task in done:
                outcome_or_error: _Outcome | BaseException = (
                    relay_task.exception() or relay_task.result()
                )
            elif limit_hit in done:
                outcome_or_error = limit_hit.result()
            else:
                # The guest exited; a done frame it wrote just before may still be in flight.
                try:
                    outcome_or_error = await asyncio.wait_for(asyncio.shield(relay_task), 0.2)
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    outcome_or_error = describe_exit(exit_task.result(), limits)
                except (LimitHit, ProtocolError) as exc:
                    outcome_or_error = exc
        except TimeoutError:
            outcome_or_error = LimitHit(
                "Timeout", f"the program ran longer than its {timeout:g} s time limit"
            )
        relay.cancel_calls()
        guest.kill()
        if isinstance(outcome_or_error, asyncio.IncompleteReadError | ConnectionError):
            outcome_or_error = describe_exit(await guest.wait(), limits)
        # The guest flushed its streams before reporting: what it wrote is in the pipes now.
        for output in outputs:
            output.read_available()
        if queue is not None:
            await queue.join()
        if limit_hit.done() and isinstance(outcome_or_error, _Outcome):
            # The outcome can overtake the output that broke the limit; the limit still wins.
            outcome_or_error = limit_hit.result()
        return _to_result(
            outcome_or_error,
            outputs,
            duration_ms=(time.perf_counter() - started) * 1000,
            correlation_id=correlation_id,
            tool_calls=relay.tool_calls,
        )
    finally:
        for task in tasks:
            task.cancel()
        for output in outputs:
            output.close()
        for fd in (out_r, err_r):
            if fd >= 0:
                os.close(fd)
        if writer is not None:
            writer.close()
        else:
            parent_sock.close()
        if guest is not None:
            guest.kill()
            _reap_later(guest, exit_task)


def _to_result(
    outcome: _Outcome | BaseException,
    outputs: list[_Output],
    *,
    duration_ms: float,
    correlation_id: str,
    tool_calls: int,
) -> pb.ExecutionResult:
    result = pb.ExecutionResult(
        stdout=outputs[0].data(),
        stderr=outputs[1].data(),
        duration_ms=duration_ms,
        correlation_id=correlation_id,
        tool_calls=tool_calls,
        output_truncated=any(o.truncated for o in outputs),
    )
    if isinstance(outcome, _Outcome) and outcome.header is not None:
        head = outcome.header
        if head.get("ok"):
            result.success = True
            result.result_json = outcome.payload
            return result
        result.error_type = str(head.get("type") or "Error")
        result.error_message = str(head.get("message") or "")
        result.traceback = str(head.get("traceback") or "")
        return result
    if isinstance(outcome, LimitHit):
        result.error_type, result.error_message = outcome.error_type, str(outcome)
    elif isinstance(outcome, ProtocolError):
        result.error_type, result.error_message = (
            "ProtocolError",
            f"the program broke the guest protocol: {outcome}",
        )
    else:
        result.error_type, result.error_message = (
            "Crashed",
            f"the program ended abnormally: {outcome!r}",
        )
    logger.info(
        "execution ended by %s: %s",
        result.error_type,
        result.error_message,
        extra={"correlation_id": correlation_id},
    )
    return result


def decode_json_object(raw: bytes, what: str) -> dict[str, Any]:
    """Decode a JSON object sent by the client; raises ``ValueError`` naming ``what``."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object, not {type(value).__name__}")
    return value
