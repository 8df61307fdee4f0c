"""The examples, each started by its one documented command, exercised end to end."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import REPO_ROOT, ServerProcess, announced_process

READY = "fastapi_service: listening on "


@pytest.fixture
def fastapi_service(server: ServerProcess) -> Iterator[str]:
    """``examples/fastapi_service.py --port 0`` against the test executor; yields its base URL."""
    env = dict(
        os.environ,
        CODEMODE_EXECUTOR_URL=server.url,
        CODEMODE_EXECUTOR_API_KEY=server.api_key,
    )
    argv = [sys.executable, "examples/fastapi_service.py", "--port", "0"]
    with announced_process(argv, READY, env) as (url, _):
        yield url


async def test_fastapi_service_runs_programs_per_customer(fastapi_service: str) -> None:
    """Concurrent requests each see their own customer's orders; /tools serves the stubs."""
    code = "result = [o['id'] for o in tools.list_orders()]"
    async with httpx.AsyncClient(base_url=fastapi_service, timeout=30) as client:
        for _ in range(50):  # the lifespan may still be connecting to the executor
            try:
                stubs = await client.get("/tools")
                break
            except httpx.TransportError:
                await asyncio.sleep(0.1)
        assert "def list_orders(" in stubs.text
        first, second = await asyncio.gather(
            client.post("/run", json={"code": code}, headers={"x-customer-id": "c-1"}),
            client.post("/run", json={"code": code}, headers={"x-customer-id": "c-2"}),
        )
    assert first.json()["result"] == ["A1", "A2", "A3"]
    assert second.json()["result"] == ["B1"]


async def test_fastapi_service_shapes_errors_for_the_model(fastapi_service: str) -> None:
    """A bad tool argument comes back as the error and the user's line, for the model."""
    async with httpx.AsyncClient(base_url=fastapi_service, timeout=30) as client:
        reply = await client.post(
            "/run",
            json={"code": "tools.exchange_rate(currency='XYZ')"},
            headers={"x-customer-id": "c-1"},
        )
    body = reply.json()
    assert body["success"] is False
    assert body["error_type"] == "TypeError"
    assert body["for_the_model"].startswith(
        "error: TypeError: tools.exchange_rate(): argument 'currency'"
    )
    assert 'File "<codemode>", line 1' in body["for_the_model"]


def _run_example(script: str, **env: str) -> str:
    """Run ``examples/<script>`` with ``env`` added (and no executor URL); its stdout."""
    environ = {k: v for k, v in os.environ.items() if k != "CODEMODE_EXECUTOR_URL"}
    done = subprocess.run(
        [sys.executable, f"examples/{script}"],
        cwd=REPO_ROOT,
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_crewai_example_answers_offline() -> None:
    """``examples/crewai_crew.py`` runs a crew on an in-process executor and prints the answer."""
    stdout = _run_example("crewai_crew.py", CREWAI_STORAGE_DIR="codemode-tests")
    answer = json.loads(stdout.strip().splitlines()[-1])
    assert answer == {"orders": ["A1", "A3"], "total_eur": 14.26}


def test_pandas_report_example(sandbox_venv: Path) -> None:
    """``examples/pandas_report.py`` with the test sandbox venv and pandas preloaded: the
    program's DataFrame aggregate, its CSV in /output and the result."""
    stdout = _run_example(
        "pandas_report.py",
        CODEMODE_SANDBOX_VENV=str(sandbox_venv),
        CODEMODE_PRELOAD_MODULES="pandas",
    )
    assert "region,revenue\nUS,289.8\n" in stdout
    assert json.loads(stdout.strip().splitlines()[-1]) == {
        "US": 289.8,
        "APAC": 140.0,
        "EU": 112.5,
    }
