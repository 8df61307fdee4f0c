"""The program's stdout and stderr: read as they arrive, bounded, optionally streamed."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from codemode.executor.run.outcome import OutputSink, Stream


class OutputPipe:
    """One output pipe, read on the loop as data arrives; both pipes share one byte budget.

    Reading is synchronous (``add_reader`` + ``os.read``), so :meth:`read_available` can take
    what the pipe holds at the moment the outcome arrives without waiting for the guest to die.
    Chunks for streaming go to ``queue``; the limit is reported once through ``on_limit``.
    """

    def __init__(
        self,
        fd: int,
        which: Stream,
        budget: list[int],
        on_limit: Callable[[], None],
        queue: asyncio.Queue[tuple[Stream, bytes]] | None,
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
        self._eof = False
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, self.read_available)

    def restart(
        self,
        budget: list[int],
        on_limit: Callable[[], None],
        queue: asyncio.Queue[tuple[Stream, bytes]] | None,
    ) -> None:
        """Collect the next execution of a session: a fresh budget, buffer and queue."""
        self.chunks = []
        self.truncated = False
        self._budget, self._on_limit, self._queue = budget, on_limit, queue
        if not self._open and not self._eof:  # stopped at the last budget's end: read again
            self._open = True
            self._loop.add_reader(self.fd, self.read_available)

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
                self._eof = True
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


async def forward(queue: asyncio.Queue[tuple[Stream, bytes]], sink: OutputSink) -> None:
    """Stream output chunks in the order they were read."""
    while True:
        which, chunk = await queue.get()
        try:
            await sink(which, chunk)
        finally:
            queue.task_done()
