"""Fixtures for every tier: a clean ``CODEMODE_*`` environment for each test, the sandbox venv."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _no_codemode_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see no CODEMODE_* setting of the developer's shell (CODEMODE_TEST_* excepted)."""
    for name in list(os.environ):
        if name.startswith("CODEMODE_") and not name.startswith("CODEMODE_TEST_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def sandbox_venv() -> Path:
    """A sandbox venv with numpy, pandas and tzdata, built once and cached across runs."""
    from tests.sandbox_venv import build_sandbox_venv

    return build_sandbox_venv()
