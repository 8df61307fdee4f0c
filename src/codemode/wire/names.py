"""The names both ends of the wire must agree on, besides the messages of ``codemode.proto``.

gRPC metadata keys, and the error types Codemode itself reports (defined with the guest,
which sets some of them and can import nothing of the package; re-exported here for the SDK).
"""

from codemode.executor.guest.outcomes import ErrorType

#: Request metadata: ``Bearer <key>``.
AUTHORIZATION = "authorization"
#: Request metadata: the caller's correlation id, echoed in the result and every log line.
CORRELATION_ID = "x-correlation-id"
#: Trailer of a refusal after which the client may retry: the program did not start.
NOT_STARTED_TRAILER = "x-codemode-not-started"

__all__ = ["AUTHORIZATION", "CORRELATION_ID", "NOT_STARTED_TRAILER", "ErrorType"]
