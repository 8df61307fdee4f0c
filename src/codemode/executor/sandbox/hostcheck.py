"""What isolation this host gives the bwrap backend: one :class:`Check` per property.

Used by ``codemode doctor`` (prints every check, and what programs can import:
:func:`contents_checks`) and ``codemode serve`` (refuses to start with the kernel sandbox when a
*required* check fails). A failed optional check degrades a limit
(e.g. no memory cgroup: the guest's ``RLIMIT_AS`` is the memory bound). Runs in well under a
second: the one real probe starts a single sandbox the way the backend does.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from codemode.config import LimitsConfig
from codemode.executor.sandbox import cgroups, seccomp
from codemode.executor.sandbox.bwrap import BwrapBackend, argv_head, sandbox_argv
from codemode.executor.sandbox.environment import zoneinfo_binds
from codemode.executor.sandbox.host import DEFAULT_UID_BASE
from codemode.executor.sandbox.interface import SandboxBackend
from codemode.executor.sandbox.process import ProcessBackend
from codemode.executor.sandbox.runtime import RuntimeLayout, SandboxUnavailable, discover_runtime
from codemode.executor.sandbox.venv import Package, SandboxVenv, VenvError, inspect_venv


@dataclass(frozen=True, slots=True)
class Check:
    """One property: whether it holds, what was seen, and how to fix it when it does not."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


_PROBE = (
    "import json, os, socket\n"
    "s = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines())\n"
    "try:\n"
    "    socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(('127.0.0.1', 1))\n"
    "    net = 'connected'\n"
    "except OSError as exc:\n"
    "    net = exc.errno\n"
    "try:\n"
    "    open('/proc/sys/kernel/hostname', 'w').write('x')\n"
    "    sysctl = 'written'\n"
    "except OSError as exc:\n"
    "    sysctl = exc.errno\n"
    "print(json.dumps({'uid': os.getuid(), 'caps': s['CapEff'].strip(),"
    " 'nnp': s['NoNewPrivs'].strip(), 'seccomp': s['Seccomp'].strip(), 'net': net,"
    " 'sysctl': sysctl, 'procs': len([p for p in os.listdir('/proc') if p.isdigit()])}))\n"
)


def check_host() -> list[Check]:
    """Probe every property the bwrap backend relies on."""
    checks: list[Check] = []
    root = os.geteuid() == 0
    checks.append(
        Check(
            "root",
            root,
            "running as root" if root else f"running as uid {os.geteuid()}",
            "run `codemode serve` as root: it starts each sandbox as root and drops it to a "
            "non-root uid of its own",
        )
    )
    bwrap = shutil.which("bwrap")
    checks.append(
        Check(
            "bubblewrap",
            bwrap is not None,
            bwrap or "bwrap not found on PATH",
            "apt-get install bubblewrap",
        )
    )
    setpriv = shutil.which("setpriv")
    checks.append(
        Check(
            "setpriv",
            setpriv is not None,
            setpriv or "setpriv not found on PATH",
            "apt-get install util-linux",
        )
    )
    seccomp_ok, seccomp_detail = seccomp.binding_available()
    checks.append(
        Check(
            "seccomp binding",
            seccomp_ok,
            seccomp_detail,
            "pip install pyseccomp; apt-get install libseccomp2",
        )
    )
    checks.append(_userns_check())
    checks += _cgroup_checks()
    if root and bwrap and setpriv:
        checks += _sandbox_probe(bwrap, with_seccomp=seccomp_ok)
    else:
        checks.append(
            Check(
                "sandbox probe",
                False,
                "skipped: needs root, bwrap and setpriv",
                "fix the checks above",
            )
        )
    return checks


def isolation_ready(checks: list[Check]) -> bool:
    """True when every required check passed."""
    return all(c.ok for c in checks if c.required)


def _userns_check() -> Check:
    try:
        limit = int(Path("/proc/sys/user/max_user_namespaces").read_text())
    except (OSError, ValueError):
        limit = -1
    return Check(
        "user namespaces",
        limit > 0,
        f"user.max_user_namespaces = {limit} (not needed: bwrap runs as root here, the guest "
        "gets a non-root uid in the initial user namespace and cannot create user namespaces)",
        "sysctl -w user.max_user_namespaces=15000",
        required=False,
    )


def _cgroup_checks() -> list[Check]:
    support = cgroups.discover()
    out = []
    for controller in cgroups.CONTROLLERS:
        site = support.sites.get(controller)
        if site is not None:
            detail = f"cgroup v{site.version} at {site.parent}"
        else:
            reasons = [p for p in support.problems if p.startswith(f"{controller}:")]
            fallback = "RLIMIT_AS" if controller == "memory" else "RLIMIT_NPROC"
            detail = "; ".join(reasons) + f" -- falling back to {fallback}"
        out.append(
            Check(
                f"cgroup {controller}",
                site is not None,
                detail,
                "give the service a cgroup where it may create children with the "
                f"{controller} controller (v1 mount, or v2 with it delegated)",
                required=False,
            )
        )
    return out


@functools.lru_cache(maxsize=1)
def _layout() -> RuntimeLayout:
    return discover_runtime()


def _sandbox_probe(bwrap: str, *, with_seccomp: bool) -> list[Check]:
    """Start one sandbox with the bwrap backend's own argv builders and look at it from inside."""
    try:
        layout = _layout()
    except Exception as exc:  # any failure to lay out the runtime is the finding
        return [Check("python runtime", False, str(exc), "install a full CPython >= 3.11")]
    read_fd = None
    if with_seccomp:
        read_fd, write_fd = os.pipe()
        os.write(write_fd, seccomp.build_filter_bpf())
        os.close(write_fd)
    head = argv_head(bwrap, layout, LimitsConfig())
    argv = sandbox_argv(
        head, layout, DEFAULT_UID_BASE, ["-I", "-S", "-B", "-c", _PROBE], seccomp_fd=read_fd
    )
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=10,
            pass_fds=(read_fd,) if read_fd is not None else (),
            env={"LANG": "C.UTF-8"},
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [Check("sandbox probe", False, str(exc), "see `bwrap --version`")]
    finally:
        if read_fd is not None:
            os.close(read_fd)
    try:
        seen = json.loads(proc.stdout)
    except ValueError:
        detail = (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}")[-500:]
        return [
            Check(
                "sandbox probe",
                False,
                f"the sandboxed runtime did not start: {detail}",
                "check that bwrap can create pid/net/ipc/uts/mount namespaces here "
                "(containers may forbid it) and that the runtime is readable",
            )
        ]
    return [
        Check(
            "namespaces",
            seen["procs"] == 1 and seen["net"] != "connected",
            f"alone in its pid namespace: {seen['procs'] == 1}; "
            f"connect to 127.0.0.1: {_outcome(seen['net'])}",
            "bwrap must be able to unshare pid, net, ipc, uts and mount namespaces",
        ),
        Check(
            "non-root uid",
            seen["uid"] == DEFAULT_UID_BASE and seen["sysctl"] != "written",
            f"guest uid {seen['uid']}, write to /proc/sys: {_outcome(seen['sysctl'])}",
            "setpriv must be able to switch to the sandbox uid range",
        ),
        Check(
            "python runtime readable",
            True,
            f"{layout.executable} started as uid {seen['uid']}",
        ),
        Check(
            "privileges dropped",
            seen["caps"] == "0000000000000000" and seen["nnp"] == "1",
            f"CapEff {seen['caps']}, NoNewPrivs {seen['nnp']}",
            "setpriv must support --bounding-set and --no-new-privs (util-linux >= 2.33)",
        ),
        Check(
            "seccomp filter",
            seen["seccomp"] == "2",
            f"Seccomp mode {seen['seccomp']} in the guest",
            "install the seccomp binding (see above)",
            required=with_seccomp,
        ),
    ]


def _outcome(value: object) -> str:
    """An attempt's outcome as the probe saw it: an errno by name, or the word it reported."""
    if isinstance(value, int):
        return f"refused ({errno.errorcode.get(value, value)})"
    return str(value)


def contents_checks(
    sandbox_venv: str | None, preload: Sequence[str], *, sandboxed: bool
) -> tuple[list[Check], tuple[Package, ...]]:
    """What programs can import: the sandbox venv checked, the preloads imported in a sandbox
    made as the backends make theirs (``sandboxed``; else in a plain process), time zones.

    Returns the checks and the venv's packages.
    """
    checks: list[Check] = []
    packages: tuple[Package, ...] = ()
    venv: SandboxVenv | None = None
    if sandbox_venv is not None:
        try:
            venv = inspect_venv(sandbox_venv)
        except VenvError as exc:
            checks.append(Check("sandbox venv", False, str(exc), "make the venv as it says"))
        else:
            packages = venv.packages
            checks.append(
                Check(
                    "sandbox venv",
                    True,
                    f"{venv.root}: site-packages bound read-only, {len(packages)} packages, "
                    f"{len(venv.libraries)} host libraries for their extensions",
                )
            )
    else:
        checks.append(
            Check(
                "sandbox venv",
                True,
                "none: programs import the standard library only",
                "--sandbox-venv DIR (a venv made with this Python) for third-party packages",
                required=False,
            )
        )
    if preload and (venv is not None or sandbox_venv is None):
        checks.append(asyncio.run(_preload_check(sandbox_venv, preload, sandboxed=sandboxed)))
    zoneinfo = zoneinfo_binds()
    has_tzdata = any(p.name.lower() == "tzdata" for p in packages)
    checks.append(
        Check(
            "time zones",
            bool(zoneinfo) or has_tzdata,
            f"{zoneinfo[0]} bound read-only"
            if zoneinfo
            else ("tzdata from the sandbox venv" if has_tzdata else "no time-zone database"),
            "apt-get install tzdata, or pip install tzdata into the sandbox venv",
            required=False,
        )
    )
    return checks, packages


async def _preload_check(
    sandbox_venv: str | None, preload: Sequence[str], *, sandboxed: bool
) -> Check:
    """Import ``preload`` as the one-shot backend checks it at start, and time it."""
    backend: SandboxBackend
    if sandboxed:
        backend = BwrapBackend(sandbox_venv=sandbox_venv, preload=preload, pool_size=0)
    else:
        backend = ProcessBackend(sandbox_venv=sandbox_venv, preload=preload)
    started = time.perf_counter()
    try:
        await backend.start()
    except SandboxUnavailable as exc:
        return Check("preload", False, str(exc), "install the module into the sandbox venv")
    finally:
        await backend.close()
    where = "in a sandbox" if sandboxed else "in a plain process"
    return Check(
        "preload",
        True,
        f"{', '.join(preload)} imported {where} in {time.perf_counter() - started:.1f} s",
    )
