"""The API key check every call but the health check passes first."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from codemode.wire.names import AUTHORIZATION

logger = logging.getLogger("codemode.executor")

#: How long a refused call may take to deliver its first message, seconds.
REJECT_READ_TIMEOUT_S = 1.0
_UNAUTHENTICATED_PATHS_PREFIX = "/grpc.health.v1.Health/"


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """Rejects every call without ``authorization: Bearer <key>`` before its handler runs.

    The key is compared in constant time. Health checks are exempt so that load balancers and
    Kubernetes probes, which cannot send headers, work; they reveal only serving status.
    """

    def __init__(self, api_key: str) -> None:
        self._expected = f"Bearer {api_key}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.startswith(_UNAUTHENTICATED_PATHS_PREFIX):
            return await continuation(handler_call_details)
        presented = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == AUTHORIZATION:
                presented = value.encode() if isinstance(value, str) else value
        if hmac.compare_digest(presented, self._expected):
            return await continuation(handler_call_details)
        logger.warning("rejected a call with a wrong or missing API key", extra={"method": method})
        return _REJECT


async def _reject(
    requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
) -> None:
    # Take the first message before refusing: a refusal racing the client's first write makes
    # grpc reset the stream, and the client then sees INTERNAL instead of UNAUTHENTICATED.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(anext(aiter(requests)), REJECT_READ_TIMEOUT_S)
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key (authorization: Bearer <key>)"
    )


_REJECT = grpc.stream_stream_rpc_method_handler(_reject)
