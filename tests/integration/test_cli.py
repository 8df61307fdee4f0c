"""The ``codemode`` command: ``exec`` with an embedded executor, ``doctor``, and the main job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO_ROOT


def codemode(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``codemode ARGS`` with this interpreter, without any executor URL in the environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CODEMODE_")}
    return subprocess.run(
        [sys.executable, "-m", "codemode.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=90,
        env={**clean, **env},
        check=False,
    )


def test_exec_runs_code_on_an_embedded_executor() -> None:
    """``codemode exec -c`` starts its own executor, prints the program's output and result."""
    done = codemode("exec", "-c", "print('from the sandbox'); result = {'sum': 2 + 2}")
    assert done.returncode == 0, done.stderr
    assert done.stdout == 'from the sandbox\n{"sum":4}\n'
    # Nothing else: no gRPC log line from the embedded executor's shutdown either (stopped
    # with no grace, it cancelled "all calls" and the client logged the GOAWAY, ~1 run in 10).
    assert done.stderr == ""


def test_exec_reads_a_file_and_stdin(tmp_path: Path) -> None:
    """``codemode exec FILE`` and ``codemode exec -`` run the program they are given."""
    program = tmp_path / "p.py"
    program.write_text("result = sum(range(10))\n")
    assert codemode("exec", str(program)).stdout == "45\n"
    assert codemode("exec", "-", stdin="result = 'piped'").stdout == '"piped"\n'


def test_exec_reports_a_failing_program() -> None:
    """A failing program exits 1 with its traceback on stderr, naming the user's line."""
    done = codemode("exec", "-c", "x = 1\nraise ValueError('bad input')")
    assert done.returncode == 1
    assert 'File "<codemode>", line 2' in done.stderr
    assert "ValueError: bad input" in done.stderr


def test_exec_against_an_unreachable_executor_says_so() -> None:
    """With CODEMODE_EXECUTOR_URL naming a dead address, exec exits 2 with a connection error."""
    done = codemode(
        "exec",
        "-c",
        "result = 1",
        CODEMODE_EXECUTOR_URL="http://127.0.0.1:9",
        CODEMODE_CONNECT_TIMEOUT="1",
        CODEMODE_MAX_RETRIES="0",
    )
    assert done.returncode == 2
    assert "ExecutorConnectionError" in done.stderr


def test_doctor_reports_every_property_of_this_host() -> None:
    """``codemode doctor`` checks each isolation property and, on this host, finds them all."""
    done = codemode("doctor")
    assert done.returncode == 0, done.stdout
    for name in ("bubblewrap", "seccomp filter", "non-root uid", "privileges dropped"):
        line = next(line for line in done.stdout.splitlines() if f"] {name} " in line)
        assert line.startswith("[ok  ]"), line
    assert "isolation: available" in done.stdout


def test_the_readme_main_job_runs_the_example() -> None:
    """``scripts/run.sh``, the README's main job, runs examples/hello.py and prints its result."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CODEMODE_")}
    done = subprocess.run(
        ["/bin/bash", str(REPO_ROOT / "scripts" / "run.sh")],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == '{"mean":13.28,"stdev":0.67}'


def test_serve_and_exec_over_a_unix_socket(tmp_path: Path) -> None:
    """``serve --host unix:///path`` listens on a socket file a unix:// executor_url reaches."""
    sock = tmp_path / "codemode.sock"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CODEMODE_")}
    server = subprocess.Popen(
        [sys.executable, "-m", "codemode.cli", "serve", "--host", f"unix://{sock}"],
        env={**clean, "CODEMODE_API_KEY": "unix-socket-key"},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == f"codemode serve: listening on unix://{sock}"
        done = codemode(
            "exec",
            "-c",
            "result = 'over a unix socket'",
            CODEMODE_EXECUTOR_URL=f"unix://{sock}",
            CODEMODE_EXECUTOR_API_KEY="unix-socket-key",
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == '"over a unix socket"\n'
    finally:
        server.terminate()
        code = server.wait(timeout=30)
        assert server.stdout is not None
        server.stdout.close()
    assert code == 0
