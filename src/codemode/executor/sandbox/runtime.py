"""The host files a sandboxed interpreter needs, and how bubblewrap lays them out.

:func:`discover_runtime` finds this interpreter, its standard library, the shared libraries
they load (``ldd``) and ``setpriv``, resolving every symlink, so that a sandbox can bind exactly
these read-only and nothing else of the host. The interpreter's own site-packages is hidden
behind an empty tmpfs. A backend adds what its guests need besides (the sandbox venv's
site-packages and libraries, the time-zone database, generated ``/etc/passwd``), and the
environment every guest starts with.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

#: Where the guest folder appears inside every sandbox.
GUEST_MOUNT = "/codemode/guest"
#: Where a sandbox sees the sandbox venv's site-packages, wherever it lives on the host (a host
#: path under /tmp, say, would be hidden by each guest's own /tmp).
SANDBOX_SITE_PACKAGES = "/codemode/site-packages"


class SandboxUnavailable(RuntimeError):
    """This host cannot give the isolation a backend promises; the message says what lacks."""


@dataclass(frozen=True, slots=True)
class RuntimeLayout:
    """The host files a guest needs, as bwrap should lay them out (all read-only)."""

    executable: str
    dirs: tuple[str, ...]
    binds: tuple[str, ...]
    symlinks: tuple[tuple[str, str], ...]  # (path in sandbox, link target)
    masks: tuple[str, ...]  # directories hidden behind an empty read-only tmpfs
    setpriv: str
    #: Host files or directories bound read-only at another path: (host path, path in sandbox).
    files: tuple[tuple[str, str], ...] = ()
    #: The guest's environment besides ``LANG`` (bwrap starts from an empty one).
    env: tuple[tuple[str, str], ...] = ()


def _resolve(path: str, links: dict[str, str], depth: int = 0) -> str:
    """The real path of ``path``, recording every symlink met (at its resolved parent)."""
    if depth > 40:
        raise OSError(f"too many levels of symbolic links resolving {path}")
    parts = [p for p in os.path.normpath(path).split("/") if p]
    current = "/"
    for index, part in enumerate(parts):
        candidate = os.path.join(current, part)
        if os.path.islink(candidate):
            target = os.readlink(candidate)
            links[candidate] = target
            base = target if target.startswith("/") else os.path.join(current, target)
            rest = os.path.join(base, *parts[index + 1 :])
            return _resolve(os.path.normpath(rest), links, depth + 1)
        current = candidate
    return current


def shared_libraries(paths: Sequence[str]) -> set[str]:
    """Shared objects (absolute paths) that ``paths`` load, as the dynamic loader resolves them."""
    ldd = shutil.which("ldd")
    if ldd is None:
        raise SandboxUnavailable("ldd is missing (Debian package libc-bin)")
    out = subprocess.run(
        [ldd, *paths], capture_output=True, text=True, check=False, env={"LC_ALL": "C"}
    ).stdout
    found: set[str] = set()
    for line in out.splitlines():
        if not line.startswith("\t"):
            continue  # a "file:" header when several files are listed
        for token in line.split():
            if token.startswith("/"):
                found.add(token)
    return found


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def discover_runtime(
    executable: str | None = None,
    *,
    extra: Sequence[str] = (),
    files: Sequence[tuple[str, str]] = (),
    symlinks: Sequence[tuple[str, str]] = (),
    env: Sequence[tuple[str, str]] = (),
) -> RuntimeLayout:
    """Lay out this interpreter, its standard library and shared libraries, and setpriv.

    ``extra``: more host files or directories to bind read-only at their own path (resolved
    like the runtime's); ``files``: (host file or directory, path in sandbox) binds;
    ``symlinks``: (path in sandbox, target) links to make; ``env``: (name, value) pairs of the
    guest's environment.
    """
    exe = os.path.realpath(executable or sys.executable)
    stdlib = sysconfig.get_path("stdlib")
    dynload = sysconfig.get_config_var("DESTSHARED") or os.path.join(stdlib, "lib-dynload")
    setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
    if not os.path.exists(setpriv):
        raise SandboxUnavailable("setpriv is missing (Debian package util-linux)")
    if not os.path.isfile(os.path.join(stdlib, "os.py")):
        raise SandboxUnavailable(f"no standard library found at {stdlib}")
    extensions = sorted(str(p) for p in Path(dynload).glob("*.so"))
    links: dict[str, str] = {}
    wanted = {exe, setpriv, stdlib, *shared_libraries([exe, setpriv, *extensions]), *extra}
    real = {_resolve(p, links) for p in wanted}
    exe_real, setpriv_real = _resolve(exe, links), _resolve(setpriv, links)
    dir_binds = sorted(p for p in real if os.path.isdir(p))
    binds = sorted(
        p for p in real if not any(_is_under(p, d) and p != d for d in dir_binds)
    )  # a file inside a bound directory comes with it
    masks = []
    for candidate in ("site-packages", "dist-packages"):
        path = os.path.join(_resolve(stdlib, links), candidate)
        if os.path.isdir(path):
            masks.append(path)
    made = dict(symlinks)
    placed = [*binds, *links, *made, *(dest for _, dest in files), os.path.dirname(GUEST_MOUNT)]
    dirs: set[str] = set()
    for path in placed:
        parent = os.path.dirname(path)
        while parent != "/":
            if parent not in links and not any(_is_under(parent, d) for d in dir_binds):
                dirs.add(parent)
            parent = os.path.dirname(parent)
    dirs.add(os.path.dirname(GUEST_MOUNT))
    return RuntimeLayout(
        executable=exe_real if os.path.exists(exe_real) else exe,
        dirs=tuple(sorted(dirs, key=lambda d: (d.count("/"), d))),
        binds=tuple(binds),
        symlinks=tuple(sorted({**links, **made}.items())),
        masks=tuple(masks),
        setpriv=setpriv_real,
        files=tuple(files),
        env=tuple(env),
    )
