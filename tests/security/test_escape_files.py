"""Escape attempts through the files surface: ``/input`` handed in, ``/output`` taken back.

The service writes ``/input`` and reads ``/output`` from the host, through the sandbox's own
file system: these attacks try to change what it wrote, point it at host files, stall it,
or see another execution's files. The suite's ``contained`` fixture checks afterwards that the
host is unchanged and the service still serves.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from codemode import ExecutionResult
from tests.security.conftest import APP_CONTEXT, App, Host, leaks
from tests.security.test_escape import all_failed, program, report

pytestmark = pytest.mark.security


async def run(app: App, code: str, files: dict[str, bytes] | None = None) -> ExecutionResult:
    """Run ``code`` with ``files`` as the application would, no tools declared."""
    return await app.codemode.run_async(
        code, available_tools=[], context=APP_CONTEXT, files=files, execution_timeout=20
    )


async def test_input_files_cannot_be_changed(app: App) -> None:
    """Every way of changing, replacing or adding to /input fails; the file stays as sent."""
    code = program(
        """
        out = {
            "append": attempt(lambda: open("/input/a.txt", "ab").write(b"pwned")),
            "truncate": attempt(os.truncate, "/input/a.txt", 0),
            "unlink": attempt(os.unlink, "/input/a.txt"),
            "rename": attempt(os.rename, "/input/a.txt", "/input/b.txt"),
            "rename out": attempt(os.rename, "/input/a.txt", "/tmp/a.txt"),
            "chmod": attempt(os.chmod, "/input/a.txt", 0o666),
            "chown": attempt(os.chown, "/input/a.txt", os.getuid(), os.getgid()),
            "utime": attempt(os.utime, "/input/a.txt", (0, 0)),
            "create": attempt(lambda: open("/input/new", "wb")),
            "mkdir": attempt(os.mkdir, "/input/d"),
            "symlink": attempt(os.symlink, "/etc/passwd", "/input/link"),
            "hard link out": attempt(os.link, "/input/a.txt", "/tmp/hard"),
            "chmod dir": attempt(os.chmod, "/input", 0o777),
            "rmdir": attempt(os.rmdir, "/input"),
            "rename dir": attempt(os.rename, "/input", "/tmp/input"),
        }
        out["content"] = ["err", open("/input/a.txt", "rb").read().decode()]
        result = out
        """
    )
    outcome = report(await run(app, code, {"a.txt": b"as sent"}))
    assert outcome.pop("content") == ["err", "as sent"]
    all_failed(outcome)


async def test_output_links_never_reach_host_files(app: App, host: Host) -> None:
    """Links in /output to host files (and to /proc) come back as nothing, not their content."""
    targets = [str(path) for path in host.canary_files] + [
        "/etc/shadow",
        "/proc/1/environ",
        "/proc/self/root/etc/shadow",
    ]
    code = program(
        """
        for n, target in enumerate(P["targets"]):
            os.symlink(target, f"/output/link{n}")
        os.symlink("/output/link0", "/output/chain")
        os.mkdir("/output/sub")
        os.symlink(P["targets"][0], "/output/sub/deep")
        result = sorted(os.listdir("/output"))
        """,
        targets=targets,
    )
    result = await run(app, code)
    assert result.success, result
    assert result.files == {}
    assert not leaks(result, host)
    assert host.file_secret.encode() not in b"".join(result.files.values())


async def test_output_specials_do_not_stall_the_service(app: App) -> None:
    """A FIFO nobody writes, a socket and a device-like name in /output are skipped at once."""
    code = program(
        """
        import socket
        os.mkfifo("/output/fifo")
        s = socket.socket(socket.AF_UNIX)
        s.bind("/output/sock")
        open("/output/real.txt", "w").write("kept")
        result = sorted(os.listdir("/output"))
        """
    )
    started = time.monotonic()
    result = await run(app, code)
    assert result.success, result
    assert result.files == {"real.txt": b"kept"}
    assert time.monotonic() - started < 5


async def test_output_flood_is_bounded(app: App) -> None:
    """Thousands of files in /output: what comes back stays within 4096 entries."""
    code = program(
        """
        made = 0
        try:
            for n in range(20000):
                open(f"/output/f{n}", "wb").write(b"x")
                made += 1
        except OSError as exc:
            stopped = errno.errorcode.get(exc.errno)
        else:
            stopped = None
        result = [made, stopped]
        """
    )
    result = await run(app, code)
    if result.success:  # the file system's inodes ran out first (the fork server's /output)
        made, stopped = report(result)
        assert stopped == "ENOSPC"
        assert len(result.files) == made <= 4096
    else:  # the service counted the entries (a one-shot sandbox's /output has no inode bound)
        assert result.error_type == "OutputFilesLimit", result
        assert result.files == {}


async def test_output_growing_after_the_end_stays_within_the_limit(app: App) -> None:
    """A child still appending to /output after the program reported is cut off at the limit."""
    code = program(
        """
        import subprocess
        subprocess.Popen([sys.executable, "-c",
            "f = open('/output/grow.bin', 'ab')\\n"
            "while True:\\n    f.write(b'x' * 65536); f.flush()"])
        import time; time.sleep(0.3)
        result = "left a writer behind"
        """
    )
    result = await app.codemode.client.execute_async(
        code,
        available_tools=[],
        context=APP_CONTEXT,
        limits={"max_output_files_bytes": 4 << 20},
    )
    if result.success:
        assert sum(len(data) for data in result.files.values()) <= 4 << 20
    else:
        assert result.error_type in ("OutputFilesLimit", "MemoryLimit"), result


async def test_concurrent_executions_never_see_each_others_files(app: App) -> None:
    """Eight executions at once, each with its own secret file: each sees only its own."""
    code = program(
        """
        import glob, time
        time.sleep(0.2)
        mine = open("/input/secret.txt").read()
        seen = sorted(glob.glob("/input/*") + glob.glob("/output/*") + glob.glob("/tmp/*"))
        open("/output/echo.txt", "w").write(mine)
        result = [mine, seen]
        """
    )
    secrets = [f"file-secret-{n}-{time.monotonic_ns()}" for n in range(8)]
    results = await asyncio.gather(*(run(app, code, {"secret.txt": s.encode()}) for s in secrets))
    for secret, result in zip(secrets, results, strict=True):
        mine, seen = report(result)
        assert mine == secret
        assert seen == ["/input/secret.txt"]
        assert result.files == {"echo.txt": secret.encode()}
        others = [s for s in secrets if s != secret]
        assert not any(s in str(result) for s in others)


async def test_files_do_not_outlive_their_execution(app: App) -> None:
    """What one execution had in /input and /output is gone for the next ones."""
    first = await run(
        app,
        "open('/output/left.txt', 'w').write('from the first')\nresult = 1",
        {"kept.txt": b"first input"},
    )
    assert first.success, first
    for _ in range(6):  # more than the pool holds: every pre-started guest is checked
        later = await run(app, "import os\nresult = [os.listdir('/input'), os.listdir('/output')]")
        assert report(later) == [[], []]
