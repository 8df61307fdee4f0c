"""The sandbox venv the tests run programs with: numpy, pandas and tzdata, built once.

It is made with this interpreter's base Python (``python -m venv``), holding the versions of
numpy, pandas and tzdata installed in the test environment (the ``dev`` extra brings them), and
kept under ``.venv-sandbox/`` (git-ignored) in a folder named after the interpreter and those
versions, so that a later run reuses it and a change of either builds a new one. Building
needs only PyPI (or pip's cache) and asks nothing (``--no-input``), so it works under CI.
A half-built venv is never reused: it is built beside its final name and renamed at the end.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from tests.helpers import REPO_ROOT

#: What the tests import in the sandbox.
REQUIREMENTS = ("numpy", "pandas", "tzdata")
#: Where built venvs are kept; ``CODEMODE_TEST_SANDBOX_VENVS`` moves it.
CACHE_DIR = Path(os.environ.get("CODEMODE_TEST_SANDBOX_VENVS") or REPO_ROOT / ".venv-sandbox")
_BUILD_TIMEOUT_S = 900


def requirements() -> list[str]:
    """The requirements pinned to the versions the test environment has (unpinned if absent)."""
    pinned = []
    for name in REQUIREMENTS:
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pinned.append(name)
    return pinned


def venv_key(reqs: list[str]) -> str:
    """The cache folder's name: interpreter version and ABI, and the requirements."""
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}"
    digest = hashlib.sha256("\n".join([sys.version, *reqs]).encode()).hexdigest()[:12]
    return f"{tag}-{digest}"


def base_python() -> str:
    """The interpreter below this venv: a sandbox venv is made from it, as an operator would."""
    candidate = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    return str(candidate) if candidate.exists() else os.path.realpath(sys.executable)


def build_sandbox_venv() -> Path:
    """The sandbox venv for this interpreter and these requirements, built if missing."""
    reqs = requirements()
    final = CACHE_DIR / venv_key(reqs)
    if (final / ".complete").exists():
        return final
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix="building-", dir=CACHE_DIR))
    try:
        subprocess.run(
            [base_python(), "-m", "venv", str(building)],
            check=True,
            timeout=_BUILD_TIMEOUT_S,
        )
        env = dict(os.environ, PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
        subprocess.run(
            [str(building / "bin" / "python"), "-m", "pip", "install", "-q", "--no-input", *reqs],
            check=True,
            timeout=_BUILD_TIMEOUT_S,
            env=env,
        )
        # A venv records its own path in its scripts: it is made where it stays. Built under a
        # temporary name, so only the folder moves; its site-packages needs no path of its own.
        (building / ".complete").write_text("\n".join(reqs) + "\n")
        try:
            building.rename(final)
        except OSError:  # another session finished the same venv first
            if not (final / ".complete").exists():
                raise
    finally:
        if building.exists():
            shutil.rmtree(building, ignore_errors=True)
    return final
