"""What one execution takes and gives back, as plain values: no gRPC, no proto.

The servicer builds an :class:`ExecutionRequest` from the start frame and turns the
:class:`RunOutcome` into the wire's result; :mod:`.execution` knows neither.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from codemode.config import LimitsConfig
from codemode.executor.guest.outcomes import ErrorType
from codemode.executor.sandbox import GuestExit

Stream = Literal["stdout", "stderr"]


@dataclass(frozen=True, slots=True)
class FileInfo:
    """A file by name (one path component) and size in bytes."""

    name: str
    size: int


@dataclass(frozen=True, slots=True)
class ExecutionRequest:
    """One validated execution: the program, what it may call and see, and its limits."""

    code: str
    tools: tuple[str, ...]
    timeout: float
    limits: LimitsConfig
    config: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)
    stream_output: bool = False
    correlation_id: str = ""
    #: Placed read-only in ``/input`` before the program starts; their bytes come separately.
    files: tuple[FileInfo, ...] = ()
    #: The API key id the request came with, for the log lines of its execution.
    tenant: str = ""


@dataclass(frozen=True, slots=True)
class ToolReply:
    """The application's answer to one tool call: a JSON value, or an error type and message."""

    ok: bool
    value_json: bytes = b""
    error_type: str = ""
    error_message: str = ""

    @classmethod
    def error(cls, error_type: str, message: str) -> ToolReply:
        return cls(ok=False, error_type=error_type, error_message=message)


#: ``call_tool(tool, arguments_json)``: asks the application, returns its reply.
ToolCaller = Callable[[str, bytes], Awaitable[ToolReply]]
#: ``on_output(stream, data)``: a chunk of the program's output, as it is written.
OutputSink = Callable[[Stream, bytes], Awaitable[None]]


@dataclass(slots=True)
class RunOutcome:
    """How an execution ended; ``error_type`` is an :class:`ErrorType` or the program's own."""

    success: bool = False
    result_json: bytes = b""
    error_type: str = ""
    error_message: str = ""
    traceback: str = ""
    stdout: bytes = b""
    stderr: bytes = b""
    output_truncated: bool = False
    duration_ms: float = 0.0
    tool_calls: int = 0
    #: The regular files the program left in ``/output``: (name, bytes), sorted by name.
    files: list[tuple[str, bytes]] = field(default_factory=list)
    #: In a session: the sandbox is still alive and its state kept for the next execution.
    session_alive: bool = False


class LimitHit(Exception):
    """The execution crossed a limit; ``error_type`` is what the client sees."""

    def __init__(self, error_type: ErrorType, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


def describe_exit(exit: GuestExit, limits: LimitsConfig) -> LimitHit:
    """Why a guest ended without reporting an outcome."""
    if exit.memory_exceeded:
        return LimitHit(
            ErrorType.MEMORY_LIMIT,
            f"the program exceeded its memory limit of {limits.memory_bytes} bytes",
        )
    if exit.pids_exceeded:
        return LimitHit(
            ErrorType.PROCESS_LIMIT,
            f"the program exceeded its limit of {limits.max_processes} processes",
        )
    if exit.sandbox_lost:
        return LimitHit(
            ErrorType.CRASHED,
            "the sandbox's fork server died and took the program with it; the service starts "
            "a new one, so the program can be run again",
        )
    if exit.signal == signal.SIGXCPU or exit.signal == signal.SIGKILL:
        # RLIMIT_CPU sends SIGXCPU, then SIGKILL one second later; the cgroup OOM killer is
        # reported through memory_exceeded above.
        return LimitHit(
            ErrorType.CPU_LIMIT, f"the program used its {limits.cpu_seconds:g} s of CPU time"
        )
    if exit.signal is not None:
        name = signal.Signals(exit.signal).name
        return LimitHit(ErrorType.CRASHED, f"the program's process was killed by {name}")
    return LimitHit(
        ErrorType.CRASHED,
        f"the program's process exited with code {exit.returncode} before finishing",
    )
