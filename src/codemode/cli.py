"""The ``codemode`` command: ``serve``, ``exec``, ``mcp``, ``doctor`` and ``hash-key``."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

from codemode.config import ClientConfig, ConfigError, ExecutorConfig


def _serve(args: argparse.Namespace) -> int:
    from codemode.executor.sandbox.factory import IsolationUnavailable, make_backend
    from codemode.executor.sandbox.runtime import SandboxUnavailable
    from codemode.executor.service.metrics import MetricsUnavailable
    from codemode.executor.service.server import RunningServer, serve_forever
    from codemode.logs import configure_logging

    overrides: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "insecure_no_auth": True if args.insecure_no_auth else None,
        "isolation": args.isolation,
        "max_concurrent_executions": args.max_concurrent,
        "log_level": args.log_level,
        "log_format": args.log_format,
        "sandbox_venv": args.sandbox_venv,
        "preload_modules": args.preload,
        "preload_warmup": args.preload_warmup,
        "metrics_port": args.metrics_port,
        "metrics_host": args.metrics_host,
    }

    def reload() -> ExecutorConfig:
        # The same sources as at start: the flags, the environment, the file read again.
        return ExecutorConfig.load(args.config, **overrides)

    try:
        config = reload()
    except ConfigError as exc:
        print(f"codemode serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    try:
        backend = make_backend(config)
    except IsolationUnavailable as exc:
        print(f"codemode serve: refusing to start: {exc}", file=sys.stderr)
        return 3
    if not config.tenant_keys():
        print(
            "codemode serve: WARNING: --insecure-no-auth: anyone who reaches the port runs code",
            file=sys.stderr,
        )

    def ready(running: RunningServer) -> None:
        # Machine-readable lines so that scripts and tests can find ephemeral ports.
        port = running.port
        where = config.host if config.host.startswith("unix:") else f"{config.host}:{port}"
        print(f"codemode serve: listening on {where}", flush=True)
        if running.metrics is not None:
            print(f"codemode serve: metrics on {running.metrics.url}", flush=True)

    try:
        asyncio.run(serve_forever(config, backend, on_ready=ready, reload=reload))
    except (SandboxUnavailable, MetricsUnavailable) as exc:
        # Found at start: a bad sandbox venv, a failing preload, a metrics port in use.
        print(f"codemode serve: refusing to start: {exc}", file=sys.stderr)
        return 3
    return 0


@asynccontextmanager
async def _embedded_executor(
    command: str, sandbox_venv: str | None = None, preload: str | None = None
) -> AsyncIterator[ClientConfig]:
    """An executor started in this process for the occasion; yields the config to reach it."""
    from codemode.executor.sandbox.factory import IsolationUnavailable, make_backend
    from codemode.executor.sandbox.process import ProcessBackend
    from codemode.executor.service.server import start_server

    key = secrets.token_urlsafe(24)
    server_config = ExecutorConfig.load(
        host="127.0.0.1",
        port=0,
        api_key=key,
        sandbox_venv=sandbox_venv,
        preload_modules=preload,
    )
    try:
        backend = make_backend(server_config)
    except IsolationUnavailable as exc:
        print(
            f"codemode {command}: no sandbox here; running programs as plain processes:\n{exc}",
            file=sys.stderr,
        )
        backend = ProcessBackend()
    running = await start_server(server_config, backend)
    try:
        yield ClientConfig.load(
            executor_url=f"http://127.0.0.1:{running.port}", executor_api_key=key
        )
    finally:
        # With a grace, even with no call left, the server's goodbye (GOAWAY) carries no error;
        # with none it cancels "all calls" and the client's closing connection logs that.
        await running.stop(1.0)


async def _exec_embedded(code: str, timeout: float | None) -> Any:
    """Run ``code`` on an executor started in this process for the occasion."""
    from codemode.core.codemode import Codemode

    async with (
        _embedded_executor("exec") as client_config,
        Codemode.from_client_config(client_config) as codemode,
    ):
        return await codemode.run_async(code, execution_timeout=timeout)


async def _exec_remote(code: str, timeout: float | None) -> Any:
    from codemode.core.codemode import Codemode

    async with Codemode.from_env() as codemode:
        return await codemode.run_async(code, execution_timeout=timeout)


def _exec(args: argparse.Namespace) -> int:
    from codemode.core.errors import ExecutorClientError
    from codemode.executor.sandbox.runtime import SandboxUnavailable

    if args.command_code is not None:
        code = args.command_code
    elif args.file is not None:
        code = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    else:
        print("codemode exec: give a FILE or -c CODE", file=sys.stderr)
        return 2
    runner = _exec_remote if os.environ.get("CODEMODE_EXECUTOR_URL") else _exec_embedded
    try:
        result = asyncio.run(runner(code, args.timeout))
    except (ExecutorClientError, ConfigError, SandboxUnavailable) as exc:
        print(f"codemode exec: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    if not result.success:
        print(result.traceback or f"{result.error_type}: {result.error}", file=sys.stderr, end="")
        if result.traceback and not result.traceback.endswith("\n"):
            print(file=sys.stderr)
        return 1
    if result.result is not None:
        print(result.result)
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from codemode.executor.sandbox.hostcheck import check_host, contents_checks, isolation_ready

    try:
        # Only the sandbox's settings are read: doctor serves nothing, so it needs no key.
        config = ExecutorConfig.load(
            args.config,
            insecure_no_auth=True,
            sandbox_venv=args.sandbox_venv,
            preload_modules=args.preload,
        )
    except ConfigError as exc:
        print(f"codemode doctor: {exc}", file=sys.stderr)
        return 2
    host = check_host()
    isolated = isolation_ready(host)
    venv = str(config.sandbox_venv) if config.sandbox_venv is not None else None
    contents, packages = contents_checks(venv, config.preload_modules, sandboxed=isolated)
    checks = host + contents
    width = max(len(c.name) for c in checks)
    for check in checks:
        mark = "ok  " if check.ok else ("MISS" if check.required else "warn")
        print(f"[{mark}] {check.name:<{width}}  {check.detail}")
        if not check.ok and check.fix:
            print(f"       {'':<{width}}  fix: {check.fix}")
    print()
    if packages:
        print("packages: " + ", ".join(f"{p.name} {p.version}" for p in packages))
    if config.preload_modules:
        print("preload:  " + ", ".join(config.preload_modules))
    if not isolated:
        print(
            "isolation: NOT available; `codemode serve` refuses to start (or --isolation=process)"
        )
        return 1
    if any(c.required and not c.ok for c in contents):
        print("sandbox contents: `codemode serve` refuses to start with these settings")
        return 1
    print(
        "isolation: available; `codemode serve` uses the fork server (--isolation=forkserver, "
        "the default) or one bwrap sandbox per execution (--isolation=bwrap)"
    )
    return 0


async def _mcp_main(args: argparse.Namespace, token: str | None) -> None:
    from codemode.core.codemode import Codemode
    from codemode.mcp.server import build_server, load_tools_option, serve_http, serve_stdio

    registry, mcp_servers = load_tools_option(args.tools) if args.tools else (None, None)
    url = args.executor_url or os.environ.get("CODEMODE_EXECUTOR_URL")
    async with AsyncExitStack() as stack:
        if url:
            client_config = ClientConfig.load(executor_url=url)
        else:
            client_config = await stack.enter_async_context(
                _embedded_executor("mcp", args.sandbox_venv, args.preload)
            )
        codemode = await stack.enter_async_context(
            Codemode.from_client_config(client_config, registry)
        )
        if mcp_servers is not None:
            from codemode.mcp.tools import from_mcp_config

            await stack.enter_async_context(from_mcp_config(codemode.registry, mcp_servers))
        server = build_server(
            codemode, sessions=not args.no_sessions, session_ttl=args.session_ttl, host=args.host
        )
        if args.transport == "stdio":
            await serve_stdio(server)
        else:

            def ready(where: str) -> None:
                print(f"codemode mcp: listening on {where}", file=sys.stderr, flush=True)

            await serve_http(server, host=args.host, port=args.port, token=token, on_ready=ready)


def _mcp(args: argparse.Namespace) -> int:
    from codemode.core.errors import ExecutorClientError
    from codemode.executor.sandbox.runtime import SandboxUnavailable
    from codemode.logs import configure_logging

    token = os.environ.get("CODEMODE_MCP_TOKEN") or None
    if args.transport == "streamable-http" and token is None and not args.insecure_no_auth:
        print(
            "codemode mcp: streamable-http needs a bearer token: set CODEMODE_MCP_TOKEN (e.g. "
            "to the output of `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`), "
            "or pass --insecure-no-auth to serve without one",
            file=sys.stderr,
        )
        return 2
    if args.insecure_no_auth:
        token = None
    # Logs go to stderr: over stdio, stdout carries the protocol.
    configure_logging(args.log_level or "WARNING", "text")
    try:
        asyncio.run(_mcp_main(args, token))
    except ImportError as exc:
        print(f"codemode mcp: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, ConfigError, ExecutorClientError) as exc:
        print(f"codemode mcp: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except SandboxUnavailable as exc:
        print(f"codemode mcp: refusing to start: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        pass
    return 0


def _hash_key(args: argparse.Namespace) -> int:
    from codemode.config.executor import hash_api_key

    key = sys.stdin.readline().rstrip("\r\n")
    if len(key) < 8:
        print(
            "codemode hash-key: give the key on stdin, at least 8 characters (make one with "
            "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`)",
            file=sys.stderr,
        )
        return 2
    print(hash_api_key(key))
    return 0


def _add_sandbox_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sandbox-venv",
        metavar="DIR",
        help="virtualenv (made with the sandbox's Python) whose packages programs may import",
    )
    parser.add_argument(
        "--preload",
        metavar="MOD[,MOD...]",
        help="modules imported once before guests are forked, e.g. pandas,numpy",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codemode", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the executor service")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 8001; 0 picks a free one)")
    serve.add_argument("--config", help="YAML file of ExecutorConfig settings")
    serve.add_argument("--insecure-no-auth", action="store_true", help="serve without an API key")
    serve.add_argument(
        "--isolation",
        choices=["auto", "forkserver", "bwrap", "process"],
        help="sandbox backend (default auto: forkserver, or refuse to start)",
    )
    serve.add_argument("--max-concurrent", type=int, help="executions running at once")
    _add_sandbox_arguments(serve)
    serve.add_argument(
        "--preload-warmup",
        metavar="CODE",
        help="Python the zygote runs once after the preloads, and each pooled guest again "
        "before it takes a request, e.g. a first DataFrame",
    )
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING …")
    serve.add_argument("--log-format", choices=["json", "text"])
    serve.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics at /metrics on this port (default: none; 0 picks one)",
    )
    serve.add_argument(
        "--metrics-host",
        help="address the metrics endpoint binds (default 127.0.0.1; it has no authentication)",
    )
    serve.set_defaults(func=_serve)

    run = sub.add_parser(
        "exec",
        help="run a program and print its result",
        description="Runs against CODEMODE_EXECUTOR_URL (with CODEMODE_EXECUTOR_API_KEY) when set, "
        "else against an executor started in this process for the occasion.",
    )
    run.add_argument("file", nargs="?", help="program file, or - for stdin")
    run.add_argument("-c", dest="command_code", metavar="CODE", help="program text")
    run.add_argument("--timeout", type=float, help="execution timeout, seconds")
    run.set_defaults(func=_exec)

    mcp = sub.add_parser(
        "mcp",
        help="serve run_python to MCP clients (Claude Code, Cursor, IDEs)",
        description="Serves run_python, search_tools, describe_tool and reset_python over MCP. "
        "Runs programs on --executor-url (or CODEMODE_EXECUTOR_URL, with "
        "CODEMODE_EXECUTOR_API_KEY), else on an executor started in this process.",
    )
    mcp.add_argument("--transport", choices=["stdio", "streamable-http"], default="stdio")
    mcp.add_argument("--host", default="127.0.0.1", help="streamable-http: address to bind")
    mcp.add_argument("--port", type=int, default=8002, help="streamable-http: port (0: any)")
    mcp.add_argument(
        "--tools",
        metavar="MODULE:OBJECT|FILE.json",
        help="the tools programs may call: a ComponentRegistry, a list of @tool functions, "
        "or an mcpServers JSON file whose servers' tools become Codemode tools",
    )
    mcp.add_argument("--executor-url", help="an executor to run programs on")
    mcp.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="streamable-http without the CODEMODE_MCP_TOKEN bearer token",
    )
    mcp.add_argument(
        "--no-sessions",
        action="store_true",
        help="every run_python starts in a fresh sandbox (no state between calls)",
    )
    mcp.add_argument("--session-ttl", type=float, help="seconds an MCP session's sandbox lives")
    _add_sandbox_arguments(mcp)
    mcp.add_argument("--log-level", help="DEBUG, INFO, WARNING … (logs go to stderr)")
    mcp.set_defaults(func=_mcp)

    doctor = sub.add_parser(
        "doctor",
        help="report what isolation this host enforces, and what the sandbox can import",
    )
    doctor.add_argument("--config", help="YAML file of ExecutorConfig settings")
    _add_sandbox_arguments(doctor)
    doctor.set_defaults(func=_doctor)

    hash_key = sub.add_parser(
        "hash-key",
        help="print the sha256:<hex> form of the API key read from stdin, for api_keys",
        description="Reads one key from stdin (its first line) and prints the hash that an "
        "api_keys entry of the executor's config holds: api_keys: {alice: sha256:...}.",
    )
    hash_key.set_defaults(func=_hash_key)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
