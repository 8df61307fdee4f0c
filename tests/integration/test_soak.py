"""Soak, CI-sized: hundreds of mixed executions leave the executor's memory flat and nothing
behind. ``bench/soak.py`` runs the same mix at full size (10,000 at 32 in flight)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from codemode.config import ClientConfig
from codemode.core import ExecutorClient
from tests.helpers import ISOLATION, ServerCgroups, wait_until
from tests.integration.conftest import Servers

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load_soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("soak", BENCH / "soak.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


soak = _load_soak()


@pytest.mark.timeout(180)
async def test_soak_leaves_memory_flat_and_nothing_behind(servers: Servers) -> None:
    """400 executions of the mix at 16 in flight: each ends as its case expects, the service's
    RSS after the last round is within 10% of the warm-up round's, its descriptors, processes
    and busy cgroups are back where they were, and once stopped nothing of it is left."""
    server = servers.start(api_key=secrets.token_urlsafe(24), extra_args=["--max-concurrent", "16"])
    meter = soak.Meter(server.pid, server.port)
    cgroups = ServerCgroups(server.pid)
    config = ClientConfig(executor_url=server.url, executor_api_key=server.api_key)
    async with ExecutorClient(config=config, registry=soak.registry()) as client:
        assert (await client.execute_async("result = 1")).success
        result = await soak.soak(client, meter, executions=400, in_flight=16, rounds=5)
    assert result["unexpected"] == 0, result["unexpected_first"]
    assert sum(result["cases"].values()) == 400
    assert all(count > 0 for count in result["cases"].values()), result["cases"]
    assert result["checks"] == dict.fromkeys(result["checks"], True), result["snapshots"]
    assert result["rss_growth_pct"] <= 10
    assert servers.stop(server) == 0  # and no process of it left (the fixture checks)
    assert wait_until(lambda: not cgroups.groups(), 5.0) is True, cgroups.groups()


async def test_sandbox_pool_is_full_again_after_a_burst(servers: Servers) -> None:
    """After a burst that empties the pool of sandboxes forked ahead, the idle executor holds
    as many as before it (it held one or two: guests handed to waiting requests were not
    replaced)."""
    server = servers.start(api_key=secrets.token_urlsafe(24))
    meter = soak.Meter(server.pid, server.port)
    config = ClientConfig(executor_url=server.url, executor_api_key=server.api_key)
    async with ExecutorClient(config=config) as client:
        assert (await client.execute_async("result = 1")).success
        idle = await soak.settled(meter, None)
        for _ in range(3):
            burst = await asyncio.gather(
                *(client.execute_async("result = sum(range(10))") for _ in range(48))
            )
            assert all(r.success for r in burst)
            after = await soak.settled(meter, idle, timeout_s=5.0)
            assert (after.processes, after.busy_cgroups) == (idle.processes, idle.busy_cgroups)
    assert servers.stop(server) == 0


@pytest.mark.timeout(120)
def test_soak_script_smoke(tmp_path: Path) -> None:
    """``bench/soak.py --smoke`` exits 0 and writes its verdict: every check passed, nothing
    left behind."""
    env = dict(os.environ, CODEMODE_BENCH_RESULTS=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, str(BENCH / "soak.py"), "--smoke", f"--isolation={ISOLATION}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, f"soak.py failed:\n{proc.stdout}\n{proc.stderr}"
    doc = json.loads((tmp_path / "soak.smoke.json").read_text())
    assert doc["smoke"] is True
    assert doc["passed"] is True
    assert doc["unexpected"] == 0
    assert sum(doc["cases"].values()) == doc["executions"] > 0
    assert doc["left_behind"] == {"processes": [], "cgroups": []}
    assert len(doc["snapshots"]) == doc["rounds"] > 1
