"""Building, running and stopping the executor's gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from codemode.config import ExecutorConfig
from codemode.config._defaults import MAX_MESSAGE_BYTES
from codemode.executor.run.execution import wait_reaped
from codemode.executor.sandbox import SandboxBackend
from codemode.executor.service.auth import AuthInterceptor, Tenants, reload_keys
from codemode.executor.service.metrics import ExecutorMetrics, MetricsEndpoint, serve_metrics
from codemode.executor.service.servicer import ExecutorServicer
from codemode.tracing import configure_from_env
from codemode.wire import codemode_pb2_grpc as pb_grpc
from codemode.wire import grpc_io

logger = logging.getLogger("codemode.executor")

SERVICE_NAME = "codemode.v1.Executor"


@dataclass
class RunningServer:
    """A started server: its bound port, its metrics endpoint (if any), what :meth:`stop`
    needs."""

    server: grpc.aio.Server
    port: int
    servicer: ExecutorServicer
    health: HealthServicer
    backend: SandboxBackend
    metrics: MetricsEndpoint | None = None

    async def stop(self, grace: float) -> None:
        """Stop accepting, let running executions finish for ``grace`` s, kill the rest."""
        self.servicer.stop_accepting()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wait_reaped(), timeout=5.0)
        await self.backend.close()
        if self.metrics is not None:  # last: a scrape during the shutdown still gets an answer
            await self.metrics.stop()


async def start_server(config: ExecutorConfig, backend: SandboxBackend) -> RunningServer:
    """Start serving on ``config.host:config.port`` (port 0 picks a free one), and metrics on
    ``config.metrics_host:config.metrics_port`` when that is set.

    Raises :class:`~.metrics.MetricsUnavailable` when the metrics port cannot be bound.
    """
    tenants = Tenants(config)
    interceptors = []
    if tenants.auth_required:
        interceptors.append(AuthInterceptor(tenants))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=None,
    )
    metrics = ExecutorMetrics() if config.metrics_port is not None else None
    servicer = ExecutorServicer(config, backend, metrics, tenants)
    pb_grpc.add_ExecutorServicer_to_server(servicer, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = f"{config.host}:{config.port}"
    if config.host.startswith("unix:"):
        address = config.host
    if config.tls_cert_file is not None and config.tls_key_file is not None:
        credentials = grpc.ssl_server_credentials(
            [(config.tls_key_file.read_bytes(), config.tls_cert_file.read_bytes())],
            root_certificates=config.tls_client_ca_file.read_bytes()
            if config.tls_client_ca_file
            else None,
            require_client_auth=config.tls_client_ca_file is not None,
        )
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    endpoint = None
    if metrics is not None and config.metrics_port is not None:
        endpoint = serve_metrics(metrics.registry, config.metrics_host, config.metrics_port)
    try:
        await backend.start()
        await server.start()
    except BaseException:
        if endpoint is not None:
            await endpoint.stop()
        raise
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, port, servicer, health, backend, endpoint)


async def serve_forever(
    config: ExecutorConfig,
    backend: SandboxBackend,
    *,
    on_ready: Callable[[RunningServer], None] | None = None,
    reload: Callable[[], ExecutorConfig] | None = None,
) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully within ``config.shutdown_grace``.

    On SIGHUP, ``reload()`` (the configuration read again) gives the API keys from then on.
    """
    # The standard OTEL_* variables, when the operator set them (extra ``otel``).
    shutdown_traces = configure_from_env()
    running = await start_server(config, backend)
    # What start-up loaded lives as long as the service: keep the cyclic collector off it, or
    # every full collection walks it all, stalling whatever requests are running.
    gc.collect()
    gc.freeze()
    logger.info(
        "executor serving",
        extra={
            "address": f"{config.host}:{running.port}",
            "isolation": backend.describe(),
            "auth": running.servicer.tenants.auth_required,
            "tenants": running.servicer.tenants.ids,
            "grpc_io": "poller" if grpc_io.APPLIED else "grpc's default",
        },
    )
    if running.metrics is not None:
        logger.info("metrics serving", extra={"url": running.metrics.url})
    if reload is not None:  # before the ready line, so a SIGHUP after it never kills
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGHUP, reload_keys, running.servicer.tenants, config, reload
        )
    if on_ready is not None:
        on_ready(running)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("shutting down", extra={"grace_s": config.shutdown_grace})
    await running.stop(config.shutdown_grace)
    if shutdown_traces is not None:  # exports the spans still batched
        await asyncio.to_thread(shutdown_traces)
    logger.info("executor stopped")
