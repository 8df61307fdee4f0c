"""One execution on the service side: take a guest, relay its tool calls, collect its outcome.

:func:`run_execution` is given an :class:`~.outcome.ExecutionRequest`, a ``call_tool``
coroutine (which asks the application) and an optional ``on_output`` callback, and returns a
:class:`~.outcome.RunOutcome`. Whatever happens (success, failure, a hit limit, cancellation)
the guest's whole process tree is killed and every descriptor closed before it returns.
:class:`HeldGuest` is the same for a session: one guest kept for many requests, in order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from codemode.config import LimitsConfig
from codemode.executor.guest.outcomes import ErrorType
from codemode.executor.guest.protocol import ProtocolError, encode_frame
from codemode.executor.run.files import read_outputs, write_inputs
from codemode.executor.run.limits import guest_limits
from codemode.executor.run.outcome import (
    ExecutionRequest,
    LimitHit,
    OutputSink,
    RunOutcome,
    Stream,
    ToolCaller,
    describe_exit,
)
from codemode.executor.run.output import OutputPipe, forward
from codemode.executor.run.relay import GuestDone, GuestRelay
from codemode.executor.sandbox import GuestFds, GuestProcess, SandboxBackend

logger = logging.getLogger("codemode.executor")

#: How long the outcome may trail the guest's exit before the exit is taken as its end, s.
_DONE_AFTER_EXIT_S = 0.2


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


@dataclass(slots=True)
class _Attached:
    """A guest with the service's ends of its channel and output pipes (owned here)."""

    guest: GuestProcess
    channel: socket.socket
    stdout: int
    stderr: int


#: ``import a.b, c as d`` or ``from a.b import c``, at a line's start or after a semicolon.
_IMPORT = re.compile(
    r"(?:^|;)[ \t]*(?:from[ \t]+([\w.]+)[ \t]+import\b|import[ \t]+([\w., \t]+))", re.M
)


def imports_packages(code: str) -> bool:
    """Whether ``code`` imports a module beyond the standard library, by its import statements.

    It only chooses the guest's zygote: a program that imports a package another way
    (``__import__``, ``exec``) runs on the plain one and imports it there, slower but the same.
    """
    for found in _IMPORT.finditer(code):
        names = [found.group(1)] if found.group(1) else found.group(2).split(",")
        for name in names:
            words = name.split()
            top = words[0].split(".")[0] if words else ""
            if top and top not in sys.stdlib_module_names:
                return True
    return False


async def _attach(backend: SandboxBackend, packages: bool = True) -> _Attached:
    """A guest from the backend: one set up ahead, or one started on descriptors made here."""
    ready = await backend.acquire(packages)
    if ready is not None:
        return _Attached(ready.process, ready.channel, ready.stdout, ready.stderr)
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        guest = await backend.spawn(GuestFds(child_sock.fileno(), out_w, err_w))
    except BaseException:
        parent_sock.close()
        os.close(out_r)
        os.close(err_r)
        raise
    finally:
        child_sock.close()
        os.close(out_w)
        os.close(err_w)
    return _Attached(guest, parent_sock, out_r, err_r)


@dataclass(slots=True)
class _Watch:
    """What one execution waits on: the first of these ends it."""

    limit_hit: asyncio.Future[LimitHit]
    outputs: list[OutputPipe] = field(default_factory=list)
    queue: asyncio.Queue[tuple[Stream, bytes]] | None = None

    def hit(self, error: LimitHit) -> None:
        if not self.limit_hit.done():
            self.limit_hit.set_result(error)


async def run_execution(
    backend: SandboxBackend,
    request: ExecutionRequest,
    call_tool: ToolCaller,
    on_output: OutputSink | None = None,
    inputs: asyncio.Queue[tuple[str, bytes]] | None = None,
    *,
    on_attached: Callable[[], object] | None = None,
) -> RunOutcome:
    """Run ``request`` in a fresh guest and return its outcome. Cancelling this kills the guest.

    ``inputs`` brings the chunks of ``request.files``, in order, as (name, bytes); they are
    written to the guest's ``/input`` before the program starts. ``on_attached`` is called
    once the guest is taken, before the program starts (the service's trace marks it). Raises
    :class:`~.files.FilesUnsupported` when the request has files and the backend no sandbox.
    """
    started = time.perf_counter()
    # Only a backend with preloads has a plain zygote to choose: skip the scan otherwise.
    packages = not backend.preload_modules or imports_packages(request.code)
    held = await HeldGuest.attach(backend, packages=packages)
    if on_attached is not None:
        on_attached()
    try:
        return await held.run(request, call_tool, on_output, inputs, started=started)
    finally:
        held.close()


class HeldGuest:
    """A guest attached to the service: for one execution, or for a session's many.

    It owns the service's ends of the guest's channel and output pipes, and the wait for its
    exit. In a session (:meth:`run` with ``session=True``) the guest outlives an execution
    that it reported on normally; any other end (a limit, a crash, cancellation) kills it,
    and :attr:`alive` turns False. :meth:`close` kills the guest's whole process tree and
    closes every descriptor, whatever happened before.
    """

    def __init__(self, backend: SandboxBackend, attached: _Attached) -> None:
        self._backend = backend
        self._attached = attached
        self.guest = attached.guest
        self.alive = True
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._outputs: list[OutputPipe] = []
        self._exit_task: asyncio.Task[Any] | None = None

    @classmethod
    async def attach(cls, backend: SandboxBackend, packages: bool = True) -> HeldGuest:
        """A guest from ``backend``, its channel open; ``packages`` as ``backend.acquire``'s
        (a session, whose later programs are not known yet, needs them)."""
        held = cls(backend, await _attach(backend, packages))
        try:
            held._reader, held._writer = await asyncio.open_unix_connection(
                sock=held._attached.channel, limit=1 << 20
            )
        except BaseException:
            held.close()
            raise
        return held

    def _watch_outputs(
        self,
        budget: list[int],
        on_limit: Callable[[], None],
        queue: asyncio.Queue[tuple[Stream, bytes]] | None,
    ) -> None:
        if self._outputs:
            for output in self._outputs:
                output.restart(budget, on_limit, queue)
            return
        attached = self._attached
        pipes: tuple[tuple[int, Stream], ...] = (
            (attached.stdout, "stdout"),
            (attached.stderr, "stderr"),
        )
        for fd, which in pipes:
            self._outputs.append(OutputPipe(fd, which, budget, on_limit, queue))
        attached.stdout = attached.stderr = -1  # owned by the outputs now

    async def run(
        self,
        request: ExecutionRequest,
        call_tool: ToolCaller,
        on_output: OutputSink | None = None,
        inputs: asyncio.Queue[tuple[str, bytes]] | None = None,
        *,
        session: bool = False,
        started: float | None = None,
    ) -> RunOutcome:
        """Run ``request`` in this guest and return its outcome (see :func:`run_execution`).

        ``session``: keep the guest for the next request when this one ends normally.
        """
        if not self.alive or self._reader is None or self._writer is None:
            raise RuntimeError("this guest was stopped; a new one is needed")
        started = time.perf_counter() if started is None else started
        limits = request.limits
        watch = _Watch(asyncio.get_running_loop().create_future())
        tasks: list[asyncio.Task[Any]] = []
        relay: GuestRelay | None = None
        kept = False
        try:
            if on_output is not None:
                watch.queue = asyncio.Queue()
                tasks.append(asyncio.create_task(forward(watch.queue, on_output)))
            budget = [limits.max_output_bytes]

            def output_limit() -> None:
                watch.hit(
                    LimitHit(
                        ErrorType.OUTPUT_LIMIT,
                        f"the program wrote more than {limits.max_output_bytes} bytes of output",
                    )
                )

            self._watch_outputs(budget, output_limit, watch.queue)
            watch.outputs = self._outputs
            writer = self._writer
            relay = GuestRelay(self._reader, writer, frozenset(request.tools), call_tool, limits)
            ended: GuestDone | BaseException | None = await _upload(self.guest, request, inputs)
            if ended is None:
                relay_task = asyncio.create_task(relay.run())
                if self._exit_task is None:
                    self._exit_task = asyncio.create_task(self.guest.wait())
                tasks.append(relay_task)
                # The start frame goes last: the loop has nothing left to do once it has woken
                # the guest, which the kernel may have placed on this very CPU.
                header = _start_header(request, self._backend.memory_cgroup_bytes, session)
                writer.write(encode_frame(header, request.code.encode()))
                ended = await _first_end(
                    writer, relay_task, self._exit_task, watch, request.timeout, limits
                )
            files: list[tuple[str, bytes]] = []
            if isinstance(ended, GuestDone) and ended.header.get("files"):
                try:
                    files = await asyncio.to_thread(
                        read_outputs, self.guest, limits.max_output_files_bytes
                    )
                except LimitHit as exc:
                    ended = exc
            relay.cancel_calls()
            if isinstance(ended, asyncio.IncompleteReadError | ConnectionError):
                assert self._exit_task is not None  # set whenever the program was started
                ended = await _channel_lost(self.guest, self._exit_task, limits)
            if not session:
                self.guest.kill()
            # The guest flushed its streams before reporting: what it wrote is in the pipes now.
            for output in self._outputs:
                output.read_available()
            if watch.queue is not None:
                await watch.queue.join()
            if watch.limit_hit.done() and isinstance(ended, GuestDone):
                # The outcome can overtake the output that broke the limit; the limit still wins.
                ended = watch.limit_hit.result()
            kept = (
                session
                and isinstance(ended, GuestDone)
                and not (self._exit_task is not None and self._exit_task.done())
            )
            outcome = _outcome(ended, self._outputs)
            outcome.files = files
            outcome.session_alive = kept
            outcome.duration_ms = (time.perf_counter() - started) * 1000
            outcome.tool_calls = relay.tool_calls
            if not outcome.success and not isinstance(ended, GuestDone):
                logger.info(
                    "execution ended by %s: %s",
                    outcome.error_type,
                    outcome.error_message,
                    extra={"correlation_id": request.correlation_id, "tenant": request.tenant},
                )
            return outcome
        finally:
            if relay is not None:
                relay.cancel_calls()  # also when cancelled: no tool call outlives its execution
            for task in tasks:
                task.cancel()
            if not kept:
                self.alive = False
                self.guest.kill()

    def close(self) -> None:
        """Kill the guest and close every descriptor; its exit is reaped in the background."""
        self.alive = False
        for output in self._outputs:
            output.close()
        for fd in (self._attached.stdout, self._attached.stderr):
            if fd >= 0:
                os.close(fd)
        self._attached.stdout = self._attached.stderr = -1
        if self._writer is not None:
            self._writer.close()
        else:
            self._attached.channel.close()
        self.guest.kill()
        _reap_later(self.guest, self._exit_task)


async def _upload(
    guest: GuestProcess,
    request: ExecutionRequest,
    inputs: asyncio.Queue[tuple[str, bytes]] | None,
) -> LimitHit | None:
    """Write the request's input files into the guest, within its time limit."""
    if not request.files:
        return None
    if inputs is None:
        raise ValueError("a request with files needs a queue of their chunks")
    try:
        async with asyncio.timeout(request.timeout):
            await write_inputs(guest, request.files, inputs)
    except TimeoutError:
        return LimitHit(
            ErrorType.TIMEOUT,
            f"the input files did not arrive within the {request.timeout:g} s time limit",
        )
    return None


def _start_header(
    request: ExecutionRequest, memory_cgroup_bytes: int, session: bool
) -> dict[str, Any]:
    return {
        "t": "start",
        "session": session,
        "tools": list(request.tools),
        "config": request.config,
        "context": request.context,
        "limits": guest_limits(request.limits, memory_cgroup_bytes),
    }


async def _first_end(
    writer: asyncio.StreamWriter,
    relay_task: asyncio.Task[GuestDone],
    exit_task: asyncio.Task[Any],
    watch: _Watch,
    timeout: float,
    limits: LimitsConfig,
) -> GuestDone | BaseException:
    """Send the start frame and wait for whatever ends the execution first."""
    try:
        async with asyncio.timeout(timeout):
            try:
                await writer.drain()
            except ConnectionError as exc:  # the guest died before it read the frame
                return exc
            waiting: list[asyncio.Future[Any]] = [relay_task, exit_task, watch.limit_hit]
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if relay_task in done:
            return relay_task.exception() or relay_task.result()
        if watch.limit_hit in done:
            return watch.limit_hit.result()
        # The guest exited; a done frame it wrote just before may still be in flight.
        try:
            return await asyncio.wait_for(asyncio.shield(relay_task), _DONE_AFTER_EXIT_S)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return describe_exit(exit_task.result(), limits)
        except (LimitHit, ProtocolError) as exc:
            return exc
    except TimeoutError:
        return LimitHit(
            ErrorType.TIMEOUT, f"the program ran longer than its {timeout:g} s time limit"
        )


async def _channel_lost(
    guest: GuestProcess, exit_task: asyncio.Task[Any], limits: LimitsConfig
) -> LimitHit:
    """Why the guest's channel closed before its outcome: how it died, or that it hung up.

    A guest still alive a moment later closed the channel itself; the SIGKILL that ends it
    then is the service's, not a limit's.
    """
    done, _ = await asyncio.wait({exit_task}, timeout=_DONE_AFTER_EXIT_S)
    if not done:
        guest.kill()
        exit = await guest.wait()
        if not (exit.memory_exceeded or exit.pids_exceeded or exit.sandbox_lost):
            return LimitHit(
                ErrorType.CRASHED, "the program closed its channel to the service and was stopped"
            )
        return describe_exit(exit, limits)
    return describe_exit(exit_task.result(), limits)


def _outcome(ended: GuestDone | BaseException, outputs: list[OutputPipe]) -> RunOutcome:
    outcome = RunOutcome(
        stdout=outputs[0].data(),
        stderr=outputs[1].data(),
        output_truncated=any(o.truncated for o in outputs),
    )
    if isinstance(ended, GuestDone):
        head = ended.header
        if head.get("ok"):
            outcome.success = True
            outcome.result_json = ended.payload
        else:
            outcome.error_type = str(head.get("type") or "Error")
            outcome.error_message = str(head.get("message") or "")
            outcome.traceback = str(head.get("traceback") or "")
    elif isinstance(ended, LimitHit):
        outcome.error_type, outcome.error_message = ended.error_type, str(ended)
    elif isinstance(ended, ProtocolError):
        outcome.error_type = ErrorType.PROTOCOL_ERROR
        outcome.error_message = f"the program broke the guest protocol: {ended}"
    else:
        outcome.error_type = ErrorType.CRASHED
        outcome.error_message = f"the program ended abnormally: {ended!r}"
    return outcome
