"""What tracing adds to one execution, on each side, in microseconds.

Runs the tracing calls one execution makes (client: the execution span, two tool-call spans,
the trace context for the metadata; executor: its span and three phases) in three set-ups,
each in a process of its own: opentelemetry not importable, imported without a tracer
provider, and the SDK's provider with a batch processor (whose exporter drops the spans).

    .venv/bin/python bench/traces.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
mode = sys.argv[1]
if mode == "hidden":
    sys.modules["opentelemetry"] = None
if mode == "no-provider":
    import opentelemetry.trace
if mode == "sdk":
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Drop(SpanExporter):
        def export(self, spans):
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    trace.set_tracer_provider(provider)
from codemode import tracing

CODE = "result = 2 + 2\n" * 20
from types import SimpleNamespace
TOOLS = (SimpleNamespace(name="a"), SimpleNamespace(name="b"))

def client():
    span = tracing.start_execution("cid", CODE, TOOLS)
    if span is None:
        return
    span.attempt()
    _ = span.metadata
    for name in ("a", "b"):
        with span.tool_call(name, 20) as call:
            call.answered(10, None)
    span.finished(success=True, error_type=None, tool_calls=2)
    span.end()

def executor():
    span = tracing.start_rpc("codemode.executor.execution", (("traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),))
    if span is None:
        return
    span.describe("cid", CODE, TOOLS, 30.0)
    for phase in ("queue", "sandbox", "run"):
        span.phase(phase)
    span.finished(True, "", 2)
    span.end()

out = {}
for name, fn in (("client", client), ("executor", executor)):
    for _ in range(2000):
        fn()
    n = 20000 if mode != "sdk" else 5000
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    out[name] = round(best * 1e6, 3)
print(json.dumps(out))
"""


def main() -> None:
    started = time.perf_counter()
    rows = {}
    for mode in ("hidden", "no-provider", "sdk"):
        done = subprocess.run(
            [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True
        )
        rows[mode] = json.loads(done.stdout)
    print(f"{'set-up':<14}{'client µs/execution':>22}{'executor µs/execution':>24}")
    for mode, row in rows.items():
        print(f"{mode:<14}{row['client']:>22}{row['executor']:>24}")
    print(f"({time.perf_counter() - started:.1f}s)")


if __name__ == "__main__":
    main()
