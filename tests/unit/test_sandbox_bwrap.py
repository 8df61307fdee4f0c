"""The bubblewrap backend's own behaviour against real sandboxes: close, cold start.

What it shares with the fork-server backend (containment, limits, cleanup after a kill) is
tested for both in ``test_sandbox_backends.py``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket

import pytest

from codemode.config import LimitsConfig
from codemode.executor.guest.protocol import encode_frame
from codemode.executor.sandbox import GuestFds
from codemode.executor.sandbox.bwrap import BwrapBackend
from codemode.executor.sandbox.host import DEFAULT_UID_BASE
from tests.unit.sandbox_harness import backend_uids, processes_in, processes_of, run

pytestmark = [
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the bwrap backend runs as root"),
]


async def test_close_leaves_no_cgroup_or_process() -> None:
    # A uid range of its own: other tests' backends may have sandboxes waiting in their pools.
    b = BwrapBackend(LimitsConfig(max_processes=16), uid_base=DEFAULT_UID_BASE + 100_000)
    await b.start()
    ours, theirs = socket.socketpair()
    out_r, out_w = os.pipe()
    guest = await b.spawn(GuestFds(theirs.fileno(), out_w, out_w))
    theirs.close()
    os.close(out_w)
    ours.sendall(encode_frame({"t": "start", "tools": []}, b"import time; time.sleep(600)"))
    await asyncio.sleep(0.5)
    sites = b.cgroup_support.sites.values() if b.cgroup_support else []
    groups = [s.parent / b._cgroups.name for s in sites if b._cgroups is not None]
    await b.close()
    exit_ = await guest.wait()
    assert exit_.signal == 9
    assert processes_of(guest.uid) == []  # type: ignore[attr-defined]
    assert not processes_in(backend_uids(b))
    for group in groups:
        assert not group.exists()
    ours.close()
    os.close(out_r)


async def test_cold_start_without_pool() -> None:
    b = BwrapBackend(pool_size=0, uid_base=DEFAULT_UID_BASE + 200_000)
    try:
        out = await run(b, "result = sum(range(10))")
        assert out.result == 45
    finally:
        await b.close()
