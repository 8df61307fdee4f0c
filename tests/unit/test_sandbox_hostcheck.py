"""check_host() on this machine: fast, and every required property holds where bwrap runs."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from codemode.executor.sandbox.hostcheck import Check, check_host, isolation_ready


def test_check_host_is_fast_and_well_formed() -> None:
    started = time.perf_counter()
    checks = check_host()
    assert time.perf_counter() - started < 2.0
    assert checks
    assert all(isinstance(c, Check) and c.name and c.detail for c in checks)
    assert all(c.fix for c in checks if not c.ok)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("bwrap") is None, reason="needs root and bubblewrap"
)
def test_this_host_gives_isolation() -> None:
    checks = check_host()
    failed = [c for c in checks if c.required and not c.ok]
    assert not failed, failed
    assert isolation_ready(checks)
    names = {c.name for c in checks}
    assert {"namespaces", "non-root uid", "privileges dropped", "seccomp filter"} <= names
