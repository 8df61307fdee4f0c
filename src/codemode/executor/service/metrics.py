"""The executor's Prometheus metrics, and the HTTP endpoint that serves them.

Off unless ``metrics_port`` is set: the servicer, the sessions and the streams then hold
``None`` and record nothing. Each server has a registry of its own, never the process-wide
one, so two servers in one process (tests, the embedded executor) keep apart.

Events are recorded where they happen, on the event loop: one counter or histogram update,
under prometheus_client's own lock. What others already count (executions running, sessions
open, the sandbox pools) is read when Prometheus scrapes, by :class:`_Sampled`, so the
sandbox needs no import of the service. Scrapes are served by prometheus_client's threaded
HTTP server; the collector only reads ints and lengths that the event loop writes.

Labels stay bounded whatever programs and applications send: ``error_type`` is one of
:class:`ErrorType`, a builtin exception's name, :data:`PROGRAM_EXCEPTION` for a class the
program defined, or :data:`EXECUTOR_ERROR`; tool names are not labels (the application picks
them, and a client may declare new ones with every execution). ``tenant`` is a key id from
the operator's config (``default`` for ``api_key`` or no authentication).
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from codemode.config.executor import DEFAULT_TENANT
from codemode.executor.run.outcome import RunOutcome
from codemode.executor.sandbox import SandboxBackend
from codemode.wire.names import ErrorType

__all__ = [
    "EXECUTOR_ERROR",
    "PROGRAM_EXCEPTION",
    "ExecutorMetrics",
    "MetricsEndpoint",
    "MetricsUnavailable",
    "error_label",
    "serve_metrics",
]

#: ``error_type`` of an execution the executor itself failed to run (the client gets INTERNAL).
EXECUTOR_ERROR = "ExecutorError"
#: ``error_type`` of a program's own exception whose class is not a builtin one.
PROGRAM_EXCEPTION = "ProgramException"

_BOUNDED = frozenset(e.value for e in ErrorType) | frozenset(
    name
    for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException)
)
# Executions run from milliseconds to max_execution_timeout (300 s by default).
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Most executions do not queue (0 s); the queue gives up at queue_timeout (10 s by default).
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_TOOL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

ToolOutcome = Literal["ok", "error", "abandoned"]
Refusal = Literal["overloaded", "shutting_down", "tenant_concurrency", "tenant_rate"]
_REFUSALS: tuple[Refusal, ...] = (
    "overloaded",
    "shutting_down",
    "tenant_concurrency",
    "tenant_rate",
)


def error_label(error_type: str) -> str:
    """The ``error_type`` label for an outcome's error type: itself when it is bounded."""
    return error_type if error_type in _BOUNDED else PROGRAM_EXCEPTION


class MetricsUnavailable(RuntimeError):
    """The metrics endpoint could not be started (its address is taken or invalid)."""


class ExecutorMetrics:
    """One server's metrics; its methods are what the servicer, sessions and streams record."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self._executions = Counter(
            "codemode_executions",
            "Executions that ended, by outcome, error type and tenant (API key id).",
            ["outcome", "error_type", "tenant"],
            registry=registry,
        )
        self._duration = Histogram(
            "codemode_execution_duration_seconds",
            "Wall time of an execution that ended with a result, from taking its sandbox to "
            "its outcome.",
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self._queue_wait = Histogram(
            "codemode_queue_wait_seconds",
            "Time an execution waited for an execution slot (0 when one was free).",
            buckets=_QUEUE_BUCKETS,
            registry=registry,
        )
        self._refused = Counter(
            "codemode_executions_refused",
            "Executions refused before they started (the client may retry them), by reason "
            "and tenant (API key id).",
            ["reason", "tenant"],
            registry=registry,
        )
        self._tool_calls = Counter(
            "codemode_tool_calls",
            "Tool calls relayed to the application, by how they ended: ok, error (the tool "
            "failed or the application went away), abandoned (the execution ended first).",
            ["outcome"],
            registry=registry,
        )
        self._tool_duration = Histogram(
            "codemode_tool_call_duration_seconds",
            "Time from writing a tool_call frame to reading its answer.",
            buckets=_TOOL_BUCKETS,
            registry=registry,
        )
        for outcome in ("ok", "error", "abandoned"):
            self._tool_calls.labels(outcome=outcome)
        ProcessCollector(registry=registry)
        #: Executions between start and outcome now (Execute and sessions alike).
        self.in_flight = 0

    def add_tenants(self, tenants: Iterable[str]) -> None:
        """Show each refusal reason of ``tenants`` at 0 before it first happens."""
        for tenant in tenants:
            for reason in _REFUSALS:
                self._refused.labels(reason=reason, tenant=tenant)

    def watch(self, backend: SandboxBackend, sessions_open: Callable[[], int]) -> None:
        """Read ``backend``'s pools, ``sessions_open()`` and :attr:`in_flight` at each scrape."""
        self.registry.register(_Sampled(self, backend, sessions_open))

    async def measured(
        self, execution: Awaitable[RunOutcome], tenant: str = DEFAULT_TENANT
    ) -> RunOutcome:
        """Await ``execution`` of ``tenant``, counting it in flight meanwhile and how it ended.

        A ``RunOutcome`` counts by its error type, with its duration; ``OSError`` or
        ``RuntimeError`` (the sandbox could not be started or driven) as ``ExecutorError``;
        cancellation (the stream went away) as ``Cancelled``. A broken client is not counted.
        """
        self.in_flight += 1
        try:
            outcome = await execution
        except asyncio.CancelledError:
            self._executions.labels("error", ErrorType.CANCELLED.value, tenant).inc()
            raise
        except (OSError, RuntimeError):
            self._executions.labels("error", EXECUTOR_ERROR, tenant).inc()
            raise
        finally:
            self.in_flight -= 1
        if outcome.success:
            self._executions.labels("ok", "", tenant).inc()
        else:
            self._executions.labels("error", error_label(outcome.error_type), tenant).inc()
        self._duration.observe(outcome.duration_ms / 1000)
        return outcome

    def admitted(self, waited: float) -> None:
        """An execution got its slot after ``waited`` seconds in the queue."""
        self._queue_wait.observe(waited)

    def refused(self, reason: Refusal, tenant: str = DEFAULT_TENANT) -> None:
        self._refused.labels(reason, tenant).inc()

    def tool_call(self, outcome: ToolOutcome, seconds: float | None) -> None:
        """A tool call ended; ``seconds`` from its frame to its answer (None: no answer)."""
        self._tool_calls.labels(outcome=outcome).inc()
        if seconds is not None:
            self._tool_duration.observe(seconds)


class _Sampled(Collector):
    """What is read at scrape time: executions in flight, sessions open, the sandbox pools."""

    def __init__(
        self, metrics: ExecutorMetrics, backend: SandboxBackend, sessions_open: Callable[[], int]
    ) -> None:
        self._metrics = metrics
        self._backend = backend
        self._sessions_open = sessions_open

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "codemode_executions_in_flight",
            "Executions started and not yet ended (in sessions too).",
            value=self._metrics.in_flight,
        )
        yield GaugeMetricFamily(
            "codemode_sessions_open",
            "Sessions open, each holding a sandbox.",
            value=self._sessions_open(),
        )
        labels = ["zygote"]
        size = GaugeMetricFamily(
            "codemode_sandbox_pool_size",
            "Sandboxes started ahead of need and waiting, by kind (preloaded: with the "
            "operator's preloads imported).",
            labels=labels,
        )
        refills = CounterMetricFamily(
            "codemode_sandbox_refills",
            "Sandboxes started to refill the pool.",
            labels=labels,
        )
        failures = CounterMetricFamily(
            "codemode_sandbox_start_failures",
            "Sandboxes that failed to start, for the pool or for a request.",
            labels=labels,
        )
        for pool in self._backend.pool_stats():
            size.add_metric([pool.kind], pool.size)
            refills.add_metric([pool.kind], pool.refills)
            failures.add_metric([pool.kind], pool.start_failures)
        yield from (size, refills, failures)


@dataclass
class MetricsEndpoint:
    """A started metrics endpoint: where it listens, and how to stop it."""

    host: str
    port: int
    _httpd: WSGIServer

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    async def stop(self) -> None:
        """Stop serving (``shutdown`` waits for the serving thread's poll, up to 0.5 s)."""
        await asyncio.to_thread(self._httpd.shutdown)
        self._httpd.server_close()


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsEndpoint:
    """Serve ``registry`` at ``http://host:port/metrics`` (port 0: a free one) from a thread.

    Raises :class:`MetricsUnavailable` when the address cannot be bound.
    """
    try:
        httpd, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise MetricsUnavailable(f"cannot serve metrics on {host}:{port}: {exc}") from None
    return MetricsEndpoint(host, httpd.server_port, httpd)
