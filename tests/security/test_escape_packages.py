"""Escape attempts through the packages surface: the sandbox venv and the preloaded modules.

The security server binds the test sandbox venv (numpy, pandas) read-only and preloads pandas
in its zygote. These attacks try to change the venv for later executions, to leave a changed
preloaded module behind, and to use pandas' and numpy's own native code as a way out. The
suite's ``contained`` fixture checks afterwards that the host is unchanged and the service
still serves.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.security.conftest import App, Host
from tests.security.test_escape import all_failed, no_leak, program, report

pytestmark = pytest.mark.security


def _tree_digest(root: Path) -> str:
    """A digest of every file's path, mode and bytes under ``root``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(oct(path.stat().st_mode).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


async def test_writing_into_the_sandbox_venv(app: App, host: Host, sandbox_venv: Path) -> None:
    """Writing, renaming or chmod-ing anything of the sandbox venv fails; the host copy is
    byte for byte what it was."""
    site = next((sandbox_venv / "lib").glob("python*/site-packages"))
    before = _tree_digest(site)
    code = program(
        """
        import os, pandas, numpy
        site = os.path.dirname(os.path.dirname(pandas.__file__))
        targets = [pandas.__file__, numpy.__file__, site + "/evil.pth",
                   site + "/sitecustomize.py", site + "/pandas/evil.py",
                   os.path.dirname(site) + "/evil.py"]
        def write(path):
            with open(path, "ab") as handle:
                handle.write(b"import os; os.system('id')\\n")
        out = {path: attempt(write, path) for path in targets}
        out["chmod"] = attempt(os.chmod, pandas.__file__, 0o777)
        out["rename"] = attempt(os.rename, pandas.__file__, "/tmp/p.py")
        out["unlink"] = attempt(os.unlink, numpy.__file__)
        out["mkdir"] = attempt(os.mkdir, site + "/evil")
        out["utime"] = attempt(os.utime, pandas.__file__, (0, 0))
        result = out
        """
    )
    result = await app.run(code)
    no_leak(result, host)
    all_failed(report(result))
    assert _tree_digest(site) == before, "the sandbox venv changed on the host"


async def test_patched_preload_does_not_reach_the_next_execution(app: App, host: Host) -> None:
    """A program that monkeypatches the preloaded pandas (module, class, sys.modules) changes
    only its own copy: the next execution sees pristine pandas."""
    patch = program(
        """
        import sys, pandas
        pandas.DataFrame.sum = lambda self, *a, **k: "pwned"
        pandas.read_csv = lambda *a, **k: "pwned"
        pandas.__version__ = "pwned"
        sys.modules["numpy"] = None
        import builtins
        builtins.__import__ = lambda *a, **k: "pwned"
        result = "patched"
        """
    )
    assert report(await app.run(patch)) == "patched"
    check = """
import sys, numpy, pandas
df = pandas.DataFrame({"a": [1, 2, 3]})
result = [int(df.a.sum()), pandas.__version__ != "pwned", pandas.read_csv.__name__,
          sys.modules["numpy"] is numpy]
"""
    got = report(await app.run(check))
    assert got == [6, True, "read_csv", True], got


async def test_native_code_of_numpy_stays_in_the_sandbox(app: App, host: Host) -> None:
    """numpy's and ctypes' native paths (a memory map of ``/dev/mem``, the service's memory, a
    C call to ``system``, libc's ``unshare``/``setns``) are held by the same filter and
    namespaces as plain Python."""
    code = program(
        """
        import ctypes, numpy as np
        libc = ctypes.CDLL(None, use_errno=True)
        def native_system():
            rc = libc.system(b"id > /tmp/native-ran")
            if rc != 0 or not os.path.exists("/tmp/native-ran"):
                raise OSError(ctypes.get_errno(), "system failed", rc)
            return rc
        def native_unshare():
            if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
                raise OSError(ctypes.get_errno(), "unshare")
        def native_setns():
            fd = os.open("/proc/1/ns/mnt", os.O_RDONLY)
            if libc.setns(fd, 0) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        def map_host_memory():
            return np.memmap("/dev/mem", dtype="uint8", mode="r", shape=(16,))[0]
        def read_service_memory():
            return np.fromfile("/proc/1/../%d/mem" % os.getppid(), dtype="uint8", count=16)
        out = {
            "system": attempt(native_system),
            "unshare": attempt(native_unshare),
            "setns": attempt(native_setns),
            "/dev/mem": attempt(map_host_memory),
            "parent mem": attempt(read_service_memory),
        }
        out["sum"] = ["err", "check", int(np.arange(10).sum())]  # numpy itself works
        result = out
        """
    )
    result = await app.run(code)
    no_leak(result, host)
    got = report(result)
    assert got.pop("sum") == ["err", "check", 45], got
    all_failed(got)
