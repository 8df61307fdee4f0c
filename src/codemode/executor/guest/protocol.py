"""The framed channel between the service and a guest.

A frame is ``>II`` (header length, payload length), a JSON header, then raw payload bytes (JSON
values or the source code). Service to guest: ``start`` (code, tool names, config, context,
limits), ``reply`` (a tool's answer). Guest to service: ``call`` (a tool call), ``done`` (the
outcome). Standard library only: the guest imports it inside the sandbox, the service beside it.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import struct
import threading
from collections.abc import Mapping
from typing import Any

FRAME_HEADER = struct.Struct(">II")
#: Largest header a peer may send; payloads are bounded by the limits in the start frame.
MAX_HEADER_BYTES = 1 << 20
#: Longest a guest waits, after sending its outcome, for the service to kill it, ms.
LINGER_MS = 5000
#: Where a program finds its input files (read-only, root's) and leaves its output files.
INPUT_DIR = "/input"
OUTPUT_DIR = "/output"


class ProtocolError(Exception):
    """The peer sent something that is not a frame of this protocol."""


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
