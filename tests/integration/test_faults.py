"""Faults against a real executor: its zygote killed under load, cgroups it cannot use, a full
temp dir, clients killed mid-stream, clients that never send a start frame, malformed and
fuzzed frames.

Each ends with a typed error or a clean gRPC status, the service goes on serving, and nothing
is left behind: no process, descriptor or cgroup.
"""

from __future__ import annotations

import asyncio
import errno
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from codemode.config import ClientConfig
from codemode.core import ExecutorClient, ExecutorClientError
from codemode.executor.service.servicer import START_FRAME_TIMEOUT_S
from codemode.wire import codemode_pb2 as pb
from tests.helpers import (
    ISOLATION,
    ZYGOTE,
    ProcRef,
    ServerCgroups,
    ServerProcess,
    ServerStartError,
    descendants,
    marked_anywhere,
    marked_program,
    open_fds,
    server_env,
    start_server,
    wait_gone,
    wait_until,
)
from tests.integration.conftest import Servers

#: Runs the server in a mount namespace of its own, where the test may change its mounts.
PRIVATE_MOUNTS = (shutil.which("unshare") or "unshare", "--mount", "--propagation", "private")
NSENTER = shutil.which("nsenter") or "nsenter"
#: For the faults of the fork server's zygote and of the cgroups its guests join.
needs_forkserver = pytest.mark.skipif(
    ISOLATION not in ("auto", "forkserver"), reason="a fault of the fork-server backend"
)


def client_for(server: ServerProcess, **overrides: Any) -> ExecutorClient:
    values: dict[str, Any] = {"executor_url": server.url, "executor_api_key": server.api_key}
    values.update(overrides)
    return ExecutorClient(config=ClientConfig(**values))


async def assert_serving(server: ServerProcess) -> None:
    """The server still runs a program for a well-behaved client."""
    async with client_for(server) as client:
        result = await client.execute_async("result = 6 * 7")
    assert result.success, result.error
    assert result.value == 42


def snapshot(server: ServerProcess, cgroups: ServerCgroups) -> tuple[int, int, int]:
    """(processes under the server, its open descriptors, its cgroups holding a process)."""
    server.guests()  # remembers every process seen, for the leftover check at its stop
    return len(descendants(server.pid)), open_fds(server.pid, server.port), len(cgroups.busy())


async def settled(
    server: ServerProcess, cgroups: ServerCgroups, before: tuple[int, int, int]
) -> tuple[int, int, int]:
    """The snapshot once it is back at ``before`` (or the last one after 10 s)."""
    await asyncio.to_thread(wait_until, lambda: snapshot(server, cgroups) == before, 10.0)
    return snapshot(server, cgroups)


async def baseline(server: ServerProcess, cgroups: ServerCgroups) -> tuple[int, int, int]:
    """The idle server's snapshot after one execution, once unchanged for a second (its
    sandbox pool full again)."""
    await assert_serving(server)
    last, same = snapshot(server, cgroups), 0
    for _ in range(60):
        await asyncio.sleep(0.25)
        now = snapshot(server, cgroups)
        same = same + 1 if now == last else 0
        if same == 4:
            break
        last = now
    return last


def stop_leaving_nothing(servers: Servers, server: ServerProcess, cgroups: ServerCgroups) -> None:
    """Stop ``server``: it exits 0, and none of its processes and cgroups is left."""
    assert servers.stop(server) == 0
    assert wait_until(lambda: not cgroups.groups(), 5.0) is True, cgroups.groups()


def zygote_of(server: ServerProcess) -> ProcRef:
    """The fork server's zygote: the process running ``zygote.py`` whose parent is bwrap."""
    procs = descendants(server.pid)
    server.seen.update(procs)
    by_pid = {p.pid: p for p in procs}
    for proc in procs:
        if ZYGOTE in proc.cmdline and "bwrap" not in proc.cmdline.split()[0]:
            stat = Path(f"/proc/{proc.pid}/stat").read_text()
            parent = by_pid.get(int(stat[stat.rindex(")") + 2 :].split()[1]))
            if parent is not None and "bwrap" in parent.cmdline.split()[0]:
                return proc
    pytest.fail(f"no zygote under the server: {[p.cmdline[:80] for p in procs]}")


async def wait_for_marked(server: ServerProcess, tag: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not server.marked_tree(tag):
        if time.monotonic() > deadline:
            pytest.fail(f"the program {tag!r} was not seen running")
        await asyncio.sleep(0.02)


@pytest.fixture(autouse=True)
def _no_leftover_programs() -> Any:
    """After each test, no process of a marked program is left anywhere on the host."""
    yield
    assert wait_gone(marked_anywhere()) == []


# ------------------------------------------------------------------------------------------
# The zygote dies under load


@needs_forkserver
async def test_zygote_killed_under_load(servers: Servers) -> None:
    """SIGKILL to the zygote mid-load: the programs it held end as Crashed (not a limit), every
    other execution succeeds, a new zygote serves, and nothing is left behind."""
    server = servers.start(api_key=secrets.token_urlsafe(24), extra_args=["--max-concurrent", "16"])
    cgroups = ServerCgroups(server.pid)
    before = await baseline(server, cgroups)
    old = zygote_of(server)
    async with client_for(server, timeout=30) as client:
        held = [
            asyncio.create_task(client.execute_async(marked_program(f"held-{i}", "time.sleep(20)")))
            for i in range(6)
        ]
        for i in range(6):
            await wait_for_marked(server, f"held-{i}")
        stop = asyncio.Event()

        async def load() -> list[Any]:
            results = []
            while not stop.is_set() and len(results) < 400:
                results += await asyncio.gather(
                    *(client.execute_async("result = sum(range(100))") for _ in range(6))
                )
            return results

        loaded = asyncio.create_task(load())
        await asyncio.sleep(0.5)
        os.kill(old.pid, signal.SIGKILL)
        # Requests arriving while the death is being noticed wait for the next zygote.
        burst = await asyncio.gather(
            *(client.execute_async("result = sum(range(100))") for _ in range(16))
        )
        ended = await asyncio.wait_for(asyncio.gather(*held), 15)
        await asyncio.sleep(0.5)
        stop.set()
        during = await asyncio.wait_for(loaded, 30)
        after = await asyncio.gather(
            *(client.execute_async("result = sum(range(100))") for _ in range(20))
        )
    for result in ended:
        assert not result.success
        assert result.error_type == "Crashed", (result.error_type, result.error)
        assert "sandbox" in (result.error or ""), result.error
    lost = [r for r in during + burst if not r.success]
    assert all(r.error_type == "Crashed" for r in lost), [(r.error_type, r.error) for r in lost]
    # At most the load's six and the burst's own could have been on the dying zygote.
    assert len(lost) <= 6 + 16
    assert len(during) + len(burst) - len(lost) > len(lost)
    assert all(r.success and r.value == 4950 for r in after)
    assert await asyncio.to_thread(wait_gone, [old]) == []
    assert zygote_of(server).pid != old.pid
    assert any("zygote exited" in str(r.get("msg")) for r in server.log_records())
    await assert_serving(server)  # the pool, short after the restart, refills on a request
    assert await settled(server, cgroups, before) == before
    stop_leaving_nothing(servers, server, cgroups)


# ------------------------------------------------------------------------------------------
# Cgroups that cannot be used


def _remount_cgroups(server: ServerProcess, mode: str) -> None:
    """Remount every cgroup file system ``mode`` (ro, rw) in the server's own mount namespace."""
    mounts = Path(f"/proc/{server.pid}/mounts").read_text().splitlines()
    for line in mounts:
        fields = line.split()
        if fields[2] in ("cgroup", "cgroup2"):
            subprocess.run(
                [
                    NSENTER,
                    "-t",
                    str(server.pid),
                    "-m",
                    "mount",
                    "-o",
                    f"remount,bind,{mode}",
                    fields[1],
                ],
                check=True,
                timeout=10,
            )


@needs_forkserver
async def test_cgroups_that_cannot_be_made(servers: Servers) -> None:
    """With cgroupfs read-only for the service (a real EROFS from the kernel, in the server's
    own mount namespace), executions that need a new sandbox fail typed (INTERNAL), none runs
    without its cgroups, and the service recovers once the cgroups can be made again."""
    server = servers.start(api_key=secrets.token_urlsafe(24), wrapper=PRIVATE_MOUNTS)
    cgroups = ServerCgroups(server.pid)
    if not cgroups.groups():
        pytest.skip("this host gives the executor no cgroups")
    before = await baseline(server, cgroups)
    _remount_cgroups(server, "ro")
    try:
        async with client_for(server, max_retries=0) as client:
            outcomes = await asyncio.gather(
                *(client.execute_async("result = 1") for _ in range(12)), return_exceptions=True
            )
    finally:
        _remount_cgroups(server, "rw")
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    ran = [o for o in outcomes if not isinstance(o, BaseException)]
    assert refused, "every execution ran although no cgroup could be made"
    for error in refused:
        assert isinstance(error, ExecutorClientError), repr(error)
        assert error.status == "INTERNAL"
        assert "Read-only file system" in str(error)
    # Only guests forked (and put in their cgroups) before the remount ran.
    assert len(ran) <= 4
    assert all(r.success for r in ran)
    await assert_serving(server)
    assert await settled(server, cgroups, before) == before
    stop_leaving_nothing(servers, server, cgroups)


# ------------------------------------------------------------------------------------------
# A full temp dir


def _tiny_tmpdir(path: Path, size: str) -> tuple[str, ...]:
    """A wrapper that mounts a tmpfs of ``size`` at ``path`` (in the server's own mount
    namespace) and points the server's TMPDIR at it."""
    path.mkdir(exist_ok=True)
    script = 'mount -t tmpfs -o size="$1" codemode-test "$0" && TMPDIR="$0" exec "${@:2}"'
    return (*PRIVATE_MOUNTS, "bash", "-c", script, str(path), size)


def test_full_tmpdir_at_start_is_refused(tmp_path: Path) -> None:
    """With no room in TMPDIR for the sandboxes' /etc/passwd, `codemode serve` refuses to start
    (exit 3) with a message naming the problem, and leaves nothing running."""
    before = {p.pid for p in descendants(os.getpid())}
    with pytest.raises(ServerStartError) as info:
        start_server(
            api_key=secrets.token_urlsafe(24),
            log_dir=tmp_path,
            wrapper=_tiny_tmpdir(tmp_path / "tmp", "16k"),
        )
    message = str(info.value)
    assert "exit code 3" in message
    assert "refusing to start" in message
    assert os.strerror(errno.ENOSPC) in message
    assert "Traceback" not in message
    assert {p.pid for p in descendants(os.getpid())} <= before


def _fill(tmpdir: Path) -> None:
    """Fill ``tmpdir``, which holds the service's identity files, to the last byte."""
    assert any(p.name.startswith("codemode-etc-") for p in tmpdir.iterdir())
    with (
        pytest.raises(OSError, match=os.strerror(errno.ENOSPC)),
        (tmpdir / "filler").open("wb") as filler,
    ):
        _write_forever(filler)
    assert os.statvfs(tmpdir).f_bfree == 0


def _write_forever(file: Any) -> None:
    while True:
        file.write(b"\0" * 4096)
        file.flush()


@needs_forkserver
async def test_full_tmpdir_while_serving(servers: Servers, tmp_path: Path) -> None:
    """TMPDIR filled to the last byte once the service runs: executions, output files,
    sessions and a zygote restart still work (the service writes there only at start)."""
    tmpdir = tmp_path / "tmp"
    server = servers.start(api_key=secrets.token_urlsafe(24), wrapper=_tiny_tmpdir(tmpdir, "2m"))
    cgroups = ServerCgroups(server.pid)
    before = await baseline(server, cgroups)
    inside = Path(f"/proc/{server.pid}/root{tmpdir}")
    await asyncio.to_thread(_fill, inside)
    async with client_for(server) as client:
        plain = await client.execute_async("result = 1")
        files = await client.execute_async("open('/output/a.txt', 'w').write('hi')\nresult = 2")
        async with client.session() as session:
            await session.execute_async("x = 3")
            kept = await session.run_async("result = x")
        os.kill(zygote_of(server).pid, signal.SIGKILL)
        await asyncio.sleep(0.3)
        restarted = await client.execute_async("result = 4")
    assert (plain.value, files.value, kept.value, restarted.value) == (1, 2, 3, 4)
    assert files.files == {"a.txt": b"hi"}
    assert os.statvfs(inside).f_bfree == 0
    assert await settled(server, cgroups, before) == before
    stop_leaving_nothing(servers, server, cgroups)


# ------------------------------------------------------------------------------------------
# Clients killed mid-stream

_CLIENT = """
import asyncio, sys
from codemode import Codemode, tool
from codemode.config import ClientConfig

@tool
async def hang() -> None:
    '''Never answers.'''
    await asyncio.Event().wait()

async def main(url, key, code, kind):
    config = ClientConfig(executor_url=url, executor_api_key=key)
    async with Codemode.from_client_config(config) as codemode:
        codemode.registry.register_tool("hang", hang)
        print("started", flush=True)
        if kind == "session":
            async with codemode.session() as session:
                await session.execute_async("x = 1")
                await session.execute_async(code)
        else:
            await codemode.execute_async(code)

asyncio.run(main(*sys.argv[1:]))
"""


async def test_clients_killed_mid_stream(servers: Servers) -> None:
    """Client processes SIGKILLed while their programs wait on a tool call (executions and a
    session): every sandbox is killed, and descriptors and cgroups are back as before."""
    server = servers.start(api_key=secrets.token_urlsafe(24))
    cgroups = ServerCgroups(server.pid)
    before = await baseline(server, cgroups)
    clients = []
    for i, kind in enumerate(["execute", "execute", "execute", "session", "session"]):
        code = marked_program(f"killed-{i}", "tools.hang()")
        argv = [sys.executable, "-c", _CLIENT, server.url, server.api_key, code, kind]
        clients.append(
            await asyncio.create_subprocess_exec(
                *argv,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
                env=server_env(None),
            )
        )
    try:
        for i in range(len(clients)):
            await wait_for_marked(server, f"killed-{i}", timeout=20.0)
        # Each program now waits in tools.hang(), its call relayed to its client.
        running = [p for i in range(len(clients)) for p in server.marked_tree(f"killed-{i}")]
    finally:
        for client in clients:
            client.kill()
            await client.wait()
    assert await asyncio.to_thread(wait_gone, running) == []
    assert await settled(server, cgroups, before) == before
    await assert_serving(server)
    stop_leaving_nothing(servers, server, cgroups)


# ------------------------------------------------------------------------------------------
# Slowloris: streams that never start


def _auth(server: ServerProcess) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {server.api_key}"),)


async def _status(call: Any) -> tuple[grpc.StatusCode, str, float]:
    """Read ``call`` to its end: its status, details, and when it ended (monotonic)."""
    try:
        while (await call.read()) is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or "", time.monotonic()
    return await call.code(), await call.details(), time.monotonic()


async def test_slowloris_streams_do_not_starve_others(servers: Servers) -> None:
    """64 streams that never send their first frame, and two that declare an input file and
    never send it: a well-behaved client is served meanwhile; the silent streams end with
    INVALID_ARGUMENT at the first-frame timeout, the stalled uploads at their execution
    timeout, and the server holds no more descriptors than before."""
    server = servers.start(api_key=secrets.token_urlsafe(24), extra_args=["--max-concurrent", "2"])
    cgroups = ServerCgroups(server.pid)
    before = await baseline(server, cgroups)
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") for _ in range(4)]
    try:
        opened = time.monotonic()
        silent = []
        for n in range(64):
            channel = channels[n % 4]
            method = "Execute" if n % 4 else "Session"
            rpc = channel.stream_stream(f"/codemode.v1.Executor/{method}")
            silent.append(rpc(metadata=_auth(server), timeout=60))
        stalled = []
        for _ in range(2):
            rpc = channels[0].stream_stream(
                "/codemode.v1.Executor/Execute",
                request_serializer=pb.ClientFrame.SerializeToString,
                response_deserializer=pb.ServerFrame.FromString,
            )
            call = rpc(metadata=_auth(server), timeout=60)
            files = [pb.FileInfo(name="data.csv", size=10)]
            start = pb.StartExecution(code="result = 1", timeout_seconds=1.5, files=files)
            await call.write(pb.ClientFrame(start=start))
            stalled.append(call)
        served = []
        async with client_for(server) as client:
            for _ in range(5):
                served.append(await client.execute_async("result = 6 * 7"))
            async with client.session() as session:
                served.append(await session.run_async("result = 6 * 7"))
        served_at = time.monotonic()
        ends = await asyncio.wait_for(
            asyncio.gather(*(_status(c) for c in silent)), START_FRAME_TIMEOUT_S + 10
        )
        stalled_results = []
        for call in stalled:
            frames = [frame async for frame in call]
            stalled_results.append(frames[-1].result)
    finally:
        for channel in channels:
            await channel.close()
    assert [r.value for r in served] == [42] * 6
    assert served_at - opened < START_FRAME_TIMEOUT_S, "the good client waited for the silent"
    for code, details, ended in ends:
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "must begin with" in details
        assert ended - opened >= START_FRAME_TIMEOUT_S - 0.5
    for result in stalled_results:
        assert result.error_type == "Timeout"
        assert "input files did not arrive" in result.error_message
    assert await settled(server, cgroups, before) == before
    stop_leaving_nothing(servers, server, cgroups)


# ------------------------------------------------------------------------------------------
# Malformed frames, each case once


def _raw_rpc(channel: grpc.aio.Channel, method: str) -> Any:
    return channel.stream_stream(f"/codemode.v1.Executor/{method}")


_GARBAGE = b"\xff\xff\xff"  # not a protobuf message at all


@pytest.mark.parametrize("method", ["Execute", "Session"])
async def test_bytes_that_are_not_a_frame_are_invalid_argument(
    fuzz_server: ServerProcess, method: str
) -> None:
    """Malformed protobuf as the first frame is INVALID_ARGUMENT (it was UNKNOWN, with the
    parser's exception in the message)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fuzz_server.port}") as channel:
        call = _raw_rpc(channel, method)(iter([_GARBAGE]), metadata=_auth(fuzz_server), timeout=10)
        code, details, _ = await _status(call)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "the client sent bytes that are not a ClientFrame"
    await assert_serving(fuzz_server)


@pytest.mark.parametrize("method", ["Execute", "Session"])
async def test_bytes_that_are_not_a_frame_end_a_running_program(
    fuzz_server: ServerProcess, method: str
) -> None:
    """Malformed protobuf while a program runs (on its own stream or in a session) ends the
    stream with INVALID_ARGUMENT at once and kills the program (a session used to wait for
    its idle timeout, holding its sandbox)."""
    tag = f"garbage-{method}"
    start = pb.StartExecution(code=marked_program(tag), timeout_seconds=30)
    frames = [pb.ClientFrame(start=start)]
    if method == "Session":
        frames.insert(0, pb.ClientFrame(open_session=pb.OpenSession()))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fuzz_server.port}") as channel:
        call = _raw_rpc(channel, method)(metadata=_auth(fuzz_server), timeout=20)
        for frame in frames:
            await call.write(frame.SerializeToString())
        await wait_for_marked(fuzz_server, tag)
        running = fuzz_server.marked_tree(tag)
        sent = time.monotonic()
        await call.write(_GARBAGE)
        code, details, ended = await _status(call)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert ended - sent < 5
    assert await asyncio.to_thread(wait_gone, running) == []
    await assert_serving(fuzz_server)


async def test_stream_closed_before_its_input_files(fuzz_server: ServerProcess) -> None:
    """A client that declares an input file and closes its side without sending it gets
    INVALID_ARGUMENT at once (it held its execution slot until the execution timeout)."""
    start = pb.StartExecution(
        code="result = 1", timeout_seconds=30, files=[pb.FileInfo(name="a.csv", size=10)]
    )
    frames = [pb.ClientFrame(start=start).SerializeToString()]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fuzz_server.port}") as channel:
        sent = time.monotonic()
        call = _raw_rpc(channel, "Execute")(iter(frames), metadata=_auth(fuzz_server), timeout=20)
        code, details, ended = await _status(call)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "before the declared input files" in details
    assert ended - sent < 5
    await assert_serving(fuzz_server)


# ------------------------------------------------------------------------------------------
# Fuzzed frames through a real grpc.aio channel


@pytest.fixture(scope="module")
def fuzz_server(servers: Servers) -> ServerProcess:
    """An executor of its own for the fuzzer, with short timeouts."""
    return servers.start(api_key=secrets.token_urlsafe(24))


_TEXT = st.text(max_size=12)
_JSON = st.one_of(
    st.sampled_from([b"", b"{}", b"[]", b'{"a": 1}', b"null", b"1e999", b'{"a": NaN}']),
    st.binary(max_size=24),
)
# Mostly values a limit can take, some at the edges of the wire's types.
_INT64 = st.one_of(st.integers(0, 1 << 30), st.integers(-(2**63), 2**63 - 1))
_INT32 = st.one_of(st.integers(0, 64), st.integers(-(2**31), 2**31 - 1))
_SECONDS = st.one_of(st.just(0.0), st.floats(0.05, 3.0), st.floats())
_LIMITS = st.builds(
    pb.Limits,
    cpu_seconds=_SECONDS,
    memory_bytes=_INT64,
    max_processes=_INT32,
    max_file_bytes=_INT64,
    max_open_files=_INT32,
    max_output_bytes=_INT64,
    max_result_bytes=_INT64,
    tmpfs_bytes=_INT64,
    max_input_bytes=_INT64,
    max_output_files_bytes=_INT64,
)
#: Programs that end quickly whatever their limits; random text is mostly a SyntaxError.
_CODE = st.one_of(
    st.sampled_from(
        [
            "result = 1",
            "",
            "print('x' * 100)",
            "raise ValueError(1)",
            "result = {1}",
            "result = tools.t()",
            "open('/output/o', 'w').write('o')",
            "result = open('/input/a').read()",
        ]
    ),
    st.text(max_size=30),
)
_START = st.builds(
    pb.StartExecution,
    code=_CODE,
    tools=st.lists(
        st.builds(pb.ToolSpec, name=st.sampled_from(["t", "u", "no name", ""])), max_size=3
    ),
    config_json=_JSON,
    context_json=_JSON,
    timeout_seconds=_SECONDS,
    limits=st.one_of(st.none(), st.none(), _LIMITS),
    stream_output=st.booleans(),
    files=st.lists(
        st.builds(pb.FileInfo, name=st.sampled_from(["a", "b", "../x", "", "a/b"]), size=_INT64),
        max_size=2,
    ),
    correlation_id=_TEXT,
)
#: A start frame the executor accepts, so that the frames after it reach a running program.
_VALID_START = st.builds(
    pb.StartExecution,
    code=_CODE,
    tools=st.sampled_from([[], [pb.ToolSpec(name="t")]]),
    config_json=st.sampled_from([b"", b"{}", b'{"n": 1}']),
    timeout_seconds=st.floats(0.05, 3.0),
    stream_output=st.booleans(),
    files=st.sampled_from([[], [pb.FileInfo(name="a", size=4)]]),
)
_FRAME = st.one_of(
    st.binary(max_size=64),  # not a frame at all: malformed protobuf, or a stray valid one
    st.builds(pb.ClientFrame),
    st.builds(pb.ClientFrame, start=_START),
    st.builds(
        pb.ClientFrame,
        tool_result=st.builds(
            pb.ToolResult,
            call_id=st.sampled_from(["1", "2", "x", ""]),
            ok=st.booleans(),
            value_json=_JSON,
            error_type=_TEXT,
            error_message=_TEXT,
        ),
    ),
    st.builds(pb.ClientFrame, cancel=st.builds(pb.Cancel, reason=_TEXT)),
    st.builds(
        pb.ClientFrame,
        file=st.builds(pb.FileChunk, name=st.sampled_from(["a", "b"]), data=st.binary(max_size=16)),
    ),
    st.builds(
        pb.ClientFrame,
        open_session=st.builds(
            pb.OpenSession, ttl_seconds=_SECONDS, limits=st.one_of(st.none(), _LIMITS)
        ),
    ),
)


def _encode(frame: bytes | pb.ClientFrame) -> bytes:
    return frame if isinstance(frame, bytes) else frame.SerializeToString()


@settings(
    max_examples=int(os.environ.get("CODEMODE_TEST_FUZZ_EXAMPLES", "60")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=st.sampled_from(["Execute", "Session"]),
    opening=st.one_of(
        st.none(),
        st.builds(pb.ClientFrame, start=_VALID_START),
        st.builds(pb.ClientFrame, start=_START),
        _FRAME,
    ),
    frames=st.lists(_FRAME, max_size=4),
)
async def test_fuzzed_frames_get_a_clean_status(
    fuzz_server: ServerProcess,
    method: str,
    opening: bytes | pb.ClientFrame | None,
    frames: list[bytes | pb.ClientFrame],
) -> None:
    """Random bytes and random frames on Execute and Session end the stream with OK or
    INVALID_ARGUMENT, every server frame parses, and the server serves after each example."""
    if method == "Session" and isinstance(opening, pb.ClientFrame) and opening.HasField("start"):
        opening = pb.ClientFrame(open_session=pb.OpenSession())
    sent = ([] if opening is None else [opening]) + frames
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fuzz_server.port}") as channel:
        rpc = channel.stream_stream(f"/codemode.v1.Executor/{method}")
        # Written by grpc from an iterator: a write the server's end of the stream cuts short
        # does not replace the server's status with a local one.
        frames_sent = iter([_encode(frame) for frame in sent])
        call = rpc(frames_sent, metadata=_auth(fuzz_server), timeout=20)
        replies: list[bytes] = []
        debug = ""
        try:
            while (reply := await call.read()) is not grpc.aio.EOF:
                replies.append(reply)
            code, details = await call.code(), await call.details()
        except grpc.aio.AioRpcError as exc:
            code, details, debug = exc.code(), exc.details() or "", exc.debug_error_string()
    clean = code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT) or (
        # A fuzzed ttl_seconds: the session expired (the server's status, not our deadline).
        code == grpc.StatusCode.DEADLINE_EXCEEDED and "session" in details
    )
    if code == grpc.StatusCode.INTERNAL and "SendMessageOperation" in debug:
        # The client's own status: grpc failed to send a frame after the server had ended
        # the stream, and reports that instead of the server's status (a race in the client).
        clean = details == "Internal error from Core"
    event(f"{method} {code.name}")
    assert clean, (code, details, sent)
    for reply in replies:
        assert pb.ServerFrame.FromString(reply).WhichOneof("frame") is not None
    assert fuzz_server.proc.poll() is None, "the server died"
    await assert_serving(fuzz_server)
