"""The benchmark scripts run end to end in their smoke mode and write their result files."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ISOLATION

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _run(script: str, results: Path, *args: str) -> dict:
    """Run ``bench/<script> --smoke`` with results in ``results`` and return its JSON document."""
    env = dict(os.environ, CODEMODE_BENCH_RESULTS=str(results))
    isolation = {"floor.py": [], "pagefaults.py": ["--isolation=forkserver"]}.get(
        script, [f"--isolation={ISOLATION}"]
    )
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke", *isolation, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    name = {
        "run.py": "codemode",
        "growth.py": "growth",
        "floor.py": "floor",
        "sidebyside.py": "sidebyside",
        "pagefaults.py": "pagefaults",
        "programs.py": "programs",
        "failover.py": "failover",
        "handoff.py": "handoff",
    }[script]
    return json.loads((results / f"{name}.smoke.json").read_text())


@pytest.mark.timeout(110)
def test_run_smoke(tmp_path: Path) -> None:
    """``bench/run.py --smoke`` exits 0 and writes every workload, PSS included."""
    doc = _run("run.py", tmp_path)
    assert doc["smoke"] is True
    workloads = doc["workloads"]
    for key in ("a_trivial", "b_tool_sync", "b_tool_async", "c_concurrent", "d_rss", "e_gather"):
        assert key in workloads
    assert {"p50_ms", "p99_ms"} <= workloads["a_trivial"].keys()
    assert {"exec_per_s", "p99_ms"} <= workloads["c_concurrent"].keys()
    cpu = workloads["c_concurrent"]
    assert cpu["executor_cpu_ms"] > 0  # the executor's tree did the work, reaped guests included
    assert cpu["client_cpu_ms"] > 0
    assert {"peak_mib", "idle_mib", "pss_peak_mib", "pss_idle_mib"} <= workloads["d_rss"].keys()


@pytest.mark.timeout(110)
def test_growth_smoke(tmp_path: Path) -> None:
    """``bench/growth.py --smoke`` exits 0 and writes every growth series."""
    doc = _run("growth.py", tmp_path)
    assert doc["smoke"] is True
    series = doc["workloads"]
    for key in ("reference", "code_size", "output_size", "result_size", "tool_calls"):
        assert key in series
    assert {"comments", "literal"} <= series["code_size"].keys()
    assert {"bytes", "p50_ms"} <= series["result_size"][0].keys()
    assert {"calls", "per_call_ms"} <= series["tool_calls"][0].keys()
    assert {"bytes", "p50_ms"} <= series["tool_arg_size"][0].keys()
    assert {"in_flight", "exec_per_s", "p50_ms", "p99_ms"} <= series["concurrency"][0].keys()


@pytest.mark.timeout(110)
def test_programs_smoke(tmp_path: Path, sandbox_venv: Path) -> None:
    """``bench/programs.py --smoke`` (ours only) runs every real-program workload, each value
    checked, and fills every row of its table."""
    doc = _run("programs.py", tmp_path, "--no-baseline", f"--sandbox-venv={sandbox_venv}")
    workloads = doc["workloads"]
    for key in (
        "pandas_preload",
        "pandas_warm",
        "pandas_venv",
        "trivial_plain",
        "trivial_preload",
        "file",
    ):
        assert workloads[key]["p50_ms"] > 0
    assert workloads["session_increment"]["n"] > 0
    assert workloads["sync_tool_per_call_ms"]["codemode"] is not None
    rows = [row["workload"] for row in workloads["table"]]
    assert len(rows) == 11
    assert any(row.startswith("7. session") for row in rows)


@pytest.mark.timeout(120)
def test_failover_smoke(tmp_path: Path) -> None:
    """``bench/failover.py --smoke``: three runs (no fault, SIGKILL, SIGTERM), nothing lost."""
    doc = _run("failover.py", tmp_path)
    assert [r["fault"] for r in doc["runs"]] == ["none", "SIGKILL", "SIGTERM"]
    for run in doc["runs"]:
        assert run["failed"] == 0
        assert run["not_exactly_once"] == 0
        assert run["call_ids"] == run["executions"] * 3


@pytest.mark.timeout(60)
def test_floor_smoke(tmp_path: Path) -> None:
    """``bench/floor.py --smoke`` exits 0 and writes each transport figure."""
    doc = _run("floor.py", tmp_path)
    figures = doc["workloads"]
    for key in ("grpc_pingpong_us", "grpc_call_us", "to_thread_us", "unix_pingpong_us"):
        assert figures[key] > 0
    for key in ("grpc_pingpong_default_us", "grpc_call_default_us"):  # grpcio's own I/O
        assert figures[key] > 0
    assert figures["tool_call_floor_sync_us"] > figures["tool_call_floor_async_us"]


GIT = shutil.which("git")


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    assert GIT is not None
    return subprocess.run(
        [GIT, "-C", str(BENCH.parent), *args], capture_output=True, text=True, check=False
    )


def _git_checkout() -> bool:
    return GIT is not None and _git("rev-parse", "HEAD").returncode == 0


@pytest.mark.timeout(110)
@pytest.mark.skipif(
    not _git_checkout(), reason="bench/sidebyside.py checks out a commit: runs in a git clone"
)
def test_sidebyside_smoke(tmp_path: Path) -> None:
    """``bench/sidebyside.py --smoke`` runs both sides, alternated, and leaves no worktree."""
    before = _git("worktree", "list").stdout
    doc = _run("sidebyside.py", tmp_path, "--base", "HEAD", "--reps", "2")
    rounds = doc["workloads"]["rounds"]
    assert len(rounds["base"]) == len(rounds["new"]) == 2
    for figures in (*rounds["base"], *rounds["new"]):
        assert figures["exec_per_s"] > 0
        assert figures["executor_cpu_ms"] > 0
        assert figures["p50_ms"] > 0
    after = _git("worktree", "list").stdout
    assert after == before


@pytest.mark.timeout(60)
@pytest.mark.skipif(
    shutil.which("perf") is None
    or shutil.which("bwrap") is None
    or os.geteuid() != 0
    or platform.machine() != "x86_64",
    reason="bench/pagefaults.py records x86's page-fault tracepoint with perf in the fork-server "
    "sandbox: runs as root on x86-64 where perf (Debian: linux-perf) and bubblewrap are installed",
)
def test_pagefaults_smoke(tmp_path: Path) -> None:
    """``bench/pagefaults.py --smoke`` counts the zygote's and each new guest's page faults."""
    doc = _run("pagefaults.py", tmp_path)
    figures = doc["workloads"]
    assert figures["executions"] == 20
    assert figures["guests_seen"] >= 20  # a fresh guest per execution
    per_execution = figures["per_execution"]
    assert per_execution["guests"] > 0
    assert per_execution["zygote"] > 0  # it forks a replacement for each guest taken
    assert figures["per_execution_by_kind"]["write, copy on write"] > 0
    assert figures["per_execution_by_area"][0]["faults"] > 0


@pytest.mark.timeout(110)
def test_handoff_smoke(tmp_path: Path) -> None:
    """``bench/handoff.py --smoke`` runs both hand-offs and writes their medians and ratio."""
    doc = _run("handoff.py", tmp_path)
    workloads = doc["workloads"]
    assert {"workers_per_call_ms", "to_thread_per_call_ms", "workers_vs_to_thread"} <= set(
        workloads
    )
    assert workloads["rounds"] == 2
