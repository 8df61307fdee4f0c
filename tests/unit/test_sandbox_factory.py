"""Choosing a backend, the bwrap command lines, and the runtime layout: nothing is started here
(apart from ``make_backend``'s host check, which probes one sandbox)."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import SecretStr

import codemode
from codemode.config import ExecutorConfig, LimitsConfig
from codemode.executor.guest import GUEST_DIR
from codemode.executor.sandbox import hostcheck
from codemode.executor.sandbox.bwrap import BwrapBackend, argv_head, sandbox_argv
from codemode.executor.sandbox.factory import (
    PROCESS_WARNING,
    IsolationUnavailable,
    make_backend,
)
from codemode.executor.sandbox.forkserver import ForkServerBackend
from codemode.executor.sandbox.host import HostSandboxBackend, bwrap_runtime
from codemode.executor.sandbox.process import ProcessBackend
from codemode.executor.sandbox.runtime import GUEST_MOUNT, RuntimeLayout, discover_runtime

API_KEY = "test-key-0123456789"
Isolation = Literal["auto", "forkserver", "bwrap", "process"]
LIMITS = LimitsConfig(memory_bytes=128 << 20, tmpfs_bytes=4 << 20)

needs_sandbox = pytest.mark.skipif(
    shutil.which("bwrap") is None or os.geteuid() != 0,
    reason="the sandbox backends need bubblewrap and root",
)

#: A layout of made-up paths, so that each one can be found in the command line.
LAYOUT = RuntimeLayout(
    executable="/opt/py/bin/python3.11",
    dirs=("/codemode", "/opt", "/opt/py"),
    binds=("/opt/py/bin/python3.11", "/opt/py/lib/python3.11", "/usr/bin/setpriv"),
    symlinks=(("/lib", "usr/lib"),),
    masks=("/opt/py/lib/python3.11/site-packages",),
    setpriv="/usr/bin/setpriv",
)

#: What setpriv must do before the interpreter starts, in this order.
SETPRIV_FLAGS = [
    "--clear-groups",
    "--no-new-privs",
    "--bounding-set=-all",
    "--inh-caps=-all",
    "--ambient-caps=-all",
]


def _config(isolation: Isolation) -> ExecutorConfig:
    return ExecutorConfig(api_key=SecretStr(API_KEY), isolation=isolation, limits=LIMITS)


def _after(argv: list[str], *items: str) -> bool:
    """Whether ``items`` appear in ``argv`` one right after the other."""
    n = len(items)
    return any(tuple(argv[i : i + n]) == items for i in range(len(argv) - n + 1))


# ------------------------------------------------------------------------------------------
# make_backend


def test_process_isolation_gives_the_process_backend_and_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """isolation=process is the unsandboxed backend, and choosing it logs the warning."""
    with caplog.at_level(logging.WARNING, logger="codemode.executor"):
        backend = make_backend(_config("process"))
    assert type(backend) is ProcessBackend
    assert not backend.isolated
    assert PROCESS_WARNING in caplog.messages


@needs_sandbox
@pytest.mark.parametrize(
    ("isolation", "kind"),
    [("bwrap", BwrapBackend), ("forkserver", ForkServerBackend), ("auto", ForkServerBackend)],
)
def test_sandbox_isolation_gives_its_backend_unstarted(
    isolation: Isolation, kind: type[HostSandboxBackend[Any]]
) -> None:
    """bwrap, forkserver and auto give their sandbox backend with the config's limits, not
    yet started."""
    backend = make_backend(_config(isolation))
    assert type(backend) is kind
    assert isinstance(backend, HostSandboxBackend)
    assert backend.isolated
    assert backend.limits == LIMITS
    assert backend.layout is None  # start() lays out the runtime; nothing ran yet


def test_missing_host_property_refuses_the_sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed required host check refuses the sandbox, naming the check and its fix; no
    silent fall back to unsandboxed processes."""
    checks = [
        hostcheck.Check("seccomp filter", False, "no libseccomp", "apt install python3-seccomp"),
        hostcheck.Check("memory cgroup", False, "absent", "delegate it", required=False),
    ]
    monkeypatch.setattr(hostcheck, "check_host", lambda: checks)
    with pytest.raises(IsolationUnavailable) as info:
        make_backend(_config("auto"))
    message = str(info.value)
    assert "seccomp filter: no libseccomp (fix: apt install python3-seccomp)" in message
    assert "memory cgroup" not in message  # optional checks do not refuse
    assert "--isolation=process" in message


# ------------------------------------------------------------------------------------------
# bwrap's command line


#: Limits whose file-system sizes are easy to find in a command line.
SMALL = LimitsConfig(tmpfs_bytes=4 << 20, max_input_bytes=5 << 20, max_output_files_bytes=6 << 20)


def test_argv_head_unshares_namespaces_and_lays_out_the_runtime() -> None:
    """The head starts fresh namespaces, binds the runtime read-only, masks site-packages,
    binds the guest folder and gives private size-bounded /tmp, /dev/shm, /input and /output."""
    head = argv_head("/usr/bin/bwrap", LAYOUT, SMALL)
    assert head[0] == "/usr/bin/bwrap"
    for flag in ("--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts"):
        assert flag in head
    for flag in ("--die-with-parent", "--new-session", "--as-pid-1", "--clearenv"):
        assert flag in head
    for path in LAYOUT.binds:
        assert _after(head, "--ro-bind", path, path)
    assert _after(head, "--symlink", "usr/lib", "/lib")
    mask = LAYOUT.masks[0]
    assert _after(head, "--tmpfs", mask, "--remount-ro", mask)
    assert _after(head, "--ro-bind", GUEST_DIR, GUEST_MOUNT)
    assert _after(head, "--size", str(4 << 20), "--tmpfs", "/tmp")
    assert _after(head, "--size", str(4 << 20), "--tmpfs", "/dev/shm")
    assert _after(head, "--perms", "0755", "--size", str(5 << 20), "--tmpfs", "/input")
    assert _after(head, "--perms", "01777", "--size", str(6 << 20), "--tmpfs", "/output")
    assert head[-4:] == ["--remount-ro", "/", "--chdir", "/tmp"]


def test_sandbox_argv_drops_every_privilege_before_the_program() -> None:
    """After the head: the seccomp and info fds, then setpriv to the uid with every capability
    set cleared (ambient included), then the interpreter and the program."""
    head = argv_head("/usr/bin/bwrap", LAYOUT, SMALL)
    before = list(head)
    argv = sandbox_argv(head, LAYOUT, 0x70001234, ["-I", "-c", "pass"], seccomp_fd=7, info_fd=9)
    assert head == before  # the shared head is not modified
    assert argv[: len(head)] == head
    assert argv[len(head) :] == [
        "--seccomp",
        "7",
        "--info-fd",
        "9",
        "--",
        "/usr/bin/setpriv",
        f"--reuid={0x70001234}",
        f"--regid={0x70001234}",
        *SETPRIV_FLAGS,
        "--",
        "/opt/py/bin/python3.11",
        "-I",
        "-c",
        "pass",
    ]


def test_sandbox_argv_without_descriptors_passes_none() -> None:
    """Without a filter or an info fd, bwrap is given neither option."""
    argv = sandbox_argv([], LAYOUT, 1000, ["-c", "pass"])
    assert "--seccomp" not in argv
    assert "--info-fd" not in argv
    assert argv[:2] == ["--", "/usr/bin/setpriv"]
    assert "--ambient-caps=-all" in argv


def test_bwrap_backend_command_is_built_by_sandbox_argv() -> None:
    """The bwrap backend's sandbox command is the shared builder's, running the guest folder."""
    backend = BwrapBackend(LIMITS)
    backend.layout = LAYOUT
    backend._prepared("/usr/bin/bwrap", LAYOUT)
    program = ["-I", "-S", "-B", GUEST_MOUNT, *backend.guest_options(), "--fds-from", "8"]
    expected = sandbox_argv(
        argv_head("/usr/bin/bwrap", LAYOUT, LIMITS),
        LAYOUT,
        5000,
        program,
        seccomp_fd=6,
        info_fd=7,
    )
    assert backend.command(5000, 6, 7, 8) == expected


# ------------------------------------------------------------------------------------------
# The runtime this host lays out


@pytest.fixture(scope="module")
def layout() -> RuntimeLayout:
    if shutil.which("setpriv") is None or shutil.which("ldd") is None:
        pytest.skip("discover_runtime needs setpriv and ldd")
    return discover_runtime()


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def test_runtime_binds_the_interpreter_and_setpriv(layout: RuntimeLayout) -> None:
    """The real interpreter and setpriv are bound (themselves or within a bound folder)."""
    assert layout.executable == os.path.realpath(sys.executable)
    for path in (layout.executable, layout.setpriv):
        assert os.path.isabs(path)
        assert any(_under(path, bound) for bound in layout.binds), path


def test_runtime_mounts_the_guest_folder(layout: RuntimeLayout) -> None:
    """The guest folder is bound read-only at its fixed mount, whose parent the layout makes."""
    assert os.path.dirname(GUEST_MOUNT) in layout.dirs
    assert _after(bwrap_runtime(layout), "--ro-bind", GUEST_DIR, GUEST_MOUNT)


def test_runtime_hides_site_packages_and_this_package(layout: RuntimeLayout) -> None:
    """Installed packages under the standard library are masked, and no bind reaches the
    ``codemode`` package's sources."""
    stdlib = next(b for b in layout.binds if os.path.isfile(os.path.join(b, "os.py")))
    present = [
        os.path.join(stdlib, name)
        for name in ("site-packages", "dist-packages")
        if os.path.isdir(os.path.join(stdlib, name))
    ]
    assert sorted(layout.masks) == sorted(present)
    package = str(Path(codemode.__file__).resolve().parent)
    assert not any(_under(package, bound) for bound in layout.binds)
    assert not any(_under(bound, package) for bound in layout.binds)
    assert not any("site-packages" in bound for bound in layout.binds)
