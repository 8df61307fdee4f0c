"""Which of grpcio's I/O engines this process uses: chosen once, before ``grpc`` is imported.

grpcio's C core reads the ``GRPC_EXPERIMENTS`` environment variable once, when ``grpc`` is
first imported. By default (grpcio 1.85 here) a channel's and a server's socket reads and
writes run on EventEngine threads, and with ``grpc.aio`` each message is then handed between
more threads on each side than on the older path, where the thread polling grpc.aio's
completion queue does the socket I/O itself, which costs a call markedly less time and CPU
on each side (``bench/floor.py`` measures both engines; bench/README.md has the figures).

So, unless the process says otherwise, ``import codemode`` imports ``grpc`` with the two
EventEngine experiments that move client and server sockets onto those threads turned off.
This is gRPC's own switch for them, and the path it falls back to is the one grpcio used by
default before them. The whole test suite runs on it.

It is a choice for the whole process, so it is made only when nothing else has made it:

- ``GRPC_EXPERIMENTS`` already set, even to an empty string: left alone, grpc's defaults
  apply (``GRPC_EXPERIMENTS= python app.py`` keeps them);
- ``grpc`` already imported before ``codemode``: too late to choose; nothing is changed.

The variable is removed again once ``grpc`` is imported, so that programs this process starts
do not inherit it.
"""

from __future__ import annotations

import os
import sys

#: The experiments turned off: EventEngine endpoints for client channels and for servers.
POLLER_IO = "-event_engine_client,-event_engine_listener"


def choose() -> bool:
    """Import ``grpc`` with :data:`POLLER_IO` unless the process chose; whether it was applied."""
    if "grpc" in sys.modules or "GRPC_EXPERIMENTS" in os.environ:
        return False
    os.environ["GRPC_EXPERIMENTS"] = POLLER_IO
    try:
        import grpc.aio  # noqa: F401 - the C core reads the variable here, once
    finally:
        del os.environ["GRPC_EXPERIMENTS"]
    return True


#: Whether this process runs grpc's I/O on the poller (`codemode serve` logs it at start).
APPLIED = choose()
