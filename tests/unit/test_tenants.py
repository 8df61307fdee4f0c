"""Tenants in the test process: per-key admission quotas, finding a key's tenant, reloading."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import pytest

from codemode.config import ConfigError, ExecutorConfig
from codemode.config.executor import hash_api_key
from codemode.executor.service.admission import Admission, Overloaded, Quota
from codemode.executor.service.auth import Tenants, reload_keys

KEY_A = "alpha-key-0123456789abcdef"
KEY_B = "beta-key-0123456789abcdef"
KEY_C = "gamma-key-0123456789abcdef"


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def held(admission: Admission, quota: Quota | None) -> AsyncIterator[asyncio.Event]:
    """Hold a slot of ``quota`` in a task until the yielded event is set."""
    release, entered = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with admission.slot(quota):
            entered.set()
            await release.wait()

    task = asyncio.create_task(hold())
    await asyncio.wait_for(entered.wait(), 2.0)
    try:
        yield release
    finally:
        release.set()
        await task


# ------------------------------------------------------------------------------------------
# Admission quotas


async def test_a_key_at_its_concurrency_is_refused_while_another_key_runs() -> None:
    """With max_concurrent 1, a key's second execution is refused at once (its reason
    ``tenant_concurrency``) while another key's is admitted; freed, the key runs again."""
    admission = Admission(limit=4, max_queued=4, queue_timeout=5.0)
    alpha, beta = Quota("alpha", max_concurrent=1), Quota("beta", max_concurrent=1)
    async with held(admission, alpha):
        assert admission.held("alpha") == 1
        with pytest.raises(Overloaded, match="'alpha' has 1 executions running or queued") as info:
            async with admission.slot(alpha):
                pass
        assert info.value.reason == "tenant_concurrency"
        async with admission.slot(beta) as waited:
            assert waited == 0.0
            assert admission.held("beta") == 1
    assert admission.held("alpha") == 0
    async with admission.slot(alpha):
        assert admission.running == 1


async def test_a_key_over_its_quota_takes_no_place_in_the_shared_queue() -> None:
    """A key refused by its own quota does not queue: the one queue place stays for another
    key, which gets the slot when it frees."""
    admission = Admission(limit=1, max_queued=1, queue_timeout=5.0)
    alpha, beta = Quota("alpha", max_concurrent=1), Quota("beta")
    async with held(admission, alpha) as release:
        with pytest.raises(Overloaded) as info:
            async with admission.slot(alpha):
                pass
        assert info.value.reason == "tenant_concurrency"
        admitted = asyncio.Event()

        async def beta_runs() -> None:
            async with admission.slot(beta):
                admitted.set()

        waiting = asyncio.create_task(beta_runs())
        await asyncio.sleep(0.05)
        assert not admitted.is_set()  # queued in the place alpha's refusal did not take
        release.set()
        await asyncio.wait_for(waiting, 2.0)
    assert admitted.is_set()


async def test_a_key_queued_for_the_executor_counts_against_its_concurrency() -> None:
    """An execution waiting in the shared queue holds its key's share: the key's next one is
    refused, not queued behind it."""
    admission = Admission(limit=1, max_queued=4, queue_timeout=5.0)
    alpha = Quota("alpha", max_concurrent=1)
    async with held(admission, None) as release:
        queued = asyncio.create_task(_enter(admission, alpha))
        await asyncio.sleep(0.05)
        assert admission.held("alpha") == 1
        with pytest.raises(Overloaded) as info:
            async with admission.slot(alpha):
                pass
        assert info.value.reason == "tenant_concurrency"
        release.set()
        await asyncio.wait_for(queued, 2.0)
    assert admission.held("alpha") == 0


async def _enter(admission: Admission, quota: Quota) -> None:
    async with admission.slot(quota):
        pass


async def test_a_key_past_its_rate_waits_for_the_window() -> None:
    """With per_minute 2, the third start within 60 s is refused (``tenant_rate``, saying
    when the next may start); 60 s after the first, one more may start."""
    clock = Clock()
    admission = Admission(limit=4, max_queued=0, queue_timeout=1.0, clock=clock)
    alpha = Quota("alpha", per_minute=2)
    await _enter(admission, alpha)
    clock.now += 20
    await _enter(admission, alpha)
    clock.now += 10
    with pytest.raises(Overloaded, match=r"next may start in 30\.0s") as info:
        await _enter(admission, alpha)
    assert info.value.reason == "tenant_rate"
    assert "max_executions_per_minute" in str(info.value)
    await _enter(admission, Quota("beta", per_minute=2))  # another key's window is its own
    clock.now += 30  # 60 s after the first start
    await _enter(admission, alpha)
    with pytest.raises(Overloaded):
        await _enter(admission, alpha)


async def test_a_start_the_executor_refused_does_not_count_against_the_rate() -> None:
    """Refused by the executor's own queue, an execution leaves its key's rate and share as
    they were."""
    admission = Admission(limit=1, max_queued=0, queue_timeout=1.0, clock=Clock())
    alpha = Quota("alpha", max_concurrent=1, per_minute=1)
    async with held(admission, None):
        with pytest.raises(Overloaded) as info:
            await _enter(admission, alpha)
        assert info.value.reason == "overloaded"
    assert admission.held("alpha") == 0
    await _enter(admission, alpha)  # the refused attempt did not use the one start a minute


# ------------------------------------------------------------------------------------------
# Finding a key's tenant


def two_keys(**extra: object) -> ExecutorConfig:
    return ExecutorConfig.load(
        api_keys={
            "alpha": {"key_hash": hash_api_key(KEY_A), "max_execution_timeout": 2},
            "beta": {
                "key_hash": hash_api_key(KEY_B),
                "max_concurrent_executions": 3,
                "max_executions_per_minute": 60,
                "max_sessions": 1,
                "limits": {"memory_bytes": 64 << 20, "cpu_seconds": 1000},
            },
        },
        **extra,
    )


def test_a_key_finds_its_tenant_with_its_quota_and_ceilings() -> None:
    """Each key finds its own tenant: its quota, and the service's limits lowered by its
    own (a key's value above the service's has no effect)."""
    config = two_keys()
    tenants = Tenants(config)
    assert tenants.auth_required
    alpha = tenants.identify(f"Bearer {KEY_A}")
    beta = tenants.identify(f"Bearer {KEY_B}".encode())
    assert alpha is not None
    assert beta is not None
    assert (alpha.id, alpha.max_execution_timeout, alpha.limits) == ("alpha", 2.0, config.limits)
    assert alpha.quota == Quota("alpha")
    assert beta.quota == Quota("beta", max_concurrent=3, per_minute=60)
    assert beta.max_execution_timeout == config.max_execution_timeout
    assert beta.limits.memory_bytes == 64 << 20
    assert beta.limits.cpu_seconds == config.limits.cpu_seconds
    assert beta.max_sessions == 1
    assert tenants.from_metadata([("x-correlation-id", "c"), ("authorization", f"Bearer {KEY_B}")])
    assert tenants.ids == ["alpha", "beta"]


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        KEY_A,
        f"bearer {KEY_A}",
        f"Bearer {KEY_A} ",
        f"Bearer {hash_api_key(KEY_A)}",
        "Bearer " + hash_api_key(KEY_A).removeprefix("sha256:"),
        f"Bearer {KEY_C}",
    ],
    ids=["none", "empty", "no-bearer", "lower-case", "trailing-space", "hash", "hex", "other"],
)
def test_anything_but_a_listed_key_finds_no_tenant(authorization: str | None) -> None:
    """A missing header, a malformed one, another key or the stored hash itself is no one."""
    assert Tenants(two_keys()).identify(authorization) is None


def test_without_keys_every_call_is_the_default_tenant() -> None:
    """insecure-no-auth: no key is needed, and every call is the tenant 'default'."""
    config = ExecutorConfig.load(insecure_no_auth=True, limits={"cpu_seconds": 5})
    tenants = Tenants(config)
    assert not tenants.auth_required
    for authorization in (None, "Bearer anything"):
        tenant = tenants.identify(authorization)
        assert tenant is not None
        assert (tenant.id, tenant.limits.cpu_seconds) == ("default", 5.0)


# ------------------------------------------------------------------------------------------
# Reloading


def test_reload_replaces_the_keys_and_keeps_the_started_limits() -> None:
    """A reload adds, removes and changes keys at once; the service's own limits around
    them stay those of the start."""
    started = two_keys(limits={"cpu_seconds": 7})
    tenants = Tenants(started)
    new = ExecutorConfig.load(
        limits={"cpu_seconds": 1},
        api_keys={
            "beta": {"key_hash": hash_api_key(KEY_B), "max_concurrent_executions": 1},
            "gamma": hash_api_key(KEY_C),
        },
    )
    changes = tenants.reload(new)
    assert changes == {"added": ["gamma"], "removed": ["alpha"], "changed": ["beta"]}
    assert tenants.identify(f"Bearer {KEY_A}") is None
    gamma = tenants.identify(f"Bearer {KEY_C}")
    beta = tenants.identify(f"Bearer {KEY_B}")
    assert gamma is not None
    assert beta is not None
    assert gamma.limits.cpu_seconds == 7.0
    assert beta.quota.max_concurrent == 1


def test_reload_cannot_turn_authentication_on_or_off() -> None:
    """Keys for an executor started without them, or none for one started with them, are
    refused: that needs a restart."""
    open_tenants = Tenants(ExecutorConfig.load(insecure_no_auth=True))
    with pytest.raises(ValueError, match="started without authentication"):
        open_tenants.reload(two_keys())
    tenants = Tenants(two_keys())
    with pytest.raises(ValueError, match="authentication stays on until a restart"):
        tenants.reload(ExecutorConfig.load(insecure_no_auth=True))
    assert tenants.identify(f"Bearer {KEY_A}") is not None


def test_reload_keys_keeps_the_old_keys_when_the_file_is_bad(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A configuration that does not load leaves the keys as they were and logs an error;
    a good one logs the change, and names the settings that need a restart."""
    started = two_keys()
    tenants = Tenants(started)

    def bad() -> ExecutorConfig:
        raise ConfigError("invalid Codemode configuration: api_keys.x.key_hash: ...")

    with caplog.at_level(logging.INFO, logger="codemode.executor"):
        assert not reload_keys(tenants, started, bad)
        assert tenants.identify(f"Bearer {KEY_A}") is not None
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert [r.getMessage() for r in errors] == [
            "API keys not reloaded; the old keys stay: invalid Codemode configuration: "
            "api_keys.x.key_hash: ..."
        ]
        caplog.clear()
        assert reload_keys(tenants, started, lambda: two_keys(max_concurrent_executions=3))
    reloaded, restart = caplog.records
    assert reloaded.getMessage().startswith("API keys reloaded")
    assert reloaded.__dict__["tenants"] == ["alpha", "beta"]
    assert restart.levelno == logging.WARNING
    assert restart.__dict__["settings"] == ["max_concurrent_executions"]
