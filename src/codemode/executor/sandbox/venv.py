"""The sandbox venv: the operator's virtualenv whose packages every sandbox may import.

:func:`inspect_venv` checks, once at a backend's start, that a directory is a venv made for
the sandbox's interpreter (same major.minor), and reads what the sandbox needs of it: its
site-packages (bound read-only at ``/codemode/site-packages``), the host shared libraries its
extension modules load from outside it (``ldd``), and its distributions by name and version
(``importlib.metadata``, read here on the host, never in the sandbox). Nothing else of the
venv (its ``bin``, its ``pyvenv.cfg``, its parent) becomes visible. ``.pth`` files are not
run: the guest puts site-packages on ``sys.path`` itself.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from codemode.executor.sandbox.runtime import SandboxUnavailable, shared_libraries


class VenvError(SandboxUnavailable):
    """The sandbox venv is missing, not a venv, or made for another interpreter."""


@dataclass(frozen=True, slots=True)
class Package:
    """One distribution installed in the sandbox venv."""

    name: str
    version: str


@dataclass(frozen=True, slots=True)
class SandboxVenv:
    """A checked sandbox venv: what a sandbox binds of it and what it offers."""

    root: str
    #: The venv's site-packages, symlinks resolved: bound read-only, put on the guest's path.
    site_packages: str
    packages: tuple[Package, ...]
    #: Host shared objects its extension modules load from outside site-packages.
    libraries: tuple[str, ...]


_VERSION = re.compile(r"^\s*(?:version|version_info)\s*=\s*(\d+)\.(\d+)", re.MULTILINE)


def _cfg_version(cfg: Path) -> tuple[int, int] | None:
    """The ``major.minor`` a ``pyvenv.cfg`` names (venv writes ``version``, virtualenv
    ``version_info``), or None."""
    match = _VERSION.search(cfg.read_text(encoding="utf-8", errors="replace"))
    return (int(match.group(1)), int(match.group(2))) if match else None


def _make_hint(executable: str, root: str, version: tuple[int, int]) -> str:
    return f"make it with `{executable} -m venv {root}` (Python {version[0]}.{version[1]})"


def check_venv(
    path: str | os.PathLike[str],
    *,
    version: tuple[int, int] | None = None,
    executable: str | None = None,
) -> tuple[str, str]:
    """(venv root, site-packages) of the venv at ``path``, both with symlinks resolved.

    ``version`` is the sandbox interpreter's ``major.minor`` (default: this one's), and
    ``executable`` the interpreter named in the fix. Raises :class:`VenvError` saying what is
    wrong and which interpreter to make the venv with.
    """
    version = version or (sys.version_info[0], sys.version_info[1])
    executable = executable or os.path.realpath(sys.executable)
    root = Path(path).expanduser()
    if not root.is_absolute():
        root = Path.cwd() / root
    hint = _make_hint(executable, str(root), version)
    if not root.is_dir():
        raise VenvError(f"the sandbox venv {root} does not exist (or is not a directory); {hint}")
    cfg = root / "pyvenv.cfg"
    if not cfg.is_file():
        raise VenvError(f"{root} is not a virtualenv (it has no pyvenv.cfg); {hint}")
    made_for = _cfg_version(cfg)
    if made_for is not None and made_for != version:
        raise VenvError(
            f"the sandbox venv {root} was made for Python {made_for[0]}.{made_for[1]}, but the "
            f"sandbox runs Python {version[0]}.{version[1]} ({executable}); {hint}"
        )
    site = root / "lib" / f"python{version[0]}.{version[1]}" / "site-packages"
    if not site.is_dir():
        others = sorted(p.name for p in (root / "lib").glob("python*") if p.is_dir())
        seen = f" (it has lib/{', lib/'.join(others)})" if others else ""
        raise VenvError(
            f"the sandbox venv {root} has no lib/python{version[0]}.{version[1]}/site-packages"
            f"{seen}, so it was not made for the sandbox's Python "
            f"{version[0]}.{version[1]} ({executable}); {hint}"
        )
    return os.path.realpath(root), os.path.realpath(site)


def list_packages(site_packages: str) -> tuple[Package, ...]:
    """The distributions installed in ``site_packages``, sorted by name (case-insensitive)."""
    found: dict[str, Package] = {}
    for dist in importlib.metadata.distributions(path=[site_packages]):
        name = dist.metadata["Name"] if dist.metadata else None
        if name and name.lower() not in found:
            found[name.lower()] = Package(str(name), str(dist.version))
    return tuple(found[key] for key in sorted(found))


def extension_libraries(site_packages: str, *, ignore: Sequence[str] = ()) -> tuple[str, ...]:
    """Shared objects the extension modules under ``site_packages`` load from elsewhere.

    Those inside site-packages (wheels bring theirs in ``*.libs`` folders) come with its bind;
    those under one of ``ignore`` are already bound by the runtime.
    """
    modules = sorted(
        str(p) for p in Path(site_packages).rglob("*.so*") if p.is_file() and not p.is_symlink()
    )
    wanted: set[str] = set()
    # ldd takes many files at once; a few hundred per call keeps the command line short.
    for start in range(0, len(modules), 200):
        wanted |= shared_libraries(modules[start : start + 200])
    inside = [os.path.realpath(site_packages), *ignore]
    return tuple(
        sorted(
            lib
            for lib in wanted
            if not any(
                os.path.realpath(lib) == d or os.path.realpath(lib).startswith(d.rstrip("/") + "/")
                for d in inside
            )
        )
    )


def inspect_venv(
    path: str | os.PathLike[str],
    *,
    version: tuple[int, int] | None = None,
    executable: str | None = None,
) -> SandboxVenv:
    """Check the venv at ``path`` (see :func:`check_venv`) and read what a sandbox needs of it."""
    root, site = check_venv(path, version=version, executable=executable)
    return SandboxVenv(
        root=root,
        site_packages=site,
        packages=list_packages(site),
        libraries=extension_libraries(site),
    )
