"""Every default of the SDK and the service, in one place."""

from __future__ import annotations

DEFAULT_EXECUTOR_URL = "http://localhost:8001"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8001
#: Service: the metrics endpoint is unauthenticated, so it binds loopback unless told otherwise.
DEFAULT_METRICS_HOST = "127.0.0.1"

#: Client: default wall-clock limit of one execution, seconds.
EXECUTION_TIMEOUT_S = 30.0
#: Client: how long to wait for a connection before giving up, seconds.
CONNECT_TIMEOUT_S = 5.0
#: An address that keeps refusing connections this long is reported at once, not retried.
REFUSED_GRACE_S = 0.8
#: Client: the gRPC deadline sits this far above the execution timeout, seconds.
DEADLINE_MARGIN_S = 5.0
#: Client: a cancelled execution waits at most this long to tell the executor, seconds.
CANCEL_NOTICE_S = 0.1
#: Client: one tool call may take this long, seconds.
TOOL_TIMEOUT_S = 30.0
#: Client: attempts after the first one, for failures where nothing can have run.
MAX_RETRIES = 3
RETRY_BACKOFF_BASE_S = 0.1
RETRY_BACKOFF_MAX_S = 2.0
#: Largest program accepted, in characters (client) and bytes (service).
MAX_CODE_LENGTH = 1_000_000
#: Largest gRPC message either side accepts.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Service: admission.
MAX_CONCURRENT_EXECUTIONS = 16
MAX_QUEUED_EXECUTIONS = 64
QUEUE_TIMEOUT_S = 10.0
SHUTDOWN_GRACE_S = 10.0
MAX_EXECUTION_TIMEOUT_S = 300.0

# Service: sessions (a sandbox kept between executions).
MAX_SESSIONS = 16
SESSION_TTL_S = 600.0
MAX_SESSION_TTL_S = 3600.0
SESSION_IDLE_TIMEOUT_S = 300.0

# Service: per-execution limits (a request may only lower them).
CPU_SECONDS = 30.0
MEMORY_BYTES = 512 * 1024 * 1024
MAX_PROCESSES = 32
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_OPEN_FILES = 64
MAX_OUTPUT_BYTES = 1024 * 1024
MAX_RESULT_BYTES = 4 * 1024 * 1024
TMPFS_BYTES = 16 * 1024 * 1024
MAX_INPUT_BYTES = 64 * 1024 * 1024
MAX_OUTPUT_FILES_BYTES = 64 * 1024 * 1024
#: Files travel in chunks of this size, both ways.
FILE_CHUNK_BYTES = 1024 * 1024
