"""Third-party packages and an ordinary machine in the sandbox, against real ``codemode serve``.

The servers run with the test sandbox venv (numpy, pandas, tzdata: ``tests/sandbox_venv.py``)
and ``--preload pandas``: the fork server (the default) and the one-shot bwrap backend, which
is also given ``OPENBLAS_NUM_THREADS=4`` so that BLAS's own threads start under seccomp. Each
bad input of the issue is a test here: a missing or wrong-interpreter venv, a preload that
raises, a module that is not installed, a time zone that does not exist.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from codemode import Codemode
from codemode.config import ClientConfig
from codemode.executor.sandbox.environment import GUEST_HOME, GUEST_USER
from tests.helpers import REPO_ROOT, ServerProcess, ServerStartError, server_env, start_server
from tests.integration.conftest import Servers

MIB = 1 << 20
WARMUP = (
    "import pandas as pd\npd.DataFrame({'a': range(10)}).a.sum()\n"
    "pd.warm_runs = getattr(pd, 'warm_runs', 0) + 1"
)


@pytest.fixture(scope="session")
def pkg_server(servers: Servers, sandbox_venv: Path) -> ServerProcess:
    """The fork server with the sandbox venv and pandas preloaded and warmed up (a first
    DataFrame, and a mark the tests can see), default limits."""
    return servers.start(
        api_key=secrets.token_urlsafe(24),
        extra_args=[
            "--sandbox-venv",
            str(sandbox_venv),
            "--preload",
            "pandas",
            "--preload-warmup",
            WARMUP,
        ],
    )


@pytest.fixture(scope="session")
def pkg_bwrap_server(
    servers: Servers, sandbox_venv: Path, tmp_path_factory: pytest.TempPathFactory
) -> ServerProcess:
    """One bwrap sandbox per execution, numpy preloaded, four BLAS threads allowed."""
    config = tmp_path_factory.mktemp("pkg-bwrap") / "executor.yaml"
    config.write_text("sandbox_env:\n  OPENBLAS_NUM_THREADS: '4'\n")
    return servers.start(
        api_key=secrets.token_urlsafe(24),
        isolation="bwrap",
        extra_args=[
            "--sandbox-venv",
            str(sandbox_venv),
            "--preload",
            "numpy",
            "--config",
            str(config),
        ],
    )


async def _client(server: ServerProcess) -> Codemode:
    config = ClientConfig(executor_url=server.url, executor_api_key=server.api_key, max_retries=0)
    return Codemode.from_client_config(config)


@pytest.fixture
async def pkg(pkg_server: ServerProcess) -> AsyncIterator[Codemode]:
    async with await _client(pkg_server) as codemode:
        yield codemode


@pytest.fixture
async def pkg_bwrap(pkg_bwrap_server: ServerProcess) -> AsyncIterator[Codemode]:
    async with await _client(pkg_bwrap_server) as codemode:
        yield codemode


async def run(codemode: Codemode, code: str, **kwargs: Any) -> Any:
    """The program's decoded result; fails the test with the program's error otherwise."""
    result = await codemode.run_async(textwrap.dedent(code), **kwargs)
    assert result.success, f"{result.error_type}: {result.error}\n{result.traceback}"
    return result.value


# ------------------------------------------------------------------------------------------
# Packages


async def test_pandas_is_preloaded_and_numpy_imports(pkg: Codemode) -> None:
    """pandas is already imported when the program starts (the zygote preloaded it)."""
    got = await run(
        pkg,
        """
        import sys
        preloaded = "pandas" in sys.modules
        import numpy as np, pandas as pd
        frame = pd.DataFrame({"a": range(1000)})
        result = [preloaded, int(np.arange(10).sum()), int(frame.a.sum())]
        """,
    )
    assert got == [True, 45, 499500]


async def test_the_warmup_ran_in_the_zygote_and_again_in_the_guest(pkg: Codemode) -> None:
    """``--preload-warmup`` ran once before the fork and once more in the guest while it
    waited in the pool (its copy-on-write copies off the request's path)."""
    got = await run(pkg, "import pandas as pd\nresult = getattr(pd, 'warm_runs', 0)")
    assert got == 2


async def test_a_program_without_packages_runs_on_the_plain_zygote(pkg: Codemode) -> None:
    """A standard-library program gets a guest without the preloads (it forks and exits as
    cheaply as without them); a session, whose later programs are unknown, gets them."""
    code = "import sys\nresult = sorted(m for m in ('pandas', 'numpy') if m in sys.modules)\n"
    plain = await run(pkg, code)
    async with pkg.session() as session:
        in_session = json.loads(await session.execute_async(code) or "null")
    assert plain == []
    assert in_session == ["numpy", "pandas"]


async def test_dataframe_program(pkg: Codemode) -> None:
    """A program builds a DataFrame from a tool's rows and returns an aggregate."""

    def orders() -> list[dict[str, Any]]:
        return [{"region": r, "cents": c} for r, c in [("eu", 100), ("us", 250), ("eu", 50)]]

    pkg.registry.register_tool("orders", orders)
    got = await run(
        pkg,
        """
        import pandas as pd
        df = pd.DataFrame(tools.orders())
        result = df.groupby("region").cents.sum().to_dict()
        """,
    )
    assert got == {"eu": 150, "us": 250}


async def test_numpy_threads_and_mmap_under_seccomp(pkg: Codemode) -> None:
    """BLAS stays on one thread by default; mmap, memmap and numpy's maths work under seccomp."""
    got = await run(
        pkg,
        """
        import mmap, os
        import numpy as np
        a = np.random.default_rng(1).random((400, 400))
        b = a @ a.T
        m = np.memmap("/tmp/m.dat", dtype="float64", mode="w+", shape=(1 << 18,))
        m[:] = 1.0
        m.flush()
        anon = mmap.mmap(-1, 16 << 20)
        anon[:4] = b"abcd"
        result = [len(os.listdir("/proc/self/task")), float(m.sum()), anon[:4].decode(),
                  bool(np.allclose(b, b.T)), os.environ["OPENBLAS_NUM_THREADS"]]
        """,
    )
    assert got == [1, float(1 << 18), "abcd", True, "1"]


async def test_blas_threads_start_when_configured(pkg_bwrap: Codemode) -> None:
    """With OPENBLAS_NUM_THREADS=4 (sandbox_env), BLAS's own threads start in a bwrap sandbox."""
    got = await run(
        pkg_bwrap,
        """
        import os, sys
        preloaded = "numpy" in sys.modules
        import numpy as np
        a = np.random.default_rng(1).random((600, 600))
        (a @ a).sum()
        result = [preloaded, len(os.listdir("/proc/self/task")), os.environ["OPENBLAS_NUM_THREADS"]]
        """,
    )
    assert got[0] is True
    assert got[2] == "4"
    assert 1 < got[1] <= 4, got


async def test_pandas_in_the_one_shot_sandbox(pkg_bwrap: Codemode) -> None:
    """The one-shot backend binds the same venv: pandas imports and works there too."""
    got = await run(
        pkg_bwrap,
        "import pandas as pd\nresult = int(pd.Series([1, 2, 3]).sum())",
    )
    assert got == 6


async def test_module_not_installed_names_what_is(pkg: Codemode) -> None:
    """Importing a module the venv lacks says so and lists what is installed."""
    result = await pkg.run_async("import polars")
    assert result.error_type == "ModuleNotFoundError"
    assert "'polars' is not installed in the sandbox" in (result.error or "")
    assert "numpy" in (result.error or "")
    assert "pandas" in (result.error or "")
    assert "import polars" in (result.traceback or "")


async def test_info_and_describe_tools_list_packages(pkg: Codemode, sandbox_venv: Path) -> None:
    """Info lists the venv's packages with versions and the preloads; describe_tools names them."""
    from importlib.metadata import version

    info = await pkg.client.info_async()
    versions = {p["name"].lower(): p["version"] for p in info["packages"]}
    assert versions["pandas"] == version("pandas")
    assert versions["numpy"] == version("numpy")
    assert info["preload_modules"] == ["pandas"]
    text = pkg.describe_tools(packages=[p["name"] for p in info["packages"]])
    line = next(x for x in text.splitlines() if "sandbox can import" in x)
    assert "numpy" in line
    assert "pandas" in line


def test_doctor_lists_packages_and_preloads(sandbox_venv: Path) -> None:
    """`codemode doctor --sandbox-venv DIR --preload pandas` checks both and lists the packages."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "codemode.cli",
            "doctor",
            "--sandbox-venv",
            str(sandbox_venv),
            "--preload",
            "pandas",
        ],
        capture_output=True,
        text=True,
        env=server_env(None),
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[ok  ] sandbox venv" in proc.stdout
    assert "[ok  ] preload" in proc.stdout
    assert "pandas imported in a sandbox" in proc.stdout
    packages = next(x for x in proc.stdout.splitlines() if x.startswith("packages: "))
    assert "numpy " in packages
    assert "pandas " in packages
    assert "preload:  pandas" in proc.stdout


# ------------------------------------------------------------------------------------------
# Memory: the cgroup counts real use, the address-space cap is only a backstop


async def test_idle_threads_do_not_eat_the_memory_limit(pkg: Codemode) -> None:
    """With 8 idle threads started, allocating 300 MiB works under the default 512 MiB."""
    got = await run(
        pkg,
        """
        import threading
        stop = threading.Event()
        threads = [threading.Thread(target=stop.wait) for _ in range(8)]
        for t in threads:
            t.start()
        block = bytearray(300 << 20)
        stop.set()
        result = len(block) >> 20
        """,
    )
    assert got == 300


async def test_thirty_threads_start_under_the_process_limit(pkg: Codemode) -> None:
    """30 threads start under the 32-process limit (address space no longer stops them)."""
    got = await run(
        pkg,
        """
        import threading
        stop = threading.Event()
        threads = [threading.Thread(target=stop.wait) for _ in range(30)]
        for t in threads:
            t.start()
        result = threading.active_count()
        stop.set()
        """,
    )
    assert got == 31


async def test_hundred_mib_dataframe_fits(pkg: Codemode) -> None:
    """A pandas program with a 100 MiB DataFrame runs within the default memory limit."""
    got = await run(
        pkg,
        """
        import numpy as np, pandas as pd
        df = pd.DataFrame(np.random.default_rng(0).random((1_310_720, 10)))
        result = [round(df.memory_usage(index=False).sum() / 2**20), round(float(df[0].mean()), 1)]
        """,
    )
    assert got == [100, 0.5]


@pytest.mark.parametrize(
    "code",
    [
        "x = bytearray(700 << 20)",
        "import numpy as np, pandas as pd\ndf = pd.DataFrame(np.ones((8_000_000, 10)))",
    ],
    ids=["bytearray", "dataframe"],
)
async def test_over_the_limit_is_memory_limit(pkg: Codemode, code: str) -> None:
    """A program over the memory limit still ends MemoryLimit, and the next one runs."""
    result = await pkg.run_async(code)
    assert result.error_type == "MemoryLimit", result
    assert await pkg.execute_async("result = 2 + 2") == "4"


async def test_a_lowered_memory_limit_still_holds(pkg_server: ServerProcess) -> None:
    """A request asking for less memory than the cgroup allows is held to it (by RLIMIT_AS)."""
    config = ClientConfig(executor_url=pkg_server.url, executor_api_key=pkg_server.api_key)
    async with Codemode.from_client_config(config) as codemode:
        result = await codemode.client.execute_async(
            "x = bytearray(200 << 20)", limits={"memory_bytes": 64 * MIB}
        )
    assert result.error_type == "MemoryLimit", result


# ------------------------------------------------------------------------------------------
# An ordinary machine: time zones, a home, a user name


async def test_time_zones(pkg: Codemode) -> None:
    """zoneinfo finds Europe/Oslo; a zone that does not exist raises ZoneInfoNotFoundError."""
    got = await run(
        pkg,
        """
        import datetime, zoneinfo
        oslo = zoneinfo.ZoneInfo("Europe/Oslo")
        winter = datetime.datetime(2024, 1, 15, 12, tzinfo=oslo).utcoffset()
        summer = datetime.datetime(2024, 7, 15, 12, tzinfo=oslo).utcoffset()
        try:
            zoneinfo.ZoneInfo("Mars/Olympus_Mons")
            missing = "found"
        except zoneinfo.ZoneInfoNotFoundError:
            missing = "ZoneInfoNotFoundError"
        result = [winter.seconds // 3600, summer.seconds // 3600, missing]
        """,
    )
    assert got == [1, 2, "ZoneInfoNotFoundError"]
    result = await pkg.run_async("import zoneinfo\nzoneinfo.ZoneInfo('Nowhere/Atlantis')")
    assert result.error_type == "ZoneInfoNotFoundError", result


@pytest.fixture(params=["forkserver", "bwrap"])
async def either(
    request: pytest.FixtureRequest, pkg_server: ServerProcess, pkg_bwrap_server: ServerProcess
) -> AsyncIterator[Codemode]:
    """A client of each sandbox backend's server in turn."""
    server = pkg_server if request.param == "forkserver" else pkg_bwrap_server
    async with await _client(server) as codemode:
        yield codemode


async def test_home_and_user_name(either: Codemode) -> None:
    """HOME is a fresh writable home, the uid has a name, in both sandbox backends."""
    codemode = either
    code = """
        import getpass, os, pathlib, pwd
        entry = pwd.getpwuid(os.getuid())
        home = pathlib.Path.home()
        before = sorted(os.listdir(home))
        (home / ".config").mkdir()
        (home / ".config" / "x.txt").write_text("kept for this execution")
        result = [os.environ["HOME"], str(home), os.path.expanduser("~"), getpass.getuser(),
                  entry.pw_name, entry.pw_dir, os.environ["USER"], os.environ["LOGNAME"], before,
                  (home / ".config" / "x.txt").read_text()]
        """
    for _ in range(2):  # the second execution finds an empty home again
        got = await run(codemode, code)
        assert got == [
            GUEST_HOME,
            GUEST_HOME,
            GUEST_HOME,
            GUEST_USER,
            GUEST_USER,
            GUEST_HOME,
            GUEST_USER,
            GUEST_USER,
            [],
            "kept for this execution",
        ]


async def test_process_backend_honours_the_venv(servers: Servers, sandbox_venv: Path) -> None:
    """--isolation=process puts the venv on the guest's path too, with a home of its own."""
    server = servers.start(
        api_key=secrets.token_urlsafe(24),
        isolation="process",
        extra_args=["--sandbox-venv", str(sandbox_venv), "--preload", "pandas"],
    )
    try:
        async with await _client(server) as codemode:
            got = await run(
                codemode,
                "import os, pandas as pd\n"
                "result = [int(pd.Series([1, 2]).sum()), os.path.isdir(os.environ['HOME'])]",
            )
            info = await codemode.client.info_async()
        assert got == [3, True]
        assert any(p["name"] == "pandas" for p in info["packages"])
    finally:
        servers.stop(server)


def _tiny_venv(root: Path) -> Path:
    """A venv (no pip) whose site-packages holds one pure-Python distribution, ``tinypkg``,
    with a submodule that is only imported on first use."""
    subprocess.run(
        [_base_python(), "-m", "venv", "--without-pip", str(root)], check=True, timeout=60
    )
    site = next((root / "lib").glob("python*/site-packages"))
    package = site / "tinypkg"
    package.mkdir()
    (package / "__init__.py").write_text(
        "def later():\n    from tinypkg import lazy\n    return lazy.VALUE\n"
    )
    (package / "lazy.py").write_text("VALUE = 42\n")
    info = site / "tinypkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tinypkg\nVersion: 1.0\n")
    return root


def _base_python() -> str:
    candidate = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    return str(candidate) if candidate.exists() else os.path.realpath(sys.executable)


@pytest.mark.parametrize("isolation", ["auto", "bwrap"])
async def test_a_venv_under_tmp_is_seen_whole(servers: Servers, isolation: str) -> None:
    """A venv under the host's /tmp, which every guest covers with its own /tmp, is still
    importable, lazy submodules of a preloaded package included, at a sandbox path of its own."""
    root = Path(tempfile.mkdtemp(prefix="codemode-venv-", dir="/tmp"))
    try:
        venv = _tiny_venv(root / "venv")
        server = servers.start(
            api_key=secrets.token_urlsafe(24),
            isolation=isolation,
            extra_args=["--sandbox-venv", str(venv), "--preload", "tinypkg"],
        )
        try:
            async with await _client(server) as codemode:
                got = await run(
                    codemode, "import tinypkg\nresult = [tinypkg.later(), tinypkg.__file__]"
                )
                info = await codemode.client.info_async()
        finally:
            servers.stop(server)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert got == [42, "/codemode/site-packages/tinypkg/__init__.py"]
    assert {"name": "tinypkg", "version": "1.0"} in info["packages"]


# ------------------------------------------------------------------------------------------
# Bad input at start: each stops `codemode serve` with a message that says what to do


def _refused(*args: str, isolation: str = "auto") -> str:
    """``codemode serve ARGS`` must refuse to start; its stderr."""
    key = secrets.token_urlsafe(24)
    try:
        server = start_server(api_key=key, isolation=isolation, extra_args=list(args))
    except ServerStartError as exc:
        return str(exc)
    server.stop()
    pytest.fail(f"codemode serve {' '.join(args)} started")


def test_a_failing_warmup_is_refused(sandbox_venv: Path) -> None:
    """A ``--preload-warmup`` that raises stops the start with its traceback."""
    text = _refused(
        "--sandbox-venv",
        str(sandbox_venv),
        "--preload",
        "json",
        "--preload-warmup",
        "import json\njson.loads('{not json')",
        isolation="forkserver",
    )
    assert "preload_warmup failed" in text
    assert "JSONDecodeError" in text


def test_missing_venv_is_refused(tmp_path: Path) -> None:
    """A venv directory that does not exist stops the start, naming the command to make it."""
    missing = tmp_path / "nowhere"
    text = _refused("--sandbox-venv", str(missing))
    assert f"the sandbox venv {missing} does not exist" in text
    assert f"-m venv {missing}" in text


def test_wrong_interpreter_venv_is_refused(tmp_path: Path) -> None:
    """A venv made with another Python stops the start, naming the interpreter to use."""
    other = next(
        (
            p
            for p in (
                "/root/.pyenv/versions/3.12.1/bin/python3.12",
                "/usr/bin/python3.12",
                "/usr/bin/python3.13",
            )
            if os.access(p, os.X_OK)
        ),
        None,
    )
    venv = tmp_path / "other-venv"
    if other is not None:
        subprocess.run([other, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    else:  # no other interpreter here: a venv whose pyvenv.cfg names one
        (venv / "lib" / "python3.99" / "site-packages").mkdir(parents=True)
        (venv / "pyvenv.cfg").write_text("home = /usr/bin\nversion = 3.99.0\n")
    text = _refused("--sandbox-venv", str(venv))
    mine = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert f"but the sandbox runs Python {mine}" in text
    assert f"-m venv {venv}` (Python {mine})" in text


@pytest.mark.parametrize("isolation", ["auto", "bwrap"])
def test_preload_that_raises_stops_the_start(tmp_path: Path, isolation: str) -> None:
    """A preload whose import raises stops the start with the module's own error."""
    venv = tmp_path / "boom-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    (site / "boom.py").write_text("raise RuntimeError('boom at import time')\n")
    text = _refused("--sandbox-venv", str(venv), "--preload", "boom", isolation=isolation)
    assert "refusing to start" in text
    assert "RuntimeError: boom at import time" in text
    assert "preloading" in text


def test_preload_that_is_not_installed_stops_the_start(sandbox_venv: Path) -> None:
    """A preload the venv does not have stops the start with ModuleNotFoundError."""
    text = _refused("--sandbox-venv", str(sandbox_venv), "--preload", "pandas,polars")
    assert "ModuleNotFoundError: No module named 'polars'" in text
