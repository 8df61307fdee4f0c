"""Files in and out: ``files=`` placed read-only under ``/input``, ``/output`` returned.

Against the session's real ``codemode serve`` (a kernel sandbox unless
``CODEMODE_TEST_ISOLATION=process``, where the executor refuses files; those tests then check
the refusal instead).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Callable

import grpc
import grpc.aio
import pytest

from codemode import Codemode, ExecutorClient
from codemode.config import ClientConfig
from codemode.core.errors import ExecutorRequestError, InvalidRequestError
from codemode.wire import codemode_pb2 as pb
from codemode.wire import codemode_pb2_grpc as pb_grpc
from tests.helpers import ServerProcess
from tests.integration.conftest import Servers

ConfigFactory = Callable[..., ClientConfig]

SANDBOXED = os.environ.get("CODEMODE_TEST_ISOLATION", "auto") != "process"
needs_sandbox = pytest.mark.skipif(
    not SANDBOXED,
    reason="CODEMODE_TEST_ISOLATION=process has no /input or /output; runs with the sandbox",
)


@needs_sandbox
async def test_input_file_is_read_and_output_file_returned(codemode: Codemode) -> None:
    """A CSV handed in is readable under /input; a file written to /output comes back."""
    csv = b"id,total\nA1,100\nA2,250\n"
    result = await codemode.run_async(
        "import csv, os\n"
        "rows = list(csv.DictReader(open('/input/orders.csv')))\n"
        "total = sum(int(r['total']) for r in rows)\n"
        "open('/output/summary.txt', 'w').write(f'{len(rows)} orders, {total}')\n"
        "result = {'total': total, 'listing': sorted(os.listdir('/input'))}\n",
        files={"orders.csv": csv, "empty.bin": b""},
    )
    assert result.success, result.error
    assert result.value == {"total": 350, "listing": ["empty.bin", "orders.csv"]}
    assert result.files == {"summary.txt": b"2 orders, 350"}


@needs_sandbox
async def test_fifty_mib_file_round_trips(codemode: Codemode) -> None:
    """A 50 MiB input arrives whole (checked by hash inside) and a 10 MiB output comes back."""
    data = secrets.token_bytes(50 << 20)
    result = await codemode.run_async(
        "import hashlib\n"
        "data = open('/input/big.bin', 'rb').read()\n"
        "open('/output/half.bin', 'wb').write(data[: 10 << 20])\n"
        "result = hashlib.sha256(data).hexdigest()\n",
        files={"big.bin": data},
        execution_timeout=30,
    )
    assert result.success, result.error
    assert result.value == hashlib.sha256(data).hexdigest()
    assert result.files["half.bin"] == data[: 10 << 20]


@needs_sandbox
async def test_input_files_are_read_only(codemode: Codemode) -> None:
    """The program can neither change, replace nor add input files."""
    result = await codemode.run_async(
        "import os\n"
        "def attempt(f, *a):\n"
        "    try:\n"
        "        f(*a)\n"
        "        return 'done'\n"
        "    except OSError as exc:\n"
        "        return type(exc).__name__\n"
        "result = {\n"
        "    'write': attempt(lambda: open('/input/a.txt', 'a').write('x')),\n"
        "    'unlink': attempt(os.unlink, '/input/a.txt'),\n"
        "    'rename': attempt(os.rename, '/input/a.txt', '/input/b.txt'),\n"
        "    'chmod': attempt(os.chmod, '/input/a.txt', 0o666),\n"
        "    'create': attempt(lambda: open('/input/new.txt', 'w')),\n"
        "    'content': open('/input/a.txt').read(),\n"
        "}\n",
        files={"a.txt": b"original"},
    )
    assert result.success, result.error
    assert result.value == {
        "write": "PermissionError",
        "unlink": "PermissionError",
        "rename": "PermissionError",
        "chmod": "PermissionError",
        "create": "PermissionError",
        "content": "original",
    }


@needs_sandbox
async def test_links_and_directories_in_output_are_not_followed(codemode: Codemode) -> None:
    """Only regular files come back: a link to a host path, a FIFO and a folder are left out."""
    result = await codemode.run_async(
        "import os\n"
        "os.symlink('/etc/shadow', '/output/shadow')\n"
        "os.symlink('/proc/1/environ', '/output/environ')\n"
        "os.link('/input/a.txt', '/output/hard') if False else None\n"
        "os.mkfifo('/output/fifo')\n"
        "os.mkdir('/output/dir')\n"
        "open('/output/dir/inner.txt', 'w').write('x')\n"
        "open('/output/ok.txt', 'w').write('fine')\n",
    )
    assert result.success, result.error
    assert result.files == {"ok.txt": b"fine"}


@needs_sandbox
async def test_output_files_past_their_limit_end_the_execution(
    make_config: ConfigFactory,
) -> None:
    """Files in /output beyond the request's lowered limit end it as OutputFilesLimit."""
    async with ExecutorClient(config=make_config()) as client:
        result = await client.execute_async(
            "open('/output/big.bin', 'wb').write(b'x' * (2 << 20))\nresult = 1\n",
            limits={"max_output_files_bytes": 1 << 20},
        )
    assert not result.success
    assert result.error_type == "OutputFilesLimit"
    assert result.files == {}


@needs_sandbox
async def test_writing_past_the_output_space_fails_in_the_program(
    make_config: ConfigFactory,
) -> None:
    """/output is a bounded file system: writing past the executor's limit fails with OSError."""
    async with ExecutorClient(config=make_config()) as client:
        result = await client.execute_async(
            "import errno\n"
            "try:\n"
            "    with open('/output/fill.bin', 'wb') as f:\n"
            "        for _ in range(80):\n"
            "            f.write(b'x' * (1 << 20))\n"
            "    result = 'wrote it all'\n"
            "except OSError as exc:\n"
            "    result = errno.errorcode[exc.errno]\n"
            "import os; os.unlink('/output/fill.bin')\n",
            execution_timeout=20,
        )
    assert result.success, result.error
    assert result.value in ("ENOSPC", "EFBIG")


@pytest.mark.parametrize("name", ["../escape", "a/b", "/etc/passwd", "..", ".", "", "nul\x00byte"])
async def test_bad_input_file_names_are_refused_by_the_client(
    codemode: Codemode, name: str
) -> None:
    """A name that is not one path component is an InvalidRequestError; nothing is sent."""
    with pytest.raises(InvalidRequestError, match="input file"):
        await codemode.run_async("result = 1", files={name: b"x"})


async def test_non_bytes_input_is_refused_by_the_client(codemode: Codemode) -> None:
    """File contents must be bytes."""
    with pytest.raises(InvalidRequestError, match="must be bytes"):
        await codemode.run_async("result = 1", files={"a.txt": "text"})  # type: ignore[dict-item]


async def _raw_start(server: ServerProcess, start: pb.StartExecution) -> grpc.aio.AioRpcError:
    """Send ``start`` on a raw stream, bypassing the SDK's checks; the error it ends with."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = pb_grpc.ExecutorStub(channel).Execute(
            metadata=(("authorization", f"Bearer {server.api_key}"),), timeout=10
        )
        await call.write(pb.ClientFrame(start=start))
        return await _final_error(call)


async def _final_error(call: grpc.aio.StreamStreamCall) -> grpc.aio.AioRpcError:
    """Read ``call`` until it fails; its error (the test fails if it ends cleanly)."""
    try:
        while await call.read() is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the call ended without an error")


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ""])
async def test_bad_input_file_names_are_refused_by_the_executor(
    server: ServerProcess, name: str
) -> None:
    """The executor checks names itself: a forged start frame is INVALID_ARGUMENT."""
    start = pb.StartExecution(code="result = 1", files=[pb.FileInfo(name=name, size=1)])
    error = await _raw_start(server, start)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input file" in (error.details() or "")


@needs_sandbox
async def test_files_over_the_limit_are_refused_before_anything_runs(
    make_config: ConfigFactory, server: ServerProcess
) -> None:
    """Declared input over max_input_bytes is refused at the start frame, before any upload."""
    async with ExecutorClient(config=make_config()) as client:
        with pytest.raises(InvalidRequestError, match="max_input_bytes"):
            await client.execute_async(
                "open('/tmp/ran', 'w')",
                files={"big.bin": b"x" * (2 << 20)},
                limits={"max_input_bytes": 1 << 20},
            )
    # Over the executor's own ceiling too, declared without sending the bytes.
    start = pb.StartExecution(code="result = 1", files=[pb.FileInfo(name="a", size=1 << 40)])
    error = await _raw_start(server, start)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_input_bytes" in (error.details() or "")


@needs_sandbox
async def test_chunks_that_do_not_match_the_declared_files_are_refused(
    server: ServerProcess,
) -> None:
    """A chunk of an undeclared file, or more bytes than declared, is INVALID_ARGUMENT."""
    for chunks in (
        [pb.FileChunk(name="other", data=b"x")],
        [pb.FileChunk(name="a", data=b"xx"), pb.FileChunk(name="a", data=b"y")],
    ):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = pb_grpc.ExecutorStub(channel).Execute(
                metadata=(("authorization", f"Bearer {server.api_key}"),), timeout=10
            )
            start = pb.StartExecution(code="result = 1", files=[pb.FileInfo(name="a", size=2)])
            await call.write(pb.ClientFrame(start=start))
            for chunk in chunks:
                await call.write(pb.ClientFrame(file=chunk))
            error = await _final_error(call)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_files_without_a_sandbox_are_refused(servers: Servers) -> None:
    """An executor running without a sandbox refuses files with a clear error, runs nothing."""
    unsandboxed = servers.start(api_key=secrets.token_urlsafe(24), isolation="process")
    config = ClientConfig(executor_url=unsandboxed.url, executor_api_key=unsandboxed.api_key)
    async with Codemode.from_client_config(config) as codemode:
        with pytest.raises(ExecutorRequestError, match="without a sandbox"):
            await codemode.run_async("result = 1", files={"a.txt": b"x"})
        assert await codemode.execute_async("result = 1") == "1"
    servers.stop(unsandboxed)
