"""Turning an ``executor_url`` into a gRPC channel."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import grpc
import grpc.aio

from codemode.config import ClientConfig
from codemode.config._defaults import MAX_MESSAGE_BYTES

_BASE_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # Fail fast on a dead address instead of backing off for up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def target_for(url: str) -> tuple[str, bool]:
    """The gRPC target string for ``url``, and whether it needs TLS.

    ``http://h:p`` → ``h:p``; ``https://h:p`` → ``h:p`` over TLS; ``unix:///p`` as is;
    ``dns:///name:port`` as is; ``http://a:p,http://b:p`` → ``ipv4:a:p,b:p`` (IP addresses only).
    """
    parts = [p.strip() for p in url.split(",") if p.strip()]
    if len(parts) > 1:
        schemes = {urlsplit(p).scheme for p in parts}
        if len(schemes) != 1 or not schemes <= {"http", "https"}:
            raise ValueError("a list of executors must all be http:// or all https:// addresses")
        hosts = [urlsplit(p).netloc for p in parts]
        return "ipv4:" + ",".join(hosts), schemes == {"https"}
    split = urlsplit(parts[0])
    if split.scheme in ("http", "https"):
        if not split.port:
            raise ValueError(f"executor_url {url!r} needs a port, e.g. http://localhost:8001")
        return split.netloc, split.scheme == "https"
    return parts[0], False


def open_channel(config: ClientConfig) -> grpc.aio.Channel:
    """A new channel to the configured executor(s); round robin when there are several."""
    target, tls = target_for(config.executor_url)
    options = list(_BASE_OPTIONS)
    if target.startswith(("ipv4:", "dns:")):
        options.append(("grpc.lb_policy_name", "round_robin"))
    if not tls:
        return grpc.aio.insecure_channel(target, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(config.tls_ca_file),
        private_key=_read(config.tls_key_file),
        certificate_chain=_read(config.tls_cert_file),
    )
    return grpc.aio.secure_channel(target, credentials, options=options)


def _read(path: Path | None) -> bytes | None:
    return None if path is None else path.read_bytes()
