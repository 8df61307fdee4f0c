"""The names both ends of the wire must agree on, besides the messages of ``codemode.proto``.

gRPC metadata keys, and the error types Codemode itself reports (defined with the guest,
which sets some of them and can import nothing of the package; re-exported here for the SDK).
"""

from codemode.executor.guest.outcomes import ErrorType

#: Request metadata: ``Bearer <key>``.
AUTHORIZATION = "authorization"
#: Request metadata: the caller's correlation id, echoed in the result and every log line.
CORRELATION_ID = "x-correlation-id"
#: Request metadata: the W3C trace context of the client's execution span (OpenTelemetry,
#: when the application traces); the executor's spans join that trace.
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
#: Trailer of a refusal after which the client may retry: the program did not start.
NOT_STARTED_TRAILER = "x-codemode-not-started"
#: Input files one execution may declare at most.
MAX_INPUT_FILES = 1000


def file_name_problem(name: object) -> str | None:
    """Why ``name`` cannot name an input or output file (one path component), or None."""
    if not isinstance(name, str):
        return f"file names must be str, not {type(name).__name__}"
    if name in ("", ".", ".."):
        return f"{name!r} is not a file name"
    if "/" in name or "\x00" in name:
        return f"file name {name!r} must be one path component (no '/')"
    if len(name.encode()) > 255:
        return f"file name {name[:40]!r}... is longer than 255 bytes"
    return None


__all__ = [
    "AUTHORIZATION",
    "CORRELATION_ID",
    "MAX_INPUT_FILES",
    "NOT_STARTED_TRAILER",
    "TRACEPARENT",
    "TRACESTATE",
    "ErrorType",
    "file_name_problem",
]
