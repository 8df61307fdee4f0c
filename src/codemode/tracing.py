"""OpenTelemetry traces of executions, on both sides of the wire (the ``otel`` extra).

The client makes ``codemode.execution``, a child of the caller's current span, and one
``codemode.tool_call`` child per tool call the application answers; it sends the execution's
W3C trace context (``traceparent``, ``tracestate``; never baggage) in the call's metadata. The
executor's ``codemode.executor.execution`` joins that trace, its phases ``queue``, ``sandbox``
and ``run`` as children, one after another.

Spans exist only when a tracer provider other than the API's default is set (by the
application, or by ``codemode serve`` from ``OTEL_*``); otherwise every entry point returns
None, and until something imports ``opentelemetry`` this module imports none of it. Attributes
are names, counts, sizes and error types: code, arguments, results, context, config, output
and error messages may hold secrets and never become attributes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from codemode._version import __version__
from codemode.wire.names import TRACEPARENT, TRACESTATE

if TYPE_CHECKING:
    from contextvars import Token

    from opentelemetry.context import Context
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.trace import Span, Tracer

logger = logging.getLogger("codemode")

#: ``opentelemetry.trace``, once something imported it.
_api: Any = None
#: The tracer, with the provider it came from: reused while that provider is the global one.
_cached: tuple[object, Tracer] | None = None
_w3c: TextMapPropagator | None = None

# Attribute names. Values are names, counts, sizes and outcomes only.
CORRELATION_ID = "codemode.correlation_id"
SESSION_ID = "codemode.session_id"
CODE_BYTES = "codemode.code.bytes"
TOOLS_DECLARED = "codemode.tools.declared"
TIMEOUT_S = "codemode.timeout_s"
ATTEMPTS = "codemode.attempts"
FAILOVERS = "codemode.failovers"
OUTCOME = "codemode.outcome"
TOOL_CALLS = "codemode.tool_calls"
REPLAYED_TOOL_CALLS = "codemode.replayed_tool_calls"
TOOL_NAME = "codemode.tool.name"
ARGUMENT_BYTES = "codemode.tool.argument_bytes"
RESULT_BYTES = "codemode.tool.result_bytes"
ERROR_TYPE = "error.type"  # the semantic conventions' name


class _Named(Protocol):
    @property
    def name(self) -> str: ...


def _declared(tools: Iterable[_Named]) -> int:
    """How many of ``tools`` (the start frame's) are the application's, Codemode's own aside."""
    return sum(1 for spec in tools if not spec.name.startswith("_codemode_"))


def tracer() -> Tracer | None:
    """Codemode's tracer, or None when opentelemetry is missing or no provider is set.

    Only code that imported ``opentelemetry.trace`` can have set a provider: until something
    has, this imports nothing and answers None.
    """
    global _api, _cached
    api = _api
    if api is None:
        api = sys.modules.get("opentelemetry.trace")
        if api is None:
            return None
        _api = api
    provider = api.get_tracer_provider()
    cached = _cached
    if cached is not None and cached[0] is provider:
        return cached[1]
    if isinstance(provider, api.ProxyTracerProvider | api.NoOpTracerProvider):
        return None
    found: Tracer = provider.get_tracer("codemode", __version__)
    _cached = (provider, found)
    return found


def _propagator() -> TextMapPropagator:
    global _w3c
    if _w3c is None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        _w3c = TraceContextTextMapPropagator()
    return _w3c


def _inject(context: Context | None) -> tuple[tuple[str, str], ...]:
    carrier: dict[str, str] = {}
    _propagator().inject(carrier, context=context)
    return tuple(carrier.items())


def current_metadata() -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying the current span's trace context; empty when tracing is off."""
    if tracer() is None:
        return ()
    return _inject(None)


def _fail(span: Span, error_type: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute(ERROR_TYPE, error_type)
    span.set_status(Status(StatusCode.ERROR, error_type))  # the type: a message may hold values


# The client ------------------------------------------------------------------------------


def start_execution(
    correlation_id: str, code: str, tools: Iterable[_Named], *, session_id: str | None = None
) -> ExecutionSpan | None:
    """The span of one execution (``code``, declaring ``tools``: the start frame's), a child
    of the current span; None when tracing is off."""
    found = tracer()
    if found is None:
        return None
    attributes: dict[str, str | int] = {
        CORRELATION_ID: correlation_id,
        CODE_BYTES: len(code.encode()),
        TOOLS_DECLARED: _declared(tools),
    }
    if session_id is not None:
        attributes[SESSION_ID] = session_id
    return ExecutionSpan(found, attributes)


class ExecutionSpan:
    """``codemode.execution``: one execution across its attempts, the parent of its tool calls.

    Tool calls run in tasks of their own, so their parent is passed explicitly, never taken
    from the current context; :attr:`metadata` carries it to the executor.
    """

    def __init__(self, tracer: Tracer, attributes: Mapping[str, str | int]) -> None:
        from opentelemetry import trace

        self._tracer = tracer
        self._span = tracer.start_span(
            "codemode.execution", kind=trace.SpanKind.CLIENT, attributes=attributes
        )
        self._context = trace.set_span_in_context(self._span)
        #: ``traceparent`` (and ``tracestate``) for the call's metadata.
        self.metadata = _inject(self._context)
        self._attempts = 0
        self._failovers = 0
        self._settled = False

    def attempt(self) -> None:
        """A stream is being opened for this execution."""
        self._attempts += 1

    def retry(self, error_type: str, delay: float) -> None:
        """The attempt failed where nothing ran; another follows in ``delay`` seconds."""
        self._span.add_event(
            "codemode.retry", {ERROR_TYPE: error_type, "codemode.retry.delay_s": delay}
        )

    def failover(self, error_type: str) -> None:
        """The executor was lost mid-execution; the program runs again elsewhere, replayed."""
        self._failovers += 1
        self._span.add_event("codemode.failover", {ERROR_TYPE: error_type})

    def tool_call(self, name: str, argument_bytes: int) -> ToolCallSpan:
        """A child span for one tool call; use it as ``with`` in the task that answers it."""
        from opentelemetry import trace

        span = self._tracer.start_span(
            "codemode.tool_call",
            context=self._context,
            kind=trace.SpanKind.INTERNAL,
            attributes={TOOL_NAME: name, ARGUMENT_BYTES: argument_bytes},
        )
        return ToolCallSpan(span)

    def finished(
        self,
        *,
        success: bool,
        error_type: str | None,
        tool_calls: int,
        replayed: int = 0,
        paused: bool = False,
    ) -> None:
        """The execution's result arrived (or it paused for an approval)."""
        span = self._span
        span.set_attribute(TOOL_CALLS, tool_calls)
        span.set_attribute(REPLAYED_TOOL_CALLS, replayed)
        if paused:
            span.set_attribute(OUTCOME, "paused")
        elif success:
            span.set_attribute(OUTCOME, "ok")
        else:
            span.set_attribute(OUTCOME, "error")
            _fail(span, error_type or "Error")
        self._settled = True

    def failed(self, exc: BaseException) -> None:
        """No result: the client raised ``exc``, was cancelled, or its caller left."""
        if self._settled:
            return
        self._settled = True
        if isinstance(exc, GeneratorExit | asyncio.CancelledError):
            self._span.set_attribute(OUTCOME, "cancelled")
        else:
            self._span.set_attribute(OUTCOME, "failed")
            _fail(self._span, type(exc).__name__)

    def end(self) -> None:
        self._span.set_attribute(ATTEMPTS, self._attempts)
        self._span.set_attribute(FAILOVERS, self._failovers)
        self._span.end()


class ToolCallSpan:
    """``codemode.tool_call``: current in its task while the tool runs, so that the tool's own
    spans are its children; ended when the ``with`` block leaves."""

    def __init__(self, span: Span) -> None:
        self._span = span
        self._token: Token[Context] | None = None
        self._answered = False

    def __enter__(self) -> ToolCallSpan:
        from opentelemetry import context, trace

        self._token = context.attach(trace.set_span_in_context(self._span))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        from opentelemetry import context

        if self._token is not None:
            context.detach(self._token)
        if exc is not None and not self._answered:
            if isinstance(exc, asyncio.CancelledError):
                self._span.set_attribute(OUTCOME, "cancelled")
            else:
                self._span.set_attribute(OUTCOME, "failed")
                _fail(self._span, type(exc).__name__)
        self._span.end()

    def answered(self, result_bytes: int, error_type: str | None) -> None:
        """The answer going back to the program: a value of ``result_bytes``, or an error."""
        self._answered = True
        self._span.set_attribute(RESULT_BYTES, result_bytes)
        if error_type:
            self._span.set_attribute(OUTCOME, "error")
            _fail(self._span, error_type)
        else:
            self._span.set_attribute(OUTCOME, "ok")

    def paused(self) -> None:
        """The call waits for the application's approval; the execution pauses without it."""
        self._answered = True
        self._span.set_attribute(OUTCOME, "paused")


# The executor ----------------------------------------------------------------------------


def start_rpc(name: str, metadata: Iterable[tuple[str, Any]] | None) -> ExecutorSpan | None:
    """The executor's span ``name`` for one RPC, a child of the trace context the client sent
    in ``metadata`` (a root span without one); None when tracing is off."""
    found = tracer()
    if found is None:
        return None
    carrier = {key: value for key, value in metadata or () if key in (TRACEPARENT, TRACESTATE)}
    return ExecutorSpan(found, name, _propagator().extract(carrier))


class ExecutorSpan:
    """One RPC's span on the executor and its phases, one child open at a time."""

    def __init__(self, tracer: Tracer, name: str, parent: Context) -> None:
        from opentelemetry import trace

        self._tracer = tracer
        self._span = tracer.start_span(name, context=parent, kind=trace.SpanKind.SERVER)
        self._context = trace.set_span_in_context(self._span)
        self._phase: Span | None = None
        self._settled = False

    def describe(
        self, correlation_id: str, code: str = "", tools: Iterable[_Named] = (), timeout: float = 0
    ) -> None:
        """The request's identity and sizes (an execution's; a session has only its id)."""
        self._span.set_attribute(CORRELATION_ID, correlation_id)
        if code:
            self._span.set_attribute(CODE_BYTES, len(code.encode()))
            self._span.set_attribute(TOOLS_DECLARED, _declared(tools))
            self._span.set_attribute(TIMEOUT_S, timeout)

    def phase(self, name: str) -> None:
        """End the phase running now and start ``codemode.executor.<name>``."""
        if self._phase is not None:
            self._phase.end()
        self._phase = self._tracer.start_span(f"codemode.executor.{name}", context=self._context)

    def finished(self, success: bool, error_type: str, tool_calls: int) -> None:
        """The program's outcome is known: the running phase ends."""
        if self._phase is not None:
            self._phase.end()
            self._phase = None
        self._settled = True
        self._span.set_attribute(TOOL_CALLS, tool_calls)
        if success:
            self._span.set_attribute(OUTCOME, "ok")
        else:
            self._span.set_attribute(OUTCOME, "error")
            _fail(self._span, error_type or "Error")

    def refused(self, reason: str) -> None:
        """Not run: refused for ``reason`` (``overloaded``)."""
        self._settled = True
        self._span.set_attribute(OUTCOME, "refused")
        _fail(self._span, reason)

    def end(self, exc: BaseException | None = None, status: str | None = None) -> None:
        """End the phase and the span; ``exc`` ended the RPC, with gRPC ``status`` if known."""
        if self._phase is not None:
            self._phase.end()
        if exc is not None and not self._settled:
            if isinstance(exc, asyncio.CancelledError):
                self._span.set_attribute(OUTCOME, "cancelled")
            else:
                self._span.set_attribute(OUTCOME, "failed")
                _fail(self._span, status or type(exc).__name__)
        self._span.end()


def configure_from_env(environ: Mapping[str, str] = os.environ) -> Callable[[], None] | None:
    """Set up the SDK's tracer provider as ``OTEL_TRACES_EXPORTER`` says; its shutdown, or None.

    Nothing happens when a provider is already set (the operator's own set-up, or
    ``opentelemetry-instrument``), when the variable is unset or ``none``, or when
    ``OTEL_SDK_DISABLED`` is true. ``console`` writes one JSON object per span and line to
    stderr (stdout carries the service's ready lines); other names are the SDK's exporter
    entry points (``otlp``, ``otlp_proto_http``, …), configured by their own ``OTEL_*``
    variables. Spans are batched (``OTEL_BSP_*``); the resource reads ``OTEL_SERVICE_NAME``
    and ``OTEL_RESOURCE_ATTRIBUTES``, ``service.name`` defaulting to ``codemode-executor``.
    """
    names = [n.strip() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not names or names == ["none"] or environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    if tracer() is not None:
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
    except ImportError:
        logger.warning(
            "OTEL_TRACES_EXPORTER is set but opentelemetry-sdk is not installed: no traces; "
            "pip install 'codemode[otel]'"
        )
        return None
    exporters: list[SpanExporter] = []
    for name in names:
        exporter = _exporter(name, environ)
        if exporter is None:
            logger.warning("unknown OTEL_TRACES_EXPORTER %r: its spans are not exported", name)
        else:
            exporters.append(exporter)
    if not exporters:
        return None
    attributes = {} if environ.get("OTEL_SERVICE_NAME") else {"service.name": "codemode-executor"}
    provider = TracerProvider(resource=Resource.create(attributes))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    logging.getLogger("codemode.executor").info("traces exported", extra={"exporters": names})
    return provider.shutdown


def _exporter(name: str, environ: Mapping[str, str]) -> Any:
    """The exporter ``name`` stands for, or None when nothing provides it."""
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(
            out=sys.stderr, formatter=lambda span: span.to_json(indent=None) + "\n"
        )
    if name == "otlp":
        protocol = environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        )
        name = "otlp_proto_http" if protocol.startswith("http") else "otlp_proto_grpc"
    from importlib.metadata import entry_points

    for point in entry_points(group="opentelemetry_traces_exporter", name=name):
        return point.load()()
    return None
