"""The API key check every call but the health check passes first, and the tenant it finds.

Keys are held as SHA-256 digests (``api_keys``, and ``api_key`` as the tenant ``default``);
a presented key is hashed and compared with every digest in constant time. Each key is a
tenant, whose :class:`Tenant` carries its admission quota and its ceilings. On SIGHUP
:func:`reload_keys` replaces the whole table at once: later calls see the new keys, calls
already admitted run on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from codemode.config import ExecutorConfig, LimitsConfig
from codemode.config.executor import DEFAULT_TENANT, ApiKeyConfig
from codemode.executor.service.admission import Quota
from codemode.wire.names import AUTHORIZATION

logger = logging.getLogger("codemode.executor")

#: How long a refused call may take to deliver its first message, seconds.
REJECT_READ_TIMEOUT_S = 1.0
_UNAUTHENTICATED_PATHS_PREFIX = "/grpc.health.v1.Health/"
_BEARER = b"Bearer "
#: Settings a reload takes; every other one needs a restart.
_RELOADED = frozenset({"api_key", "api_keys"})
UNAUTHENTICATED_MESSAGE = "missing or wrong API key (authorization: Bearer <key>)"


@dataclass(frozen=True, slots=True)
class Tenant:
    """Whose call this is (the key's id) and what its requests may use."""

    id: str
    quota: Quota
    #: The service's limits, lowered by the key's own: the most a request may ask for.
    limits: LimitsConfig
    max_execution_timeout: float
    #: Sessions of this key open at once; ``None``: only the service's ``max_sessions``.
    max_sessions: int | None = None


def make_tenant(key_id: str, key: ApiKeyConfig | None, config: ExecutorConfig) -> Tenant:
    """The tenant ``key_id`` with ``key``'s limits under ``config``'s (``None``: no own ones)."""
    if key is None:
        return Tenant(key_id, Quota(key_id), config.limits, config.max_execution_timeout)
    return Tenant(
        id=key_id,
        quota=Quota(key_id, key.max_concurrent_executions, key.max_executions_per_minute),
        limits=config.limits.lowered(key.limits),
        max_execution_timeout=min(
            config.max_execution_timeout, key.max_execution_timeout or math.inf
        ),
        max_sessions=key.max_sessions,
    )


class Tenants:
    """The keys this executor accepts, each with its tenant.

    Without any key (``--insecure-no-auth``) every call is the tenant ``default``. Whether
    keys are needed at all is fixed at start: a reload may change the keys, not that.
    """

    def __init__(self, config: ExecutorConfig) -> None:
        self._config = config
        keys = config.tenant_keys()
        self.auth_required = bool(keys)
        self._open = make_tenant(DEFAULT_TENANT, None, config)
        self._keys = keys
        self._table = self._build(keys)

    @property
    def ids(self) -> list[str]:
        """The tenant ids that have a key now, sorted."""
        return sorted(self._keys)

    def identify(self, authorization: str | bytes | None) -> Tenant | None:
        """The tenant of an ``authorization`` value (``Bearer <key>``), or None for none."""
        if not self.auth_required:
            return self._open
        if authorization is None:
            return None
        presented = authorization.encode() if isinstance(authorization, str) else authorization
        if not presented.startswith(_BEARER):
            return None
        digest = hashlib.sha256(presented[len(_BEARER) :]).digest()
        found = None
        for expected, tenant in self._table:  # every one, so the time says nothing of which
            if hmac.compare_digest(digest, expected):
                found = tenant
        return found

    def from_metadata(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Tenant | None:
        """The tenant of a call's metadata (its last ``authorization`` value), or None."""
        authorization: str | bytes | None = None
        for key, value in metadata or ():
            if key == AUTHORIZATION:
                authorization = value
        return self.identify(authorization)

    def reload(self, config: ExecutorConfig) -> dict[str, list[str]]:
        """Take ``config``'s keys (the limits around them stay those of the start); return the
        ids ``added``, ``removed`` and ``changed``.

        Raises ``ValueError`` when ``config`` would turn authentication on or off.
        """
        keys = config.tenant_keys()
        if bool(keys) != self.auth_required:
            raise ValueError(
                "the executor started without authentication; a restart with keys turns it on"
                if keys
                else "the config gives no API key; authentication stays on until a restart"
            )
        table = self._build(keys)
        old = self._keys
        self._keys, self._table = keys, table
        return {
            "added": sorted(keys.keys() - old.keys()),
            "removed": sorted(old.keys() - keys.keys()),
            "changed": sorted(k for k in keys.keys() & old.keys() if keys[k] != old[k]),
        }

    def _build(self, keys: dict[str, ApiKeyConfig]) -> tuple[tuple[bytes, Tenant], ...]:
        return tuple(
            (bytes.fromhex(key.key_hash.removeprefix("sha256:")), make_tenant(i, key, self._config))
            for i, key in keys.items()
        )


def reload_keys(
    tenants: Tenants, running: ExecutorConfig, load: Callable[[], ExecutorConfig]
) -> bool:
    """Read the configuration again (``load``) and take its API keys; whether that worked.

    Anything wrong with the file keeps the old keys, and is logged. Other settings take
    effect only at a restart; those that differ are named in a warning.
    """
    try:
        config = load()
        changes = tenants.reload(config)
    except (ValueError, OSError) as exc:  # ConfigError is a ValueError
        logger.error("API keys not reloaded; the old keys stay: %s", exc)
        return False
    logger.info(
        "API keys reloaded (only api_keys and api_key; other settings need a restart)",
        extra={"tenants": tenants.ids, **changes},
    )
    restart = sorted(
        name
        for name in type(running).model_fields
        if name not in _RELOADED and getattr(config, name) != getattr(running, name)
    )
    if restart:
        logger.warning(
            "the config file changes settings that take effect only at a restart",
            extra={"settings": restart},
        )
    return True


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """Rejects every call without ``authorization: Bearer <key>`` of a known tenant before its
    handler runs.

    Health checks are exempt so that load balancers and Kubernetes probes, which cannot send
    headers, work; they reveal only serving status.
    """

    def __init__(self, tenants: Tenants) -> None:
        self._tenants = tenants

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.startswith(_UNAUTHENTICATED_PATHS_PREFIX):
            return await continuation(handler_call_details)
        if self._tenants.from_metadata(handler_call_details.invocation_metadata) is not None:
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
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


_REJECT = grpc.stream_stream_rpc_method_handler(_reject)
