"""The error types an execution can end with besides the program's own exceptions.

One table for every side: the guest sets some, the service's run and servicer the rest, and
the SDK compares them (through :mod:`codemode.wire.names`). A program's own uncaught exception
is reported by its class name (``ZeroDivisionError``), which is not in this table.
Standard library only: the guest imports it inside the sandbox.
"""

from __future__ import annotations

import enum


class ErrorType(enum.StrEnum):
    """``ExecutionResult.error_type`` values that Codemode itself sets (the README's table)."""

    TIMEOUT = "Timeout"
    CPU_LIMIT = "CpuLimit"
    MEMORY_LIMIT = "MemoryLimit"
    PROCESS_LIMIT = "ProcessLimit"
    OUTPUT_LIMIT = "OutputLimit"
    OUTPUT_FILES_LIMIT = "OutputFilesLimit"
    RESULT_TOO_LARGE = "ResultTooLarge"
    RESULT_NOT_SERIALIZABLE = "ResultNotSerializable"
    TOOL_CALL_LIMIT = "ToolCallLimit"
    TOOL_ERROR = "ToolError"
    CRASHED = "Crashed"
    CANCELLED = "Cancelled"
    PROTOCOL_ERROR = "ProtocolError"
