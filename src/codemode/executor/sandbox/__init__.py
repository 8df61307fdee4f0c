"""The sandbox: everything that isolates a guest, on the host side of the boundary.

:mod:`.interface` is what the rest of the executor sees (a backend starts guests, a guest can
be waited on and killed); :mod:`.factory` picks the backend. :mod:`.process` runs guests
unsandboxed; :mod:`.bwrap` and :mod:`.forkserver` are the kernel sandboxes, sharing
:mod:`.host` (launching bwrap, uids, pidfds, the pool) and :mod:`.runtime` (the read-only file
system). :mod:`.cgroups`, :mod:`.seccomp` and :mod:`.hostcheck` (``codemode doctor``) are what
they rest on. May import the standard library, :mod:`codemode.config` and the guest folder's
paths and control protocol; never gRPC, the wire or the SDK.
"""

from codemode.executor.sandbox.interface import (
    INPUT_DIR,
    OUTPUT_DIR,
    GuestExit,
    GuestFds,
    GuestProcess,
    PoolStats,
    ReadyGuest,
    SandboxBackend,
)

__all__ = [
    "INPUT_DIR",
    "OUTPUT_DIR",
    "GuestExit",
    "GuestFds",
    "GuestProcess",
    "PoolStats",
    "ReadyGuest",
    "SandboxBackend",
]
