"""The relay between a guest and the application: frames in, tool calls out, one outcome.

Calls to tools the request did not declare are answered "not available" here: a forged call
frame never reaches the application.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from codemode.config import LimitsConfig
from codemode.executor.guest.outcomes import ErrorType
from codemode.executor.guest.protocol import (
    FRAME_HEADER,
    MAX_HEADER_BYTES,
    ProtocolError,
    encode_frame,
    parse_header,
)
from codemode.executor.run.outcome import LimitHit, ToolCaller, ToolReply

#: Calls one program may have waiting at once; more are refused inside the guest.
MAX_PENDING_TOOL_CALLS = 256
#: Largest tool-call argument payload a guest may send, bytes.
MAX_ARGUMENT_BYTES = 16 * 1024 * 1024


@dataclass(slots=True)
class GuestDone:
    """The guest's ``done`` frame: its header and the JSON result (when it succeeded)."""

    header: dict[str, Any]
    payload: bytes = b""


async def read_frame(
    reader: asyncio.StreamReader, max_payload: int
) -> tuple[dict[str, Any], bytes]:
    head_len, payload_len = FRAME_HEADER.unpack(await reader.readexactly(FRAME_HEADER.size))
    if head_len > MAX_HEADER_BYTES:
        raise ProtocolError(f"frame header of {head_len} bytes")
    if payload_len > max_payload:
        raise LimitHit(
            ErrorType.RESULT_TOO_LARGE,
            f"the program sent {payload_len} bytes; the limit is {max_payload}",
        )
    header = parse_header(await reader.readexactly(head_len))
    return header, await reader.readexactly(payload_len)


class GuestRelay:
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

    async def run(self) -> GuestDone:
        """Relay until the done frame; raises LimitHit or ProtocolError on a misbehaving guest."""
        max_result = self._limits.max_result_bytes
        max_payload = max(max_result, MAX_ARGUMENT_BYTES)
        while True:
            head, payload = await read_frame(self._reader, max_payload)
            if head["t"] == "done":
                if len(payload) > max_result:
                    raise LimitHit(
                        ErrorType.RESULT_TOO_LARGE,
                        f"result is {len(payload)} bytes; limit {max_result}",
                    )
                return GuestDone(head, payload)
            if head["t"] != "call":
                raise ProtocolError(f"unexpected frame {head['t']!r} from the program")
            self.tool_calls += 1
            if len(self._pending) >= MAX_PENDING_TOOL_CALLS:
                raise LimitHit(
                    ErrorType.TOOL_CALL_LIMIT,
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
            reply = ToolReply.error(
                "AttributeError", f"tool {tool!r} is not available to this program"
            )
        else:
            reply = await self._call_tool(tool, arguments)
        head: dict[str, Any] = {"t": "reply", "id": call_id, "ok": reply.ok}
        if not reply.ok:
            head.update(type=reply.error_type, message=reply.error_message)
        async with self._write_lock:
            self._writer.write(encode_frame(head, reply.value_json if reply.ok else b""))
            await self._writer.drain()
